"""Bytes per generated token on disk, and what each Parquet encoding choice buys.

Writes the same synthetic tokens (see bench/_common.py) with pyarrow defaults, then with one
choice changed at a time, then with tracekit's own settings (tracekit/store/parquet.py, the exact
path the writer uses), without and with top-5 alternatives, and prints B/token side by side.

    .venv/bin/python bench/size.py [--tokens 4M] [--logprobs both|mixture|engine]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    TokenSampler,
    engine_like_logprobs,
    fmt_table,
    human_tokens,
    machine_note,
    parse_tokens,
    synth_chunks,
)

from tracekit.schema import table as get_table
from tracekit.store import parquet as tkpq

TOP_K = 5


def tokens_table(n: int, *, logprobs: str, top_k: int = 0, seed: int = 0, ids: str = "bpe") -> pa.Table:
    """A tokens part in the writer's layout (sorted by request_id, pos) with ``n`` tokens."""
    chunks = list(synth_chunks(n, seed=seed, replay=False, chunk_tokens=n, ids=ids))
    c = chunks[0]
    s = TokenSampler(seed + 1)
    lp = engine_like_logprobs(s, c.n_tokens) if logprobs == "engine" else c.logprob
    cols: dict[str, Any] = {
        "request_id": pa.array(c.tok_request_id),
        "pos": pa.array(c.tok_pos),
        "token_id": pa.array(c.tok_id),
        "logprob": pa.array(lp),
        "weight_version": pa.array(c.weight_version),
    }
    if top_k:
        cols.update(_top_k(s, c.tok_id, lp, top_k))
    t = get_table("tokens")
    schema = t.arrow_schema
    arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(c.n_tokens, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _top_k(s: TokenSampler, tok: np.ndarray, lp: np.ndarray, k: int) -> dict[str, pa.Array]:
    """Top-k ids/logprobs per token: descending logprobs whose best is >= the sampled one; the
    sampled token is among them when it ranks within k (most of the time)."""
    n = tok.size
    ids = s.token_ids(n * k).reshape(n, k)
    top1 = np.maximum(lp, -np.abs(s.logprobs(n)) * 0.1).astype(np.float32)
    gaps = s.rng.exponential(1.5, (n, k - 1)).astype(np.float32)
    tl = np.concatenate([top1[:, None], top1[:, None] - np.cumsum(gaps, axis=1)], axis=1).astype(np.float32)
    rank = np.minimum(s.rng.geometric(0.7, n) - 1, k)  # rank of the sampled token; k = outside
    inside = rank < k
    ids[inside, rank[inside]] = tok[inside]
    tl[inside, rank[inside]] = lp[inside]
    tl = -np.sort(-tl, axis=1)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return {
        "top_token_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel().astype(np.int32))),
        "top_logprobs": pa.ListArray.from_arrays(offsets, pa.array(tl.ravel())),
    }


def nbytes(t: pa.Table, **opts: Any) -> tuple[int, dict[str, int]]:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, **opts)
    buf = sink.getvalue()
    md = pq.read_metadata(pa.BufferReader(buf))
    per_col: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for i in range(g.num_columns):
            c = g.column(i)
            name = c.path_in_schema.split(".")[0]
            per_col[name] = per_col.get(name, 0) + c.total_compressed_size
    return buf.size, per_col


def tracekit_opts(t: pa.Table, **override: Any) -> dict[str, Any]:
    o = tkpq.write_options(get_table("tokens"), t.schema)
    o.update(override)
    return o


