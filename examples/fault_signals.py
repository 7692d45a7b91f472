"""How big is each planted fault? Runs the toy GRPO job once per fault (and clean) at a reduced
size on a real vLLM engine and prints mean |Δ(recorded, trainer)| per run, next to the clean floor.

    python examples/fault_signals.py --out /tmp/fault-signals [--steps 3 --group-size 4 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    from tracekit.compare.metrics import overall
    from tracekit.demo.job import engine_spec, run_job
    from tracekit.testing.faults import CAUSES, Faults
    from tracekit.testing.tiny_model import build_tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=12)
    a = ap.parse_args()
    model = build_tiny_model(a.out / "model", arch="qwen2", seed=0)
    runs = [("clean", Faults())] + [(c, Faults.of(c)) for c in CAUSES]
    rows = []
    from vllm import LLM

    for name, faults in runs:
        path, args = engine_spec(faults, model)
        t0 = time.time()
        llm = LLM(model=str(path), seed=0, **args)
        res = run_job(a.out / name, model, faults=faults, llm=llm, steps=a.steps, group_size=a.group_size,
                      prompts_per_step=a.prompts_per_step, max_tokens=a.max_tokens)
        llm.llm_engine.engine_core.shutdown()
        m = overall(res.trace, "recorded", "trainer")
        after = overall(res.trace, "recorded", "trainer", where="step >= 1")
        rows.append((name, m.tokens, m.mean_abs_delta, after.mean_abs_delta, m.max_abs_delta, m.clip_rate, m.k3,
                     time.time() - t0))
        print(f"done {name}", file=sys.stderr, flush=True)
    floor = rows[0][2]
    print(f"{'run':<18} {'tokens':>6} {'mean|Δ|':>9} {'steps>=1':>9} {'max|Δ|':>8} {'clip':>7} {'k3':>9} {'x floor':>8} {'sec':>5}")
    for name, n, mad, mad1, mx, clip, k3, sec in rows:
        print(f"{name:<18} {n:>6} {mad:>9.4f} {mad1:>9.4f} {mx:>8.3f} {clip:>7.4f} {k3:>9.5f} {mad / floor:>8.1f} {sec:>5.0f}")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
