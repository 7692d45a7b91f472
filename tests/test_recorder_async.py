"""Recorder on a real AsyncLLM (multiprocess engine core): streaming, and an in-flight weight
update in the middle of streamed requests tagged by the engine's own version spans."""

from __future__ import annotations

import asyncio
import json

import pytest

import tracekit
from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine


def test_async_streaming_and_mid_stream_weight_update(tiny_model, tmp_path):
    import safetensors.torch as st
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    base = st.load_file(str(tiny_model / "model.safetensors"))
    v1 = {k: (v * 1.1 if "mlp" in k else v) for k, v in base.items()}

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(tiny_model), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
            max_model_len=512))
        try:
            orig = engine.generate
            sp = SamplingParams(temperature=0.8, max_tokens=16, seed=5)

            async def collect(gen):
                last = None
                async for out in gen:
                    last = out
                return last

            ref = await collect(orig("the quick brown", sp, "ref"))
            rec = tracekit.Recorder(tmp_path / "t", flush_interval=0.2)
            assert rec.wrap(engine) is engine and type(engine) is AsyncLLM
            rec.log_weights(0, tiny_model)
            got = await collect(engine.generate("the quick brown", sp, "a"))
            assert list(got.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
            assert got.outputs[0].logprobs is None and got.outputs[0].cumulative_logprob is None
            delta = SamplingParams(temperature=0.8, max_tokens=16, seed=5, logprobs=1, output_kind=RequestOutputKind.DELTA)
            seen_delta = []
            async for out in engine.generate("the quick brown", delta, "d"):
                seen_delta.extend(out.outputs[0].token_ids)
                assert out.outputs[0].logprobs is not None  # the caller asked: it sees them
            assert seen_delta == list(ref.outputs[0].token_ids)

            # Four long streams; update the weights while they are in flight.
            long = SamplingParams(temperature=1.0, max_tokens=96, min_tokens=96, seed=1)
            received: dict[str, list[int]] = {}
            before_update: dict[str, int] = {}
            started = asyncio.Event()

            async def stream(rid: str, prompt: str):
                async for out in engine.generate(prompt, long, rid):
                    received[rid] = list(out.outputs[0].token_ids)
                    if sum(len(v) for v in received.values()) > 40:
                        started.set()
                    await asyncio.sleep(0.005)  # a consumer that lags a little
                return out

            tasks = [asyncio.create_task(stream(f"s{i}", p)) for i, p in enumerate(
                ["the quick brown", "one two three", "a b c d", "add the numbers"])]
            await started.wait()
            before_update.update({k: len(v) for k, v in received.items()})
            rec.step(1)
            await rec.update_weights_async(engine, 1, v1)
            outs = await asyncio.gather(*tasks)
            ids = {o.request_id: o.outputs[0].tracekit_request_id for o in outs}
            spans = {o.request_id: [(s.version, s.start, s.end) for s in o.outputs[0].weight_versions] for o in outs}
            rec.close()
            return ids, spans, before_update, received
        finally:
            engine.shutdown()

    ids, spans, before, received = asyncio.run(main())
    con = Trace(tmp_path / "t").connect(read_only=False)
    for rid, tk in ids.items():
        rows = con.execute("SELECT token_id, weight_version FROM tokens WHERE request_id = ? ORDER BY pos", [tk]).fetchall()
        assert [r[0] for r in rows] == received[rid]
        versions = [r[1] for r in rows]
        want = [int(v) if v != "default" else 0 for v, s, e in spans[rid] for _ in range(s, e)]
        assert versions == want  # exactly the engine's spans
        assert versions == sorted(versions) and set(versions) <= {0, 1}
        assert versions.count(0) >= before.get(rid, 0)  # tokens seen before the update are version 0
    mixed = con.execute("SELECT count(*) FROM requests WHERE weight_version_start = 0 AND weight_version_end = 1").fetchone()[0]
    assert mixed >= 1  # the update really landed in the middle of streams
    sync = con.execute("SELECT version, engine_checksum, snapshot, error FROM weight_syncs").fetchall()
    assert sync[0][0] == 1 and sync[0][1] and sync[0][2] is True
    req = con.execute("SELECT surface, sampling_requested, finish_reason FROM requests WHERE engine_request_id = 'a'").fetchone()
    assert req[0] == "async_llm" and json.loads(req[1]) == {"temperature": 0.8, "seed": 5}
    # (max_tokens=16 is SamplingParams' default, so it cannot be told apart from "not set")
    assert req[2] == "length"
    con.close()
