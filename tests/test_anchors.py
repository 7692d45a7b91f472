"""The anchors' metrics (verl, slime, PipelineRL, TRL) against each stack's formula redone in numpy.

Every reference below is written from the anchor's source (cited in tracekit/compare/anchors.py and
docs/metrics.md) the way the stack computes it: a padded batch of sequences with a response mask,
a = rollout logprobs (the engine), b = training logprobs (the trainer). The batch holds the tokens
both sources have with a finite Δ; a sequence without such a token is not in the batch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from test_metrics import NEG_INF, make_trace

from tracekit.cli import cli
from tracekit.compare import anchors
from tracekit.errors import QueryError
from tracekit.store import Trace

F32 = np.float32


def _f(x: float | None) -> float | None:
    """The value as the trace stores it (float32)."""
    return None if x is None else float(F32(x))


def _build(tmp_path: Path) -> tuple[Trace, dict[int, dict[str, Any]]]:
    """3 steps of random requests plus planted edge cases; returns the trace and, per request, its
    step and the two logprob lists exactly as stored."""
    rng = np.random.default_rng(7)
    reqs, rec, trn, info = [], {}, {}, {}
    rid = 0
    for step in range(3):
        for _ in range(5):
            rid += 1
            n = int(rng.integers(1, 12))
            a = rng.uniform(-4.0, -0.01, n)
            b = a + rng.normal(0.0, 0.4 if step == 1 else 0.05, n)  # step 1: off-policy enough to truncate/mask
            rec[rid] = [_f(x) for x in a]
            trn[rid] = [_f(min(x, 0.0)) for x in b]
            reqs.append({"request_id": rid, "step": step, "group_id": f"g{step}", "sample_idx": rid})
    # Edge cases in step 0: one side -inf, both -inf, a trainer shorter than the recording (nulls),
    # |lr| > 20 (verl's safety bound), a ratio above every cap (TRL mask, verl truncation, RS).
    rec[1] = [NEG_INF, -1.0, NEG_INF, -0.5, -2.0]
    trn[1] = [-3.0, NEG_INF, NEG_INF, -0.5]
    rec[2] = [-25.0, -0.1, -3.0]
    trn[2] = [-1.0, -0.1, -0.2]
    # A request whose only token is non-finite, and a step-3 request never trained.
    rec[16], trn[16] = [NEG_INF], [-1.0]
    rec[17] = [-1.0, -2.0]
    reqs += [{"request_id": 16, "step": 0, "group_id": "g0", "sample_idx": 16},
             {"request_id": 17, "step": 3, "group_id": "g3", "sample_idx": 17}]
    rec = {k: [_f(x) for x in v] for k, v in rec.items()}
    trn = {k: [_f(x) for x in v] for k, v in trn.items()}
    t = make_trace(tmp_path / "t", reqs, rec, trn,
                   replays={"r": {1: [(-1.0, None), (-1.0, -1.2)], 3: [(x, x) for x in rec[3]]}})
    for r in reqs:
        info[r["request_id"]] = {"step": r["step"], "a": rec.get(r["request_id"], []), "b": trn.get(r["request_id"], [])}
    return t, info


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trace, dict[int, dict[str, Any]]]:
    return _build(tmp_path_factory.mktemp("anchors"))


def _batch(info: dict[int, dict[str, Any]], rids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Padded (B, T) rollout / training logprobs and the response mask of the sequences with at
    least one comparable token; also the count of paired tokens left out (non-finite Δ)."""
    seqs, nonfinite = [], 0
    for r in rids:
        a, b = info[r]["a"], info[r]["b"]
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        keep = [(x, y) for x, y in pairs if math.isfinite(x - y)]
        nonfinite += len(pairs) - len(keep)
        if keep:
            seqs.append(keep)
    T = max((len(s) for s in seqs), default=0)
    A, B, M = (np.zeros((len(seqs), T)) for _ in range(3))
    for i, s in enumerate(seqs):
        A[i, :len(s)] = [x for x, _ in s]
        B[i, :len(s)] = [y for _, y in s]
        M[i, :len(s)] = 1.0
    return A, B, M, nonfinite


