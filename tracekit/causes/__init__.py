"""Causes of an engine/trainer logprob gap, one module each (a new cause is one new file).

Every module here that defines ``CAUSE`` (a :class:`tracekit.causes.base.Cause`) is picked up.
Ids are used everywhere (CLI ``--fail-on``, JSON, docs): ``logprob_mode``, ``runtime_defaults``,
``weight_sync``, ``lm_head_precision``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import ABSENT, INCONCLUSIVE, PRESENT, Ablation, Cause, Evidence, Verdict


def all_causes() -> list[Cause]:
    """Every cause module's CAUSE, in ladder order."""
    out: list[Cause] = []
    for m in pkgutil.iter_modules(__path__):
        if m.name == "base" or m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{m.name}")
        c = getattr(mod, "CAUSE", None)
        if isinstance(c, Cause):
            out.append(c)
    return sorted(out, key=lambda c: (c.order, c.id))


def cause_ids() -> list[str]:
    return [c.id for c in all_causes()]


__all__ = ["ABSENT", "INCONCLUSIVE", "PRESENT", "Ablation", "Cause", "Evidence", "Verdict", "all_causes", "cause_ids"]
