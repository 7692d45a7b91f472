"""Run by Python at start-up of every process tracekit starts: tracekit puts this directory first
on PYTHONPATH (``tracekit.amx.child_env``) and vLLM's worker processes inherit it.

1. ask Linux for AMX tile state where the CPU has AMX (tracekit/amx.py);
2. under ``tracekit record``, install the recording import hook (tracekit/capture/launch.py);
3. run the ``sitecustomize`` this one shadows: the next one on sys.path after this directory.

Nothing here may break the interpreter's start-up.
"""

import os
import sys

try:
    from tracekit import amx

    amx.request()
except Exception:  # noqa: BLE001, S110
    pass

if os.environ.get("TRACEKIT_RECORD_OUT"):
    try:
        from tracekit.capture.launch import install

        install()
    except Exception as _e:  # noqa: BLE001
        print(f"tracekit: recording disabled ({type(_e).__name__}: {_e})", file=sys.stderr)


def _run_shadowed() -> None:
    import importlib.machinery
    import importlib.util

    me = os.path.realpath(__file__)
    here = os.path.dirname(me)
    dirs = [os.path.realpath(p or os.curdir) for p in sys.path]
    # After our LAST entry: two tracekit layers (a replay inside `tracekit record`) put this
    # directory on the path twice, and each copy must move forward, never back to itself.
    rest = sys.path[len(dirs) - dirs[::-1].index(here):] if here in dirs else sys.path
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin and os.path.realpath(spec.origin) != me:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)


try:
    _run_shadowed()
except Exception as _e:  # noqa: BLE001
    print(f"tracekit: the shadowed sitecustomize failed ({type(_e).__name__}: {_e})", file=sys.stderr)
