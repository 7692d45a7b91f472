"""What a cause module provides: its data signature, its rung of the ablation ladder, its fix.

A cause is one module in ``tracekit/causes/`` that defines ``CAUSE``, an instance of a
:class:`Cause` subclass. ``tracekit.attribute`` discovers them, runs every ``evidence`` query,
builds the ablation ladder from their ``ablation`` (in ``order``), and asks each to ``decide``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context, Rung

PRESENT, ABSENT, INCONCLUSIVE = "present", "absent", "inconclusive"


@dataclass
class Evidence:
    """One piece of evidence: the query that shows it (a canned query name or SQL), its numbers,
    and whether it points at the cause (True), away from it (False) or neither (None)."""

    summary: str
    query: str
    numbers: dict[str, Any] = field(default_factory=dict)
    signal: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ablation:
    """The change one rung of the ladder makes, cumulative over earlier rungs.

    ``engine_args`` / ``hf_overrides`` use vLLM's own names. ``requests`` names a counterfactual
    rewrite of the recorded requests before replaying them (see ``attribute.REWRITES``).
    ``switch_mode`` compares the other logprob kind (raw ↔ processed) of the same replay.
    ``faithful`` replaces the recording by a replay of it under the claimed weights.
    """

    engine_args: dict[str, Any] = field(default_factory=dict)
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    requests: str | None = None
    switch_mode: bool = False
    faithful: bool = False


@dataclass
class Verdict:
    verdict: str
    reason: str
    # Present only because its fix ALONE closes a gap that another cause's fix also closes (not
    # needed once the other fixes are in): attribute() keeps it only if no present cause shows a
    # setting the job did not ask for (``Cause.unasked``).
    alternative: bool = False


class Cause(ABC):
    """Base class of a cause module's ``CAUSE``."""

    id: str = ""
    title: str = ""
    order: int = 100  # position in the ablation ladder
    fix: str = ""
    # Engine fingerprint columns (schemas/engines.json) whose change between two engines can
    # produce this cause: tags the config diff of a migration (tracekit.compare.engines).
    knobs: tuple[str, ...] = ()

    def evidence(self, ctx: Context) -> list[Evidence]:
        """Signature queries over the recorded data (no engine run)."""
        return []

    def ablation(self, ctx: Context, evidence: list[Evidence]) -> Ablation | None:
        """The ladder rung that removes this cause, or None when it cannot apply to this trace."""
        return None

    @abstractmethod
    def decide(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> Verdict:
        """The verdict from the signatures and, when it ran, the ablation rung."""

    def unasked(self, ctx: Context, evidence: list[Evidence]) -> str | None:
        """The setting the job did not ask for that this cause's evidence shows (e.g. sampling
        defaults from the model file), or None. When two fixes close the same gap, the cause
        with such a setting is named: its fix restores what the job intended."""
        return None

    def fix_for(self, ctx: Context, evidence: list[Evidence]) -> str:
        """The exact fix; may depend on what the evidence found."""
        return self.fix
