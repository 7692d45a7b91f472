"""Zero-code recording: ``tracekit record --out TRACE -- python train.py ...``.

The CLI runs the command with ``tracekit/_boot`` first on ``PYTHONPATH`` (``amx.child_env``);
Python imports its ``sitecustomize`` at start-up, which asks for AMX tile state where the CPU has
AMX (tracekit/amx.py) and, with ``TRACEKIT_RECORD_OUT`` set, calls :func:`install`: an import
hook. The hook does not import vLLM itself: when the job imports ``vllm.entrypoints.llm`` /
``vllm.v1.engine.async_llm``, it patches ``LLM.__init__`` / ``AsyncLLM.__init__`` so every
engine the job builds is wrapped by one process-wide Recorder (created lazily, so vLLM's worker
processes never open the trace). ``os._exit`` is patched to flush the recorder first (vLLM
scripts often exit that way).
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import amx
from ..errors import TracekitError

ENV_OUT = "TRACEKIT_RECORD_OUT"
ENV_SNAPSHOT_EVERY = "TRACEKIT_SNAPSHOT_EVERY"
ENV_FLUSH = "TRACEKIT_FLUSH_INTERVAL"
BOOT_DIR = Path(amx.BOOT_DIR)

_recorder: Any = None
_lock = threading.Lock()


def current_recorder() -> Any:
    """The process-wide Recorder of a zero-code run (None outside ``tracekit record``).

    A job that wants steps or trainer logprobs in the trace can call
    ``current_recorder().step(n)`` without depending on tracekit otherwise.
    """
    global _recorder
    if _recorder is None and os.environ.get(ENV_OUT):
        with _lock:
            if _recorder is None:
                from .recorder import Recorder

                _recorder = Recorder(
                    os.environ[ENV_OUT],
                    snapshot_every=int(os.environ.get(ENV_SNAPSHOT_EVERY, "1")),
                    flush_interval=float(os.environ.get(ENV_FLUSH, "1.0")),
                )
    return _recorder


def _wrap_after_init(cls: Any, surface: str) -> None:
    if getattr(cls.__init__, "_tracekit_patched", False):
        return
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        try:
            rec = current_recorder()
            if rec is not None:
                engine_args = dict(kwargs)
                if args and surface == "llm":
                    engine_args.setdefault("model", args[0])
                engine_args = {k: v for k, v in engine_args.items() if isinstance(v, (str, int, float, bool, dict, list, type(None)))}
                rec.wrap(self, engine_args=engine_args or None)
        except Exception as e:
            print(f"tracekit: not recording this engine ({type(e).__name__}: {e})", file=sys.stderr)

    __init__._tracekit_patched = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def _patch_llm(module: Any) -> None:
    _wrap_after_init(module.LLM, "llm")


def _patch_async(module: Any) -> None:
    _wrap_after_init(module.AsyncLLM, "async_llm")


_TARGETS: dict[str, Callable[[Any], None]] = {
    "vllm.entrypoints.llm": _patch_llm,
    "vllm.v1.engine.async_llm": _patch_async,
}


class _Finder(importlib.abc.MetaPathFinder):
    """Runs a patch right after a target module finished executing."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _TARGETS.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            orig_exec(module)
            try:
                patch(module)
            except Exception as e:
                print(f"tracekit: cannot hook {name} ({type(e).__name__}: {e})", file=sys.stderr)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Install the import hook (idempotent) and patch modules already imported."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, patch in _TARGETS.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not getattr(os._exit, "_tracekit_patched", False):
        orig_exit = os._exit

        def _exit(code: int) -> None:
            try:
                if _recorder is not None:
                    _recorder.close(timeout=10.0)
            finally:
                orig_exit(code)

        _exit._tracekit_patched = True  # type: ignore[attr-defined]
        os._exit = _exit  # type: ignore[assignment]


def record_command(cmd: Sequence[str], out: str | os.PathLike[str], *, snapshot_every: int = 1,
                   flush_interval: float = 1.0) -> int:
    """Run ``cmd`` with recording on; return its exit code (signals are forwarded)."""
    if not cmd:
        raise TracekitError("record: no command given (usage: tracekit record --out TRACE -- python train.py)")
    from ..store.location import as_root

    out_p = as_root(out)
    if out_p.exists() and not out_p.is_dir():
        raise TracekitError(f"record: --out {out_p} exists and is not a directory")
    env = dict(os.environ)
    env[ENV_OUT] = str(out_p.resolve())  # a URI stays a URI (s3://...): the child opens it the same way
    env[ENV_SNAPSHOT_EVERY] = str(int(snapshot_every))
    env[ENV_FLUSH] = str(float(flush_interval))
    amx.child_env(env)
    try:
        proc = subprocess.Popen(list(cmd), env=env)
    except FileNotFoundError:
        raise TracekitError(f"record: command not found: {cmd[0]}") from None
    except PermissionError:
        raise TracekitError(f"record: command not executable: {cmd[0]}") from None

    def forward(sig: int, _frame: Any) -> None:
        try:
            proc.send_signal(sig)
        except Exception:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