def variants(t: pa.Table) -> list[tuple[str, dict[str, Any]]]:
    """(label, write_table kwargs): defaults, one change at a time, then tracekit's settings."""
    tk = tracekit_opts(t)
    enc_ids = {"request_id": "DELTA_BINARY_PACKED", "pos": "DELTA_BINARY_PACKED", "weight_version": "DELTA_BINARY_PACKED"}
    return [
        ("pyarrow defaults (snappy, dictionary on all, 20k-row pages)", {}),
        ("defaults + zstd level 1", dict(compression="zstd", compression_level=1)),
        ("defaults + zstd level 3", dict(compression="zstd", compression_level=3)),
        ("defaults + zstd level 9", dict(compression="zstd", compression_level=9)),
        ("zstd 1 + byte-stream-split logprob", dict(compression="zstd", compression_level=1,
                                                   use_dictionary=["request_id", "pos", "token_id", "weight_version"],
                                                   column_encoding={"logprob": "BYTE_STREAM_SPLIT"})),
        ("zstd 1 + delta ids (request_id, pos, weight_version)", dict(compression="zstd", compression_level=1,
                                                                     use_dictionary=["token_id", "logprob"],
                                                                     column_encoding=enc_ids)),
        ("zstd 1 + byte-stream-split logprob, pages of 128Ki rows", dict(compression="zstd", compression_level=1,
                                                   use_dictionary=["request_id", "pos", "token_id", "weight_version"],
                                                   column_encoding={"logprob": "BYTE_STREAM_SPLIT"},
                                                   max_rows_per_page=1 << 17)),
        ("tracekit, token_id dictionary (pyarrow default)", {**tk, "use_dictionary": tk["use_dictionary"] + ["token_id"],
                                                            "column_encoding": _without(tk["column_encoding"], "token_id")}),
        ("tracekit, token_id plain", {**tk, "column_encoding": {**tk["column_encoding"], "token_id": "PLAIN"}}),
        ("tracekit, token_id delta", {**tk, "column_encoding": {**tk["column_encoding"], "token_id": "DELTA_BINARY_PACKED"}}),
        ("tracekit, pages of 20k rows (pyarrow default)", {**tk, "max_rows_per_page": 20_000}),
        ("tracekit, pages of 1Mi rows", {**tk, "max_rows_per_page": 1 << 20}),
        ("tracekit, row groups of 128Ki rows", {**tk, "row_group_size": 1 << 17}),
        ("tracekit, zstd level 3", {**tk, "compression_level": 3}),
        ("tracekit, zstd level 9", {**tk, "compression_level": 9}),
        ("tracekit settings (tracekit/store/parquet.py)", tk),
    ]


def _without(d: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in d.items() if k != key}


def shuffled_order(t: pa.Table) -> pa.Table:
    """Arrival order of a streaming recorder: tokens of concurrent requests interleaved."""
    rid = t.column("request_id").to_numpy()
    pos = t.column("pos").to_numpy()
    batch = (rid - rid.min()) // 64  # 64 requests decode in lockstep, one token each per step
    order = np.lexsort((rid, pos, batch))
    return t.take(pa.array(order))


def run(n: int, logprobs: str, out: list[dict[str, Any]]) -> str:
    t = tokens_table(n, logprobs=logprobs)
    n = t.num_rows  # whole steps: a little more than asked
    base, _ = nbytes(t)
    rows = []
    for label, opts in variants(t):
        b, _ = nbytes(t, **opts)
        rows.append([label, b / n, base / b])
    tk = tracekit_opts(t)
    b, _ = nbytes(shuffled_order(t), **tk)
    rows.insert(-1, ["tracekit, rows in arrival order (not sorted)", b / n, base / b])
    final, per_col = nbytes(t, **tk)
    # The real write path (temp file, fsync, rename) on disk, to count footer and all.
    with tempfile.TemporaryDirectory() as d:
        disk = tkpq.write_part_atomic(t, get_table("tokens"), Path(d) / "part.parquet")
    rows.append(["tracekit, written by write_part_atomic (on disk)", disk / n, base / disk])
    tk5 = tokens_table(n, logprobs=logprobs, top_k=TOP_K)
    b5_default, _ = nbytes(tk5)
    b5, per_col5 = nbytes(tk5, **tracekit_opts(tk5))
    no_bss = {k: v for k, v in tracekit_opts(tk5)["column_encoding"].items() if not k.startswith("top_")}
    b5_plain, _ = nbytes(tk5, **tracekit_opts(tk5, column_encoding=no_bss))
    shuf = tokens_table(n, logprobs=logprobs, ids="shuffled")
    b_shuf, _ = nbytes(shuf, **tk)
    b_shuf_dict, _ = nbytes(shuf, **{**tk, "use_dictionary": tk["use_dictionary"] + ["token_id"],
                                     "column_encoding": _without(tk["column_encoding"], "token_id")})
    rows.append(["token ids shuffled (no frequency order): tracekit settings", b_shuf / n, base / b_shuf])
    rows.append(["token ids shuffled: tracekit, token_id dictionary", b_shuf_dict / n, base / b_shuf_dict])
    roundtrip = duckdb_reads_back(tk5)
    rows.append([f"top-{TOP_K}: pyarrow defaults", b5_default / n, base / b5_default])
    rows.append([f"top-{TOP_K}: tracekit without byte-stream-split on the top-k lists", b5_plain / n, base / b5_plain])
    rows.append([f"top-{TOP_K}: tracekit settings", b5 / n, base / b5])
    text = [f"\n### tokens table, {human_tokens(n)} tokens, logprobs = {logprobs}\n",
            fmt_table(["encoding choice", "B/token", "x smaller than defaults"], rows), ""]
    col_rows = [[k, v / n] for k, v in per_col.items() if v] + [["total (file, incl. footer)", final / n]]
    text.append(fmt_table(["column (tracekit settings, no top-k)", "B/token"], col_rows))
    text.append("")
    text.append(fmt_table([f"column (tracekit settings, top-{TOP_K})", "B/token"],
                          [[k, v / n] for k, v in per_col5.items() if v]))
    out.append(dict(logprobs=logprobs, tokens=n, b_per_token=disk / n, b_per_token_top5=b5 / n,
                    b_per_token_defaults=base / n, duckdb_reads_back=roundtrip))
    return "\n".join(text)


