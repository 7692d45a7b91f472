"""The migration audit: split the recorded-vs-new-engine gap by the setting that changed.

"The new engine's logprobs differ from the old one's on the same rollouts: which change does it,
and does it matter for training?" The new engine is a score replay of the trace in another
interpreter (another vLLM release) and/or with other settings. Every setting whose *effective*
value differs between the two fingerprints (compare.engines) and that vLLM lets us set back is
restored to the recorded value on the new engine, alone and cumulatively; each replay is compared
with the recording. What is left when every setting is restored is the version itself (kernels,
numerics). No trainer logprobs are needed: the reference is the recording.

The logprob kind is a setting too, and needs no replay: a score replay carries both raw and
processed logprobs, so "the new engine's logprobs" are the kind its effective ``logprobs_mode``
returns, and restoring the mode reads the other kind of the same replay.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .causes import Ablation, all_causes
from .causes.context import Context, ReplayConfig, Thresholds
from .compare.engines import EngineChange, engine_changes
from .compare.metrics import Metrics, json_safe
from .store.reader import Trace

MIG_PREFIX = "mig-"
# Training metrics a gate can name (recorded vs new engine, from compare.metrics.Metrics).
GATE_METRICS = ("mean_abs_delta", "max_abs_delta", "clip_rate", "seq_clip_rate", "k3")


@dataclass
class SettingEffect:
    """One changed setting, set back to the recorded value on the new engine."""

    knob: str
    cause: str | None
    recorded: Any
    new: Any
    restore: dict[str, Any]  # {"engine_args": {...}, "hf_overrides": {...}} or {"kind": "raw"|"processed"}
    alone: Metrics | None = None  # recorded vs new engine with only this setting restored
    cumulative: Metrics | None = None  # ... with this and every earlier one restored
    without: Metrics | None = None  # ... with every setting restored but this one
    share_alone: float | None = None
    share_cumulative: float | None = None
    share_needed: float | None = None  # (without − all restored) / gap
    moves_gate: bool = False  # it moves the recorded-vs-new gap beyond the tolerance, alone or last
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alone"] = self.alone.as_dict() if self.alone else None
        d["cumulative"] = self.cumulative.as_dict() if self.cumulative else None
        d["without"] = self.without.as_dict() if self.without else None
        return d


@dataclass
class Migration:
    replay: str  # the new engine's replay
    recorded_version: str | None
    new_version: str | None
    kind: str  # the logprob kind the new engine returns ("raw" / "processed")
    gap: Metrics | None  # recorded vs the new engine
    settings: list[SettingEffect]
    remaining: Metrics | None  # every setting restored: the version itself
    remaining_share: float | None
    context_changes: list[EngineChange]  # changed, not restorable (versions, platform, env)
    tolerance: float
    gate: tuple[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def gate_exceeded(self) -> bool:
        if self.gate is None or self.gap is None:
            return False
        v = getattr(self.gap, self.gate[0])
        return v is not None and v > self.gate[1]

    def flagged(self) -> list[str]:
        """Settings (and 'version') to blame when the gate is exceeded: those that move the gap
        beyond the tolerance alone or as the one left out, and the version when what is left
        with every setting restored still exceeds the gate."""
        if not self.gate_exceeded:
            return []
        out = [s.knob for s in self.settings if s.moves_gate]
        if self.gate and self.remaining is not None:
            v = getattr(self.remaining, self.gate[0])
            if v is not None and v > self.gate[1]:
                out.append("version")
        return out

    def as_dict(self) -> dict[str, Any]:
        return json_safe({
            "replay": self.replay, "recorded_version": self.recorded_version, "new_version": self.new_version,
            "kind": self.kind, "gap": self.gap.as_dict() if self.gap else None,
            "settings": [s.as_dict() for s in self.settings],
            "remaining": self.remaining.as_dict() if self.remaining else None,
            "remaining_share": self.remaining_share,
            "context_changes": [c.as_dict() for c in self.context_changes], "tolerance": self.tolerance,
            "gate": list(self.gate) if self.gate else None, "gate_exceeded": self.gate_exceeded,
            "flagged": self.flagged(), "notes": self.notes,
        })


def parse_gate(text: str | None) -> tuple[str, float] | None:
    """'clip_rate=0.01' → ('clip_rate', 0.01); ValueError naming the metrics otherwise."""
    if not text:
        return None
    k, sep, v = text.partition("=")
    if not sep or k.strip() not in GATE_METRICS:
        raise ValueError(f"--gate takes METRIC=VALUE with METRIC one of {', '.join(GATE_METRICS)}, not {text!r}")
    return k.strip(), float(v)


# ---------------------------------------------------------------------- what can be set back
def restore_args(change: EngineChange) -> dict[str, Any] | None:
    """vLLM arguments that set ``change`` back to its recorded value (None: not settable)."""
    k, v = change.knob, change.recorded
    if k == "logprobs_mode":
        return {"kind": "processed" if str(v).startswith("processed") else "raw"}
    if k in ("enable_prefix_caching", "block_size", "async_scheduling", "dtype", "max_model_len"):
        return None if v is None else {"engine_args": {k: v}}
    if k == "head_dtype":
        return None if v is None else {"hf_overrides": {"head_dtype": v}}
    if k == "generation_config.mode":
        return None if v is None else {"engine_args": {"generation_config": v}}
    return None


def _grouped(changes: list[EngineChange]) -> list[tuple[EngineChange, dict[str, Any] | None]]:
    """Changed settings with how to restore them. Sampling defaults (``default_sampling_params.*``,
    ``generation_config.file.*``) are restored together, as the recorded defaults pinned with
    ``override_generation_config``."""
    out: list[tuple[EngineChange, dict[str, Any] | None]] = []
    sampling = [c for c in changes if c.knob.startswith(("default_sampling_params.", "generation_config.file."))]
    for c in changes:
        if c in sampling:
            continue
        out.append((c, restore_args(c)))
    if sampling:
        rec = {c.knob.split(".", 1)[1]: c.recorded for c in sampling
               if c.knob.startswith("default_sampling_params.") and c.recorded is not None}
        knob = "default_sampling_params"
        merged = EngineChange(knob, {c.knob: c.recorded for c in sampling}, {c.knob: c.replay for c in sampling},
                              "runtime_defaults")
        out.append((merged, {"engine_args": {"override_generation_config": rec}} if rec else None))
    return out


# ---------------------------------------------------------------------- the audit
def migrate(
    trace: str | Trace,
    *,
    python: str | None,
    engine_args: dict[str, Any] | None = None,
    hf_overrides: dict[str, Any] | None = None,
    gate: tuple[str, float] | None = None,
    thresholds: Thresholds | None = None,
    ctx: Context | None = None,
    progress: bool = False,
    model: str | None = None,
) -> Migration:
    """Replay the trace on the new engine (``python``, plus ``engine_args``/``hf_overrides`` for a
    new config), then once per restorable changed setting and once with all of them restored."""
    t = trace if isinstance(trace, Trace) else Trace(trace)
    own = ctx is None
    ctx = ctx or Context(t, thresholds=thresholds or Thresholds(), run_replays=True, python=python,
                         progress=progress, model=model)
    try:
        return _migrate(ctx, ReplayConfig().plus(Ablation(engine_args=dict(engine_args or {}),
                                                          hf_overrides=dict(hf_overrides or {}))), gate)
    finally:
        if own:
            ctx.close()


def _migrate(ctx: Context, new_cfg: ReplayConfig, gate: tuple[str, float] | None) -> Migration:
    notes: list[str] = []
    new = ctx.replay_for(new_cfg)
    if new is None:
        raise_from = ctx.notes[-1] if ctx.notes else "no replay"
        from .causes.context import AttributionError

        raise AttributionError(f"the new engine's replay could not run: {raise_from}")
    knob_causes = {k: c.id for c in all_causes() for k in c.knobs}
    changes = engine_changes(ctx.con, new, knob_causes) or []
    fp = ctx.rows("SELECT vllm_version, logprobs_mode FROM replay_engines WHERE replay = ? LIMIT 1", [new])
    new_mode = (fp[0]["logprobs_mode"] if fp else None) or "raw_logprobs"
    kind = "processed" if str(new_mode).startswith("processed") else "raw"
    rec_kind = ctx.recorded_mode
    grouped = _grouped(changes)
    settable = [(c, r) for c, r in grouped if r is not None]
    context = [c for c, r in grouped if r is None]
    # Every replay first, so all comparisons use the same requests: each setting alone, the
    # cumulative chain, and every setting but one (the kind costs no replay).
    def ab(r: dict[str, Any]) -> Ablation:
        return Ablation(engine_args=r.get("engine_args", {}), hf_overrides=r.get("hf_overrides", {}))

    def restored(skip: str | None) -> ReplayConfig:
        cfg = new_cfg
        for c, r in settable:
            if "kind" not in r and c.knob != skip:
                cfg = cfg.plus(ab(r))
        return cfg

    cfgs: dict[str, ReplayConfig] = {}
    cum = new_cfg
    for c, r in settable:
        cfgs[f"but:{c.knob}"] = restored(c.knob)
        if "kind" in r:
            continue
        cfgs[f"alone:{c.knob}"] = new_cfg.plus(ab(r))
        cum = cum.plus(ab(r))
        cfgs[f"cum:{c.knob}"] = cum
    names = {k: ctx.replay_for(cfg) for k, cfg in cfgs.items()}
    all_name = ctx.replay_for(restored(None))
    rec_all_kind = next((r["kind"] for _c, r in settable if "kind" in r), kind)
    ctx.restrict_to([new] + [n for n in names.values() if n])

    def m(name: str | None, k: str) -> Metrics | None:
        return None if name is None else ctx.metrics("recorded", ctx.source(name, k), ctx.common_where)

    gap = m(new, kind)
    g0 = gap.mean_abs_delta if gap else None
    all_restored = m(all_name, rec_all_kind)
    settings: list[SettingEffect] = []
    cur_name, cur_kind = new, kind
    for c, r in settable:
        s = SettingEffect(c.knob, c.cause, c.recorded, c.replay, r)
        if "kind" in r:
            s.alone = m(new, r["kind"])
            cur_kind = r["kind"]
            s.cumulative = m(cur_name, cur_kind)
            if rec_kind != r["kind"]:
                s.note = f"the trace recorded {rec_kind} logprobs; compared as {r['kind']}"
        else:
            a, cu = names.get(f"alone:{c.knob}"), names.get(f"cum:{c.knob}")
            if a is None:
                s.note = "replay could not run"
            s.alone, s.cumulative = m(a, kind), m(cu, cur_kind)
            cur_name = cu or cur_name
        s.without = m(names.get(f"but:{c.knob}"), kind if "kind" in r else rec_all_kind)
        if g0:
            s.share_alone = _share(g0, s.alone)
            s.share_cumulative = _share(g0, s.cumulative)
            if s.without is not None and all_restored is not None and s.without.mean_abs_delta is not None \
                    and all_restored.mean_abs_delta is not None:
                s.share_needed = (s.without.mean_abs_delta - all_restored.mean_abs_delta) / g0
        s.moves_gate = bool(g0) and (ctx.closes((s.share_alone or 0) * g0, g0)  # type: ignore[operator]
                                     or ctx.closes((s.share_needed or 0) * g0, g0))  # type: ignore[operator]
        settings.append(s)
    remaining = m(cur_name, cur_kind) if settings else gap
    rem_share = (remaining.mean_abs_delta / g0) if remaining and g0 and remaining.mean_abs_delta is not None else None
    if not settable:
        notes.append("no restorable setting changed: the whole gap is the version itself")
    return Migration(
        replay=new, recorded_version=_version(changes, "recorded", ctx),
        new_version=_version(changes, "replay", ctx, fp[0].get("vllm_version") if fp else None),
        kind=kind, gap=gap, settings=settings, remaining=remaining, remaining_share=rem_share,
        context_changes=context, tolerance=ctx.cal.tol, gate=gate, notes=notes + ctx.notes,
    )


def _share(g0: float, x: Metrics | None) -> float | None:
    if x is None or x.mean_abs_delta is None:
        return None
    return (g0 - x.mean_abs_delta) / g0


def _version(changes: list[EngineChange], side: str, ctx: Context, fallback: str | None = None) -> str | None:
    """The vLLM version of one side: from the diff when it changed, else the fingerprint's."""
    for c in changes:
        if c.knob == "vllm_version":
            return str(getattr(c, side))
    if fallback is not None:
        return str(fallback)
    eng = ctx.record_engines()
    return str(eng[0].get("vllm_version")) if eng else None