def _masked_mean(x: np.ndarray, m: np.ndarray, axis: int | None = None) -> Any:
    return (x * m).sum(axis=axis) / m.sum(axis=axis)


def reference(A: np.ndarray, B: np.ndarray, M: np.ndarray, s: anchors.Settings | None = None) -> dict[str, float]:
    """Each anchor's metric as its own code computes it (numpy transcription of the cited source)."""
    s = s or anchors.Settings()
    mask = M.astype(bool)
    out: dict[str, float] = {}
    # verl/utils/debug/metrics.py calculate_debug_metrics: probabilities, |actor − rollout| under the mask.
    actor_probs, rollout_probs = np.exp(B), np.exp(A)
    diff = np.abs(actor_probs - rollout_probs)[mask]
    out["training/rollout_probs_diff_max"] = diff.max()
    out["training/rollout_probs_diff_mean"] = diff.mean()
    out["training/rollout_probs_diff_std"] = diff.std(ddof=1) if diff.size > 1 else float("nan")  # torch.std
    with np.errstate(invalid="ignore", divide="ignore"):
        out["training/rollout_actor_probs_pearson_corr"] = np.corrcoef(np.stack([actor_probs[mask], rollout_probs[mask]]))[0, 1]
    # verl rollout_corr_helper.py: log_ratio = old_log_prob (training) − rollout_log_prob.
    log_ratio = B - A
    out["rollout_corr/kl"] = _masked_mean(A - B, M)
    out["rollout_corr/k3_kl"] = _masked_mean(np.exp(log_ratio) - log_ratio - 1, M)
    sb, thr = s.verl_safety_bound, s.verl_is_threshold
    w = np.exp(np.clip(log_ratio, -sb, sb)) * M  # rollout_is="token", metrics before truncation
    out["rollout_corr/rollout_is_mean[token]"] = _masked_mean(w, M)
    out["rollout_corr/rollout_is_max[token]"] = np.where(mask, w, -np.inf).max()
    out["rollout_corr/rollout_is_min[token]"] = np.where(mask, w, np.inf).min()
    out["rollout_corr/rollout_is_ratio_fraction_high[token]"] = _masked_mean((w > thr).astype(float), M)
    lsum = (log_ratio * M).sum(axis=-1, keepdims=True)  # rollout_is="sequence"
    ws = np.exp(np.clip(lsum, -sb, sb)) * M
    out["rollout_corr/rollout_is_mean[sequence]"] = _masked_mean(ws, M)
    out["rollout_corr/rollout_is_max[sequence]"] = np.exp(min(lsum.max(), sb))
    out["rollout_corr/rollout_is_min[sequence]"] = np.exp(lsum.min())
    out["rollout_corr/rollout_is_ratio_fraction_high[sequence]"] = (lsum > np.log(thr)).mean()
    lo, hi = s.verl_rs_bounds  # rollout_rs="seq_sum_k1", rollout_rs_threshold "lo_hi"
    k1 = -np.clip(log_ratio, -sb, sb)
    seq_stat = (k1 * M).sum(axis=-1)
    keep = ((seq_stat >= np.log(lo)) & (seq_stat <= np.log(hi)))[:, None] * np.ones_like(M)
    out["rollout_corr/rollout_rs_seq_sum_k1_masked_fraction"] = _masked_mean(1 - keep, M)
    out["rollout_corr/rollout_rs_seq_sum_k1_seq_masked_fraction"] = ((keep < 0.5) & mask).any(axis=-1).mean()
    # slime loss.py: sum_of_sample_mean(|old − rollout|) / global batch size (samples).
    per_sample = ((np.abs(B - A) * M).sum(axis=-1) / np.maximum(M.sum(axis=-1), 1))
    out["train/train_rollout_logprob_abs_diff"] = per_sample.sum() / len(M)
    # PipelineRL rl_step: sum_sum(x / num_labels_in_seq) then / num_samples.
    lr_new_old = B - A
    num_labels = M.sum(axis=-1, keepdims=True)
    ratio = np.exp(lr_new_old)

    def sum_sum(x: np.ndarray) -> float:
        return float(np.nan_to_num(x * M).sum())

    out["rl/kl_new_old"] = sum_sum((np.exp(lr_new_old) - lr_new_old - 1) / num_labels) / len(M)
    out["rl/mean_abs_log_ratio_new_old"] = sum_sum(np.abs(lr_new_old) / num_labels) / len(M)
    out["rl/ratio_new_old"] = sum_sum(ratio / num_labels) / len(M)
    out["rl/clamp_log_ratio_new_old_indicator"] = sum_sum((ratio > 1 + s.pipelinerl_epsilon_high) / num_labels) / len(M)
    out["rl/ess"] = sum_sum(ratio) ** 2 / sum_sum(ratio * ratio) / M.sum()
    # TRL grpo_trainer.py: delta = |old − sampling| under the mask; IS ratio per vllm_importance_sampling_mode.
    delta = np.abs(B - A)[mask]
    out["sampling/sampling_logp_difference/mean"] = delta.mean()
    out["sampling/sampling_logp_difference/max"] = delta.max()
    cmin = -np.inf if s.trl_clip_min is None else s.trl_clip_min
    cmax = np.inf if s.trl_clip_max is None else s.trl_clip_max
    per_token_logps_diff = (B - A) * M
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        ld = per_token_logps_diff.sum(axis=-1, keepdims=True) if mode.startswith("sequence") else per_token_logps_diff
        r = np.exp(ld)
        r = np.clip(r, cmin, cmax) if mode.endswith("truncate") else np.where((r < cmin) | (r > cmax), 0.0, r)
        flat = r.flatten() if mode.startswith("sequence") else r[mask]
        for stat, fn in (("min", np.min), ("mean", np.mean), ("max", np.max)):
            out[f"sampling/importance_sampling_ratio/{stat}[{mode}]"] = fn(flat)
    return {k: float(v) for k, v in out.items()}


