"""The RL stacks' own mismatch metrics (verl, slime, PipelineRL, TRL), under their names, from one trace.

Roles: source ``a`` is the **rollout** side (behaviour / "old" policy: the engine that sampled the
tokens, e.g. ``recorded``), source ``b`` the **training** side (the policy the trainer scores with,
"new" in PipelineRL, ``old_log_probs`` in verl, ``old_per_token_logps`` in TRL, e.g. ``trainer``).
As in ``tracekit diff``, Δ = logprob_a − logprob_b; the stacks' log-ratio is the other way round,
lr = log π_train − log π_rollout = logprob_b − logprob_a = −Δ, and their IS ratio is exp(lr).

Each metric is the anchor's formula, read in its source (file@commit in ``source``; docs/metrics.md),
evaluated in DOUBLE on the tokens both sources have with a finite Δ. Tokens with a −inf on one or both
sides are left out of every metric and counted in ``nonfinite_tokens`` (the stacks' own code would
log inf or NaN for the whole batch). A "sequence" is a request; sequence-level metrics (per-sequence
means, sequence IS ratios) exist only under request keys (step, request, group, sampling,
temperature, cache_hit, all) and are NULL under the per-token keys (position, weight_version).

Query plan (scales like ``diff``): the pair relation of ``views.pairs_sql`` → per-request partial
sums (or per token key) → one row per group. Standard deviation and Pearson correlation over all
tokens of a group are combined from per-request means and centred second moments (Chan et al.), so
no per-token join with ``request_info`` is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import duckdb

from ..errors import QueryError
from ..store.reader import Trace
from . import views
from .metrics import run
from .views import AGG_KEYS, REQUEST_KEYS, TOKEN_KEYS

STYLES = ("verl", "slime", "pipelinerl", "trl")

VERL = "volcengine/verl@b178a3cd5"
SLIME = "THUDM/slime@624b824a8"
PIPELINERL = "ServiceNow/PipelineRL@58d3934"
TRL = "huggingface/trl@f2cd577"


@dataclass(frozen=True)
class Settings:
    """The anchors' thresholds and caps; defaults are each stack's own default (see docs/metrics.md)."""

    verl_is_threshold: float = 2.0  # rollout_is_threshold (verl/trainer/config/algorithm/rollout_correction.yaml)
    verl_rs_bounds: tuple[float, float] = (0.5, 2.0)  # decoupled_seq_is_rs(): rollout_rs_threshold "0.5_2.0"
    verl_safety_bound: float = 20.0  # SAFETY_BOUND in rollout_corr_helper.py
    trl_clip_max: float | None = 3.0  # vllm_importance_sampling_clip_max
    trl_clip_min: float | None = None  # vllm_importance_sampling_clip_min
    pipelinerl_epsilon_high: float = 0.02  # conf/finetune/base.yaml rl.epsilon_high (policy_loss: reinforce)


@dataclass(frozen=True)
class AnchorMetric:
    """One metric as its stack logs it: name, formula in a/b terms, where it is defined, threshold."""

    name: str
    style: str
    level: str  # "token": over all tokens of a group; "sequence": per request first (NULL under token keys)
    formula: str
    source: str
    threshold: str | None
    sql: str  # aggregate over the per-request partials ``s`` (see _PARTIAL); {placeholders} from Settings


# Per-token values (lr = logprob_b − logprob_a on finite-Δ tokens, else NULL; every aggregate skips NULL).
_TOKENS = """
SELECT t.request_id, t.pos, t.weight_version, t.lr,
       CASE WHEN t.lr IS NOT NULL THEN exp(t.logprob_a) END AS pa,
       CASE WHEN t.lr IS NOT NULL THEN exp(t.logprob_b) END AS pb,
       exp(t.lr) AS r,
       CASE WHEN t.lr IS NOT NULL THEN least(greatest(t.lr, -{sb}), {sb}) END AS lr_safe