def duckdb_reads_back(t: pa.Table) -> bool:
    """The part as written by tracekit (byte-stream-split ints and list leaves) reads back
    value-identical in DuckDB, the query engine of every view."""
    import duckdb

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "part.parquet"
        tkpq.write_part_atomic(t, get_table("tokens"), p)
        got = duckdb.sql(f"SELECT * FROM read_parquet('{p}')").arrow()
        got = got.read_all() if hasattr(got, "read_all") else got
    return all(got.column(c).to_pylist() == t.column(c).to_pylist() for c in t.column_names)


def requests_cost(n: int) -> str:
    """What the requests table adds per generated token (prompt/output id lists, params)."""
    from tracekit.store.writer import _Columns, _to_arrow

    c = next(synth_chunks(n, seed=0, replay=False, chunk_tokens=n))
    s = TokenSampler(3)
    nreq = c.request_id.size
    prompts = {g: s.token_ids(int(s.rng.integers(100, 600))) for g in np.unique(c.group_id)}
    starts = np.cumsum(c.length) - c.length
    cols = {
        "request_id": c.request_id, "step": c.step, "group_id": [str(g) for g in c.group_id],
        "sample_idx": c.sample_idx,
        "prompt_token_ids": [prompts[g] for g in c.group_id],
        "output_token_ids": [c.tok_id[a:a + k] for a, k in zip(starts, c.length)],
        "temperature": np.full(nreq, 1.0, np.float32), "top_p": np.full(nreq, 1.0, np.float32),
        "max_tokens": np.full(nreq, 1024, np.int32), "finish_reason": ["stop"] * nreq,
        "weight_version_start": np.maximum(c.step - 1, 0), "weight_version_end": np.maximum(c.step - 1, 0),
        "sampling_requested": [json.dumps({"temperature": 1.0, "top_p": 1.0, "max_tokens": 1024, "n": 8, "logprobs": 0})] * nreq,
        "reward": s.rng.random(nreq).astype(np.float32),
    }
    t = get_table("requests")
    data = _to_arrow(t, [_Columns(cols, {"run_id": "r" * 32, "engine_id": "e" * 16})])
    with tempfile.TemporaryDirectory() as d:
        total = tkpq.write_part_atomic(data, t, Path(d) / "p.parquet")
        md = pq.read_metadata(Path(d) / "p.parquet")
    per_col: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for i in range(g.num_columns):
            name = g.column(i).path_in_schema.split(".")[0]
            per_col[name] = per_col.get(name, 0) + g.column(i).total_compressed_size
    rows = [[k, v / c.n_tokens] for k, v in sorted(per_col.items(), key=lambda kv: -kv[1])[:5]]
    rows.append(["requests table total", total / c.n_tokens])
    return (f"\n### requests table per generated token ({nreq:,} requests, {c.n_tokens:,} tokens, "
            "GRPO n=8 sharing a prompt)\n\n" + fmt_table(["column", "B/generated token"], rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4M", help="tokens per measurement (default 4M)")
    ap.add_argument("--logprobs", default="both", choices=["both", "mixture", "engine"])
    ap.add_argument("--json", help="write the summary as JSON to this file")
    a = ap.parse_args(argv)
    n = parse_tokens(a.tokens)
    print(f"# bench/size.py — {machine_note()}")
    out: list[dict[str, Any]] = []
    for lp in (["mixture", "engine"] if a.logprobs == "both" else [a.logprobs]):
        print(run(n, lp, out))
    print(requests_cost(n))
    print("\nTarget: <= 5 B/token without top-k.")
    for o in out:
        verdict = "MET" if o["b_per_token"] <= 5 else "MISSED"
        print(f"  logprobs={o['logprobs']}: {o['b_per_token']:.2f} B/token ({verdict}); "
              f"top-{TOP_K}: {o['b_per_token_top5']:.2f} B/token; pyarrow defaults {o['b_per_token_defaults']:.2f}; "
              f"DuckDB reads the part back value-identical: {o['duckdb_reads_back']}")
    summary = {"tokens": n, "results": out}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
