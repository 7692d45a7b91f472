"""Concurrency: many threads (and two writers) recording into one trace at once lose nothing
and keep each request's tokens in order; a real AsyncLLM event loop recording many concurrent
streams while trainer threads log at the same time does too."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tracekit.store import Trace, TraceWriter
from tracekit.store.validate import validate

THREADS = 16
REQS = 60


def token_of(rid: int, pos: int) -> int:
    return (rid * 7919 + pos * 104729) % 50000


def test_many_threads_two_writers_lose_nothing_and_keep_token_order(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writers = [TraceWriter(root, flush_interval=0.02, part_max_rows=3000) for _ in range(2)]
    expected: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        rng = random.Random(k)
        w = writers[k % 2]
        start.wait()
        for j in range(REQS):
            rid = k * 10_000 + j
            n = rng.randint(0, 120)
            w.write("requests", {"request_id": rid, "run_id": w.run_id, "output_token_ids": [token_of(rid, p) for p in range(n)]})
            pos = 0
            while pos < n:  # tokens arrive in chunks, like a stream, interleaved with other threads
                m = min(n - pos, rng.randint(1, 40))
                p = np.arange(pos, pos + m, dtype=np.int32)
                w.write_columns("tokens", {"pos": p, "token_id": np.array([token_of(rid, q) for q in p], np.int32),
                                           "logprob": -p.astype(np.float32) / 100}, request_id=rid)
                pos += m
            with lock:
                expected[rid] = n

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        st = w.close()
        assert st.dropped == 0 and not st.errors and not st.rows_pending, st
    assert not [f for f in validate(root) if f.level != "warning" or "fewer token" in f.message]
    tr = Trace(root)
    got = dict(tr.query("SELECT request_id, count(*) FROM tokens GROUP BY 1"))
    assert {r: n for r, n in expected.items() if n} == got
    assert tr.query("SELECT count(*) FROM requests")[0][0] == len(expected) == THREADS * REQS
    bad = tr.query("SELECT count(*) FROM tokens WHERE token_id <> (request_id * 7919 + pos * 104729) % 50000 "
                   "OR logprob <> -pos::FLOAT / 100")[0][0]
    assert bad == 0
    # scan order (parts by name, rows as stored): each request's positions only ever increase
    last: dict[int, int] = {}
    for p in sorted((root / "tokens").glob("*.parquet")):
        t = pq.read_table(p, columns=["request_id", "pos"])
        for rid, pos in zip(t.column("request_id").to_pylist(), t.column("pos").to_pylist()):
            assert pos == last.get(rid, -1) + 1, (p.name, rid, pos, last.get(rid))
            last[rid] = pos


@pytest.mark.engine
def test_async_llm_event_loop_and_trainer_threads_record_at_once(tiny_model, tmp_path) -> None:
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import tracekit

    rec = tracekit.Recorder(tmp_path / "t", flush_interval=0.05)
    n_streams = 24
    results: dict[str, tuple[list[int], list[float]]] = {}
    trainer_rows = [0]
    stop = threading.Event()

    def trainer(k: int) -> None:  # other threads hit the same writer while the loop records
        i = 0
        while not stop.is_set():
            rec.log_trainer_logprobs(10**12 + k * 10**6 + i, np.full(16, -0.5, np.float32), step=0)
            i += 1
        trainer_rows[0] += i * 16

    async def main() -> None:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(tiny_model), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
            max_model_len=512))
        try:
            rec.wrap(engine)

            async def one(i: int) -> None:
                sp = SamplingParams(temperature=1.0, max_tokens=32, seed=i, logprobs=0)
                last = None
                async for out in engine.generate(f"prompt number {i}", sp, f"req-{i}"):
                    last = out
                c = last.outputs[0]
                results[f"req-{i}"] = (list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])

            await asyncio.gather(*(one(i) for i in range(n_streams)))
        finally:
            engine.shutdown()

    threads = [threading.Thread(target=trainer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        asyncio.run(main())
    finally:
        stop.set()
        for t in threads:
            t.join()
    st = rec.close()
    assert st.dropped == 0 and rec.errors == 0, (st, rec.error_messages)
    tr = Trace(tmp_path / "t")
    rows = tr.query("SELECT engine_request_id, request_id FROM requests")
    assert sorted(r[0] for r in rows) == sorted(results)
    for erid, rid in rows:
        toks = tr.query("SELECT pos, token_id, logprob FROM tokens WHERE request_id = ? ORDER BY pos", [rid])
        want_ids, want_lp = results[erid]
        assert [t[0] for t in toks] == list(range(len(want_ids)))
        assert [t[1] for t in toks] == want_ids
        assert np.allclose([t[2] for t in toks], want_lp, rtol=0, atol=1e-6)
    assert tr.query("SELECT count(*) FROM trainer")[0][0] == trainer_rows[0]