FROM (SELECT p.*, CASE WHEN p.finite THEN p.logprob_b - p.logprob_a END AS lr FROM ({token_pairs}) AS p) AS t
"""

# Sums per request (``grp`` = request_id) or per token key (``grp`` = the key). m2 = centred second
# moment (var_pop · n), c = centred co-moment (covar_pop · n): they combine exactly across requests.
_PARTIAL = """
SELECT {grp} AS grp, {requests} AS requests, count(*) AS pairs, count(x.lr) AS n,
       sum(abs(x.pb - x.pa)) AS pd_sum, max(abs(x.pb - x.pa)) AS pd_max, avg(abs(x.pb - x.pa)) AS pd_mean,
       var_pop(abs(x.pb - x.pa)) * count(x.lr) AS pd_m2,
       avg(x.pa) AS pa_mean, avg(x.pb) AS pb_mean,
       var_pop(x.pa) * count(x.lr) AS pa_m2, var_pop(x.pb) * count(x.lr) AS pb_m2,
       covar_pop(x.pa, x.pb) * count(x.lr) AS pab_c,
       sum(x.lr) AS lr_sum, sum(x.lr_safe) AS lr_safe_sum, sum(abs(x.lr)) AS ad_sum, max(abs(x.lr)) AS ad_max,
       sum(exp(x.lr) - x.lr - 1.0) AS k3_sum,
       sum(exp(x.lr_safe)) AS w_sum, max(exp(x.lr_safe)) AS w_max, min(exp(x.lr_safe)) AS w_min,
       sum((exp(x.lr_safe) > {verl_thr})::INT) AS w_hi,
       sum(x.r) AS r_sum, sum(x.r * x.r) AS r2_sum, sum((x.r > 1.0 + {pl_eps})::INT) AS pl_clamped,
       sum({tt}) AS tt_sum, min({tt}) AS tt_min, max({tt}) AS tt_max,
       sum({tm}) AS tm_sum, min({tm}) AS tm_min, max({tm}) AS tm_max
FROM ({tokens}) AS x
GROUP BY 1
"""

# Group means of the per-request first moments (for the between-request part of m2 / c).
_WINDOWED = """
SELECT {key} AS k, s.*,
       sum(s.n * s.pd_mean) OVER w / nullif(sum(s.n) OVER w, 0) AS g_pd,
       sum(s.n * s.pa_mean) OVER w / nullif(sum(s.n) OVER w, 0) AS g_pa,
       sum(s.n * s.pb_mean) OVER w / nullif(sum(s.n) OVER w, 0) AS g_pb
FROM {rel}
WINDOW w AS (PARTITION BY {key})
"""

_GROUPED = """
SELECT s.k AS {name},
       coalesce(sum(s.requests), 0)::BIGINT AS requests,
       coalesce(sum(s.n), 0)::BIGINT AS tokens,
       coalesce(sum(s.pairs - s.n), 0)::BIGINT AS nonfinite_tokens{metrics}
