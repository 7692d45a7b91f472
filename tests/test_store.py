"""The trace store: every table round-trips, writers are concurrent-safe and crash-safe."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tracekit.schema import schema_hashes, table, tables
from tracekit.store import Trace, TraceWriter
from tracekit.store.validate import validate

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)

# One plausible row per table, typed as the schema declares.
_SAMPLE: dict[str, object] = {
    "string": "x'y\"z ☃",
    "json": {"temperature": 0.7, "top_k": -1},
    "bool": True,
    "int32": -7,
    "int64": 1 << 40,
    "float32": -0.5,
    "float64": 1.25,
    "timestamp": NOW,
    "list<int32>": [1, 2, 3],
    "list<int64>": [4, 5],
    "list<float32>": [-0.25, float("-inf")],
    "list<string>": ["python", "train.py"],
}


def sample_row(name: str, i: int = 0) -> dict:
    row = {}
    for c in table(name).columns:
        v = _SAMPLE[c.type]
        if c.type in ("int64", "int32") and c.name in ("request_id", "pos", "version"):
            v = i
        row[c.name] = v
    return row


def test_schemas_declare_every_table_once() -> None:
    names = set(tables())
    assert {"engines", "requests", "tokens", "trainer", "weights", "replay_tokens", "replay_requests"} <= names
    assert set(schema_hashes()) == names
    for t in tables().values():
        assert len(set(t.column_names)) == len(t.column_names), t.name
        assert set(t.sort_by) <= set(t.column_names)


@pytest.mark.parametrize("name", sorted(tables()))
def test_every_table_round_trips(tmp_path: Path, name: str) -> None:
    w = TraceWriter(tmp_path / "t", flush_interval=60)
    rows = [sample_row(name, i) for i in range(3)]
    replay = "r1" if table(name).is_replay_table else None
    assert w.write(name, rows, replay=replay)
    stats = w.close()
    assert stats.dropped == 0 and not stats.errors, stats
    con = Trace(tmp_path / "t").connect()
    cols = ", ".join(table(name).column_names)
    # runs/ also holds the writer's own start/close rows
    where = "WHERE run_id = ?" if name == "runs" else ""
    params = [rows[0]["run_id"]] if name == "runs" else []
    got = con.execute(f"SELECT {cols} FROM {name} {where} ORDER BY {table(name).sort_by[0]}", params).fetchall()
    assert len(got) == 3
    for want, have in zip(rows, got):
        for c, v in zip(table(name).columns, have):
            exp = want[c.name]
            if c.type == "json":
                assert json.loads(v) == exp
            elif c.type == "list<float32>":
                assert v[0] == exp[0] and math.isinf(v[1]) and v[1] < 0
            elif c.type == "float32":
                assert v == pytest.approx(exp)
            else:
                assert v == exp, (c.name, v, exp)
    if replay:
        assert con.execute(f"SELECT DISTINCT replay FROM {name}").fetchall() == [("r1",)]


def test_columns_write_sorts_and_encodes(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t", flush_interval=60)
    for rid in (5, 3, 9):
        n = 100
        w.write_columns("tokens", {"pos": np.arange(n, dtype=np.int32)[::-1],
                                   "token_id": np.arange(n, dtype=np.int32),
                                   "logprob": np.full(n, -1.0, dtype=np.float32)}, request_id=rid)
    w.close()
    parts = list((tmp_path / "t" / "tokens").glob("*.parquet"))
    assert len(parts) == 1
    t = pq.read_table(parts[0])
    ids, pos = t.column("request_id").to_pylist(), t.column("pos").to_pylist()
    assert ids == sorted(ids) and pos[:100] == list(range(100))
    md = pq.read_metadata(parts[0])
    encodings = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i).encodings
                 for i in range(md.num_columns)}
    assert "DELTA_BINARY_PACKED" in encodings["request_id"]
    assert "BYTE_STREAM_SPLIT" in encodings["logprob"]
    assert md.row_group(0).column(0).compression == "ZSTD"


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t", flush_interval=0.05, part_max_rows=5000)
    n_threads, per_thread, ntok = 8, 200, 17

    def producer(k: int) -> None:
        for j in range(per_thread):
            rid = k * 10_000 + j
            w.write("requests", {"request_id": rid, "run_id": w.run_id, "output_token_ids": list(range(ntok))})
            w.write_columns("tokens", {"pos": np.arange(ntok, dtype=np.int32), "token_id": np.arange(ntok),
                                       "logprob": -np.random.rand(ntok).astype(np.float32)}, request_id=rid)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = w.close()
    assert stats.dropped == 0
    con = Trace(tmp_path / "t").connect()
    assert con.execute("SELECT count(*) FROM requests").fetchone()[0] == n_threads * per_thread
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == n_threads * per_thread * ntok
    assert [f.message for f in validate(tmp_path / "t") if f.level == "error"] == []


def test_two_processes_share_one_trace(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from tracekit.store import TraceWriter
        w = TraceWriter({str(tmp_path / 't')!r}, flush_interval=0.01)
        base = int(sys.argv[1])
        for i in range(50):
            w.write("requests", {{"request_id": base + i, "run_id": w.run_id}})
        w.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k * 1000)]) for k in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    t = Trace(tmp_path / "t")
    assert t.query("SELECT count(*), count(DISTINCT run_id) FROM requests") == [(150, 3)]


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t", flush_interval=60, max_queue_rows=10)
    results = [w.write("requests", {"request_id": i, "run_id": "r"}) for i in range(25)]
    assert results.count(False) >= 14  # the 'start' row of runs/ takes one slot
    stats = w.close()
    assert stats.rows_dropped["requests"] >= 14
    close = Trace(tmp_path / "t").query("SELECT stats FROM runs WHERE event = 'close'")
    assert json.loads(close[0][0])["rows_dropped"]["requests"] >= 14


def test_writer_that_writes_nothing_leaves_runs_untouched(tmp_path: Path) -> None:
    TraceWriter(tmp_path / "t").close()  # e.g. a replay whose engine refused its args
    assert not list((tmp_path / "t").glob("runs/*.parquet"))
    w = TraceWriter(tmp_path / "t", flush_interval=60)
    w.write("requests", {"request_id": 1, "run_id": w.run_id})
    w.close()
    rows = Trace(tmp_path / "t").query("SELECT event, run_id FROM runs ORDER BY time")
    assert rows == [("start", w.run_id), ("close", w.run_id)]


def test_unwritable_directory_never_raises(tmp_path: Path) -> None:
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    w = TraceWriter(target / "trace")  # parent is a file: cannot be created
    assert w.write("requests", {"request_id": 1, "run_id": "r"}) is False
    stats = w.close()
    assert stats.errors and stats.dropped >= 1


def test_bad_row_is_dropped_not_raised(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t", flush_interval=60)
    assert w.write("requests", {"request_id": 1, "run_id": "r", "no_such_column": 3})
    assert w.write("requests", {"request_id": 2, "run_id": "r"})
    w.write("requests", {"request_id": None, "run_id": "r"})  # violates NOT NULL
    stats = w.close()
    assert stats.rows_dropped.get("requests", 0) >= 1
    assert any("no_such_column" in e or "required" in e for e in stats.errors)


def test_sigkill_mid_run_leaves_only_complete_parts(tmp_path: Path) -> None:
    root = tmp_path / "t"
    code = textwrap.dedent(f"""
        import numpy as np, time
        from tracekit.store import TraceWriter
        w = TraceWriter({str(root)!r}, flush_interval=0.05)
        rid = 0
        while True:
            rid += 1
            n = 64
            w.write("requests", {{"request_id": rid, "run_id": w.run_id, "output_token_ids": list(range(n))}})
            w.write_columns("tokens", {{"pos": np.arange(n, dtype=np.int32), "token_id": np.arange(n),
                                        "logprob": -np.random.rand(n).astype(np.float32)}}, request_id=rid)
            time.sleep(0.001)  # a job between two rollouts, not a tight loop
    """)
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list((root / "tokens").glob("*.parquet"))) < 4:
            time.sleep(0.05)
        assert len(list((root / "tokens").glob("*.parquet"))) >= 4
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    errors = [f.message for f in validate(root) if f.level == "error"]
    assert errors == []
    for part in root.rglob("*.parquet"):
        pq.read_table(part)  # every visible part is complete
    assert Trace(root).query("SELECT count(*) FROM tokens")[0][0] > 0
