"""AMX tile state (tracekit/amx.py, docs/vllm-cpu.md "AMX hosts").

A process that runs vLLM's AMX kernels without having asked Linux for AMX tile state dies with
SIGILL; only a CPU with AMX can show that. These tests run on any x86 host: a fake cpuinfo
(TRACEKIT_TEST_CPUINFO) says whether the CPU "has" AMX, and every process that ran
``amx.request()`` appends what it did to TRACEKIT_TEST_AMX_LOG. On a host without AMX the
kernel refuses the request ("refused"); on an AMX host it grants it ("granted").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tracekit import amx
from tracekit.cli import cli

ASKED = ("granted", "refused")
REPO = Path(__file__).resolve().parents[1]


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    p.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 {flags}\n")
    return p


@pytest.fixture
def amx_env(tmp_path: Path) -> Any:
    """``amx_env(has_amx)`` → (env for a child process, its AMX log)."""

    def make(has_amx: bool) -> tuple[dict[str, str], Path]:
        log = tmp_path / f"amx-{has_amx}.jsonl"
        flags = "avx512_bf16 amx_bf16 amx_tile" if has_amx else "avx512_bf16"
        env = amx.child_env(dict(os.environ))
        env.update({amx.ENV_CPUINFO: str(_cpuinfo(tmp_path, flags)), amx.ENV_LOG: str(log)})
        return env, log

    return make


def _log(path: Path) -> dict[int, dict[str, Any]]:
    if not path.exists():
        return {}
    return {e["pid"]: e for e in map(json.loads, path.read_text().splitlines())}


def _py(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_cpu_flags_decide_whether_a_process_asks(amx_env: Any) -> None:
    for has_amx, want in ((True, ASKED), (False, ("not-needed",))):
        env, log = amx_env(has_amx)
        r = _py("import os; from tracekit import amx; print(os.getpid(), amx.state, amx.needed())", env)
        assert r.returncode == 0, r.stderr
        pid, state, needed = r.stdout.split()
        assert needed == str(has_amx) and state in want
        # sitecustomize asked at start-up, before the program ran, exactly once.
        assert list(_log(log)) == [int(pid)] and _log(log)[int(pid)]["state"] == state


def test_request_answers_like_torch_on_this_cpu() -> None:
    """The syscall tracekit makes is torch.cpu._init_amx()'s: same answer on the real CPU."""
    env = {k: v for k, v in os.environ.items() if k not in (amx.ENV_CPUINFO, amx.ENV_LOG)}
    r = _py("import torch; from tracekit import amx; print(amx.request(), torch.cpu._init_amx(), amx.permitted())", env)
    assert r.returncode == 0, r.stderr
    ours, torch_says, held = r.stdout.split()
    assert ours == torch_says == (held if held != "None" else "False"), r.stdout  # None: not Linux x86_64
    assert ours == "False" or amx.needed()


def test_engine_side_modules_ask_at_import_and_pass_it_on(amx_env: Any) -> None:
    """Without tracekit's start-up dir on PYTHONPATH, importing the code that builds engines
    (demo job, bench scripts) asks in this process and puts the dir first for its children."""
    env, _ = amx_env(True)
    env["PYTHONPATH"] = ""
    probe = "import os; from tracekit import amx; print(amx.state, os.environ['PYTHONPATH'].split(os.pathsep)[0])"
    bench = [f"import runpy; runpy.run_path({str(REPO / 'bench' / f)!r})" for f in ("record_overhead.py", "replay_throughput.py")]
    for code in ("import tracekit.demo.job", *bench):
        r = _py(f"{code}\n{probe}", env)
        assert r.returncode == 0, r.stderr
        state, first = r.stdout.split()[-2:]
        assert state in ASKED and first == amx.BOOT_DIR, (code, r.stdout)


def test_record_boot_asks_and_runs_the_users_sitecustomize_once(amx_env: Any, tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nopen(os.environ['USER_MARK'], 'a').write('x')\n")
    for has_amx in (True, False):
        env, log = amx_env(has_amx)
        mark = tmp_path / f"mark-{has_amx}"
        # Twice our dir (a `tracekit record` inside another): each copy chains forward, never back.
        env.update(USER_MARK=str(mark), PYTHONPATH=os.pathsep.join([amx.BOOT_DIR, amx.BOOT_DIR, str(user)]))
        r = subprocess.run([sys.executable, "-m", "tracekit.cli", "record", "--out", str(tmp_path / f"t{has_amx}"), "--",
                            sys.executable, "-c", "import os; print(os.getpid())"], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        job = _log(log)[int(r.stdout.split()[-1])]
        assert job["state"] in (ASKED if has_amx else ("not-needed",))
        assert mark.read_text() == "x" * len(_log(log))  # once per process: the CLI and the job


def test_doctor_says_when_this_host_needs_the_init(amx_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for has_amx in (True, False):
        env, _ = amx_env(has_amx)
        monkeypatch.setenv(amx.ENV_CPUINFO, env[amx.ENV_CPUINFO])
        r = CliRunner().invoke(cli, ["doctor"])
        assert r.exit_code == 0, r.output
        lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.output.splitlines())
        assert lines["cpu flag amx_tile"] == ("yes" if has_amx else "no")
        assert lines["needs AMX init"].startswith("yes" if has_amx else "no")
        assert (amx.BOOT_DIR in r.output) == has_amx  # the recipe, where it is needed


@pytest.mark.engine
def test_every_process_below_a_replay_asks(amx_env: Any, tiny_model: Path, engine_pool: Any, tmp_path: Path) -> None:
    """`tracekit replay` on the default multiprocess engine with a CPU that has AMX, started from a
    shell without tracekit's start-up dir: the replay worker and every Python process vLLM
    spawns below it asked for AMX tile state."""
    import psutil
    from test_replay import CPU_ARGS
    from test_replay_support import prompts, record_trace

    root = tmp_path / "t"
    record_trace(root, engine_pool(tiny_model), tiny_model, [
        {"version": 0, "tensors": None, "prompts": prompts(2, seed=5),
         "sampling": [{"temperature": 1.0, "seed": s, "max_tokens": 4} for s in (1, 2)]}], engine_args={**CPU_ARGS})
    env, log = amx_env(True)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONPATH="")
    proc = subprocess.Popen([sys.executable, "-m", "tracekit.cli", "replay", str(root), "--name", "amx", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: dict[int, tuple[int, str]] = {}  # pid -> (parent pid, command line) below the CLI
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            for c in psutil.Process(proc.pid).children(recursive=True):
                if c.pid not in seen:
                    seen[c.pid] = (c.ppid(), " ".join(c.cmdline()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    asked = _log(log)
    # Python processes only: vLLM and torch also run lscpu and g++, which never see vLLM's kernels.
    pythons = {pid: ppid for pid, (ppid, cmd) in seen.items() if Path(cmd.split(" ")[0]).name.startswith("python")}
    missing = {pid: seen[pid] for pid in pythons if pid not in asked or asked[pid]["state"] not in ASKED}
    assert not missing, (missing, asked)
    worker = [pid for pid, ppid in pythons.items() if ppid == proc.pid]
    assert worker and any(ppid in worker for ppid in pythons.values()), seen  # the worker and vLLM's engine core
