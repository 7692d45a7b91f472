"""logprob_mode: the engine returns raw logprobs where the trainer uses processed ones (or back).

vLLM's ``logprobs_mode`` defaults to ``raw_logprobs``: the logprob before temperature and
top-k/top-p/min-p. A trainer that scores tokens under the distribution they were sampled from
(processed) then sees a gap that grows as temperature leaves 1 or truncation bites, and is ~0 for
T=1 untruncated requests. Ladder rung: compare the other kind of the same replay (score replays
carry both raw and processed logprobs of every recorded token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ABSENT, INCONCLUSIVE, PRESENT, Ablation, Cause, Evidence, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context, Rung

# Requests whose processed distribution differs from the raw one (greedy returns raw logprobs).
PROCESSING = ("(coalesce(temperature, 1.0) >= 1e-5 AND (coalesce(temperature, 1.0) <> 1.0 "
              "OR coalesce(top_k, 0) > 0 OR coalesce(top_p, 1.0) < 1.0 OR coalesce(min_p, 0.0) > 0.0))")


class LogprobMode(Cause):
    id = "logprob_mode"
    title = "Logprob mode: raw engine logprobs vs processed trainer logprobs (or the reverse)"
    order = 20
    knobs = ("logprobs_mode",)
    fix = ('Return the logprobs the trainer uses: LLM(..., logprobs_mode="processed_logprobs") '
           '(vllm serve --logprobs-mode processed_logprobs), or have the trainer score raw logprobs.')

    def evidence(self, ctx: Context) -> list[Evidence]:
        ev: list[Evidence] = []
        modes = ctx.rows("SELECT logprobs_mode, count(*) AS engines FROM engines GROUP BY 1 ORDER BY 2 DESC")
        ev.append(Evidence(
            "recording engine logprobs_mode: " + (", ".join(str(m["logprobs_mode"]) for m in modes) or "unknown"),
            "tracekit sql TRACE --query engines", {"modes": modes, "recorded_as": ctx.recorded_mode}, None,
        ))
        n = ctx.scalar("SELECT count(*) FROM requests")
        n_proc = ctx.scalar(f"SELECT count(*) FROM requests WHERE {PROCESSING}")
        ev.append(Evidence(
            f"{n_proc} of {n} requests sampled with temperature ≠ 1 or truncation (processed ≠ raw for them)",
            "tracekit diff TRACE --by sampling", {"requests": n, "processed_requests": n_proc},
            False if n_proc == 0 else None,
        ))
        if ctx.has_trainer and 0 < n_proc < n:
            g_p = ctx.metrics("recorded", "trainer", where=PROCESSING).mean_abs_delta
            g_u = ctx.metrics("recorded", "trainer", where=f"NOT {PROCESSING}").mean_abs_delta
            sig = None
            if g_p is not None and g_u is not None:
                sig = g_u <= ctx.cal.material < g_p - g_u
            ev.append(Evidence(
                f"recorded-vs-trainer mean |Δ| {_f(g_p)} where processing applies, {_f(g_u)} at T=1 untruncated",
                "tracekit sql TRACE --query delta_by_sampling",
                {"gap_processed_requests": g_p, "gap_plain_requests": g_u}, sig,
            ))
        return ev

    def ablation(self, ctx: Context, evidence: list[Evidence]) -> Ablation | None:
        n_proc = next((e.numbers["processed_requests"] for e in evidence if "processed_requests" in e.numbers), 0)
        return Ablation(switch_mode=True) if n_proc else None

    def decide(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> Verdict:
        why = ctx.unknown("requests.sampling_resolved", "requests.temperature", "engines.logprobs_mode")
        if why and (rung is None or rung.alone_closed is None):
            return Verdict(INCONCLUSIVE, f"{why}; a replay with the model and the run config would tell")
        if any(e.signal is False and "processed_requests" in e.numbers for e in evidence):
            return Verdict(ABSENT, "every request sampled at T=1 without truncation: raw = processed")
        if rung is None or rung.alone_closed is None:
            split = [e for e in evidence if "gap_plain_requests" in e.numbers]
            if split and split[0].signal:
                return Verdict(PRESENT, "the gap appears only where temperature/truncation apply "
                               "(no replay run to measure its share)")
            if ctx.has_trainer and (ctx.gap("recorded", where="true") or 0) <= ctx.cal.material:
                return Verdict(ABSENT, "the recorded-vs-trainer gap is within the noise floor")
            return Verdict(INCONCLUSIVE, "needs a score replay to compare raw and processed logprobs")
        mode = ctx.recorded_mode
        other = "processed" if mode == "raw" else "raw"
        alone, needed = ctx.judge(rung)
        evidence.append(Evidence(
            f"trainer vs the faithful replay's {mode} logprobs: mean |Δ| {_f(rung.alone_before)}; "
            f"vs its {other} logprobs: {_f(rung.alone_after)}; with every other fix in: {mode} "
            f"{_f(rung.without)}, best kind {_f(rung.with_all)}",
            "tracekit sql TRACE --query gap_by_source",
            {"gap_recorded_mode": rung.alone_before, "gap_other_mode": rung.alone_after,
             "gap_recorded_mode_all_fixes": rung.without, "gap_best_mode_all_fixes": rung.with_all,
             "recorded_mode": mode},
            needed or alone,
        ))
        what = f"the engine returned {mode} logprobs, the trainer's match {other} ones"
        if needed:
            return Verdict(PRESENT, f"{what} (gap {_f(rung.without)} → {_f(rung.with_all)} with every other fix in)")
        if alone:
            return Verdict(PRESENT, f"{what} on the recorded params (gap {_f(rung.alone_before)} → "
                           f"{_f(rung.alone_after)}), but not once the other fixes are in", alternative=True)
        return Verdict(ABSENT, f"the trainer's logprobs match the recorded {mode} kind")

    def fix_for(self, ctx: Context, evidence: list[Evidence]) -> str:
        if ctx.recorded_mode == "processed":
            return ('Return the logprobs the trainer uses: LLM(..., logprobs_mode="raw_logprobs") '
                    "(vLLM's default), or have the trainer score processed logprobs.")
        return self.fix


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


CAUSE = LogprobMode()
