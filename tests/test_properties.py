"""Property test: random rows of every table, written through the real TraceWriter (as row
dicts or as columns), read back identical with pyarrow and through the reader's DuckDB views.
Strategies derive from schemas/, so a new column is covered without touching this file."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracekit.schema import Column, table, tables
from tracekit.store import Trace, TraceWriter

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)  # any unicode but lone surrogates
SCALARS: dict[str, st.SearchStrategy] = {
    "string": TEXT,
    "json": TEXT,
    "bool": st.booleans(),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "float32": st.floats(width=32) | st.sampled_from([float("-inf"), float("nan"), -0.0]),
    "float64": st.floats() | st.sampled_from([float("-inf"), float("nan")]),
    "timestamp": st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 1, 1),
                              timezones=st.just(dt.timezone.utc)),
}


def value(spec: str) -> st.SearchStrategy:
    if spec.startswith("list<"):
        return st.lists(st.none() | value(spec[5:-1]), max_size=5)  # empty lists and null elements too
    return SCALARS[spec]


def column(c: Column) -> st.SearchStrategy:
    return (st.none() | value(c.type)) if c.nullable else value(c.type)


def rows_of(name: str) -> st.SearchStrategy:
    return st.lists(st.fixed_dictionaries({c.name: column(c) for c in table(name).columns}), min_size=0, max_size=8)


def canon(v: Any, spec: str) -> Any:
    """Comparable form: float32 rounding applied, NaN as a token, lists element-wise."""
    if v is None:
        return None
    if spec.startswith("list<"):
        return tuple(canon(x, spec[5:-1]) for x in v)
    if spec == "float32":
        f = float(np.float32(v))
        return "nan" if math.isnan(f) else f
    if spec == "float64":
        return "nan" if math.isnan(v) else float(v)
    if spec == "timestamp":
        return v.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return v


def key(row: tuple) -> str:
    return repr(row)


def _written(name: str, rows: list[dict]) -> list[tuple]:
    cols = table(name).columns
    return sorted((tuple(canon(r[c.name], c.type) for c in cols) for r in rows), key=key)


def _read_back(root: Path, name: str, replay: str | None, skip_run: str) -> list[tuple]:
    t = table(name)
    parts = sorted(t.dir(root, replay).glob("*.parquet"))
    got = []
    for p in parts:
        for r in pq.read_table(p).to_pylist():
            if name == "runs" and r["run_id"] == skip_run:
                continue  # the writer's own start/close rows
            got.append(tuple(canon(r[c.name], c.type) for c in t.columns))
    return sorted(got, key=key)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_rows_of_every_table_round_trip(tmp_path_factory, data) -> None:
    root = tmp_path_factory.mktemp("prop") / uuid.uuid4().hex
    w = TraceWriter(root, flush_interval=60)
    batches: dict[str, list[dict]] = {}
    for name in tables():
        replay = "r1" if table(name).is_replay_table else None
        for _ in range(data.draw(st.integers(1, 3), label=f"{name} writes")):
            rows = data.draw(rows_of(name), label=name)
            batches.setdefault(name, []).extend(rows)
            if rows and data.draw(st.booleans(), label="as columns"):
                cols = {c: [r[c] for r in rows] for c in rows[0]}
                assert w.write_columns(name, cols, replay=replay)
            else:
                assert w.write(name, rows, replay=replay)
    stats = w.close()
    assert stats.dropped == 0 and not stats.errors, stats
    for name, rows in batches.items():
        replay = "r1" if table(name).is_replay_table else None
        assert _read_back(root, name, replay, w.run_id) == _written(name, rows), name
    # the DuckDB views see the same number of rows (and do not choke on nan/inf/unicode/empty lists)
    con = Trace(root).connect()
    for name, rows in batches.items():
        # the writer's own start/close rows, present once it wrote anything at all
        extra = 2 if name == "runs" and any(batches.values()) else 0
        assert con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == len(rows) + extra, name
    con.close()


@settings(max_examples=20, deadline=None)
@given(lp=st.lists(st.floats(width=32) | st.sampled_from([float("-inf"), float("nan")]), min_size=1, max_size=50))
def test_token_logprobs_read_back_bit_exact_through_duckdb(tmp_path_factory, lp) -> None:
    root = tmp_path_factory.mktemp("lp")
    w = TraceWriter(root, flush_interval=60)
    w.write("requests", {"request_id": 1, "run_id": "r", "output_token_ids": list(range(len(lp)))})
    w.write_columns("tokens", {"pos": np.arange(len(lp), dtype=np.int32), "token_id": np.arange(len(lp), dtype=np.int32),
                               "logprob": np.asarray(lp, dtype=np.float32)}, request_id=1)
    assert w.close().dropped == 0
    got = Trace(root).query("SELECT logprob FROM tokens ORDER BY pos")
    want = np.asarray(lp, dtype=np.float32)
    have = np.asarray([r[0] for r in got], dtype=np.float32)
    assert np.array_equal(want, have, equal_nan=True)