def _rows(cols: list[str], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(cols, r)) for r in rows]


def _check(got: dict[str, Any], want: dict[str, float]) -> None:
    for name, w in want.items():
        g = got[name]
        if math.isnan(w):
            assert g is None or math.isnan(g), name
        else:
            assert g == pytest.approx(w, rel=1e-9, abs=1e-12), name


def test_every_anchor_metric_per_step_and_overall_equals_the_anchor_formula(built: Any) -> None:
    t, info = built
    by_step = {r["step"]: r for r in _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="step"))}
    assert sorted(by_step) == [0, 1, 2, 3]
    for step in (0, 1, 2):
        A, B, M, nonfinite = _batch(info, [r for r, v in info.items() if v["step"] == step])
        got = by_step[step]
        assert got["tokens"] == int(M.sum()) and got["requests"] == len(M) and got["nonfinite_tokens"] == nonfinite
        _check(got, reference(A, B, M))
    assert by_step[3]["tokens"] == 0 and by_step[3]["training/rollout_probs_diff_mean"] is None
    (overall,) = _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="all"))
    A, B, M, nonfinite = _batch(info, sorted(info))
    assert overall["nonfinite_tokens"] == nonfinite == 4  # request 1: -inf|-3, -1|-inf, -inf|-inf; request 16: -inf|-1
    _check(overall, reference(A, B, M))


def test_edge_cases_reach_every_branch(built: Any) -> None:
    """The planted tokens exercise verl's safety bound and truncation, RS rejection, TRL's mask."""
    t, info = built
    (s0,) = [r for r in _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="step")) if r["step"] == 0]
    assert s0["rollout_corr/rollout_is_max[token]"] == pytest.approx(math.exp(20.0))  # lr = 24 clamped at 20
    assert s0["rollout_corr/rollout_is_ratio_fraction_high[token]"] > 0
    assert s0["rollout_corr/rollout_rs_seq_sum_k1_seq_masked_fraction"] > 0
    assert s0["sampling/importance_sampling_ratio/max[token_truncate]"] == 3.0
    assert s0["sampling/importance_sampling_ratio/max[token_mask]"] < 3.0
    assert s0["sampling/importance_sampling_ratio/min[sequence_mask]"] == 0.0
    assert s0["requests"] == 5  # request 16 has only a non-finite token: not in the batch
    s1 = [r for r in _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="step")) if r["step"] == 1][0]
    assert 0 < s1["rl/clamp_log_ratio_new_old_indicator"] < 1


