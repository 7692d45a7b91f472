"""Replay shards: 1, 2 and 4 Ray shards (``replay_on_ray``) vs 1, 2 and 4 local shard processes.

One run, side by side, on the same recorded trace and engine config:
  1. record a trace with the real Recorder (tiny model, real vllm.LLM; bench/replay_throughput.py's
     recording child);
  2. start a local Ray instance once (its start-up time is reported on its own line), with as many
     logical CPUs as the most shards, so K Ray shards run at once like K local processes;
  3. for K in 1, 2, 4: ``tracekit replay TRACE --name local-K --shard i/K`` as K concurrent
     processes, then ``replay_on_ray(TRACE, "ray-K", shards=K)`` (the order alternates with K:
     the box is shared).
Wall s: from launch to the last shard's exit (engine start-ups included: that is what a user
waits). Steady tokens/s from the ledger's commit times: tokens after each shard's first batch
over the time from the first shard's first batch to the last commit (engine start and warm-up
of the first shard excluded; later shards' start-ups overlap the window, as they do for real).
Engines run in-process in each shard (VLLM_ENABLE_V1_MULTIPROCESSING=0), one per shard, with one
OpenMP thread each on both sides (what Ray gives a 1-CPU task; local shards get it explicitly).

    .venv/bin/python bench/ray_shards.py [--requests 2048] [--max-tokens 64] [--chunk 32] [--quick] [--json PATH]

The tiny model scores ~10-20 k tokens/s per engine here, so at --quick sizes the walls are mostly
engine start-ups (~15 s each, and K of them compete for 2 cores); the full size gives every shard
some seconds of steady work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import replay_throughput as rt  # noqa: E402 - its recording child
from _common import fmt_table, machine_note  # noqa: E402

SHARDS = (1, 2, 4)


def steady(trace: Path, name: str) -> tuple[int, float]:
    """(tokens, steady tokens/s) of replay ``name`` from its ledger's per-batch commit times."""
    from tracekit.store.reader import Trace

    rows = Trace(trace).query(
        "SELECT shard, time, sum(num_tokens) FROM replay_requests WHERE replay = ? GROUP BY 1, 2 ORDER BY 1, 2", [name])
    by_shard: dict[str, list[tuple[float, int]]] = {}
    for shard, t, n in rows:
        by_shard.setdefault(shard, []).append((t.timestamp(), int(n)))
    total = sum(n for b in by_shard.values() for _, n in b)
    after_first = sum(n for b in by_shard.values() for _, n in b[1:])
    t0 = min(b[0][0] for b in by_shard.values())
    t1 = max(b[-1][0] for b in by_shard.values())
    return total, after_first / (t1 - t0) if t1 > t0 and after_first else float("nan")


def run_local(trace: Path, name: str, k: int, chunk: int) -> float:
    """K concurrent ``tracekit replay --shard i/K`` processes; wall seconds to the last exit."""
    # The thread count a 1-CPU Ray task gets (Ray sets OMP_NUM_THREADS=num_cpus): without it the
    # comparison is of torch threading, not of Ray (unset here: ~8x slower steady, docs/scale.md).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "tracekit.cli", "replay", str(trace), "--name", name,
                               "--shard", f"{i}/{k}", "--chunk-requests", str(chunk), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(k)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"local shard of {name} failed (exit {p.returncode}): {out.strip()[-800:]}")
    return wall


def run_ray(trace: Path, name: str, k: int, chunk: int) -> float:
    from tracekit.replay.cluster import replay_on_ray

    t0 = time.perf_counter()
    res = replay_on_ray(trace, name, shards=k, chunk_requests=chunk, progress=False)
    wall = time.perf_counter() - t0
    assert res.requests_error == 0 and res.requests_ok > 0, res
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32, help="requests per engine batch (small: every shard commits "
                                                            "several batches, so it has a steady rate)")
    ap.add_argument("--model", type=Path, help="model directory (default: a tiny random Qwen2)")
    ap.add_argument("--quick", action="store_true", help="512 requests x 48 tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.max_tokens = 512, 48

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="tk-bench-ray-"))
    try:
        model = rt.model_dir(a.model, tmp)
        trace = tmp / "trace"
        t = time.perf_counter()
        rt.child("--_record", str(trace), str(model), str(a.requests), str(a.max_tokens))
        print(f"# {machine_note()}")
        print(f"recorded {a.requests} requests x {a.max_tokens} tokens in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        ray.init(num_cpus=max(SHARDS), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t
        print(f"ray.init (local instance, {max(SHARDS)} logical CPUs): {ray_start:.1f} s, not in the walls below")
        results: list[dict[str, Any]] = []
        for j, k in enumerate(SHARDS):
            order = ("local", "ray") if j % 2 == 0 else ("ray", "local")
            for kind in order:
                name = f"{kind}-{k}"
                wall = (run_local if kind == "local" else run_ray)(trace, name, k, a.chunk)
                tokens, rate = steady(trace, name)
                results.append({"kind": kind, "shards": k, "wall_s": wall, "steady_tokens_per_s": rate, "tokens": tokens})
                print(f"{name:8s} wall {wall:6.1f} s, steady {rate:8,.0f} tokens/s, {tokens:,} tokens", flush=True)
        ray.shutdown()
        rows = []
        for k in SHARDS:
            lo = next(r for r in results if r["kind"] == "local" and r["shards"] == k)
            ra = next(r for r in results if r["kind"] == "ray" and r["shards"] == k)
            rows.append([k, lo["wall_s"], ra["wall_s"], ra["wall_s"] / lo["wall_s"], lo["steady_tokens_per_s"],
                         ra["steady_tokens_per_s"]])
        print()
        print(fmt_table(["shards", "local wall s", "Ray wall s", "Ray / local wall", "local steady tok/s",
                         "Ray steady tok/s"], rows))
        if a.json:
            a.json.write_text(json.dumps({"requests": a.requests, "max_tokens": a.max_tokens, "chunk": a.chunk,
                                          "ray_init_s": ray_start, "machine": machine_note(), "runs": results},
                                         indent=1))
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
