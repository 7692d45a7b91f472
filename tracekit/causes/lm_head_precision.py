"""lm_head_precision: the engine's final projection in bf16 against an fp32 trainer head.

Signature: a small, broad Δ on nearly every token (rounding of large logits), growing with the
logit scale; the engine fingerprint's head_dtype is not float32. Ladder rung: replay with
``hf_overrides={"head_dtype": "float32"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ABSENT, INCONCLUSIVE, PRESENT, Ablation, Cause, Evidence, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context, Rung

BREADTH_SQL = """
SELECT count(*) AS tokens,
       avg((abs_delta > 1e-3)::DOUBLE) AS share_tokens_off,
       quantile_cont(abs_delta, 0.5) AS median_abs_delta,
       avg(abs_delta) AS mean_abs_delta
FROM token_diff('recorded', 'trainer') WHERE finite
"""


class LmHeadPrecision(Cause):
    id = "lm_head_precision"
    title = "lm_head precision: bf16 engine head vs fp32 trainer head"
    order = 40
    knobs = ("head_dtype", "dtype")
    fix = 'Run the engine head in fp32: LLM(..., hf_overrides={"head_dtype": "float32"}) (vllm serve --hf-overrides \'{"head_dtype": "float32"}\').'

    def evidence(self, ctx: Context) -> list[Evidence]:
        engines = ctx.record_engines()
        heads = sorted({str(e.get("head_dtype") or e.get("dtype")) for e in engines})
        low = [h for h in heads if h not in ("float32", "float64", "None")]
        ev = [Evidence(
            f"recording engine lm_head dtype: {', '.join(heads) or 'unknown'}",
            "tracekit sql TRACE --query engines", {"head_dtypes": heads},
            True if low else (False if heads and heads != ["None"] else None),
        )]
        if ctx.has_trainer:
            b = ctx.rows(BREADTH_SQL)[0]
            ev.append(Evidence(
                f"{_pct(b['share_tokens_off'])} of tokens differ by > 1e-3 (median |Δ| {_f(b['median_abs_delta'])})",
                BREADTH_SQL.strip(), b, None,
            ))
        return ev

    def ablation(self, ctx: Context, evidence: list[Evidence]) -> Ablation | None:
        if evidence and evidence[0].signal:
            return Ablation(hf_overrides={"head_dtype": "float32"})
        return None

    def decide(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> Verdict:
        if evidence and evidence[0].signal is False:
            return Verdict(ABSENT, "the engine's lm_head already runs in float32")
        if rung is None or rung.alone_closed is None:
            if ctx.has_trainer and (ctx.gap("recorded", where="true") or 0) <= ctx.cal.material:
                return Verdict(ABSENT, "the recorded-vs-trainer gap is within the noise floor")
            return Verdict(INCONCLUSIVE, "bf16 head; needs a replay with an fp32 head to measure its share")
        alone, needed = ctx.judge(rung)
        what = (f"an fp32 head alone takes the gap {_f(rung.alone_before)} → {_f(rung.alone_after)}; "
                f"with every other fix in, {_f(rung.without)} → {_f(rung.with_all)}")
        if needed:
            return Verdict(PRESENT, what)
        if alone:
            return Verdict(PRESENT, what + " (another fix closes the same gap)", alternative=True)
        return Verdict(ABSENT, f"an fp32 head does not move the gap beyond noise: {what}")


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


CAUSE = LmHeadPrecision()
