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
from .context import SINGLE_VERSION, VLLM_SAMPLING_DEFAULTS
from .logprob_mode import PROCESSING

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context, Rung

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
            # Only before the first weight update: a hit on KV from older weights is weight_sync's.
            first = ctx.first_version()
            before = SINGLE_VERSION + ("" if first is None else f" AND weight_version_start = {int(first)}")
            hit = ctx.metrics("recorded", "trainer", where=f"{before} AND cache_hit")
            miss = ctx.metrics("recorded", "trainer", where=f"{before} AND NOT cache_hit")
            sig = None
            if min(hit.tokens, miss.tokens) >= MIN_CACHE_TOKENS and hit.mean_abs_delta is not None \
                    and miss.mean_abs_delta is not None:
                sig = hit.mean_abs_delta > miss.mean_abs_delta + ctx.cal.material
            ev.append(Evidence(
                f"before any weight update, prefix-cache hits: mean |Δ| {_f(hit.mean_abs_delta)} on "
                f"{hit.tokens} tokens; misses: {_f(miss.mean_abs_delta)} on {miss.tokens}",
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
        if _params_signal(evidence):
            return Ablation(engine_args={"generation_config": "vllm"}, requests="requested_params")
        return None

    def decide(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> Verdict:
        params = _params_signal(evidence)
        cache = any(e.signal for e in evidence if "cache_comparison" in e.numbers)
        asy = any(e.signal for e in evidence if "async_engines" in e.numbers)
        reasons = []
        verdict, alternative = ABSENT, False
        if params:
            verdict, alternative, why = self._params_verdict(ctx, evidence, rung)
            reasons.append(why)
        if cache:
            verdict, alternative = PRESENT, False
            reasons.append("before any weight update, prefix-cache hits disagree with the trainer far more than "
                           "misses (mismatched KV)")
        if asy:
            residual = self._residual(ctx)
            if residual is not None and residual > ctx.cal.material:
                verdict, alternative = PRESENT, False
                reasons.append(f"async scheduling was on and a gap of {_f(residual)} remains that no replayable "
                               "fix explains (async scheduling cannot be replayed on CPU)")
            elif verdict == ABSENT:
                reasons.append("async scheduling was on, but no unexplained gap remains")
        if not reasons:
            reasons.append("requested = resolved params, no file defaults, cache hits agree, async off")
        why = ctx.unknown("requests.sampling_resolved", "engines.generation_config", "engines.default_sampling_params",
                          "engines.async_scheduling")
        if verdict == ABSENT and why:
            return Verdict(INCONCLUSIVE, f"{why}; nothing seen in what the trace holds")
        return Verdict(verdict, "; ".join(reasons), alternative=alternative)

    def _params_verdict(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> tuple[str, bool, str]:
        """Sampling defaults the job did not set were applied. They matter when the trainer's
        logprobs fit the distribution the job asked for better than the one the samples were drawn
        from (the samples are off-policy), even if the per-token gap is small (e.g. raw logprobs
        at T=1 hide a file temperature of 0.5)."""
        applied = "sampling defaults from the model's generation_config were applied"
        if rung is not None and rung.replay_alone and rung.replay_base:
            d_res = ctx.gap(ctx.source(rung.replay_base, "processed"))
            d_req = ctx.gap(ctx.source(rung.replay_alone, "processed"))
            off = d_res is not None and d_req is not None and ctx.closes(d_res - d_req, d_res)
            evidence.append(Evidence(
                f"trainer vs the distribution the samples were drawn from (resolved params): mean |Δ| {_f(d_res)}; "
                f"vs the one the job asked for (requested params): {_f(d_req)}",
                "tracekit diff TRACE --a trainer --b replay:NAME:processed",
                {"gap_resolved_distribution": d_res, "gap_requested_distribution": d_req, "off_policy": off}, off,
            ))
            alone, needed = ctx.judge(rung)
            if off or needed:
                return PRESENT, False, (f"{applied}: the trainer scores the requested distribution "
                                        f"({_f(d_req)}) but the samples come from the file's ({_f(d_res)})")
            if alone:
                return PRESENT, True, (f"{applied}; without them the gap goes {_f(rung.alone_before)} → "
                                       f"{_f(rung.alone_after)}")
            if d_res is not None and d_req is not None and d_req - d_res > ctx.cal.tol:
                return ABSENT, False, (f"{applied}, but the trainer scores under them too "
                                       f"(trainer vs requested {_f(d_req)}, vs resolved {_f(d_res)})")
            return ABSENT, False, (f"{applied}, but they change the sampled distribution by less than the "
                                   f"tolerance {ctx.cal.tol:.3g} (trainer vs requested {_f(d_req)}, vs resolved "
                                   f"{_f(d_res)})")
        if not ctx.has_trainer:
            return INCONCLUSIVE, False, f"{applied}; no trainer logprobs to measure their effect"
        g = ctx.gap("recorded", where="true") or 0
        if ctx.recorded_mode == "raw" and self._requested_plain(ctx) and g <= ctx.cal.material:
            return PRESENT, False, (f"{applied}: the trainer's logprobs match the raw (T=1, untruncated) ones "
                                    "the job asked for, but the samples were drawn from the file's (off-policy; "
                                    "no replay run to measure it)")
        if g > ctx.cal.material:
            return PRESENT, False, f"{applied} (share not measured: no replay)"
        return INCONCLUSIVE, False, f"{applied}; a replay is needed to measure their effect"

    @staticmethod
    def _requested_plain(ctx: Context) -> bool:
        """Every request with file defaults asked for T=1 untruncated (then raw = requested processed)."""
        n = ctx.scalar(
            "SELECT count(*) FROM requests WHERE "
            "coalesce(TRY_CAST(json_extract_string(sampling_requested, '$.temperature') AS DOUBLE), 1.0) <> 1.0 "
            "OR coalesce(TRY_CAST(json_extract_string(sampling_requested, '$.top_k') AS DOUBLE), 0) > 0 "
            "OR coalesce(TRY_CAST(json_extract_string(sampling_requested, '$.top_p') AS DOUBLE), 1.0) < 1.0 "
            "OR coalesce(TRY_CAST(json_extract_string(sampling_requested, '$.min_p') AS DOUBLE), 0.0) > 0.0")
        return not n and bool(ctx.scalar(f"SELECT count(*) FROM requests WHERE {PROCESSING}"))

    def unasked(self, ctx: Context, evidence: list[Evidence]) -> str | None:
        if not _params_signal(evidence):
            return None
        fields = next((e.numbers.get("defaults") for e in evidence if "requests_with_file_defaults" in e.numbers), None)
        return f"sampling defaults {fields or ''} from the model's generation_config that the job did not set".replace("  ", " ")

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
        if _params_signal(evidence):
            fixes.append(self.fix)
        if any(e.signal for e in evidence if "cache_comparison" in e.numbers):
            fixes.append("llm.reset_prefix_cache() after every weight update (or enable_prefix_caching=False)")
        if any(e.signal for e in evidence if "async_engines" in e.numbers):
            fixes.append("async_scheduling=False")
        return "; ".join(fixes) or (self.fix + " Also: enable_prefix_caching=False or reset_prefix_cache() "
                                    "after updates; async_scheduling=False.")


def _params_signal(evidence: list[Evidence]) -> bool:
    return any(e.signal for e in evidence if "param_diffs" in e.numbers or "requests_with_file_defaults" in e.numbers)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _v(x: object) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


CAUSE = RuntimeDefaults()
