"""Import speed: `tracekit import pipelinerl` on a generated PipelineRL actor stream.

The dump is written the way PipelineRL's actor writes it (tests/import_fixtures.py): one compact
JSON line per group of 8 TrainingText records (text, n_predicted, reward, logprobs, ref_logprobs,
input_ids, labels, group_id, finished, prompt_tokens, output_tokens, visual_features, metadata).
Completion lengths, token ids and logprobs follow bench/_common.py; prompts are 100..600 tokens
shared by the group and the text is ~4 bytes per token. The import runs as the CLI in a child
process; the figure is generated (completion) tokens per second, wall clock, from start to the
renamed trace, and the child's peak RSS.

    .venv/bin/python bench/import_speed.py [--tokens 100M] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BENCH_OUT,
    TokenSampler,
    engine_like_logprobs,
    human_tokens,
    machine_note,
    parse_tokens,
)

GROUP = 8
POOL = 256  # distinct groups, reused with fresh group ids / versions (generation is not timed)


def _group_line(s: TokenSampler, rng: np.random.Generator) -> tuple[bytes, int]:
    prompt = s.token_ids(int(rng.integers(100, 600))).tolist()
    recs = []
    n_tok = 0
    for i, n in enumerate(s.lengths(GROUP).tolist()):
        out = s.token_ids(n).tolist()
        lps = engine_like_logprobs(s, n).astype(float).tolist()
        text = "x" * (4 * (len(prompt) + n))
        recs.append({"text": text, "n_predicted": 4 * n, "reward": float(i % 2), "logprobs": lps, "ref_logprobs": [],
                     "input_ids": prompt + out, "labels": [-100] * len(prompt) + out, "group_id": "@GID@",
                     "finished": True, "prompt_tokens": len(prompt), "output_tokens": n, "visual_features": None,
                     "metadata": {"model_version": -1, "rollout_index": i, "step_index": 0}})
        n_tok += n
    line = json.dumps(recs, separators=(",", ":")).replace('"model_version":-1', '"model_version":@V@')
    return line.encode(), n_tok


def make_dump(path: Path, tokens: int, seed: int = 0) -> tuple[int, int]:
    s = TokenSampler(seed)
    rng = np.random.default_rng(seed)
    pool = [_group_line(s, rng) for _ in range(POOL)]
    path.parent.mkdir(parents=True, exist_ok=True)
    done = groups = 0
    with open(path, "wb") as f:
        while done < tokens:
            line, n = pool[groups % POOL]
            f.write(line.replace(b"@GID@", f"train_{groups}".encode()).replace(b"@V@", str(groups // 64 * 512).encode()))
            f.write(b"\n")
            done += n
            groups += 1
    return done, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="100M", help="generated tokens in the dump (e.g. 10M, 100M)")
    ap.add_argument("--keep", action="store_true", help="keep the dump and the trace")
    ap.add_argument("--work", type=Path, default=BENCH_OUT / "import", help="directory for the dump and the trace")
    a = ap.parse_args()
    n = parse_tokens(a.tokens)
    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    dump = work / "exp" / "streams" / "actor" / "0" / "0" / "0.jsonl"
    t0 = time.perf_counter()
    tokens, groups = make_dump(dump, n)
    gen_s = time.perf_counter() - t0
    size = dump.stat().st_size
    print(f"dump: {human_tokens(tokens)} generated tokens, {groups:,} groups, {size / 1e9:.2f} GB "
          f"({size / tokens:.1f} B/token) written in {gen_s:.0f} s")
    cmd = [sys.executable, "-m", "tracekit.cli", "import", "pipelinerl", str(work / "exp"), "--out", str(work / "trace")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRACEKIT_DEBUG": "1"})
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"import failed: {r.stderr}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss, cpu = ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime
    tsize = sum(p.stat().st_size for p in (work / "trace").rglob("*") if p.is_file())
    print(r.stdout.splitlines()[0])
    print(f"import: {tokens / wall / 1e6:.2f} M tokens/s ({size / wall / 1e6:.0f} MB/s of JSONL), {wall:.1f} s wall, "
          f"peak RSS {rss:.0f} MiB; {cpu:.0f} CPU-s ({tokens / cpu / 1e6:.2f} M tokens per CPU-second); "
          f"trace {tsize / 1e9:.2f} GB ({tsize / tokens:.2f} B/token)")
    print(machine_note())
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
