"""Tolerances from the engine's own noise, measured by the test on the machine it runs on.

A recording holds decode-time logprobs; a score replay computes teacher-forced (prefill) ones, and
a server or a multiprocess engine runs other threads and batches than an in-process one. Where
the engine runs the same kernels for all of these they agree bitwise (AVX-512 CPUs); where it
does not (AMX CPUs, GPUs) they differ by kernel noise: up to 2.3e-2 on a same-engine replay on an
AMX Xeon (docs/vllm-cpu.md). So no test asserts bitwise equality or a constant tuned on one CPU:
it re-scores requests it recorded with the recording engine itself (:func:`measure`: that
engine's prefill-vs-decode noise, here, on these tokens) and bounds what should be equal by
:attr:`Noise.tol`. A real change (wrong weights, another logprobs mode) must exceed the noise of
a control pair measured in the same test by :data:`DETECT`, so every such test can still fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FLOOR = 1e-5  # float32 rounding across processes/thread counts (~1e-6) when the measured noise is 0
SPREAD = 4.0  # a replay's batches and token sample differ from the probe's: its noise can be larger
DETECT = 5.0  # a real change must exceed the noise of its control pair by this factor


@dataclass(frozen=True)
class Noise:
    """|decode logprob − the same engine's prefill logprob| over the re-scored tokens."""

    mean: float
    max: float
    tokens: int

    @property
    def tol(self) -> float:
        """Bound on the per-token |Δ| of two runs that should agree (same weights and mode)."""
        return max(FLOOR, SPREAD * self.max)

    @property
    def tol_mean(self) -> float:
        """Bound on the mean |Δ| of two runs that should agree."""
        return max(FLOOR, SPREAD * self.mean)


def recorded_requests(trace: Path, version: int | None = 0) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt ids, output ids, recorded logprobs) of the requests whose every token was sampled
    under weight ``version`` (None: every request)."""
    from tracekit.store.reader import Trace

    where = "" if version is None else f"HAVING bool_and(t.weight_version IS NOT DISTINCT FROM {int(version)})"
    rows = Trace(trace).query(
        "SELECT any_value(r.prompt_token_ids), any_value(r.output_token_ids), list(t.logprob ORDER BY t.pos) "
        f"FROM requests r JOIN tokens t USING (request_id) GROUP BY r.request_id {where} ORDER BY r.request_id")
    return [(list(p), list(o), list(lp)) for p, o, lp in rows if o]


def measure(llm: Any, requests: list[tuple[list[int], list[int], list[float]]]) -> Noise:
    """Re-score ``requests`` (decode-time raw logprobs, recorded by ``llm`` under the weights it
    holds now) with teacher-forced prompt logprobs on ``llm`` itself."""
    from vllm import SamplingParams

    assert requests, "no request to measure the engine's noise on"
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": list(p) + list(o)} for p, o, _ in requests], sp, use_tqdm=False)
    deltas = []
    for (p, o, lps), out in zip(requests, outs):
        for j, (tok, lp) in enumerate(zip(o, lps)):
            if lp is not None and np.isfinite(lp):
                deltas.append(abs(lp - out.prompt_logprobs[len(p) + j][tok].logprob))
    d = np.asarray(deltas, dtype=np.float64)
    assert d.size, "no finite recorded logprob to measure the engine's noise on"
    return Noise(float(d.mean()), float(d.max()), int(d.size))
