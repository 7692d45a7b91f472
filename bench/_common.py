"""Shared pieces of the benchmarks: a realistic synthetic RL trace, peak-RSS probes, tables.

The synthetic shape (documented in docs/benchmarks.md):
- steps of GRPO groups (``n`` samples per prompt), completion lengths 50..1000 (log-normal,
  median ~300), request ids as the recorder makes them (random 22-bit run prefix << 40 | counter);
- token ids: Zipf(s=1.1) over a 151 936-token vocabulary (Qwen2); ids "bpe"-like by default (id
  ~ frequency rank x LogNormal(0, 1): BPE merges are learnt in frequency order, so frequent
  tokens have small ids) or "shuffled" (ranks randomly permuted: the pessimistic case);
- logprobs (float32): a mixture, 55 % near 0 (log-uniform in [-1e-2, -1e-7]), 30 % moderate
  (-Exp(0.7)), 15 % heavy tail (-Exp(4) capped at -15), with full float32 mantissa entropy;
- a replay = recorded + N(0, 0.02) noise, 3 % of tokens get N(0, 0.4) noise (clip candidates).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 151_936
ZIPF_S = 1.1
REPO = Path(__file__).resolve().parent.parent
BENCH_OUT = REPO / "bench-out"


# ---------------------------------------------------------------------------------- memory
def reset_peak_rss() -> None:
    """Reset this process's VmHWM (Linux >= 4.0) so the next peak is the next phase's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last reset, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------- data
class TokenSampler:
    """Vectorised draws of token ids and logprobs with the distributions above."""

    def __init__(self, seed: int = 0, ids: str = "bpe") -> None:
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
        pmf = ranks**-ZIPF_S
        self.cdf = np.cumsum(pmf / pmf.sum())
        g = np.random.default_rng(12345)
        if ids == "shuffled":
            self.rank_to_id = g.permutation(VOCAB).astype(np.int32)
        else:
            key = ranks * g.lognormal(0.0, 1.0, VOCAB)
            self.rank_to_id = np.argsort(np.argsort(key)).astype(np.int32)

    def token_ids(self, n: int) -> np.ndarray:
        r = np.searchsorted(self.cdf, self.rng.random(n))
        return self.rank_to_id[np.minimum(r, VOCAB - 1)]

    def logprobs(self, n: int) -> np.ndarray:
        rng = self.rng
        u = rng.random(n)
        out = np.empty(n, dtype=np.float64)
        near = u < 0.55
        mid = (u >= 0.55) & (u < 0.85)
        tail = u >= 0.85
        out[near] = -np.exp(rng.uniform(np.log(1e-7), np.log(1e-2), int(near.sum())))
        out[mid] = -rng.exponential(0.7, int(mid.sum()))
        out[tail] = -np.minimum(rng.exponential(4.0, int(tail.sum())), 15.0)
        return out.astype(np.float32)

    def perturb(self, lp: np.ndarray) -> np.ndarray:
        rng = self.rng
        noise = rng.normal(0.0, 0.02, lp.size)
        big = rng.random(lp.size) < 0.03
        noise[big] = rng.normal(0.0, 0.4, int(big.sum()))
        return np.minimum(lp.astype(np.float64) + noise, 0.0).astype(np.float32)

    def lengths(self, n: int, lo: int = 50, hi: int = 1000) -> np.ndarray:
        return np.clip(self.rng.lognormal(np.log(300), 0.7, n), lo, hi).astype(np.int64)


@dataclass
class Chunk:
    """Whole RL steps of a synthetic trace, as column arrays (tokens sorted by request, pos)."""

    step: np.ndarray  # per request
    request_id: np.ndarray
    group_id: np.ndarray
    sample_idx: np.ndarray
    length: np.ndarray
    tok_request_id: np.ndarray  # per token
    tok_pos: np.ndarray
    tok_id: np.ndarray
    logprob: np.ndarray
    replay_logprob: np.ndarray
    weight_version: np.ndarray  # per token

    @property
    def n_tokens(self) -> int:
        return int(self.tok_id.size)


