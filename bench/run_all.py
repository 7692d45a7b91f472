"""Run every benchmark (``make bench``) and print one summary table.

Each script runs in its own process (clean peak-RSS figures, no shared caches) at nice 10, since
this box's CPU is shared: every script also prints ratios measured side by side in the same run.

    .venv/bin/python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import fmt_table, machine_note

# (script, full-size args, --quick args); scripts owned by other helpers are run when present.
MINE = {
    "ingest": (["--tokens", "8M"], ["--tokens", "2M"]),
    "size": (["--tokens", "4M"], ["--tokens", "1M"]),
    "query": (["--tokens", "100M", "--sizes", "5M,25M", "--baseline", "5M", "--strategies", "shipped,hash,sliced,positional"],
              ["--tokens", "10M", "--sizes", "2M", "--baseline", "2M", "--strategies", "shipped,hash,positional"]),
}
OTHERS = ["record_overhead", "replay_throughput", "ray_shards"]


def run(name: str, args: list[str], json_path: Path | None) -> tuple[int, float, str]:
    cmd = ["nice", "-n", "10", sys.executable, str(HERE / f"{name}.py"), *args]
    if json_path is not None:
        cmd += ["--json", str(json_path)]
    print(f"\n$ {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(p.stdout)
    return p.returncode, time.perf_counter() - t0, p.stdout


def _accepts(name: str, flag: str) -> bool:
    try:
        h = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return flag in h.stdout


def summarise(name: str, d: dict[str, Any]) -> list[list[Any]]:
    if name == "ingest":
        r = d["runs"][1]
        return [["ingest: tokens + requests through TraceWriter", ">= 2 M tokens/s",
                 f"{r['tokens_per_s'] / 1e6:.2f} M/s wall, {r['tokens_per_cpu_s'] / 1e6:.2f} M per process CPU-s, "
                 f"{r['tokens_per_writer_cpu_s'] / 1e6:.2f} M per writer-thread CPU-s"],
                ["ingest: writer peak RSS", "flat with trace size",
                 f"{d['runs'][-2]['peak_rss_mb']:.0f} -> {d['runs'][-1]['peak_rss_mb']:.0f} MiB at 4x the tokens"]]
    if name == "size":
        out = []
        for r in d["results"]:
            out.append([f"size: tokens table, logprobs={r['logprobs']}", "<= 5 B/token",
                        f"{r['b_per_token']:.2f} B/token (top-5: {r['b_per_token_top5']:.1f}; "
                        f"pyarrow defaults {r['b_per_token_defaults']:.2f})"])
        return out
    if name == "query":
        b = d["baseline"]
        rows = []
        for label in ("shipped", "best", "positional"):
            if f"{label}_seconds" in d:
                rows.append([f"query: per-step attribution at {d['tokens'] / 1e6:.0f}M tokens "
                             f"({d.get(f'{label}_strategy', label)})", "<= 10 s",
                             f"{d[f'{label}_seconds']:.1f} s wall, {d.get(f'{label}_cpu_seconds', float('nan')):.1f} "
                             "CPU s (2 threads)"])
        for k, v in d.items():
            if k.startswith("ratio_same_size_"):
                s = k.removeprefix("ratio_same_size_")
                rows.append([f"query vs JSONL + pandas at {b['tokens'] / 1e6:.1f}M ({s})", ">= 20x",
                             f"{v:.0f}x wall, {d.get('cpu_ratio_same_size_' + s, float('nan')):.0f}x CPU"])
        return rows
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes, not tens of minutes)")
    a = ap.parse_args(argv)
    print(f"# bench/run_all.py — {machine_note()}")
    summary: list[list[Any]] = []
    status: list[list[Any]] = []
    rc_all = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (full, quick) in MINE.items():
            jp = Path(tmp) / f"{name}.json"
            rc, s, _ = run(name, quick if a.quick else full, jp)
            status.append([name, "ok" if rc == 0 else f"exit {rc}", s])
            rc_all |= rc
            if rc == 0 and jp.exists():
                summary += summarise(name, json.loads(jp.read_text()))
        for name in OTHERS:
            if not (HERE / f"{name}.py").exists():
                status.append([name, "not present", float("nan")])
                continue
            args = ["--quick"] if a.quick and _accepts(name, "--quick") else []
            rc, s, out = run(name, args, None)
            status.append([name, "ok" if rc == 0 else f"exit {rc}", s])
            rc_all |= rc
            tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            summary.append([f"{name} (see its output above)", "", tail[0][:120]])
    print("\n## Summary\n")
    print(fmt_table(["benchmark", "target", "measured"], summary))
    print()
    print(fmt_table(["script", "status", "seconds"], status))
    return 1 if rc_all else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
