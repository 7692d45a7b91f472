"""runtime_defaults: engine behaviour nobody asked for — generation_config sampling defaults
applied silently, prefix-cache hits computed on stale KV, async scheduling.

Signature: resolved sampling params ≠ requested, or resolved params carrying the model's
generation_config defaults (engine fingerprint ``default_sampling_params``); a larger gap on
prefix-cache hits than on misses; ``async_scheduling`` on. Ladder rung: replay with
``generation_config="vllm"`` and each request's sampling params as the engine would have resolved
them without the file (a counterfactual rewrite of the recorded requests).
Async scheduling cannot run on CPU (vLLM forces it off), so that branch is judged from the
recorded fingerprint and the gap the other rungs leave.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..compare.queries import get as canned
from .base import ABSENT, INCONCLUSIVE, PRESENT, Ablation, Cause, Evidence, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from ..attribute import Context, Rung

MIN_CACHE_TOKENS = 20  # per side, before a hit/miss comparison means anything


class RuntimeDefaults(Cause):
    id = "runtime_defaults"
    title = "Runtime defaults: generation_config applied silently, prefix cache, async scheduling"
    order = 30
    knobs = ("enable_prefix_caching", "block_size", "async_scheduling", "generation_config", "default_sampling_params")
    fix = 'LLM(..., generation_config="vllm") and pass explicit SamplingParams (or override_generation_config={...}).'

    def evidence(self, ctx: Context) -> list[Evidence]:
        ev: list[Evidence] = []
        diffs = ctx.rows(canned("resolved_vs_requested").sql.rstrip().rstrip(";"))
        n_diff = sum(d["requests"] for d in diffs)
        ev.append(Evidence(
            f"{n_diff} request-field(s) resolved differently from what the caller asked: "
            + ", ".join(f"{d['field']} {_v(d['requested'])}→{_v(d['resolved'])} ×{d['requests']}" for d in diffs[:4])
            if diffs else "resolved sampling params equal the requested ones",
            "tracekit sql TRACE --query resolved_vs_requested",
            {"param_diffs": diffs[:10]}, bool(diffs),
        ))
        carried, fields = self._carried_defaults(ctx)
        ev.append(Evidence(
            f"{carried} request(s) sampled with the model generation_config defaults {fields}"
            if carried else "no request carries sampling defaults from the model's generation_config",
            "tracekit sql TRACE --query engines", {"requests_with_file_defaults": carried, "defaults": fields},
            carried > 0,
        ))
        if ctx.has_trainer:
            hit = ctx.metrics("recorded", "trainer", where="cache_hit")
            miss = ctx.metrics("recorded", "trainer", where="NOT cache_hit")
            sig = None
            if min(hit.tokens, miss.tokens) >= MIN_CACHE_TOKENS and hit.mean_abs_delta is not None \
                    and miss.mean_abs_delta is not None:
                sig = hit.mean_abs_delta > miss.mean_abs_delta + ctx.t.material_gap
            ev.append(Evidence(
                f"prefix-cache hits: mean |Δ| {_f(hit.mean_abs_delta)} on {hit.tokens} tokens; "
                f"misses: {_f(miss.mean_abs_delta)} on {miss.tokens}",
                "tracekit sql TRACE --query prefix_cache_hits",
                {"gap_cache_hits": hit.mean_abs_delta, "tokens_cache_hits": hit.tokens,
                 "gap_cache_misses": miss.mean_abs_delta, "tokens_cache_misses": miss.tokens,
                 "cache_comparison": True}, sig,
            ))
        asy = [e["engine_id"] for e in ctx.record_engines() if e.get("async_scheduling")]
        ev.append(Evidence(
            f"async scheduling ON in {len(asy)} recording engine(s)" if asy else "async scheduling off",
            "tracekit sql TRACE --query engines", {"async_engines": asy}, bool(asy),
        ))
        return ev

    @staticmethod
    def _carried_defaults(ctx: Context) -> tuple[int, dict]:
        from ..attribute import VLLM_SAMPLING_DEFAULTS

        carried, fields = 0, {}
        for e in ctx.record_engines():
            d = {k: v for k, v in ctx.generation_defaults(e["engine_id"]).items()
                 if k in VLLM_SAMPLING_DEFAULTS and v != VLLM_SAMPLING_DEFAULTS[k]}
            if not d:
                continue
            conds = " AND ".join(
                f"TRY_CAST(json_extract_string(sampling_resolved, '$.{k}') AS DOUBLE) = {float(v)!r}" for k, v in d.items())
            n = ctx.scalar(f"SELECT count(*) FROM requests WHERE engine_id = ? AND {conds}", [e["engine_id"]])
            if n:
                carried += n
                fields.update(d)
        return carried, fields

    def ablation(self, ctx: Context, evidence: list[Evidence]) -> Ablation | None:
        if any(e.signal for e in evidence if "param_diffs" in e.numbers or "requests_with_file_defaults" in e.numbers):
            return Ablation(engine_args={"generation_config": "vllm"}, requests="requested_params")
        return None

    def decide(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> Verdict:
        params = any(e.signal for e in evidence if "param_diffs" in e.numbers or "requests_with_file_defaults" in e.numbers)
        cache = any(e.signal for e in evidence if "cache_comparison" in e.numbers)
        asy = any(e.signal for e in evidence if "async_engines" in e.numbers)
        reasons = []
        verdict = ABSENT
        if params:
            if rung is not None and rung.closed is not None:
                if (rung.closed or 0) >= ctx.t.min_close and (rung.relative or 0) >= ctx.t.min_share:
                    verdict = PRESENT
                    reasons.append(f"sampling defaults from the model's generation_config were applied; "
                                   f"without them the gap goes {_f(rung.gap_before)} → {_f(rung.gap_after)}")
                else:
                    reasons.append("generation_config defaults were applied but the trainer's logprobs agree "
                                   f"with them (gap {_f(rung.gap_before)} → {_f(rung.gap_after)})")
            elif ctx.has_trainer and (ctx.gap("recorded", where="true") or 0) > ctx.t.material_gap:
                verdict = PRESENT
                reasons.append("sampling defaults from the model's generation_config were applied "
                               "(share not measured: no replay)")
            else:
                verdict = INCONCLUSIVE
                reasons.append("generation_config defaults were applied; no trainer gap to measure their effect")
        if cache:
            verdict = PRESENT
            reasons.append("prefix-cache hits disagree with the trainer far more than misses (stale or "
                           "mismatched KV)")
        if asy:
            residual = self._residual(ctx)
            if residual is not None and residual > ctx.t.material_gap:
                verdict = PRESENT
                reasons.append(f"async scheduling was on and a gap of {_f(residual)} remains that no replayable "
                               "fix explains (async scheduling cannot be replayed on CPU)")
            elif verdict == ABSENT:
                reasons.append("async scheduling was on, but no unexplained gap remains")
        if not reasons:
            reasons.append("requested = resolved params, no file defaults, cache hits agree, async off")
        return Verdict(verdict, "; ".join(reasons))

    @staticmethod
    def _residual(ctx: Context) -> float | None:
        """The gap left after every replayable rung (or the whole gap without replays)."""
        if not ctx.has_trainer:
            return None
        ladder = getattr(ctx, "ladder", None) or []
        done = [r for r in ladder if r.applicable and r.gap_after is not None]
        return done[-1].gap_after if done else ctx.gap("recorded", where="true")

    def fix_for(self, ctx: Context, evidence: list[Evidence]) -> str:
        fixes = []
        if any(e.signal for e in evidence if "param_diffs" in e.numbers or "requests_with_file_defaults" in e.numbers):
            fixes.append(self.fix)
        if any(e.signal for e in evidence if "cache_comparison" in e.numbers):
            fixes.append("llm.reset_prefix_cache() after every weight update (or enable_prefix_caching=False)")
        if any(e.signal for e in evidence if "async_engines" in e.numbers):
            fixes.append("async_scheduling=False")
        return "; ".join(fixes) or (self.fix + " Also: enable_prefix_caching=False or reset_prefix_cache() "
                                    "after updates; async_scheduling=False.")


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _v(x: object) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


CAUSE = RuntimeDefaults()
