"""Ask Linux for AMX tile state where the CPU has AMX (docs/vllm-cpu.md, "AMX hosts").

On Intel CPUs with AMX, vLLM's bf16 CPU attention runs AMX tile instructions. Linux hands a
process AMX tile state only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``); a
process that never asked dies with SIGILL on the first tile instruction, and vLLM's spawned
worker processes never ask. :func:`request` asks exactly as ``torch.cpu._init_amx()`` does
(aten/src/ATen/cpu/Utils.cpp), without importing torch; :func:`enable` also puts
:data:`BOOT_DIR` first on ``PYTHONPATH``, whose ``sitecustomize`` asks in every Python process
started below this one. Standard library only: it runs at start-up of every such process and
never raises.
"""

from __future__ import annotations

import os
import sys

BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16")  # the ISA flags vLLM's CPU kernels choose by
ENV_CPUINFO = "TRACEKIT_TEST_CPUINFO"  # tests only: read CPU flags from this file, not /proc/cpuinfo
ENV_LOG = "TRACEKIT_TEST_AMX_LOG"  # tests only: every process that runs request() appends a JSON line

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM = 0x1022, 0x1023
_XTILECFG, _XTILEDATA = 17, 18
_XTILE_MASK = (1 << _XTILECFG) | (1 << _XTILEDATA)

# What request() did in this process: None (not called), "not-needed" (no amx_tile flag),
# "granted" or "refused" (asked; the kernel's answer).
state: str | None = None


def cpu_flags() -> set[str]:
    """The CPU's ISA flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open(os.environ.get(ENV_CPUINFO) or "/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def needed() -> bool:
    """True where vLLM's CPU kernels may run AMX tiles, so every engine process must ask."""
    return "amx_tile" in cpu_flags()


def _arch_prctl(code: int, arg: object) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return int(libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(code), arg))


def permitted() -> bool | None:
    """Whether this process holds AMX tile permission now (None: not Linux x86_64)."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        return None
    try:
        import ctypes

        mask = ctypes.c_ulong(0)
        if _arch_prctl(_ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
            return False
        return mask.value & _XTILE_MASK == _XTILE_MASK
    except Exception:  # noqa: BLE001 - a probe, never an error
        return None


def request() -> bool:
    """Ask for AMX tile state if the CPU has AMX; True when this process may now use it."""
    global state
    if state is None:
        try:
            if not needed():
                state = "not-needed"
            else:
                import ctypes

                ok = (permitted() is not None
                      and _arch_prctl(_ARCH_REQ_XCOMP_PERM, ctypes.c_ulong(_XTILEDATA)) == 0
                      and bool(permitted()))
                state = "granted" if ok else "refused"
        except Exception:  # noqa: BLE001 - never break the process that imports this
            state = "refused"
        _log()
    return state == "granted"


def _log() -> None:
    path = os.environ.get(ENV_LOG)
    if not path:
        return
    try:
        import json

        line = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "state": state, "argv": sys.argv[:3]})
        with open(path, "a") as f:
            f.write(line + "\n")
    except Exception:  # noqa: BLE001 - a test probe must not break the process
        pass


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`BOOT_DIR` first on PYTHONPATH (once): its Python processes ask at start-up."""
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOT_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *rest])
    return env


def enable() -> bool:
    """Ask in this process and in every Python process it starts (engine workers included)."""
    try:
        child_env(os.environ)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - never break the process that imports this
        pass
    return request()


def recipe() -> str:
    """The one line a user puts before ``vllm serve`` / their own job on an AMX host."""
    return f'export PYTHONPATH="{BOOT_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"'


if __name__ == "__main__":  # `python -m tracekit.amx`: the directory to put first on PYTHONPATH
    print(BOOT_DIR)
