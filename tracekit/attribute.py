"""Name the cause of a logprob gap: signatures + replays with each fix alone and all together.

The gap attributed is the one that drives an RL job's clip rate and KL: the recorded engine's
logprobs against the trainer's logprobs of the same tokens, G = mean |Δ(recorded, trainer)|
(clip rate, k1, k3 and the GSPO sequence clip are reported beside it). Traces without trainer
logprobs get the signatures only. Replays that already exist on another engine are reported as
"migration gaps" (recorded vs replay).

Each cause is judged on its own evidence and on what its fix does: alone (on the faithful
replay) and when it is the one fix left out of all of them. Where two fixes close the same gap,
the cause whose evidence shows a setting the job did not ask for is named. Tolerances scale with
the replay noise measured on the trace (causes.context.Calibration). See docs/attribution.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .causes import ABSENT, INCONCLUSIVE, PRESENT, Cause, Evidence, Verdict, all_causes
from .causes.context import (
    ATTR_PREFIX,
    MISMATCHED_REQUESTS,
    AttributionError,
    Calibration,
    Context,
    ReplayConfig,
    Rung,
    Thresholds,
)
from .compare.engines import EngineChange, engine_changes
from .compare.metrics import Metrics, json_safe
from .errors import TracekitError
from .store.reader import Trace

__all__ = ["ATTR_PREFIX", "Attribution", "AttributionError", "CauseResult", "Context", "ReplayConfig", "Rung",
           "Thresholds", "attribute", "check_fail_on", "render"]


@dataclass
class CauseResult:
    id: str
    title: str
    verdict: str
    reason: str
    evidence: list[Evidence]
    rung: Rung | None
    fix: str
    alternative: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "verdict": self.verdict, "reason": self.reason,
            "share": self.rung.share if self.rung else None,
            "share_alone": self.rung.share_alone if self.rung else None,
            "share_needed": self.rung.share_needed if self.rung else None,
            "gap_closed": self.rung.closed if self.rung else None,
            "replay": self.rung.replay if self.rung else None,
            "evidence": [e.as_dict() for e in self.evidence], "fix": self.fix,
        }


@dataclass
class Attribution:
    trace: str
    gap: Metrics | None
    gap_definition: str
    thresholds: Thresholds
    calibration: Calibration
    causes: list[CauseResult]
    ladder: list[Rung]
    residual: float | None
    replays_used: list[str]
    replays_run: list[str]
    migration_gaps: list[Metrics] = field(default_factory=list)
    # replay name -> settings its engine changed vs the recorded one (replays outside the ladder)
    engine_changes: dict[str, list[EngineChange]] = field(default_factory=dict)
    migration: Any = None  # tracekit.migration.Migration
    notes: list[str] = field(default_factory=list)

    def found(self) -> list[str]:
        return [c.id for c in self.causes if c.verdict == PRESENT]

    def as_dict(self) -> dict[str, Any]:
        return json_safe({
            "trace": self.trace,
            "gap": {"definition": self.gap_definition, **(self.gap.as_dict() if self.gap else {})},
            "thresholds": asdict(self.thresholds),
            "calibration": self.calibration.as_dict(),
            "causes": [c.as_dict() for c in self.causes],
            "found": self.found(),
            "ladder": [r.as_dict() for r in self.ladder],
            "residual_share": self.residual,
            "replays_used": self.replays_used,
            "replays_run": self.replays_run,
            "migration_gaps": [m.as_dict() for m in self.migration_gaps],
            "engine_changes": {r: [c.as_dict() for c in cs] for r, cs in self.engine_changes.items()},
            "migration": self.migration.as_dict() if self.migration else None,
            "notes": self.notes,
        })


# ---------------------------------------------------------------------- the ladder
def build_ladder(ctx: Context, causes: list[Cause], evidence: dict[str, list[Evidence]]) -> list[Rung]:
    """Run (or reuse) the replays every verdict needs and measure each cause's fix.

    Replays: the faithful one (claimed weights, recorded config), each config fix alone, every
    fix together, and every fix but one. The cumulative ladder (cause order) is kept for the
    report; verdicts read ``alone`` and ``needed``, which do not depend on the order.
    """
    rec_mode = ctx.recorded_mode
    other_mode = "processed" if rec_mode == "raw" else "raw"
    ablations = {c.id: c.ablation(ctx, evidence[c.id]) for c in causes}
    config = [c for c in causes if ablations[c.id] is not None
              and not ablations[c.id].switch_mode and not ablations[c.id].faithful]

    def cfg_of(subset: list[Cause]) -> ReplayConfig:
        cfg = ReplayConfig()
        for c in subset:
            cfg = cfg.plus(ablations[c.id])  # type: ignore[arg-type]
        return cfg

    base, full = ReplayConfig(), cfg_of(config)
    cfgs = [base] + [cfg_of([c]) for c in config] + [full] + [cfg_of([d for d in config if d is not c]) for c in config]
    cfgs += [cfg_of(config[: i + 1]) for i in range(len(config))]
    names: dict[ReplayConfig, str | None] = {}
    for cfg in dict.fromkeys(cfgs):  # the faithful replay first: it calibrates the noise
        names[cfg] = ctx.replay_for(cfg)
    ctx.restrict_to([n for n in names.values() if n])
    if names.get(base):
        ctx.calibrate(names[base])  # type: ignore[arg-type]

    def gap(cfg: ReplayConfig, mode: str) -> float | None:
        n = names.get(cfg)
        return ctx.gap(ctx.source(n, mode)) if n else None

    # Which kind the trainer uses, read where every fix is in (no other cause blurs it); the
    # recorded kind unless the other is closer by more than the noise tolerance.
    trainer_mode = rec_mode
    gf_rec, gf_other = gap(full, rec_mode), gap(full, other_mode)
    if gf_rec is not None and gf_other is not None and gf_rec - gf_other > ctx.cal.tol:
        trainer_mode = other_mode
    # The floor: what no fix removes, on tokens the trainer scored under the version that sampled
    # them (a version mismatch is weight_sync's gap, not the floor).
    if names.get(full):
        where = f"{ctx.common_where or 'true'} AND request_id NOT IN ({MISMATCHED_REQUESTS})"
        best = ctx.gap(ctx.source(names[full], trainer_mode), where=where)  # type: ignore[arg-type]
        if best is not None:
            ctx.cal.floor, ctx.cal.floor_replay = best, names.get(full)

    g0 = ctx.gap("recorded")
    rungs: list[Rung] = []
    cur_src, cur_gap, mode, cum = "recorded", g0, rec_mode, ReplayConfig()
    for c in causes:
        ab = ablations[c.id]
        if ab is None:
            rungs.append(Rung(c.id, False, note="not applicable to this trace"))
            continue
        if ab.faithful:
            n = names.get(base)
            if n is None:
                rungs.append(Rung(c.id, False, note="replay not run (--no-replay) or failed"))
                continue
            src = ctx.source(n, mode)
            g = ctx.gap(src)
            r = Rung(c.id, True, cur_src, src, cur_gap, g, replay=n, alone_before=g0, alone_after=g,
                     replay_base=n)
            cur_src, cur_gap = src, g
        elif ab.switch_mode:
            n = names.get(base)
            if n is None:
                rungs.append(Rung(c.id, False, note="needs a replay (both raw and processed logprobs)"))
                continue
            r = Rung(c.id, True, cur_src, cur_src, cur_gap, cur_gap, replay=n, replay_base=n,
                     alone_before=gap(base, rec_mode), alone_after=gap(base, other_mode),
                     without=gap(full, rec_mode), with_all=gap(full, trainer_mode))
            cur_n = _replay_of(cur_src)
            if trainer_mode == other_mode and cur_n is not None:
                src = ctx.source(cur_n, other_mode)
                g = ctx.gap(src)
                r.source_after, r.gap_after, r.note = src, g, f"trainer expects {other_mode} logprobs"
                mode, cur_src, cur_gap = other_mode, src, g
            else:
                r.note = f"trainer matches {rec_mode} logprobs once every fix is in ({other_mode}: {_f(gf_other)})"
        else:
            cum = cum.plus(ab)
            alone = cfg_of([c])
            without = cfg_of([d for d in config if d is not c])
            n = names.get(cum)
            if n is None:
                rungs.append(Rung(c.id, False, note="replay not run (--no-replay) or failed"))
                continue
            src = ctx.source(n, mode)
            g = ctx.gap(src)
            r = Rung(c.id, True, cur_src, src, cur_gap, g, replay=n, replay_base=names.get(base),
                     replay_alone=names.get(alone), alone_before=gap(base, rec_mode),
                     alone_after=gap(alone, rec_mode), without=gap(without, trainer_mode),
                     with_all=gap(full, trainer_mode))
            cur_src, cur_gap = src, g
        if g0:
            r.share = None if r.closed is None else r.closed / g0
            r.share_alone = None if r.alone_closed is None else r.alone_closed / g0
            r.share_needed = None if r.needed_closed is None else r.needed_closed / g0
        rungs.append(r)
    return rungs


def resolve_alternatives(results: list[CauseResult], unasked: dict[str, str | None]) -> None:
    """Two fixes that close the same gap name one cause: the one whose evidence shows a setting
    the job did not ask for. Causes present only as such an alternative become absent."""
    by_unasked = [r for r in results if r.verdict == PRESENT and unasked.get(r.id) and not r.alternative]
    if not by_unasked:
        return
    named = by_unasked[0]
    for r in results:
        if r.verdict == PRESENT and r.alternative:
            r.verdict = ABSENT
            r.reason = (f"its fix would also close the gap, but only because {named.id} is present "
                        f"({unasked[named.id]}); fixing {named.id} restores what the job asked for. " + r.reason)


def _replay_of(source: str) -> str | None:
    if not source.startswith("replay:"):
        return None
    return source.split(":")[1]


# ---------------------------------------------------------------------- entry point
def attribute(
    trace: str | os.PathLike[str] | Trace,
    *,
    replay: bool = True,
    python: str | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = False,
    model: str | None = None,
    migration: bool = False,
    engine_args: dict[str, Any] | None = None,
    hf_overrides: dict[str, Any] | None = None,
    gate: tuple[str, float] | None = None,
) -> Attribution:
    """Decide present / absent / inconclusive for every cause of the recorded-vs-trainer gap.

    ``replay=False`` uses only the recorded data and replays that already exist.
    ``python``: interpreter for the replays' engine side (another venv / vLLM version).
    ``migration``: also split the recorded-vs-new-engine gap (``python`` + ``engine_args`` /
    ``hf_overrides``) by changed setting (tracekit.migration); needs no trainer logprobs.
    ``gate``: (metric, value) the recorded-vs-new metric must stay under.
    """
    t = trace if isinstance(trace, Trace) else Trace(trace)
    th = thresholds or Thresholds()
    ctx = Context(t, thresholds=th, run_replays=replay, python=python, progress=progress, model=model)
    try:
        if not ctx.scalar("SELECT count(*) FROM tokens"):
            raise AttributionError(f"{t.root}: the trace has no recorded tokens to attribute")
        causes = all_causes()
        if not ctx.has_trainer:
            ctx.notes.append("no trainer logprobs in the trace: the recorded-vs-trainer gap is undefined, "
                             "only signatures are checked (log them with rec.log_trainer_logprobs)")
            ctx.run_replays = False
        mig = None
        if migration and replay:
            from .migration import migrate

            try:
                mig = migrate(t, python=python, engine_args=engine_args, hf_overrides=hf_overrides, gate=gate,
                              thresholds=th, progress=progress, model=model)
            except TracekitError as e:
                if gate is not None:  # a gate that could not be evaluated must not pass
                    raise
                ctx.notes.append(f"migration audit could not run: {e}")  # the cause verdicts still stand
        evidence = {c.id: c.evidence(ctx) for c in causes}
        gap = ctx.metrics("recorded", "trainer") if ctx.has_trainer else None
        ladder = build_ladder(ctx, causes, evidence) if ctx.has_trainer else []
        ctx.ladder = ladder
        rungs = {r.cause: r for r in ladder}
        results = []
        unasked: dict[str, str | None] = {}
        for c in causes:
            rung = rungs.get(c.id)
            v: Verdict = c.decide(ctx, evidence[c.id], rung if rung and rung.applicable else None)
            unasked[c.id] = c.unasked(ctx, evidence[c.id]) if v.verdict == PRESENT else None
            results.append(CauseResult(c.id, c.title, v.verdict, v.reason, evidence[c.id], rung,
                                       c.fix_for(ctx, evidence[c.id]), v.alternative))
        resolve_alternatives(results, unasked)
        applied = [r for r in ladder if r.applicable and r.gap_after is not None]
        g0 = ctx.gap("recorded") if ladder else None
        residual = (applied[-1].gap_after / g0) if applied and g0 else None
        migration = []
        changes: dict[str, list[EngineChange]] = {}
        knob_causes = {k: c.id for c in causes for k in c.knobs}
        for name in t.replay_names():
            if name.startswith(ATTR_PREFIX):
                continue
            diff = engine_changes(ctx.con, name, knob_causes)
            if diff:
                changes[name] = diff
            if name in ctx.replays_used or (mig is not None and name == mig.replay):
                continue
            m = ctx.metrics(f"replay:{name}", "recorded")
            if m.tokens:
                migration.append(m)
        return Attribution(
            trace=str(t.root), gap=gap,
            gap_definition="mean |Δ| with Δ = recorded engine logprob − trainer logprob, same tokens",
            thresholds=th, calibration=ctx.cal, causes=results, ladder=ladder, residual=residual,
            replays_used=sorted(ctx.replays_used), replays_run=ctx.replays_run, migration_gaps=migration,
            engine_changes=changes, migration=mig,
            notes=ctx.notes,
        )
    finally:
        ctx.close()


def check_fail_on(result: Attribution, fail_on: str | None) -> bool:
    """True when ``--fail-on`` matches: 'any' (a present cause or an exceeded migration gate), a
    cause id that is present, or a changed setting / 'version' the exceeded gate blames."""
    if not fail_on:
        return False
    found = set(result.found())
    mig = result.migration
    blamed = set(mig.flagged()) if mig is not None else set()
    if fail_on == "any":
        return bool(found) or (mig is not None and mig.gate_exceeded)
    return fail_on in found or fail_on in blamed


# ---------------------------------------------------------------------- terminal report
_STYLE = {PRESENT: "bold red", ABSENT: "green", INCONCLUSIVE: "yellow"}


def render(result: Attribution, console: Any) -> None:
    """The terminal report: the gap, one panel per cause, the ladder."""
    from rich.table import Table

    g = result.gap
    console.print(f"[bold]tracekit attribute[/bold] {result.trace}")
    if g is not None and g.tokens:
        console.print(
            f"gap = recorded engine vs trainer logprobs on {g.tokens:,} tokens: mean |Δ| [bold]{g.mean_abs_delta:.4f}[/bold] "
            f"(floor {result.calibration.floor_used:.4f}), mean Δ {g.mean_delta:+.4f}, "
            f"token clip rate {100 * (g.clip_rate or 0):.1f}% at ε={result.thresholds.eps}, "
            f"GSPO seq clip {100 * (g.seq_clip_rate or 0):.1f}%, k3 {g.k3:.4g}"
        )
    console.print(f"[dim]calibration: {result.calibration.summary()}[/dim]")
    for n in result.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    t = Table(title="causes", show_lines=True)
    for c in ("cause", "verdict", "share of gap\n(alone / needed)", "evidence", "fix"):
        t.add_column(c, overflow="fold")
    for c in result.causes:
        share = "-" if not c.rung else f"{_pct(c.rung.share_alone)} / {_pct(c.rung.share_needed)}"
        ev = "\n".join(f"{'•' if e.signal is None else ('+' if e.signal else '-')} {e.summary}\n  [dim]{_short_query(e.query)}[/dim]"
                       for e in c.evidence)
        t.add_row(f"[bold]{c.id}[/bold]", f"[{_STYLE[c.verdict]}]{c.verdict}[/]\n{c.reason}", share, ev,
                  c.fix if c.verdict != ABSENT else "[dim]-[/dim]")
    console.print(t)
    if result.ladder:
        lt = Table(title="ablation ladder (gap = mean |Δ| to the trainer; cumulative in cause order, "
                         "and each fix alone / left out of all fixes)")
        for c in ("rung", "logprobs compared", "gap before", "gap after", "share (ladder)", "alone", "needed",
                  "note"):
            lt.add_column(c, overflow="fold")
        for r in result.ladder:
            lt.add_row(r.cause, r.source_after or "-", _f(r.gap_before), _f(r.gap_after), _pct(r.share),
                       f"{_f(r.alone_before)} → {_f(r.alone_after)}" if r.alone_before is not None else "-",
                       f"{_f(r.without)} → {_f(r.with_all)}" if r.without is not None else "-", r.note)
        console.print(lt)
        if result.residual is not None:
            console.print(f"residual after all rungs: {100 * result.residual:.0f}% of the gap")
    if result.migration is not None:
        from .migration import render as render_migration

        render_migration(result.migration, console)
    for m in result.migration_gaps:
        console.print(f"migration gap {m.a} vs {m.b}: mean |Δ| {_f(m.mean_abs_delta)} on {m.tokens:,} tokens, "
                      f"clip rate {100 * (m.clip_rate or 0):.1f}%")
    for name, changes in result.engine_changes.items():
        et = Table(title=f"engine settings replay:{name} changed vs the recorded engine")
        for c in ("setting", "recorded", "replay", "cause it can produce"):
            et.add_column(c, overflow="fold")
        for ch in changes:
            et.add_row(ch.knob, _v(ch.recorded), _v(ch.replay), ch.cause or "[dim]-[/dim]")
        console.print(et)
    found = result.found()
    console.print("[bold]verdict:[/bold] " + (f"[bold red]{', '.join(found)}[/]" if found else "[green]no cause found[/]"))


def _v(x: Any) -> str:
    from rich.markup import escape

    return "[dim]unset[/dim]" if x is None else escape(json.dumps(x) if isinstance(x, (dict, list)) else str(x))


def _short_query(q: str) -> str:
    q = " ".join(q.split())
    return q if len(q) <= 90 else q[:87] + "..."


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"
