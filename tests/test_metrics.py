"""RL metrics against hand-computed values, on small traces written with the real TraceWriter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tracekit.compare import metrics
from tracekit.errors import QueryError
from tracekit.store import Trace, TraceWriter

NEG_INF = float("-inf")


def make_trace(
    root: Path,
    requests: list[dict[str, Any]],
    recorded: dict[int, list[float]],
    trainer: dict[int, list[float]] | None = None,
    replays: dict[str, dict[int, list[tuple[float | None, float | None]]]] | None = None,
    token_versions: dict[int, int] | None = None,
    trainer_entropy: dict[int, list[float]] | None = None,
    engines: list[dict[str, Any]] | None = None,
    weight_syncs: list[dict[str, Any]] | None = None,
) -> Trace:
    """Write a trace through TraceWriter: requests rows, per-request logprob lists per source.

    ``replays[name][request_id]`` is a list of (raw logprob, processed logprob) per position.
    """
    w = TraceWriter(root, kind="import", flush_interval=60)
    for e in engines or []:
        w.write("engines", {"run_id": w.run_id, "created_at": _now(), **e})
    for s in weight_syncs or []:
        w.write("weight_syncs", {"run_id": w.run_id, **s})
    w.write("requests", [{"run_id": w.run_id, **r} for r in requests])
    for rid, lps in recorded.items():
        w.write(
            "tokens",
            [
                {"request_id": rid, "pos": i, "token_id": 7, "logprob": lp,
                 "weight_version": (token_versions or {}).get(rid)}
                for i, lp in enumerate(lps)
            ],
        )
    for rid, lps in (trainer or {}).items():
        ent = (trainer_entropy or {}).get(rid)
        w.write(
            "trainer",
            [
                {"request_id": rid, "pos": i, "logprob": lp, "policy_version": 0, "step": 0,
                 "entropy": ent[i] if ent else None}
                for i, lp in enumerate(lps)
            ],
        )
    w.close()
    for name, per_req in (replays or {}).items():
        rw = TraceWriter(root, kind="replay", flush_interval=60)
        for rid, pairs in per_req.items():
            rw.write(
                "replay_tokens",
                [
                    {"request_id": rid, "pos": i, "token_id": 7, "logprob": raw, "processed_logprob": proc}
                    for i, (raw, proc) in enumerate(pairs)
                ],
                replay=name,
            )
        rw.close()
    return Trace(root)


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def k3(d: float) -> float:
    return math.exp(-d) - 1 + d


@pytest.fixture()
def hand_trace(tmp_path: Path) -> Trace:
    reqs = [
        {"request_id": 1, "step": 0, "group_id": "g0", "sample_idx": 0, "temperature": 1.0, "num_cached_tokens": 0},
        {"request_id": 2, "step": 0, "group_id": "g0", "sample_idx": 1, "temperature": 1.0, "num_cached_tokens": 32},
        {"request_id": 3, "step": 1, "group_id": "g1", "sample_idx": 0, "temperature": 0.7, "top_p": 0.9},
        {"request_id": 4, "step": 2, "group_id": "g2", "sample_idx": 0},  # empty step: no tokens at all
        {"request_id": 5, "step": 1, "group_id": "g1", "sample_idx": 1},  # recorded but never trained
    ]
    recorded = {1: [-1.0, -2.0, -0.5], 2: [-0.3], 3: [NEG_INF, -1.0, -2.0, NEG_INF], 5: [-1.0]}
    trainer = {1: [-1.1, -2.0, -0.1], 2: [-1.0], 3: [-5.0, -1.0, NEG_INF, NEG_INF]}
    return make_trace(
        tmp_path / "t",
        reqs,
        recorded,
        trainer,
        token_versions={1: 0, 2: 0, 3: 1, 5: 1},
        trainer_entropy={1: [0.5, 1.0, 1.5], 2: [2.0]},
        replays={"r": {1: [(-1.0, -0.9), (-2.0, None), (-0.5, -0.5)]}},
    )


def _rows(cols: list[str], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(cols, r)) for r in rows]


def test_by_step_matches_hand_computed_values(hand_trace: Trace) -> None:
    rows = {r["step"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="step"))}
    s0 = rows[0]
    deltas = [0.1, 0.0, -0.4, 0.7]
    assert s0["requests"] == 2 and s0["tokens"] == 4
    assert s0["mean_delta"] == pytest.approx(sum(deltas) / 4, abs=1e-6)
    assert s0["k1"] == pytest.approx(sum(deltas) / 4, abs=1e-6)
    assert s0["mean_abs_delta"] == pytest.approx(sum(abs(d) for d in deltas) / 4, abs=1e-6)
    assert s0["max_abs_delta"] == pytest.approx(0.7, abs=1e-6)
    assert s0["clip_rate"] == pytest.approx(2 / 4)  # ratios 1.105, 1, 0.670, 2.014 at eps 0.2
    assert s0["k3"] == pytest.approx(sum(k3(d) for d in deltas) / 4, abs=1e-6)
    # GSPO: request 1 exp(-0.1)=0.905 inside [0.8, 1.2]; single-token request 2 exp(0.7) outside.
    assert s0["seq_clip_rate"] == pytest.approx(0.5)
    assert s0["mean_seq_ratio"] == pytest.approx((math.exp(-0.1) + math.exp(0.7)) / 2, abs=1e-6)
    assert s0["entropy_b"] == pytest.approx((0.5 + 1.0 + 1.5 + 2.0) / 4)
    assert s0["entropy_a"] is None and s0["nonfinite_tokens"] == 0


def test_infinite_logprobs_are_clipped_but_kept_out_of_means(hand_trace: Trace) -> None:
    rows = {r["step"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="step"))}
    s1 = rows[1]
    # request 3: Δ = [-inf, 0, +inf, NaN]; request 5 has no trainer tokens.
    assert s1["requests"] == 1 and s1["tokens"] == 4
    assert s1["nonfinite_tokens"] == 3
    assert s1["mean_delta"] == pytest.approx(0.0) and s1["k3"] == pytest.approx(0.0)
    assert s1["clip_rate"] == pytest.approx(2 / 3)  # NaN token has no ratio; ±inf are clipped
    assert s1["seq_clip_rate"] is None  # mean of -inf and +inf is undefined


def test_empty_step_is_listed_with_zero_tokens(hand_trace: Trace) -> None:
    rows = {r["step"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="step"))}
    s2 = rows[2]
    assert s2["tokens"] == 0 and s2["requests"] == 0
    assert s2["mean_abs_delta"] is None and s2["clip_rate"] is None and s2["k3"] is None


def test_by_position_and_weight_version(hand_trace: Trace) -> None:
    pos = {r["position"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="position"))}
    # position 0: Δ = 0.1 (req 1), 0.7 (req 2), -inf (req 3)
    assert pos[0]["tokens"] == 3 and pos[0]["nonfinite_tokens"] == 1
    assert pos[0]["mean_abs_delta"] == pytest.approx(0.4, abs=1e-6)
    assert pos[0]["clip_rate"] == pytest.approx(2 / 3)
    assert pos[0]["seq_clip_rate"] is None
    wv = {r["weight_version"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="weight_version"))}
    assert wv[0]["tokens"] == 4 and wv[1]["tokens"] == 4
    assert wv[0]["mean_abs_delta"] == pytest.approx(0.3, abs=1e-6)


def test_by_cache_hit_group_and_sampling(hand_trace: Trace) -> None:
    hit = {r["cache_hit"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="cache_hit"))}
    assert hit[True]["tokens"] == 1 and hit[True]["mean_abs_delta"] == pytest.approx(0.7, abs=1e-6)
    assert hit[False]["tokens"] == 3 + 4
    grp = {r["group_id"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="group"))}
    assert grp["g0"]["tokens"] == 4 and grp["g2"]["tokens"] == 0
    samp = _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="sampling"))
    keys = {r["sampling"] for r in samp}
    assert "T=0.7 top_p=0.9 top_k=-1 min_p=0.0" in {k.replace("0.699999988079071", "0.7").replace(
        "0.8999999761581421", "0.9") for k in keys}


def test_single_token_sequence_ratio_equals_token_ratio(hand_trace: Trace) -> None:
    rows = {r["request_id"]: r for r in _rows(*metrics.diff(hand_trace, "recorded", "trainer", by="request"))}
    assert rows[2]["tokens"] == 1
    assert rows[2]["mean_seq_ratio"] == pytest.approx(math.exp(0.7), rel=1e-6)
    assert rows[2]["seq_clip_rate"] == 1.0 and rows[2]["clip_rate"] == 1.0


def test_eps_changes_clip_rate(hand_trace: Trace) -> None:
    m = metrics.overall(hand_trace, "recorded", "trainer", eps=0.5, where="step = 0")
    # ratios 1.105, 1, 0.670, 2.014: only the last is outside [0.5, 1.5]
    assert m.clip_rate == pytest.approx(1 / 4) and m.tokens == 4
    with pytest.raises(QueryError):
        metrics.overall(hand_trace, "recorded", "trainer", eps=1.5)


def test_replay_sources_raw_and_processed(hand_trace: Trace) -> None:
    assert metrics.list_sources(hand_trace) == ["recorded", "trainer", "replay:r", "replay:r:processed"]
    raw = metrics.overall(hand_trace, "recorded", "replay:r")
    assert raw.tokens == 3 and raw.mean_abs_delta == pytest.approx(0.0) and raw.clip_rate == 0
    proc = metrics.overall(hand_trace, "recorded", "replay:r:processed")
    assert proc.tokens == 2  # the null processed logprob is not compared
    assert proc.mean_abs_delta == pytest.approx(0.05, abs=1e-6)
    with pytest.raises(QueryError, match="unknown source"):
        metrics.overall(hand_trace, "recorded", "replay:nope")


def test_sql_macros_agree_with_python_api(hand_trace: Trace) -> None:
    con = hand_trace.connect(read_only=True)
    cols, rows = metrics.diff(hand_trace, "recorded", "trainer", by="step", eps=0.3)
    cur = con.execute("SELECT * FROM diff_by_step('recorded', 'trainer', eps := 0.3)")
    assert [d[0] for d in cur.description] == cols
    assert cur.fetchall() == rows
    n = con.execute("SELECT count(*) FROM token_diff('recorded', 'replay:r:processed')").fetchone()[0]
    assert n == 2
    srcs = [r[0] for r in con.execute("SELECT source FROM comparison_sources").fetchall()]
    assert "replay:r:processed" in srcs


def test_empty_trace_gives_no_tokens(tmp_path: Path) -> None:
    t = make_trace(tmp_path / "e", [], {})
    m = metrics.overall(t, "recorded", "trainer")
    assert m.tokens == 0 and m.mean_abs_delta is None and m.clip_rate is None