def run_prefix(seed: int) -> int:
    return int(np.random.default_rng(seed).integers(1, 1 << 22)) << 40


def synth_chunks(
    total_tokens: int,
    *,
    seed: int = 0,
    group_size: int = 8,
    groups_per_step: int = 64,
    chunk_tokens: int = 1 << 20,
    replay: bool = True,
    ids: str = "bpe",
) -> Iterator[Chunk]:
    """Yield chunks of whole steps (~``chunk_tokens`` tokens each) until ``total_tokens``."""
    s = TokenSampler(seed, ids)
    prefix = run_prefix(seed)
    counter = 0
    step = 0
    produced = 0
    per_step = group_size * groups_per_step
    while produced < total_tokens:
        steps, lens_l = [], []
        n = 0
        while n < chunk_tokens and produced + n < total_tokens:
            lens = s.lengths(per_step)
            steps.append(np.full(per_step, step, dtype=np.int64))
            lens_l.append(lens)
            n += int(lens.sum())
            step += 1
        step_arr = np.concatenate(steps)
        lens = np.concatenate(lens_l)
        nreq = lens.size
        rid = prefix | np.arange(counter, counter + nreq, dtype=np.int64)
        counter += nreq
        ntok = int(lens.sum())
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        pos = (np.arange(ntok, dtype=np.int64) - starts).astype(np.int32)
        lp = s.logprobs(ntok)
        yield Chunk(
            step=step_arr,
            request_id=rid,
            group_id=(step_arr * groups_per_step + (np.arange(nreq) % per_step) // group_size),
            sample_idx=(np.arange(nreq) % group_size).astype(np.int32),
            length=lens,
            tok_request_id=np.repeat(rid, lens),
            tok_pos=pos,
            tok_id=s.token_ids(ntok),
            logprob=lp,
            replay_logprob=s.perturb(lp) if replay else lp,
            weight_version=np.repeat(np.maximum(step_arr - 1, 0), lens),
        )
        produced += ntok


# ---------------------------------------------------------------------------------- output
def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[_fmt(v) for v in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(vals)) + " |"
    out = [line(headers), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def human_tokens(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"


def parse_tokens(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "kmg" else s) * mult)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load avg {load:.2f} "
        f"(CPU shared with other jobs: compare ratios measured in the same run)"
    )


# ---------------------------------------------------------------------------------- engine-like
def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 precision (nearest even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def engine_like_logprobs(s: TokenSampler, n: int) -> np.ndarray:
    """Logprobs as vLLM computes them: fp32 log_softmax of bf16 logits.

    logprob = (x_i - x_max) - log(sum_j exp(x_j - x_max)); x are bf16 so x_i - x_max is exact in
    fp32 and only the per-position log-sum term carries a full mantissa; when the argmax is
    sampled (x_i = x_max) the value is -log(fp32(1 + s)), quantised near 0.
    """
    rng = s.rng
    target = s.logprobs(n).astype(np.float64)  # same marginal shape as the mixture
    rest = np.exp(rng.uniform(np.log(1e-7), np.log(2.0), n))  # sum of the other probabilities
    log_sum = np.log((np.float32(1.0) + rest.astype(np.float32)).astype(np.float32)).astype(np.float32)
    argmax = target > -1e-2
    m = bf16_round(rng.uniform(8, 30, n).astype(np.float32))
    xi = bf16_round((m + np.minimum(target + log_sum, 0)).astype(np.float32))
    gap = np.where(argmax, np.float32(0), xi - m).astype(np.float32)
    log_sum = np.where(argmax, np.log(np.float32(1) + (-target).astype(np.float32)).astype(np.float32), log_sum)
    return (gap - log_sum).astype(np.float32)