FROM ({windowed}) AS s
GROUP BY s.k
ORDER BY 1 NULLS FIRST
"""

_N = "nullif(sum(s.n), 0)"
_VAR = "(sum(s.{m}_m2) + sum(s.n * (s.{m}_mean - s.g_{m}) * (s.{m}_mean - s.g_{m})))"


def _clip(x: str, lo: str, hi: str) -> str:
    """least/greatest that keep NULL NULL (DuckDB's skip NULL arguments: least(NULL, 3) = 3)."""
    return f"CASE WHEN ({x}) IS NOT NULL THEN least(greatest({x}, {lo}), {hi}) END"


def _seq_is(mode: str) -> str:
    """TRL's sequence ratio exp(Σ lr) of one request after truncation or masking (SQL)."""
    return "({})".format(_trl_sql(mode, "exp(s.lr_sum)"))


def _trl_sql(mode: str, r: str) -> str:
    if mode == "truncate":
        return _clip(r, "{trl_min}", "{trl_max}")
    return f"CASE WHEN {r} < {{trl_min}} OR {r} > {{trl_max}} THEN 0.0 ELSE {r} END"


def _verl_rs_rejected() -> str:
    # seq_sum_k1 = Σ token_k1 = Σ −clamp(lr, ±20); kept when log(lower) <= it <= log(upper).
    return "(-s.lr_safe_sum < {rs_lo_log} OR -s.lr_safe_sum > {rs_hi_log})"


_V_DEBUG = "verl/utils/debug/metrics.py `calculate_debug_metrics`"
_V_CORR = "verl/trainer/ppo/rollout_corr_helper.py"
_V_FAQ = "docs/faq/faq.rst"

METRICS: tuple[AnchorMetric, ...] = (
    # ------------------------------------------------------------------ verl
    AnchorMetric("training/rollout_probs_diff_max", "verl", "token",
                 "max |exp(b) − exp(a)| over the batch's response tokens",
                 f"{VERL} {_V_DEBUG}", None, "max(s.pd_max)"),
    AnchorMetric("training/rollout_probs_diff_mean", "verl", "token",
                 "mean over all tokens of |exp(b) − exp(a)| (probabilities, not logprobs)",
                 f"{VERL} {_V_DEBUG}; threshold: {_V_FAQ}", "< 0.005 normal, > 0.01 a precision problem",
                 f"sum(s.pd_sum) / {_N}"),
    AnchorMetric("training/rollout_probs_diff_std", "verl", "token",
                 "torch.std (n − 1) over all tokens of |exp(b) − exp(a)|",
                 f"{VERL} {_V_DEBUG}", None,
                 "sqrt(" + _VAR.format(m="pd") + " / nullif(sum(s.n) - 1, 0))"),
    AnchorMetric("training/rollout_actor_probs_pearson_corr", "verl", "token",
                 "Pearson correlation (torch.corrcoef) of exp(b) and exp(a) over all tokens",
                 f"{VERL} {_V_DEBUG}", "none in verl (closer to 1 is better; cites arXiv 2506.13585)",
                 "(sum(s.pab_c) + sum(s.n * (s.pa_mean - s.g_pa) * (s.pb_mean - s.g_pb))) / "
                 "nullif(sqrt(" + _VAR.format(m="pa") + " * " + _VAR.format(m="pb") + "), 0)"),
    AnchorMetric("rollout_corr/kl", "verl", "token",
                 "k1 = mean(a − b): KL(π_rollout ‖ π_train) on tokens sampled by the rollout",
                 f"{VERL} {_V_CORR} `compute_offpolicy_metrics`", None, f"-sum(s.lr_sum) / {_N}"),
    AnchorMetric("rollout_corr/k3_kl", "verl", "token",
                 "k3 = mean(exp(lr) − lr − 1), lr = b − a", f"{VERL} {_V_CORR} `compute_offpolicy_metrics`",
                 None, f"sum(s.k3_sum) / {_N}"),
    AnchorMetric("rollout_corr/rollout_is_mean[token]", "verl", "token",
                 "mean of w = exp(clamp(lr, ±20)) over tokens, before truncation at the threshold (Token-TIS)",
                 f"{VERL} {_V_CORR} `compute_is_metrics` (rollout_is=token)",
                 "truncated at rollout_is_threshold = {verl_thr}", f"sum(s.w_sum) / {_N}"),
    AnchorMetric("rollout_corr/rollout_is_max[token]", "verl", "token", "max w over tokens",
                 f"{VERL} {_V_CORR} `compute_is_metrics`", None, "max(s.w_max)"),
    AnchorMetric("rollout_corr/rollout_is_min[token]", "verl", "token", "min w over tokens",
                 f"{VERL} {_V_CORR} `compute_is_metrics`", None, "min(s.w_min)"),
    AnchorMetric("rollout_corr/rollout_is_ratio_fraction_high[token]", "verl", "token",
                 "share of tokens with w > threshold (the tokens Token-TIS truncates)",
                 f"{VERL} {_V_CORR} `compute_is_metrics`", "rollout_is_threshold = {verl_thr}",
                 f"sum(s.w_hi) / {_N}"),
    AnchorMetric("rollout_corr/rollout_is_mean[sequence]", "verl", "sequence",
                 "token-weighted mean of W = exp(clamp(Σ lr, ±20)) per sequence, before truncation (Seq-TIS)",
                 f"{VERL} {_V_CORR} `compute_rollout_correction_weights` (rollout_is=sequence)",
                 "truncated at rollout_is_threshold = {verl_thr}",
                 "sum(s.n * exp(" + _clip("s.lr_sum", "-{sb}", "{sb}") + f")) / {_N}"),
    AnchorMetric("rollout_corr/rollout_is_max[sequence]", "verl", "sequence", "exp(min(max Σ lr, 20))",
                 f"{VERL} {_V_CORR} `compute_is_metrics`", None, "exp(" + _clip("max(s.lr_sum)", "'-inf'::DOUBLE", "{sb}") + ")"),
    AnchorMetric("rollout_corr/rollout_is_min[sequence]", "verl", "sequence", "exp(min Σ lr)",
                 f"{VERL} {_V_CORR} `compute_is_metrics`", None, "exp(min(s.lr_sum))"),
    AnchorMetric("rollout_corr/rollout_is_ratio_fraction_high[sequence]", "verl", "sequence",
                 "share of sequences with Σ lr > log(threshold)", f"{VERL} {_V_CORR} `compute_is_metrics`",
                 "rollout_is_threshold = {verl_thr}", "avg((s.lr_sum > {verl_thr_log})::DOUBLE)"),
    AnchorMetric("rollout_corr/rollout_rs_seq_sum_k1_masked_fraction", "verl", "sequence",
                 "share of tokens in sequences rejected by Seq-MIS: Σ −clamp(lr, ±20) outside [log lo, log hi]",
                 f"{VERL} {_V_CORR} `compute_rollout_rejection_mask` (decoupled_seq_is_rs)",
                 "rollout_rs_threshold = {rs_lo}_{rs_hi}",
                 f"sum(CASE WHEN {_verl_rs_rejected()} THEN s.n ELSE 0 END) / {_N}"),
    AnchorMetric("rollout_corr/rollout_rs_seq_sum_k1_seq_masked_fraction", "verl", "sequence",
                 "share of sequences rejected by Seq-MIS", f"{VERL} {_V_CORR} `compute_rollout_rejection_mask`",
                 "rollout_rs_threshold = {rs_lo}_{rs_hi}", f"avg(({_verl_rs_rejected()})::DOUBLE)"),
    # ------------------------------------------------------------------ slime
    AnchorMetric("train/train_rollout_logprob_abs_diff", "slime", "sequence",
                 "per sample mean |b − a| over its tokens, then mean over samples (sum_of_sample_mean / "
                 "global batch size, calculate_per_token_loss off)",
                 f"{SLIME} slime/backends/megatron_utils/loss.py `policy_loss_function`, cp_utils.py "
                 "`get_sum_of_sample_mean`, observability/train_metric_utils.py `reduce_train_step_metrics`",
                 "<= 0.1 CI gate (--ci-train-rollout-logprob-abs-diff-threshold, slime/utils/arguments.py); "
                 "< 1e-6 deterministic alignment (docs/en/advanced/reproducibility.md)",
                 "avg(s.ad_sum / nullif(s.n, 0))"),
    # ------------------------------------------------------------------ PipelineRL
    AnchorMetric("rl/kl_new_old", "pipelinerl", "sequence",
                 "per sequence mean of exp(lr) − lr − 1 (lr = new − old = b − a), then mean over sequences",
                 f"{PIPELINERL} pipelinerl/finetune/rl/__init__.py `rl_step`, rl/utils.py `aggregate_rl_stats`",
                 None, "avg(s.k3_sum / nullif(s.n, 0))"),
    AnchorMetric("rl/mean_abs_log_ratio_new_old", "pipelinerl", "sequence",
                 "per sequence mean |b − a|, then mean over sequences",
                 f"{PIPELINERL} pipelinerl/finetune/rl/__init__.py `rl_step`", None, "avg(s.ad_sum / nullif(s.n, 0))"),
    AnchorMetric("rl/ratio_new_old", "pipelinerl", "sequence",
                 "per sequence mean exp(b − a), then mean over sequences",
                 f"{PIPELINERL} pipelinerl/finetune/rl/__init__.py `rl_step`", None, "avg(s.r_sum / nullif(s.n, 0))"),
    AnchorMetric("rl/clamp_log_ratio_new_old_indicator", "pipelinerl", "sequence",
                 "per sequence share of tokens with exp(b − a) > 1 + epsilon_high (reinforce loss), mean over sequences",
                 f"{PIPELINERL} pipelinerl/finetune/rl/__init__.py `rl_step`",
                 "epsilon_high = {pl_eps} (conf/finetune/base.yaml)", "avg(s.pl_clamped / nullif(s.n, 0))"),
    AnchorMetric("rl/ess", "pipelinerl", "token", "(Σ exp(lr))² / Σ exp(lr)² / tokens",
                 f"{PIPELINERL} pipelinerl/finetune_loop.py (rl/ess)", None,
                 f"sum(s.r_sum) * sum(s.r_sum) / nullif(sum(s.r2_sum), 0) / {_N}"),
    # ------------------------------------------------------------------ TRL
    AnchorMetric("sampling/sampling_logp_difference/mean", "trl", "token", "mean |b − a| over all tokens",
                 f"{TRL} trl/trainer/grpo_trainer.py `_generate_and_score_completions`", None,
                 f"sum(s.ad_sum) / {_N}"),
    AnchorMetric("sampling/sampling_logp_difference/max", "trl", "token", "max |b − a|",
                 f"{TRL} trl/trainer/grpo_trainer.py `_generate_and_score_completions`", None, "max(s.ad_max)"),
)

_TRL_SRC = f"{TRL} trl/trainer/grpo_trainer.py `_generate_and_score_completions`, grpo_config.py"
_TRL_THR = "C_max = {trl_max_txt}, C_min = {trl_min_txt} (vllm_importance_sampling_clip_max/min)"
for _mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
    _level, _kind = _mode.split("_")
    _what = ("exp(b − a) per token" if _level == "token" else "exp(Σ (b − a)) per sequence") + (
        ", clamped to [C_min, C_max]" if _kind == "truncate" else ", 0 outside [C_min, C_max]")
    if _level == "token":
        _aggs = {"min": f"min(s.t{_kind[0]}_min)", "mean": f"sum(s.t{_kind[0]}_sum) / {_N}",
                 "max": f"max(s.t{_kind[0]}_max)"}
    else:
        _aggs = {k: f"{k if k != 'mean' else 'avg'}({_seq_is(_kind)})" for k in ("min", "mean", "max")}
    for _stat in ("min", "mean", "max"):
        METRICS += (AnchorMetric(
            f"sampling/importance_sampling_ratio/{_stat}[{_mode}]", "trl", _level,
            f"{_stat} of {_what} over {'tokens' if _level == 'token' else 'sequences'}"
            + (" (TRL's default mode)" if _mode == "sequence_mask" else ""),
            _TRL_SRC, _TRL_THR, _aggs[_stat]),)


def metrics_for(style: str = "all") -> list[AnchorMetric]:
    """The metrics of ``style`` (verl, slime, pipelinerl, trl) or of all of them."""
    if style != "all" and style not in STYLES:
        raise QueryError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}, all")
    return [m for m in METRICS if style in ("all", m.style)]


