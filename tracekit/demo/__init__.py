"""The toy GRPO job used by ``make demo``, the attribution tests and the docs' walkthrough."""

from __future__ import annotations

from ..testing.faults import CAUSES, Faults

__all__ = ["CAUSES", "Faults", "JobResult", "run_job"]


def __getattr__(name: str):  # lazy: importing the package must not import torch/vLLM
    if name in ("run_job", "JobResult"):
        from . import job

        return getattr(job, name)
    raise AttributeError(name)
