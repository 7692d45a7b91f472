"""Name the cause of a logprob gap: signatures + an ablation ladder of replays → verdict per cause.

The gap attributed is the one that drives an RL job's clip rate and KL: the recorded engine's
logprobs against the trainer's logprobs of the same tokens, G = mean |Δ(recorded, trainer)|
(clip rate, k1, k3 and the GSPO sequence clip are reported beside it). Traces without trainer
logprobs get the signatures only. Replays that already exist on another engine are reported as
"migration gaps" (recorded vs replay).

The ladder replays the trace with one more fix per rung, in cause order, and measures the gap
of each rung's logprobs to the trainer: the share of G a rung closes is
(gap before − gap after) / G. See docs/attribution.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb

from .causes import ABSENT, INCONCLUSIVE, PRESENT, Ablation, Cause, Evidence, all_causes
from .compare.engines import EngineChange, engine_changes
from .compare.metrics import Metrics, json_safe, overall
from .errors import TracekitError
from .store.reader import Trace
from .store.reader import json_value as _json

ATTR_PREFIX = "attr-"


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds, in mean |Δ| nats, set from the floors measured in docs/vllm-cpu.md.

    A bf16 engine with an fp32 head against an fp32 trainer differs by ~0.014 mean |Δ| (bf16
    kernels differ between vLLM and torch): that is the floor no fix removes.
    """

    noise_floor: float = 0.014
    material_gap: float = 0.028  # 2 × floor: a gap worth explaining
    min_close: float = 0.003  # a rung must close this much (rung-to-rung differences are deterministic) ...
    min_share: float = 0.10  # ... and 10 % of the gap left before it to count
    repro_tol: float = 0.005  # recorded vs same-version same-config replay (bitwise on CPU)
    eps: float = 0.2


@dataclass
class Rung:
    """One step of the ablation ladder."""

    cause: str
    applicable: bool
    source_before: str | None = None
    source_after: str | None = None
    gap_before: float | None = None
    gap_after: float | None = None
    share: float | None = None
    replay: str | None = None
    note: str = ""

    @property
    def closed(self) -> float | None:
        if self.gap_before is None or self.gap_after is None:
            return None
        return self.gap_before - self.gap_after

    @property
    def relative(self) -> float | None:
        """Share of the gap left before this rung that it closes (decisions use this, so a small
        cause next to a large one still counts)."""
        c = self.closed
        return c / self.gap_before if c is not None and self.gap_before else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["closed"] = self.closed
        d["relative"] = self.relative
        return d