def _params(s: Settings) -> dict[str, str]:
    lo, hi = s.verl_rs_bounds
    if not (s.verl_is_threshold > 0 and 0 < lo < hi):
        raise QueryError(f"bad verl thresholds: is {s.verl_is_threshold}, rs {lo}_{hi}")
    if s.trl_clip_min is not None and s.trl_clip_max is not None and s.trl_clip_min >= s.trl_clip_max:
        raise QueryError(f"trl_clip_min {s.trl_clip_min} must be below trl_clip_max {s.trl_clip_max}")
    return {
        "sb": repr(float(s.verl_safety_bound)), "verl_thr": repr(float(s.verl_is_threshold)),
        "verl_thr_log": repr(math.log(s.verl_is_threshold)),
        "rs_lo": repr(float(lo)), "rs_hi": repr(float(hi)),
        "rs_lo_log": repr(math.log(lo)), "rs_hi_log": repr(math.log(hi)),
        "trl_max": "'inf'::DOUBLE" if s.trl_clip_max is None else repr(float(s.trl_clip_max)),
        "trl_min": "'-inf'::DOUBLE" if s.trl_clip_min is None else repr(float(s.trl_clip_min)),
        "trl_max_txt": str(s.trl_clip_max), "trl_min_txt": str(s.trl_clip_min),
        "pl_eps": repr(float(s.pipelinerl_epsilon_high)),
    }


