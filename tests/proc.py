"""Processes the tests start: run one in its own process group and always reap the whole group
(engine children too); a free loopback port for a server they start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Sequence


def run_group(cmd: Sequence[str], *, timeout: float = 900, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit code, combined stdout+stderr); a timeout kills the group and raises."""
    p = subprocess.Popen(list(cmd), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    try:
        log, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