@dataclass
class CauseResult:
    id: str
    title: str
    verdict: str
    reason: str
    evidence: list[Evidence]
    rung: Rung | None
    fix: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "verdict": self.verdict, "reason": self.reason,
            "share": self.rung.share if self.rung else None,
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
    causes: list[CauseResult]
    ladder: list[Rung]
    residual: float | None
    replays_used: list[str]
    replays_run: list[str]
    migration_gaps: list[Metrics] = field(default_factory=list)
    # replay name -> settings its engine changed vs the recorded one (replays outside the ladder)
    engine_changes: dict[str, list[EngineChange]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def found(self) -> list[str]:
        return [c.id for c in self.causes if c.verdict == PRESENT]

    def as_dict(self) -> dict[str, Any]:
        return json_safe({
            "trace": self.trace,
            "gap": {"definition": self.gap_definition, **(self.gap.as_dict() if self.gap else {})},
            "thresholds": asdict(self.thresholds),
            "causes": [c.as_dict() for c in self.causes],
            "found": self.found(),
            "ladder": [r.as_dict() for r in self.ladder],
            "residual_share": self.residual,
            "replays_used": self.replays_used,
            "replays_run": self.replays_run,
            "migration_gaps": [m.as_dict() for m in self.migration_gaps],
            "engine_changes": {r: [c.as_dict() for c in cs] for r, cs in self.engine_changes.items()},
            "notes": self.notes,
        })


class AttributionError(TracekitError):
    """The trace cannot be attributed as asked."""


# ---------------------------------------------------------------------- replay configurations
@dataclass(frozen=True)
class ReplayConfig:
    """A score-mode replay: engine-arg / hf overrides plus an optional request rewrite."""

    engine_args: tuple[tuple[str, Any], ...] = ()
    hf_overrides: tuple[tuple[str, Any], ...] = ()
    requests: str | None = None

    def plus(self, ab: Ablation) -> ReplayConfig:
        ea = dict(self.engine_args) | ab.engine_args
        hf = dict(self.hf_overrides) | ab.hf_overrides
        return ReplayConfig(tuple(sorted(ea.items())), tuple(sorted(hf.items())), ab.requests or self.requests)

    def with_requests(self, rewrite: str | None) -> ReplayConfig:
        return ReplayConfig(self.engine_args, self.hf_overrides, rewrite)

    @property
    def overrides(self) -> dict[str, Any]:
        return {"engine_args": dict(self.engine_args), "hf_overrides": dict(self.hf_overrides)}

    @property
    def name(self) -> str:
        parts = [f"{k}-{v}" for k, v in self.engine_args] + [f"{k}-{v}" for k, v in self.hf_overrides]
        if self.requests:
            parts.insert(0, self.requests.replace("_", "-"))
        s = "-".join(parts).replace("_", "-").replace(".", "")
        return ATTR_PREFIX + (s or "base")


# Counterfactual rewrites of the recorded requests, applied before replaying them.
def _rewrite_requested_params(row: dict[str, Any], ctx: Context) -> dict[str, Any] | None:
    """The sampling params the engine would have used without the model's generation_config:
    every field whose resolved value is the engine's generation_config default goes back to
    vLLM's own default (what ``generation_config="vllm"`` gives)."""
    defaults = ctx.generation_defaults(row.get("engine_id"))
    res = _json(row.get("sampling_resolved")) or {}
    changed = False
    for k, v in defaults.items():
        # A resolved value equal to the file's default is taken to come from it.
        if k in VLLM_SAMPLING_DEFAULTS and res.get(k) == v and v != VLLM_SAMPLING_DEFAULTS[k]:
            res[k] = VLLM_SAMPLING_DEFAULTS[k]
            changed = True
    if changed:
        row = dict(row, sampling_resolved=json.dumps(res, sort_keys=True))
        for k in ("temperature", "top_p", "top_k", "min_p"):
            if k in res:
                row[k] = res[k]
    return row


def _rewrite_previous_version(row: dict[str, Any], ctx: Context) -> dict[str, Any] | None:
    """Each request under the snapshot before the version it claims (None: no earlier one)."""
    v = row.get("weight_version_start")
    if v is None:
        return None
    prev = [s for s in ctx.snapshot_versions() if s < v]
    if not prev:
        return None
    return dict(row, weight_version_start=prev[-1], weight_version_end=prev[-1])


REWRITES: dict[str, Callable[[dict[str, Any], Context], dict[str, Any] | None]] = {
    "requested_params": _rewrite_requested_params,
    "previous_version": _rewrite_previous_version,
}

# vLLM's SamplingParams() defaults for the fields a generation_config can set.
VLLM_SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}