def threshold(m: AnchorMetric, settings: Settings | None = None) -> str | None:
    """``m.threshold`` with the settings' values filled in."""
    return m.threshold.format(**_params(settings or Settings())) if m.threshold else None


def anchor_sql(
    trace: Trace, a: str, b: str, by: str = "step", style: str = "all", settings: Settings | None = None
) -> str:
    """The SQL ``anchor_metrics`` runs: a = rollout (behaviour/old), b = training (new policy)."""
    if by not in AGG_KEYS:
        raise QueryError(f"--by must be one of {', '.join(AGG_KEYS)}, not {by!r}")
    chosen = metrics_for(style)
    p = _params(settings or Settings())
    tokens = _TOKENS.format(token_pairs=views.token_pairs_sql(views.pairs_sql(trace, a, b)), sb=p["sb"])
    trunc, mask = (_trl_sql(k, "x.r").format(**p) for k in ("truncate", "mask"))
    per_request = by in REQUEST_KEYS
    partial = _PARTIAL.format(
        grp="x.request_id" if per_request else "x." + TOKEN_KEYS[by].split(".", 1)[1],
        requests="(count(x.lr) > 0)::INT" if per_request else "count(DISTINCT x.request_id) FILTER (WHERE x.lr IS NOT NULL)",
        tokens=tokens, tt=trunc, tm=mask, **p)
    if per_request:
        rel = f"request_info AS r LEFT JOIN ({partial}) AS s ON s.grp = r.request_id"
        key = REQUEST_KEYS[by]
    else:
        rel, key = f"({partial}) AS s", "s.grp"
    cols = "".join(
        f",\n       {m.sql.format(**p) if per_request or m.level == 'token' else 'NULL::DOUBLE'} AS {_ident(m.name)}"
        for m in chosen)
    name = {"request": "request_id", "group": "group_id", "all": "scope"}.get(by, by)
    return _GROUPED.format(name=name, metrics=cols, windowed=_WINDOWED.format(key=key, rel=rel))


def anchor_metrics(
    trace: Trace | str,
    a: str,
    b: str,
    by: str = "step",
    style: str = "all",
    con: duckdb.DuckDBPyConnection | None = None,
    settings: Settings | None = None,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The anchors' metrics of rollout source ``a`` vs training source ``b``, grouped by ``by``.

    Returns (column names, rows): the key, ``requests``, ``tokens`` (finite-Δ tokens the metrics
    use), ``nonfinite_tokens`` (paired but left out), then each metric of ``style`` under its name.
    QueryError for an unknown source, key or style.
    """
    t = trace if isinstance(trace, Trace) else Trace(trace)
    return run(t, anchor_sql(t, a, b, by, style, settings), con)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
