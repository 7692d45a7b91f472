"""What a cause module works with: the query context over one trace, the replays it can ask for,
and the thresholds it decides with, measured on the trace itself.

``Context`` answers metrics between sources (recorded, trainer, replay:NAME[:processed]), trace
facts (engines, versions, generation defaults), and runs or reuses score replays on demand
(``replay_for``). ``Calibration`` holds the noise measured on the trace: every "reproduces" and
"closes" decision scales with it, so the same code decides on a bitwise CPU, an AMX CPU whose
prefill and decode kernels differ, or a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb

from ..compare import views
from ..compare.metrics import Metrics, overall
from ..errors import TracekitError
from ..store.location import RemotePath, copy_path, rmtree
from ..store.reader import Trace
from ..store.reader import json_value as _json
from .base import Ablation

ATTR_PREFIX = "attr-"


class AttributionError(TracekitError):
    """The trace cannot be attributed as asked."""

# Requests whose tokens all came from one weight version.
SINGLE_VERSION = "weight_version_start IS NOT DISTINCT FROM weight_version_end"

# Requests with a token the trainer scored under another policy version than the one that sampled it.
MISMATCHED_REQUESTS = """
SELECT DISTINCT t.request_id FROM tokens AS t JOIN trainer AS tr ON t.request_id = tr.request_id AND t.pos = tr.pos
WHERE t.weight_version IS NOT NULL AND tr.policy_version IS NOT NULL AND t.weight_version <> tr.policy_version
"""


@dataclass(frozen=True)
class Thresholds:
    """The knobs of every decision, in mean |Δ| nats. None is tuned to a machine: the tolerances
    in force are derived from the noise measured on the trace (:class:`Calibration`).

    - ``noise_k``: a difference counts when it exceeds ``noise_k`` × the measured replay noise;
    - ``min_effect``: ... and at least this (an effect below 1e-3 nats moves no RL metric; it is
      what "bitwise" engines get as tolerance);
    - ``min_share``: a fix must close this share of the gap it acts on;
    - ``default_floor``: the engine-vs-trainer floor no fix removes, used only until a replay
      measures it (bf16 engine with an fp32 head vs an fp32 trainer, docs/vllm-cpu.md).
    """

    noise_k: float = 4.0
    min_effect: float = 1e-3
    min_share: float = 0.10
    default_floor: float = 0.014
    eps: float = 0.2


@dataclass
class Calibration:
    """Noise and floor measured on this trace, and the tolerances derived from them.

    noise: mean |Δ| between the recorded logprobs and a faithful replay (claimed weights, same
    engine config) on tokens whose weights are certain — single-version requests of the first
    weight version, before any update, without prefix-cache hits. It is the engine's own
    replay noise on this machine (0 where prefill and decode are bitwise equal).
    floor: the engine-vs-trainer gap left after every fix (measured on the most-fixed replay),
    or ``Thresholds.default_floor`` until then.
    """

    t: Thresholds
    noise: float | None = None
    noise_max: float | None = None
    noise_tokens: int = 0
    noise_replay: str | None = None
    noise_where: str = ""
    floor: float | None = None
    floor_replay: str | None = None

    @property
    def tol(self) -> float:
        """A replay reproduces / a fix closes when the difference exceeds this."""
        if self.noise is None:
            return max(self.t.min_effect, self.t.noise_k * 1e-3)  # unmeasured: a conservative 4e-3
        return max(self.t.min_effect, self.t.noise_k * self.noise)

    @property
    def floor_used(self) -> float:
        return self.floor if self.floor is not None else self.t.default_floor

    @property
    def material(self) -> float:
        """A recorded-vs-trainer gap worth explaining: clearly above the floor no fix removes."""
        return max(2 * self.floor_used, self.floor_used + self.tol)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("t")
        d.update(tol=self.tol, floor_used=self.floor_used, material_gap=self.material,
                 floor_measured=self.floor is not None, noise_measured=self.noise is not None)
        return d

    def summary(self) -> str:
        if self.noise is None:
            n = f"replay noise not measured (tolerance {self.tol:.4g})"
        else:
            n = (f"replay noise {self.noise:.3g} mean |Δ| (max {self.noise_max:.3g}) on {self.noise_tokens} "
                 f"tokens of {self.noise_where} → tolerance {self.tol:.3g}")
        f = (f"floor {self.floor:.4f} (gap left after every fix)" if self.floor is not None
             else f"floor {self.t.default_floor} (default, not measured)")
        return f"{n}; {f}; material gap {self.material:.4f}"


@dataclass
class Rung:
    """One cause's fix, measured three ways (gaps are mean |Δ| to the trainer, common requests):

    - within the cumulative ladder (``gap_before`` → ``gap_after``, ``share`` of G);
    - alone: the fix on top of the faithful replay only (``alone_before`` → ``alone_after``);
    - needed: every fix but this one (``without``) against every fix (``with_all``).
    A cause is judged on the last two, so the ladder's order decides nothing.
    """

    cause: str
    applicable: bool
    source_before: str | None = None
    source_after: str | None = None
    gap_before: float | None = None
    gap_after: float | None = None
    share: float | None = None
    replay: str | None = None
    note: str = ""
    alone_before: float | None = None
    alone_after: float | None = None
    without: float | None = None
    with_all: float | None = None
    replay_alone: str | None = None  # the replay with this fix alone (config causes)
    replay_base: str | None = None  # the faithful replay
    share_alone: float | None = None  # alone_closed / G
    share_needed: float | None = None  # needed_closed / G

    @property
    def closed(self) -> float | None:
        return _diff(self.gap_before, self.gap_after)

    @property
    def relative(self) -> float | None:
        """Share of the gap left before this rung that it closes."""
        c = self.closed
        return c / self.gap_before if c is not None and self.gap_before else None

    @property
    def alone_closed(self) -> float | None:
        return _diff(self.alone_before, self.alone_after)

    @property
    def needed_closed(self) -> float | None:
        return _diff(self.without, self.with_all)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(closed=self.closed, relative=self.relative, alone_closed=self.alone_closed,
                 needed_closed=self.needed_closed)
        return d


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


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
        self.cal = Calibration(thresholds)

    # -- queries
    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = views.connect(self.trace, read_only=False, check_parts=False)
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
    def restrict_to(self, replays: list[str]) -> None:
        """Compare on the requests every one of ``replays`` scored ok (``common_where``)."""
        used = list(dict.fromkeys(replays))
        if not used:
            return
        ids = ", ".join("'" + n.replace("'", "''") + "'" for n in used)
        self.common_where = (
            f"request_id IN (SELECT request_id FROM replay_requests WHERE replay IN ({ids}) AND status = 'ok' "
            f"GROUP BY request_id HAVING count(DISTINCT replay) = {len(used)})"
        )

    def unknown(self, *fields: str) -> str | None:
        """Why a field a verdict reads is unknown in this trace ('table.column' or 'table'): an
        import that could not know it says so in trace.json; None when the trace holds it."""
        from ..importers import null_reason

        for f in fields:
            why = null_reason(self.trace.manifest, f)
            if why:
                return f"{f} is unknown: {why}"
        return None

    def first_version(self) -> int | None:
        v = self.token_versions()
        return v[0] if v else None

    def calibrate(self, replay: str) -> None:
        """Measure the replay noise: recorded vs ``replay`` (faithful, recorded kind) on tokens
        whose weights are certain (see :class:`Calibration`)."""
        first = self.first_version()
        src = self.source(replay, self.recorded_mode)
        base = SINGLE_VERSION + ("" if first is None else f" AND weight_version_start = {int(first)}")
        where, what = f"{base} AND NOT cache_hit", "the first weight version, no prefix-cache hit"
        m = self.metrics("recorded", src, where=where)
        if not m.tokens:
            where, what = base, "the first weight version"
            m = self.metrics("recorded", src, where=where)
        if m.tokens and m.mean_abs_delta is not None:
            self.cal.noise, self.cal.noise_max, self.cal.noise_tokens = m.mean_abs_delta, m.max_abs_delta, m.tokens
            self.cal.noise_replay, self.cal.noise_where = replay, what
        else:
            self.notes.append("replay noise not measured: no recorded token of the first weight version was "
                              "replayed; tolerances use a conservative default")

    def judge(self, rung: Rung) -> tuple[bool, bool]:
        """(its fix alone closes a gap, the gap is left open without it when every other fix is in)."""
        return self.closes(rung.alone_closed, rung.alone_before), self.closes(rung.needed_closed, rung.without)

    def closes(self, closed: float | None, before: float | None) -> bool:
        """A fix closes a gap: by more than the noise tolerance and by ``min_share`` of it."""
        if closed is None or not before:
            return False
        return closed >= self.cal.tol and closed / before >= self.t.min_share

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
        from ..replay import replay

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
                rmtree(existing)
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
        from ..replay import replay
        from ..store.writer import TraceWriter

        rewrite = REWRITES[cfg.requests]  # type: ignore[index]
        root = self.trace.root
        remote = isinstance(root, RemotePath)
        # A local trace's scratch sits beside it and links its tables; a remote trace (s3://...)
        # cannot be linked to, so its scratch is a local copy of the tables the replay reads.
        scratch = (Path(tempfile.mkdtemp(prefix="tracekit-attribute-scratch-")) if remote
                   else root / f".attribute-scratch-{uuid.uuid4().hex[:8]}")
        scratch.mkdir(exist_ok=remote)
        try:
            copy_path(root / "trace.json", scratch / "trace.json")
            for d in ("engines", "tokens", "weights", "weight_syncs"):
                if (root / d).exists():
                    if remote:
                        copy_path(root / d, scratch / d)
                    else:
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
            if remote:
                copy_path(src, root / "replays" / name)
            else:
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


