"""RL metrics against hand-computed values, on small traces written with the real TraceWriter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tracekit.compare import metrics, views
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
    con = views.connect(hand_trace)
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


def _close(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
    """Same rows up to float summation order."""
    return len(got) == len(want) and all(g == pytest.approx(w, nan_ok=True) for g, w in zip(got, want))


def _copied_replay(t: Trace, name: str, recorded: dict[int, list[float]], replayed: dict[int, list[tuple[float | None, float | None]]],
                   versions: dict[int, int], *, flag: bool = True, trace_id: str | None = None) -> None:
    """A replay as tracekit's replayer writes it: rows carry the recorded logprob/weight version."""
    import json

    rw = TraceWriter(t.root, kind="replay", flush_interval=60)
    for rid, pairs in replayed.items():
        rec = recorded.get(rid, [])
        rw.write("replay_tokens", [
            {"request_id": rid, "pos": i, "token_id": 7, "logprob": raw, "processed_logprob": proc,
             "recorded_logprob": rec[i] if i < len(rec) else None,
             "recorded_weight_version": versions.get(rid) if i < len(rec) else None, "weight_version": 9}
            for i, (raw, proc) in enumerate(pairs)], replay=name)
    rw.close()
    meta = {"name": name, "mode": "score", "trace_id": trace_id or t.manifest["trace_id"]}
    if flag:
        meta["recorded_copy"] = True
    (t.root / "replays" / name / "replay.json").write_text(json.dumps(meta))


def test_recorded_copy_reads_one_replay_and_equals_the_hash_join(tmp_path: Path) -> None:
    """recorded vs a replay that copied the recorded values: no join, same numbers as the hash
    join for every grouping key and both orders; a copy made in another trace (counterfactual
    scratch) or without the flag is never trusted; the SQL macros prune to the same path."""

    reqs = [{"request_id": i, "step": i % 2, "group_id": f"g{i % 3}", "sample_idx": 0, "temperature": 1.0} for i in range(1, 6)]
    recorded = {1: [-1.0, -2.0, -0.5], 2: [-0.3, NEG_INF], 3: [-0.1, -4.0, -1.2, -0.7], 5: [-2.5]}
    versions = {1: 0, 2: 0, 3: 1, 5: 1}
    t = make_trace(tmp_path / "t", reqs, recorded, token_versions=versions)
    # Replay rows beyond the recording (regenerate) and a missing request (4 was never recorded).
    rep = {1: [(-1.1, -1.0), (-2.0, None), (-0.2, -0.2), (-3.0, -3.0)], 2: [(-0.3, -0.3), (NEG_INF, NEG_INF)],
           3: [(-0.1, -0.1), (-3.0, -2.9), (-1.2, -1.1), (-0.9, -0.9)], 4: [(-1.0, -1.0)]}
    for name, kw in (("c", {}), ("h", {"flag": False}), ("x", {"trace_id": "another-trace"})):
        _copied_replay(t, name, recorded, rep, versions, **kw)
    t = Trace(t.root)
    copied = views.copied_pairs_sql(t)
    assert set(copied) == {("recorded", "replay:c"), ("replay:c", "recorded"),
                           ("recorded", "replay:c:processed"), ("replay:c:processed", "recorded")}
    con = views.connect(t)
    for suffix in ("", ":processed"):
        for a, b in (("recorded", f"replay:c{suffix}"), (f"replay:c{suffix}", "recorded")):
            a_h, b_h = (x.replace("replay:c", "replay:h") for x in (a, b))
            for by in metrics.AGG_KEYS:
                cols, got = metrics.diff(t, a, b, by=by)
                _, want = metrics.diff(t, a_h, b_h, by=by)  # not flagged: the hash join
                assert _close(got, want), (a, b, by)
                assert _close(con.execute(f"SELECT * FROM diff_by_{by}('{a}', '{b}')").fetchall(), got)
    m = metrics.overall(t, "recorded", "replay:c")
    assert m.tokens == 9 and m.requests == 3  # 4 has no recorded tokens; 1's 4th token is not recorded; 5 not replayed
    # Token-keyed grouping uses the recorded weight version first, as the join does.
    assert [r[0] for r in metrics.diff(t, "recorded", "replay:c", by="weight_version")[1]] == [0, 1]
    # The macro's pair union: with the copy, the only join left is request_info's (per request).
    def joins(a: str, b: str) -> int:
        plan = "\n".join(r[1] for r in con.execute(f"EXPLAIN SELECT * FROM diff_by_all('{a}', '{b}')").fetchall())
        return plan.upper().replace(" ", "_").count("HASH_JOIN")

    assert joins("recorded", "replay:h") == joins("recorded", "replay:c") + 1 >= 2


def test_manifest_with_an_older_table_version_is_readable(tmp_path: Path) -> None:
    """Additive evolution: a trace whose manifest holds replay_tokens v1's hash opens; an unknown
    hash is refused with one line."""
    import json

    from tracekit.errors import TraceFormatError
    from tracekit.schema import table

    t = make_trace(tmp_path / "t", [{"request_id": 1, "step": 0}], {1: [-1.0]})
    rt = table("replay_tokens")
    assert rt.version >= 2 and rt.hash_at(1) in rt.readable_hashes and rt.hash_at(1) != rt.hash
    p = t.root / "trace.json"
    m = json.loads(p.read_text())
    m["schema_hashes"]["replay_tokens"] = rt.hash_at(1)
    p.write_text(json.dumps(m))
    assert metrics.overall(Trace(t.root), "recorded", "recorded").tokens == 1
    m["schema_hashes"]["replay_tokens"] = "0" * 64
    p.write_text(json.dumps(m))
    with pytest.raises(TraceFormatError, match="different schema"):
        Trace(t.root)
