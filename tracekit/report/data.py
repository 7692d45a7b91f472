"""What the report shows, as plain Python data read from the trace with DuckDB.

Every logprob source is compared against one reference: the trainer's logprobs when the trace has
them (the policy the job trains), else the recorded ones. For a source S and the reference R the
per-step curves are what the job would have logged had S been its "old" (behaviour) logprobs and R
its current policy. They come from the compare views (``tracekit.compare.views``) with a = R,
b = S: Δ = R − S, ratio = exp(Δ), clip rate = share of tokens with |ratio − 1| > ε, and
kl_new_old = k3 = mean(exp(−Δ) − 1 + Δ), the views' estimate of KL(a‖b) = KL(new‖old).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compare import views
from ..store.reader import Trace

# Where the demo job (tracekit.demo.job) writes its own per-step curves inside the trace.
JOB_METRICS = Path("job") / "metrics.json"


@dataclass
class ReportData:
    trace: Any  # Path or store.location.RemotePath
    reference: str | None  # 'trainer' or 'recorded'
    eps: float
    summary: dict[str, Any]
    engines: list[dict[str, Any]]
    sources: list[str]
    # source -> {step: {metric: value}}
    curves: dict[str, dict[int, dict[str, float | None]]] = field(default_factory=dict)
    # source -> summary over all tokens
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)
    # source -> sample of finite Δ values (for the histogram)
    deltas: dict[str, list[float]] = field(default_factory=dict)
    job_metrics: list[dict[str, Any]] | None = None
    # The RL stacks' own metrics by step (tracekit.compare.anchors) for one pair (rollout a, training b):
    # recorded vs trainer, else recorded vs the first replay. {metric name: {step: value}}.
    anchor_pair: tuple[str, str] | None = None
    anchors: dict[str, dict[int, float | None]] = field(default_factory=dict)


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def collect(trace: str | Path, *, eps: float = 0.2, max_hist: int = 200_000) -> ReportData:
    """Read everything the report needs from ``trace`` through the compare views."""
    t = Trace(trace)
    con = views.connect(t)
    try:
        sources = [r[0] for r in con.execute(
            "SELECT source FROM token_sources WHERE logprob IS NOT NULL GROUP BY source "
            "ORDER BY source = 'trainer' DESC, source = 'recorded' DESC, source"
        ).fetchall()]
        reference = "trainer" if "trainer" in sources else ("recorded" if "recorded" in sources else None)
        data = ReportData(t.root, reference, eps, _summary(con, t), _engines(con), sources)
        data.job_metrics = _job_metrics(t.root)
        # Rewards logged later by the job (rewards/, latest per request) win over any recorded inline.
        rewards = dict(con.execute(
            "SELECT q.step, avg(coalesce(w.reward, q.reward)) FROM requests q "
            "LEFT JOIN (SELECT request_id, arg_max(reward, time) AS reward FROM rewards GROUP BY 1) w "
            "USING (request_id) WHERE coalesce(w.reward, q.reward) IS NOT NULL GROUP BY 1").fetchall())
        _anchors(t, con, data)
        if reference is None:
            return data
        ref, e = _lit(reference), repr(float(eps))
        for src in sources:
            if src == reference:
                continue
            cur = con.execute(f"SELECT * FROM diff_by_step({ref}, {_lit(src)}, eps := {e})")
            cols = [c[0] for c in cur.description]
            for row in cur.fetchall():
                m = dict(zip(cols, row))
                if not m["tokens"]:
                    continue
                step = _step(m["step"])
                data.curves.setdefault(src, {})[step] = {
                    "tokens": m["tokens"], "nonfinite": m["nonfinite_tokens"], "mean_abs_delta": m["mean_abs_delta"],
                    "clip_rate": m["clip_rate"], "kl_new_old": m["k3"], "entropy": m["entropy_b"],
                    "seq_clip_rate": m["seq_clip_rate"], "reward": rewards.get(m["step"]),
                }
                ref_curve = data.curves.setdefault(reference, {}).setdefault(step, {"reward": rewards.get(m["step"])})
                if m["entropy_a"] is not None:
                    ref_curve["entropy"] = m["entropy_a"]
            cur = con.execute(f"SELECT * FROM diff_by_all({ref}, {_lit(src)}, eps := {e})")
            cols = [c[0] for c in cur.description]
            tot = dict(zip(cols, cur.fetchone()))
            data.totals[src] = {k: tot[k] for k in ("tokens", "nonfinite_tokens", "mean_delta", "mean_abs_delta",
                                                   "max_abs_delta", "clip_rate", "k3", "seq_clip_rate")}
            data.deltas[src] = [v for (v,) in con.execute(
                f"SELECT delta FROM token_diff({ref}, {_lit(src)}) WHERE finite "
                f"USING SAMPLE reservoir({int(max_hist)} ROWS) REPEATABLE (0)"
            ).fetchall()]
        for step, rew in rewards.items():
            data.curves.setdefault(reference, {}).setdefault(_step(step), {})["reward"] = rew
        return data
    finally:
        con.close()


# The anchor metrics the report plots (a subset; `tracekit metrics` prints them all).
ANCHOR_PLOT = ("training/rollout_probs_diff_mean", "training/rollout_probs_diff_max",
               "train/train_rollout_logprob_abs_diff", "rl/kl_new_old",
               "sampling/importance_sampling_ratio/mean[sequence_mask]")


def _anchors(t: Trace, con: Any, data: ReportData) -> None:
    """Anchor metrics by step: recorded (rollout) vs trainer, else vs the first replay."""
    from ..compare.anchors import anchor_metrics

    srcs = data.sources
    train = "trainer" if "trainer" in srcs else next((s for s in srcs if s.startswith("replay:")), None)
    if "recorded" not in srcs or train is None:
        return
    data.anchor_pair = ("recorded", train)
    cols, rows = anchor_metrics(t, "recorded", train, by="step", con=con)
    for row in rows:
        m = dict(zip(cols, row))
        if m["tokens"]:
            for name in ANCHOR_PLOT:
                data.anchors.setdefault(name, {})[_step(m["step"])] = m[name]


def _step(v: Any) -> int:
    return -1 if v is None else int(v)


def _summary(con: Any, t: Trace) -> dict[str, Any]:
    (req, steps, smin, smax) = con.execute(
        "SELECT count(*), count(DISTINCT step), min(step), max(step) FROM requests").fetchone()
    (tok,) = con.execute("SELECT count(*) FROM tokens").fetchone()
    (trn,) = con.execute("SELECT count(*) FROM trainer").fetchone()
    (ver,) = con.execute("SELECT count(DISTINCT weight_version) FROM tokens").fetchone()
    (snap,) = con.execute("SELECT count(DISTINCT version) FROM weights").fetchone()
    return {"trace_id": t.manifest.get("trace_id"), "created": t.manifest.get("created"), "requests": req,
                "steps": steps, "step_range": (smin, smax), "tokens": tok, "trainer_tokens": trn, "weight_versions": ver,
                "snapshots": snap, "replays": t.replay_names()}


_ENGINE_COLS = ("engine_id", "role", "vllm_version", "dtype", "logprobs_mode", "head_dtype",
                "enable_prefix_caching", "default_sampling_params")


def _engines(con: Any) -> list[dict[str, Any]]:
    cols = ", ".join(_ENGINE_COLS)
    return [dict(zip(_ENGINE_COLS, r)) for r in con.execute(f"SELECT {cols} FROM engines ORDER BY created_at").fetchall()]


def _job_metrics(root: Path) -> list[dict[str, Any]] | None:
    p = root / JOB_METRICS
    if not p.is_file():
        return None
    try:
        rows = json.loads(p.read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return rows if isinstance(rows, list) else None