# ---------------------------------------------------------------------- context
class Context:
    """What cause modules query: metrics between sources, trace facts, replays on demand."""

    def __init__(self, trace: Trace, *, thresholds: Thresholds, run_replays: bool, python: str | None,
                 progress: bool = False, model: str | None = None) -> None:
        self.trace = trace
        self.t = thresholds
        self.run_replays = run_replays
        self.python = python
        self.progress = progress
        self.model = model
        self.replays_run: list[str] = []
        self.replays_used: set[str] = set()
        self.notes: list[str] = []
        self._con: duckdb.DuckDBPyConnection | None = None
        self._metrics: dict[tuple[str, str, str | None], Metrics] = {}
        self._replay_for: dict[ReplayConfig, str | None] = {}
        self.common_where: str | None = None
        self.ladder: list[Rung] = []

    # -- queries
    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = self.trace.connect(read_only=False, check_parts=False)
        return self._con

    def refresh(self) -> None:
        """Reconnect so views see replays written since (views list replays at connect time)."""
        if self._con is not None:
            self._con.close()
        self._con = None
        self._metrics.clear()

    def rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        r = self.con.execute(sql, params or []).fetchone()
        return r[0] if r else None

    def metrics(self, a: str, b: str = "trainer", where: str | None = None) -> Metrics:
        key = (a, b, where)
        if key not in self._metrics:
            self._metrics[key] = overall(self.trace, a, b, eps=self.t.eps, con=self.con, where=where)
        return self._metrics[key]

    def gap(self, a: str, b: str = "trainer", where: str | None = None) -> float | None:
        """mean |Δ(a, b)|; on the ladder's common request set unless ``where`` is given."""
        return self.metrics(a, b, where if where is not None else self.common_where).mean_abs_delta

    # -- trace facts
    @property
    def has_trainer(self) -> bool:
        return bool(self.scalar("SELECT count(*) FROM trainer"))

    def record_engines(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM engines WHERE role IS NULL OR role <> 'replay' ORDER BY created_at")

    def engine(self, engine_id: str | None) -> dict[str, Any] | None:
        for e in self.record_engines():
            if e["engine_id"] == engine_id:
                return e
        return None

    def generation_defaults(self, engine_id: str | None) -> dict[str, Any]:
        """Sampling defaults the engine took from the model's generation_config (empty if none)."""
        e = self.engine(engine_id) or (self.record_engines() or [None])[0]
        if not e:
            return {}
        d = _json(e.get("default_sampling_params"))
        return dict(d) if isinstance(d, dict) else {}

    @property
    def recorded_mode(self) -> str:
        """'raw' or 'processed': what tokens.logprob holds, per the (most used) engine fingerprint."""
        r = self.rows(
            "SELECT e.logprobs_mode AS m, count(*) AS n FROM requests r JOIN engines e USING (engine_id) "
            "GROUP BY ALL ORDER BY n DESC"
        )
        if not r:
            r = [{"m": e.get("logprobs_mode")} for e in self.record_engines()]
        mode = (r[0]["m"] if r else None) or "raw_logprobs"
        return "processed" if mode.startswith("processed") else "raw"

    def snapshot_versions(self) -> list[int]:
        return [int(r[0]) for r in self.con.execute("SELECT DISTINCT version FROM weights ORDER BY 1").fetchall()]

    def token_versions(self) -> list[int]:
        return [int(r[0]) for r in self.con.execute(
            "SELECT DISTINCT weight_version FROM tokens WHERE weight_version IS NOT NULL ORDER BY 1").fetchall()]

    # -- replays
    def repro_tol(self, replay: str) -> float:
        """How close a same-config replay must be to the recording: bitwise-level on the same
        vLLM version; the bf16 noise floor when the replay ran on another version."""
        rec = {e.get("vllm_version") for e in self.record_engines()}
        target = self.trace.replay_meta(replay).get("target_vllm_version")
        if target and rec and target not in rec:
            return self.t.noise_floor
        return self.t.repro_tol

    def source(self, replay: str, mode: str) -> str:
        return f"replay:{replay}" if mode == "raw" else f"replay:{replay}:processed"

    def replay_for(self, cfg: ReplayConfig) -> str | None:
        """Name of a complete score replay with exactly ``cfg`` (reused, or run now), or None."""
        if cfg in self._replay_for:
            return self._replay_for[cfg]
        name = self._find_replay(cfg)
        if name is None and self.run_replays:
            try:
                name = self._run_replay(cfg)
            except TracekitError as e:  # verdicts fall back to the data signatures
                self.notes.append(f"replay {cfg.name} could not run: {e}")
                self.run_replays = False  # the next ones would fail the same way
                name = None
        if name:
            self.replays_used.add(name)
        self._replay_for[cfg] = name
        return name

    def _find_replay(self, cfg: ReplayConfig) -> str | None:
        n_req = self.scalar("SELECT count(*) FROM requests")
        for name in self.trace.replay_names():
            meta = self.trace.replay_meta(name)
            if meta.get("mode") != "score" or meta.get("overrides") != _canon_overrides(cfg.overrides):
                continue
            if _venv(meta.get("python")) != _venv(self.python or sys.executable):
                continue  # ran on another interpreter (another vLLM): not this ladder's engine
            if meta.get("counterfactual") != cfg.requests:
                continue
            if name.startswith(ATTR_PREFIX) or cfg.requests is None:
                done = self.scalar(
                    "SELECT count(DISTINCT request_id) FROM replay_requests WHERE replay = ?", [name])
                expected = n_req if cfg.requests is None else None
                if done and (expected is None or done >= expected):
                    return name
        return None

    def _run_replay(self, cfg: ReplayConfig) -> str | None:
        from .replay import replay

        name = cfg.name
        if self.python and _venv(self.python) != _venv(sys.executable):
            name += "-py" + hashlib.sha1(_venv(self.python).encode()).hexdigest()[:6]
        existing = self.trace.root / "replays" / name
        if existing.exists():  # an incomplete or different replay of ours: redo it
            meta = self.trace.replay_meta(name)
            if (not name.startswith(ATTR_PREFIX) or meta.get("overrides") not in (None, _canon_overrides(cfg.overrides))
                    or _venv(meta.get("python")) not in ("", _venv(self.python or sys.executable))):
                name = f"{name}-{uuid.uuid4().hex[:6]}"
            else:
                shutil.rmtree(existing)
        ov = cfg.overrides
        if cfg.requests is None:
            replay(self.trace.root, name, python=self.python, engine_args=ov["engine_args"],
                   hf_overrides=ov["hf_overrides"], mode="score", progress=self.progress,
                   allow_missing_weights=True, model=self.model)
        else:
            self._counterfactual_replay(cfg, name)
        self.replays_run.append(name)
        self.refresh()
        return name

    def _counterfactual_replay(self, cfg: ReplayConfig, name: str) -> None:
        """Replay rewritten requests: a scratch trace that shares every table but ``requests``
        (symlinks), replayed with the real replayer, then moved under this trace's replays/."""
        from .replay import replay
        from .store.writer import TraceWriter

        rewrite = REWRITES[cfg.requests]  # type: ignore[index]
        root = self.trace.root
        scratch = root / f".attribute-scratch-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            shutil.copy2(root / "trace.json", scratch / "trace.json")
            for d in ("engines", "tokens", "weights", "weight_syncs"):
                if (root / d).exists():
                    os.symlink((root / d).resolve(), scratch / d)
            rows = [rewrite(r, self) for r in self.rows("SELECT * FROM requests")]
            rows = [r for r in rows if r is not None]
            if not rows:
                raise AttributionError(f"counterfactual {cfg.requests}: no request applies")
            w = TraceWriter(scratch, kind="import", flush_interval=3600)
            w.write("requests", rows)
            st = w.close()
            if st.dropped:
                raise AttributionError(f"could not write counterfactual requests: {st.errors[-1:]}")
            ov = cfg.overrides
            replay(scratch, name, python=self.python, engine_args=ov["engine_args"],
                   hf_overrides=ov["hf_overrides"], mode="score", progress=self.progress,
                   allow_missing_weights=True, model=self.model)
            src = scratch / "replays" / name
            meta = json.loads((src / "replay.json").read_text())
            meta["counterfactual"] = cfg.requests
            meta["counterfactual_doc"] = (rewrite.__doc__ or "").strip()
            (src / "replay.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
            (root / "replays").mkdir(exist_ok=True)
            shutil.move(str(src), str(root / "replays" / name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def _venv(python: str | None) -> str:
    """The bin directory of an interpreter path (symlinks not resolved: venvs share the binary)."""
    return os.path.dirname(os.path.abspath(python)) if python else ""


def _canon_overrides(ov: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(ov, sort_keys=True, default=str))


# ---------------------------------------------------------------------- the ladder
def build_ladder(ctx: Context, causes: list[Cause], evidence: dict[str, list[Evidence]]) -> list[Rung]:
    """Cumulative fixes in cause order; each rung's gap to the trainer and the share of G it closes."""
    rec_mode = ctx.recorded_mode
    rungs: list[Rung] = []
    ablations = {c.id: c.ablation(ctx, evidence[c.id]) for c in causes}
    # First make every replay the ladder needs, so all rungs compare the same requests.
    cfg = ReplayConfig()
    cfgs: list[ReplayConfig] = []
    for c in causes:
        ab = ablations[c.id]
        if ab is None or ab.switch_mode:
            continue
        if not ab.faithful:
            cfg = cfg.plus(ab)
        cfgs.append(cfg)
    names = {c: ctx.replay_for(c) for c in dict.fromkeys(cfgs)}
    used = [n for n in names.values() if n]
    if used:
        ids = ", ".join(_sql_lit(n) for n in used)
        ctx.common_where = (
            f"request_id IN (SELECT request_id FROM replay_requests WHERE replay IN ({ids}) AND status = 'ok' "
            f"GROUP BY request_id HAVING count(DISTINCT replay) = {len(used)})"
        )
    g0 = ctx.gap("recorded")
    cur_src, cur_gap, mode = "recorded", g0, rec_mode
    # Which kind (raw/processed) the trainer uses is read on the most-fixed replay, where no other
    # cause blurs it (e.g. file defaults change processed logprobs but not raw ones).
    final = names.get(cfgs[-1]) if cfgs else None
    trainer_mode = rec_mode
    if final is not None:
        gaps = {m: ctx.gap(ctx.source(final, m)) for m in ("raw", "processed")}
        if all(v is not None for v in gaps.values()):
            trainer_mode = min(gaps, key=lambda m: gaps[m])  # type: ignore[arg-type, return-value]
    cfg = ReplayConfig()
    for c in causes:
        ab = ablations[c.id]
        if ab is None:
            rungs.append(Rung(c.id, False, note="not applicable to this trace"))
            continue
        if ab.switch_mode:
            replay = _replay_of(cur_src)
            if replay is None:
                rungs.append(Rung(c.id, False, note="needs a replay (both raw and processed logprobs)"))
                continue
            other = "processed" if mode == "raw" else "raw"
            src = ctx.source(replay, other)
            g = ctx.gap(src)
            if g is None:
                rungs.append(Rung(c.id, False, note=f"{src} has no comparable tokens"))
                continue
            if trainer_mode == other:
                r = Rung(c.id, True, cur_src, src, cur_gap, g, replay=replay, note=f"trainer expects {other} logprobs")
                mode, cur_src, cur_gap = other, src, g
            else:  # the trainer uses the recorded kind: the rung changes nothing
                r = Rung(c.id, True, cur_src, cur_src, cur_gap, cur_gap, replay=replay,
                         note=f"trainer matches {mode} logprobs ({other}: {_f(g)})")
        else:
            if not ab.faithful:
                cfg = cfg.plus(ab)
            replay = names.get(cfg)
            if replay is None:
                rungs.append(Rung(c.id, False, note="replay not run (--no-replay) or failed"))
                continue
            src = ctx.source(replay, mode)
            g = ctx.gap(src)
            r = Rung(c.id, True, cur_src, src, cur_gap, g, replay=replay)
            cur_src, cur_gap = src, g
        if g0 and r.closed is not None:
            r.share = r.closed / g0
        rungs.append(r)
    return rungs


def _replay_of(source: str) -> str | None:
    if not source.startswith("replay:"):
        return None
    return source.split(":")[1]


def _sql_lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


# ---------------------------------------------------------------------- entry point
def attribute(
    trace: str | os.PathLike[str] | Trace,
    *,
    replay: bool = True,
    python: str | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = False,
    model: str | None = None,
) -> Attribution:
    """Decide present / absent / inconclusive for every cause of the recorded-vs-trainer gap.

    ``replay=False`` uses only the recorded data and replays that already exist.
    ``python``: interpreter for the replays' engine side (another venv / vLLM version).
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
        evidence = {c.id: c.evidence(ctx) for c in causes}
        gap = ctx.metrics("recorded", "trainer") if ctx.has_trainer else None
        ladder = build_ladder(ctx, causes, evidence) if ctx.has_trainer else []
        ctx.ladder = ladder
        rungs = {r.cause: r for r in ladder}
        results = []
        for c in causes:
            rung = rungs.get(c.id)
            v = c.decide(ctx, evidence[c.id], rung if rung and rung.applicable else None)
            results.append(CauseResult(c.id, c.title, v.verdict, v.reason, evidence[c.id], rung, c.fix_for(ctx, evidence[c.id])))
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
            if name in ctx.replays_used:
                continue
            m = ctx.metrics(f"replay:{name}", "recorded")
            if m.tokens:
                migration.append(m)
        return Attribution(
            trace=str(t.root), gap=gap,
            gap_definition="mean |Δ| with Δ = recorded engine logprob − trainer logprob, same tokens",
            thresholds=th, causes=results, ladder=ladder, residual=residual,
            replays_used=sorted(ctx.replays_used), replays_run=ctx.replays_run, migration_gaps=migration,
            engine_changes=changes,
            notes=ctx.notes,
        )
    finally:
        ctx.close()


def check_fail_on(result: Attribution, fail_on: str | None) -> bool:
    """True when ``--fail-on`` (a cause id or 'any') matches a present cause."""
    if not fail_on:
        return False
    found = set(result.found())
    return bool(found) if fail_on == "any" else fail_on in found


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
            f"(noise floor ~{result.thresholds.noise_floor}), mean Δ {g.mean_delta:+.4f}, "
            f"token clip rate {100 * (g.clip_rate or 0):.1f}% at ε={result.thresholds.eps}, "
            f"GSPO seq clip {100 * (g.seq_clip_rate or 0):.1f}%, k3 {g.k3:.4g}"
        )
    for n in result.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    t = Table(title="causes", show_lines=True)
    for c in ("cause", "verdict", "share of gap", "evidence", "fix"):
        t.add_column(c, overflow="fold")
    for c in result.causes:
        share = "-" if not c.rung or c.rung.share is None else f"{100 * c.rung.share:.0f}%"
        ev = "\n".join(f"{'•' if e.signal is None else ('+' if e.signal else '-')} {e.summary}\n  [dim]{_short_query(e.query)}[/dim]"
                       for e in c.evidence)
        t.add_row(f"[bold]{c.id}[/bold]", f"[{_STYLE[c.verdict]}]{c.verdict}[/]\n{c.reason}", share, ev,
                  c.fix if c.verdict != ABSENT else "[dim]-[/dim]")
    console.print(t)
    if result.ladder:
        lt = Table(title="ablation ladder (cumulative fixes; gap = mean |Δ| to the trainer)")
        for c in ("rung", "logprobs compared", "gap before", "gap after", "share closed", "note"):
            lt.add_column(c, overflow="fold")
        for r in result.ladder:
            lt.add_row(r.cause, r.source_after or "-", _f(r.gap_before), _f(r.gap_after),
                       "-" if r.share is None else f"{100 * r.share:.0f}%", r.note)
        console.print(lt)
        if result.residual is not None:
            console.print(f"residual after all rungs: {100 * result.residual:.0f}% of the gap")
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