def render(mig: Migration, console: Any) -> None:
    """The migration table in the terminal."""
    from rich.markup import escape
    from rich.table import Table

    g = mig.gap
    console.print(f"[bold]migration[/bold] vLLM {mig.recorded_version} → {mig.new_version} "
                  f"(replay:{mig.replay}, {mig.kind} logprobs): recorded vs new mean |Δ| "
                  f"[bold]{_f(g.mean_abs_delta if g else None)}[/bold], clip rate "
                  f"{_pct(g.clip_rate if g else None)}, k3 {_f(g.k3 if g else None)} "
                  f"(tolerance {mig.tolerance:.3g})")
    t = Table(title="what each changed setting does (set back to the recorded value on the new engine)")
    for c in ("setting", "recorded", "new", "cause", "gap alone", "share alone", "share needed", "cumulative",
              "note"):
        t.add_column(c, overflow="fold")
    for s in mig.settings:
        t.add_row(escape(s.knob), escape(_v(s.recorded)), escape(_v(s.new)), s.cause or "-",
                  _f(s.alone.mean_abs_delta if s.alone else None), _pct(s.share_alone), _pct(s.share_needed),
                  _pct(s.share_cumulative), ("[bold]moves the gap[/] " if s.moves_gate else "") + s.note)
    t.add_row("[bold]the version itself[/bold]", escape(str(mig.recorded_version)), escape(str(mig.new_version)), "-",
              _f(mig.remaining.mean_abs_delta if mig.remaining else None), "-", "-", _pct(mig.remaining_share),
              "left with every setting restored")
    console.print(t)
    if mig.gate:
        state = "[bold red]exceeded[/]" if mig.gate_exceeded else "[green]holds[/]"
        console.print(f"gate {mig.gate[0]} ≤ {mig.gate[1]:g}: {state}" +
                      (f"; blame: {', '.join(mig.flagged())}" if mig.flagged() else ""))


def _v(x: Any) -> str:
    return "unset" if x is None else (json.dumps(x) if isinstance(x, (dict, list)) else str(x))


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"
