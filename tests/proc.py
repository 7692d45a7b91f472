"""Run a command in its own process group and always reap the whole group (engine children too)."""

from __future__ import annotations

import os
import signal
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
