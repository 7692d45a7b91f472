"""Tiny-size runs of every bench script so they cannot rot. No timing assertions: the checks are
that each script runs end to end and that what it measures is the right computation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    p = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(out.read_text())


def test_ingest_writes_every_token_through_the_real_writer(tmp_path: Path) -> None:
    d = _run("ingest", "--tokens", "60k", "--threads", "2", "--out", str(tmp_path / "t"), tmp_path=tmp_path)
    for r in d["runs"]:
        assert r["rows_written"] == r["tokens"] > 0
        assert r["errors"] == []
        assert r["peak_rss_mb"] > 0


def test_size_reports_every_variant_and_the_real_write_path(tmp_path: Path) -> None:
    d = _run("size", "--tokens", "40k", "--logprobs", "engine", tmp_path=tmp_path)
    (r,) = d["results"]
    # tracekit's settings must beat pyarrow's defaults; top-5 must cost more than no top-k
    assert 0 < r["b_per_token"] < r["b_per_token_defaults"]
    assert r["b_per_token_top5"] > r["b_per_token"]
    assert r["duckdb_reads_back"]  # byte-stream-split ints and list leaves are readable by DuckDB


def test_query_strategies_agree_with_the_pandas_baseline(tmp_path: Path) -> None:
    d = _run("query", "--tokens", "200k", "--sizes", "80k", "--baseline", "80k", "--chunk", "40k",
             "--strategies", "shipped,hash,sliced,positional,lists", "--out", str(tmp_path / "q"),
             tmp_path=tmp_path)
    assert d["baseline"]["agree"] < 1e-9  # JSONL + pandas and DuckDB compute the same numbers
    by = {(r["tokens"], r["strategy"]): r for r in d["results"]}
    assert len({t for t, _ in by}) == 2
    for (_t, s), r in by.items():
        assert "error" not in r, r
        if s == "positional (sharded replay)":
            assert r["misaligned"] > 0  # the positional join cannot pair a sharded replay
        elif s == "positional (aligned replay)":
            assert r["misaligned"] == 0
            assert r["max_abs_diff_vs_hash"] < 1e-9
        else:
            assert r["max_abs_diff_vs_hash"] < 1e-9, (s, r)
    assert not (tmp_path / "q").exists()  # deleted at the end without --keep


@pytest.mark.parametrize("script", ["run_all"])
def test_run_all_has_a_help(script: str) -> None:
    p = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--quick" in p.stdout


def test_writer_fast_paths_keep_parts_sorted_complete_and_bounded(tmp_path: Path) -> None:
    """The writer's performance paths (pre-ordered column runs, sort skipped when ordered, backlog
    split into parts) must still give sorted, complete parts of bounded size."""
    import numpy as np
    import pyarrow.parquet as pq

    from tracekit.store.writer import TraceWriter

    rng = np.random.default_rng(0)
    w = TraceWriter(tmp_path / "t", part_max_rows=5_000, flush_interval=3600)
    expected = 0
    for rid in rng.permutation(400):  # requests finish out of order
        n = int(rng.integers(1, 60))
        for lo in range(0, n, 25):  # and some arrive in several writes
            pos = np.arange(lo, min(n, lo + 25), dtype=np.int32)
            w.write_columns("tokens", {"pos": pos, "token_id": pos, "logprob": -pos.astype(np.float32)},
                            request_id=int(rid), weight_version=1)
        expected += n
    w.write_columns("tokens", {"pos": np.array([0], np.int32), "token_id": np.array([1], np.int32)},
                    request_id=10_000, weight_version=None)  # a null constant takes the slow path
    st = w.close()
    assert st.rows_written["tokens"] == expected + 1 and st.dropped == 0
    parts = sorted((tmp_path / "t" / "tokens").glob("*.parquet"))
    assert len(parts) > 1  # the backlog was split
    seen = 0
    for p in parts:
        t = pq.read_table(p)
        assert t.num_rows <= 5_000 + 25
        keys = list(zip(t.column("request_id").to_pylist(), t.column("pos").to_pylist()))
        assert keys == sorted(keys)
        seen += t.num_rows
    assert seen == expected + 1
