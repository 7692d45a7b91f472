"""Toy GRPO job on vLLM (CPU or GPU), recorded with tracekit, with flags that plant faults.

    python examples/grpo_toy.py --out runs/clean                      # builds a tiny model
    python examples/grpo_toy.py --out runs/bad --fault weight_sync --fault logprob_mode
    python examples/grpo_toy.py --out runs/x --model /path/to/hf-checkpoint --steps 20

Then: ``tracekit info runs/clean``, ``tracekit report runs/clean --out runs/clean-report``.
A thin script over ``tracekit.demo.job.run_job``; see docs/walkthrough.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    from tracekit.testing.faults import CAUSES, Faults

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="trace directory to write")
    ap.add_argument("--model", type=Path, help="HF checkpoint dir (default: build the tiny model)")
    ap.add_argument("--fault", action="append", default=[], choices=CAUSES, help="plant a fault (repeatable)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=None, help="unset by default, like most RL jobs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1.5e-4)
    ap.add_argument("--logit-offset", type=float, default=None,
                    help="per-position logit shift for realistic magnitudes (default: 60 for the tiny model, 0 for --model)")
    a = ap.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        print(f"error: {a.out} exists and is not empty", file=sys.stderr)
        return 2
    model = a.model
    offset = a.logit_offset if a.logit_offset is not None else (0.0 if model is not None else 60.0)
    if model is None:
        from tracekit.testing.tiny_model import build_tiny_model

        model = build_tiny_model(a.out.parent / f"{a.out.name}-model", arch="qwen2", seed=a.seed)
    from tracekit.demo.job import run_job

    res = run_job(a.out, model, faults=Faults.of(*a.fault), steps=a.steps, group_size=a.group_size,
                  prompts_per_step=a.prompts_per_step, max_tokens=a.max_tokens, temperature=a.temperature,
                  top_p=a.top_p, top_k=a.top_k, seed=a.seed, lr=a.lr, logit_offset=offset, log=print)
    print(f"trace {res.trace}: {res.requests} requests, {res.tokens} tokens, weight versions "
          f"{res.weight_versions[0]}..{res.weight_versions[-1]}, faults: {res.faults}, "
          f"mean |engine - trainer| {res.mean_abs_delta():.4f}, {res.seconds:.0f} s")
    print(f"job curves: {res.metrics_path}")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # vLLM's engine threads can abort a normal interpreter exit (docs/vllm-cpu.md)