def test_per_request_and_per_token_keys(built: Any) -> None:
    t, info = built
    per_req = {r["request_id"]: r for r in _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="request"))}
    for rid in (2, 5, 9):
        A, B, M, _ = _batch(info, [rid])
        _check(per_req[rid], reference(A, B, M))
    # Per-token keys: token metrics over the tokens at that position; sequence metrics do not exist.
    pos = {r["position"]: r for r in _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="position"))}
    xs = [(v["a"][1], v["b"][1]) for v in info.values() if len(v["a"]) > 1 and len(v["b"]) > 1
          and math.isfinite(v["a"][1] - v["b"][1])]
    a, b = np.array([x for x, _ in xs]), np.array([y for _, y in xs])
    assert pos[1]["tokens"] == len(xs)
    assert pos[1]["training/rollout_probs_diff_std"] == pytest.approx(np.abs(np.exp(b) - np.exp(a)).std(ddof=1), rel=1e-9)
    assert pos[1]["training/rollout_actor_probs_pearson_corr"] == pytest.approx(np.corrcoef(np.exp(b), np.exp(a))[0, 1], rel=1e-9)
    assert pos[1]["sampling/sampling_logp_difference/max"] == pytest.approx(np.abs(b - a).max(), rel=1e-12)
    for name in ("train/train_rollout_logprob_abs_diff", "rl/kl_new_old",
                 "sampling/importance_sampling_ratio/mean[sequence_mask]", "rollout_corr/rollout_is_mean[sequence]"):
        assert pos[1][name] is None


def test_settings_change_caps_and_the_sql_agrees(built: Any) -> None:
    t, info = built
    s = anchors.Settings(verl_is_threshold=1.5, verl_rs_bounds=(0.8, 1.25), trl_clip_max=2.0, trl_clip_min=0.5,
                         pipelinerl_epsilon_high=0.2)
    (got,) = _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="all", settings=s))
    A, B, M, _ = _batch(info, sorted(info))
    _check(got, reference(A, B, M, s))
    assert got["sampling/importance_sampling_ratio/min[token_truncate]"] == 0.5
    with pytest.raises(QueryError):
        anchors.anchor_metrics(t, "recorded", "trainer", settings=anchors.Settings(trl_clip_min=3.0, trl_clip_max=2.0))


def test_any_two_sources_and_styles(built: Any) -> None:
    t, info = built
    # replay:r:processed has a null for request 1 position 0: only the non-null tokens pair up.
    cols, rows = anchors.anchor_metrics(t, "replay:r:processed", "recorded", by="all", style="trl")
    assert cols == ["scope", "requests", "tokens", "nonfinite_tokens"] + [m.name for m in anchors.metrics_for("trl")]
    (r,) = _rows(cols, rows)
    assert r["tokens"] == 1 + len(info[3]["a"]) and r["sampling/sampling_logp_difference/max"] == pytest.approx(0.2, rel=1e-6)
    cols, _ = anchors.anchor_metrics(t, "recorded", "trainer", style="slime")
    assert cols[4:] == ["train/train_rollout_logprob_abs_diff"]
    assert {m.style for m in anchors.metrics_for()} == set(anchors.STYLES)
    assert len({m.name for m in anchors.METRICS}) == len(anchors.METRICS)  # every column name is unique
    for m in anchors.METRICS:
        assert "@" in m.source and m.level in ("token", "sequence")
    with pytest.raises(QueryError, match="unknown style"):
        anchors.anchor_metrics(t, "recorded", "trainer", style="openrlhf")
    with pytest.raises(QueryError, match="unknown source"):
        anchors.anchor_metrics(t, "recorded", "replay:nope")
    with pytest.raises(QueryError, match="--by"):
        anchors.anchor_metrics(t, "recorded", "trainer", by="minute")


def test_identical_sources_give_the_ideal_values(tmp_path: Path) -> None:
    t = make_trace(tmp_path / "t", [{"request_id": 1, "step": 0}, {"request_id": 2, "step": 0}],
                   {1: [-1.0, -0.5], 2: [-2.0]}, {1: [-1.0, -0.5], 2: [-2.0]})
    (r,) = _rows(*anchors.anchor_metrics(t, "recorded", "trainer", by="all"))
    assert r["training/rollout_probs_diff_max"] == 0 and r["train/train_rollout_logprob_abs_diff"] == 0
    assert r["rl/kl_new_old"] == 0 and r["rollout_corr/k3_kl"] == 0 and r["rl/ess"] == pytest.approx(1.0)
    assert r["training/rollout_actor_probs_pearson_corr"] == pytest.approx(1.0)
    assert r["sampling/importance_sampling_ratio/mean[sequence_mask]"] == 1.0


def test_cli_json_csv_table_and_errors(built: Any) -> None:
    t, _ = built
    run = CliRunner()
    r = run.invoke(cli, ["metrics", str(t.root), "--a", "recorded", "--b", "trainer", "--by", "step", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert "NaN" not in r.output and "Infinity" not in r.output
    rows = json.loads(r.output)
    cols, want = anchors.anchor_metrics(t, "recorded", "trainer", by="step")
    assert [x["step"] for x in rows] == [w[0] for w in want]
    assert rows[0]["training/rollout_probs_diff_mean"] == pytest.approx(want[0][cols.index("training/rollout_probs_diff_mean")])
    assert rows[-1]["training/rollout_probs_diff_std"] is None  # step 3: no tokens
    r = run.invoke(cli, ["metrics", str(t.root), "--style", "pipelinerl", "--by", "all", "--format", "csv"])
    assert r.exit_code == 0, r.output
    (row,) = list(csv.DictReader(io.StringIO(r.output)))
    assert set(row) == {"scope", "requests", "tokens", "nonfinite_tokens"} | {m.name for m in anchors.metrics_for("pipelinerl")}
    r = run.invoke(cli, ["metrics", str(t.root), "--style", "verl"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "rollout_corr/rollout_is_mean[token]" in r.output and "step 0" in r.output and "0.005" in r.output
    for args, msg in ((["--b", "replay:nope"], "unknown source"), (["--style", "nope"], "--style"),
                      (["--by", "minute"], "--by")):
        r = run.invoke(cli, ["metrics", str(t.root), *args])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and msg in r.output, r.output
    r = run.invoke(cli, ["metrics", str(t.root.parent / "missing")])
    assert r.exit_code == 2 and r.output.count("\n") == 1


def test_report_plots_the_anchor_metrics(built: Any, tmp_path: Path) -> None:
    from tracekit.report import write_report
    from tracekit.report.data import ANCHOR_PLOT, collect

    t, info = built
    d = collect(t.root)
    assert d.anchor_pair == ("recorded", "trainer") and set(d.anchors) == set(ANCHOR_PLOT)
    A, B, M, _ = _batch(info, [r for r, v in info.items() if v["step"] == 1])
    assert d.anchors["rl/kl_new_old"][1] == pytest.approx(reference(A, B, M)["rl/kl_new_old"], rel=1e-9)
    paths = write_report(t.root, tmp_path / "rep", compute_attribution=False)
    page = paths["html"].read_text()
    assert paths["anchors"].read_bytes().startswith(b"\x89PNG") and "Anchor metrics" in page
    assert page.count('src="data:image/png;base64,') == len(paths) - 1
    # Without trainer logprobs the pair is recorded vs the first replay.
    t2 = make_trace(tmp_path / "t2", [{"request_id": 1, "step": 0}], {1: [-1.0, -2.0]},
                    replays={"z": {1: [(-1.1, -1.0), (-2.0, -2.0)]}})
    assert collect(t2.root).anchor_pair == ("recorded", "replay:z")
