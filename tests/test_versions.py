"""Weight versions of the weight changes a job pushes itself (capture/versions.py), on real vLLM
engines: an offline LLM the job reloads with collective_rpc and never labels (versions from its
log_weights statements, a stale push, zero-code ordinals, the job's own labels), and an AsyncLLM
reloaded mid-stream, every token checked against a rescoring under each version (vLLM 0.32 and
0.27.1)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from test_recorder import PROMPTS, _q
from test_recorder_old_engine import run_job

import tracekit
from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine


def _checkpoint(model: Path, out: Path, seed: int) -> Path:
    """A reloadable checkpoint directory: the model perturbed (a 'trainer step') + its config files."""
    import safetensors.torch as st
    from test_replay_support import perturbed

    out.mkdir(parents=True, exist_ok=True)
    st.save_file(perturbed(model, scale=0.3, seed=seed), str(out / "model.safetensors"))
    for p in model.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)
    return out


@pytest.fixture(scope="module")
def ckpts(model_factory, tmp_path_factory) -> dict[int, Path]:
    """Version -> checkpoint directory (0: the model itself)."""
    model = model_factory(arch="llama", seed=1)
    root = tmp_path_factory.mktemp("ckpts")
    return {0: model, **{v: _checkpoint(model, root / f"v{v}", seed=10 + v) for v in (1, 2, 3)}}


@pytest.fixture
def llm(engine_pool, ckpts):
    """The shared llama engine, put back to its weights and label afterwards."""
    llm = engine_pool(ckpts[0])
    yield llm
    for name in ("generate", "chat", "get_default_sampling_params", "_tracekit_recorder", "_tracekit_hooks"):
        llm.__dict__.pop(name, None)
    for name in ("collective_rpc", "set_weight_version"):
        llm.llm_engine.__dict__.pop(name, None)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(ckpts[0])})
    llm.reset_prefix_cache()
    llm.llm_engine.set_weight_version("default")


def _push(llm, path: Path) -> None:
    """What RL stacks do: reload, reset the prefix cache, no label."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
    llm.reset_prefix_cache()


def _versions(trace: Path, outs) -> list[list]:
    """The distinct recorded versions of each sample of ``outs``."""
    ids = [c.tracekit_request_id for o in outs for c in o.outputs]
    got = dict(_q(trace, "SELECT request_id, list(weight_version) FROM tokens GROUP BY 1"))  # nulls kept
    return [sorted(set(got[i]), key=lambda v: (v is None, v)) for i in ids]


def test_job_pushed_reloads_take_the_version_the_job_states_next(llm, ckpts, tmp_path):
    """collective_rpc('reload_weights') without a label, then rec.log_weights(v, dir): every token
    carries v. A stale push (the previous dir reloaded while the job claims v) gives tokens v, and
    a weight_syncs row whose engine checksum equals the previous version's: STALE_CHECKSUM_SQL."""
    from vllm import SamplingParams

    from tracekit.causes.weight_sync import STALE_CHECKSUM_SQL

    rec = tracekit.Recorder(tmp_path / "t", flush_interval=0.2)
    rec.wrap(llm)
    rec.log_weights(0, ckpts[0])
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=3)
    outs = {0: llm.generate(PROMPTS, sp, use_tqdm=False)}
    for v in (1, 2):
        _push(llm, ckpts[v])
        rec.log_weights(v, ckpts[v], step=v)
        rec.step(v)
        outs[v] = llm.generate(PROMPTS, sp, use_tqdm=False)
    _push(llm, ckpts[2])  # stale: the engine gets version 2's weights again...
    rec.log_weights(3, ckpts[3], step=3)  # ...while the job believes 3 is live
    outs[3] = llm.generate(PROMPTS, sp, use_tqdm=False)
    _push(llm, ckpts[0])  # stale back to the starting weights (known from the baseline checksum)
    rec.log_weights(4, ckpts[1], step=4, force=True)
    outs[4] = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert llm.llm_engine.get_weight_version().startswith("tracekit-")  # labeled by the recorder
    st = rec.close()
    assert rec.errors == 0 and st.dropped == 0, rec.error_messages

    for v, o in outs.items():
        assert _versions(tmp_path / "t", o) == [[v]] * len(PROMPTS), v
    assert [list(c.token_ids) for o in outs[1] for c in o.outputs] != \
        [list(c.token_ids) for o in outs[0] for c in o.outputs]  # the reloads took effect
    syncs = _q(tmp_path / "t", "SELECT version, step, method, engine_checksum, ok, error FROM weight_syncs ORDER BY t_end")
    base, syncs = syncs[0], syncs[1:]  # the weights the engine held before the job's first push
    assert (base[0], base[2]) == (0, "baseline") and base[3] and base[3] != syncs[0][3]
    assert [(s[0], s[1], s[2], s[4]) for s in syncs] == [(v, v, "collective_rpc:reload_weights", True) for v in (1, 2, 3, 4)]
    assert all("stated by rec.log_weights" in s[5] for s in syncs)
    assert syncs[0][3] != syncs[1][3] and syncs[2][3] == syncs[1][3]  # checksums: the stale push holds v2
    assert syncs[3][3] == base[3]  # and the last one the starting weights
    assert f"the engine loaded {ckpts[2].resolve()}" in syncs[2][5]
    stale = _q(tmp_path / "t", STALE_CHECKSUM_SQL)
    assert {(3, 2), (4, 0)} <= {(r[1], r[3]) for r in stale}  # claimed 3, weights of 2; claimed 4, weights of 0
    assert [r[0] for r in _q(tmp_path / "t", "SELECT DISTINCT version FROM weights ORDER BY 1")] == [0, 1, 2, 3, 4]


def test_zero_code_job_gets_ordinal_versions_and_snapshots(llm, ckpts, tmp_path):
    """A job that never states a version (what `tracekit record --` sees): the k-th reload is
    version initial + k, and the reloaded directory is snapshotted under that version at once."""
    import safetensors.torch as st
    from vllm import SamplingParams

    from tracekit.store.weights import load_snapshot

    rec = tracekit.Recorder(tmp_path / "t", flush_interval=0.2)
    rec.wrap(llm)
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=5)
    outs = [llm.generate(PROMPTS[:2], sp, use_tqdm=False)]
    for v in (1, 2):
        _push(llm, ckpts[v])
        outs.append(llm.generate(PROMPTS[:2], sp, use_tqdm=False))
    assert rec.versions.held_total == 4  # the samples after each reload waited for its version
    rec.close()
    assert rec.errors == 0, rec.error_messages
    assert [_versions(tmp_path / "t", o) for o in outs] == [[[0]] * 2, [[1]] * 2, [[2]] * 2]
    syncs = _q(tmp_path / "t", "SELECT version, snapshot, engine_checksum, error FROM weight_syncs "
               "WHERE method <> 'baseline' ORDER BY t_end")
    assert [s[:2] for s in syncs] == [(1, True), (2, True)] and all(s[2] for s in syncs)
    assert "no version stated before the next weight change" in syncs[0][3] and "ordinal 1" in syncs[0][3]
    assert "before the recorder closed" in syncs[1][3]
    for v in (1, 2):  # snapshots of the reloaded directories, under the ordinal versions
        snap = load_snapshot(Trace(tmp_path / "t"), v)
        want = st.load_file(str(ckpts[v] / "model.safetensors"))
        assert snap.keys() == want.keys() and all((snap[k] == want[k]).all() for k in want)


def test_the_jobs_own_labels_win(llm, ckpts, tmp_path):
    """Labels the job sets itself are kept (never clobbered): after the reload (a statement of its
    version), before it (the label of that reload). A label set after tokens of the new weights
    were returned is the next reload's: the reload before it gets no version, not the label."""
    from vllm import SamplingParams

    rec = tracekit.Recorder(tmp_path / "t", flush_interval=0.2)
    rec.wrap(llm)
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=7)
    _push(llm, ckpts[1])
    llm.llm_engine.set_weight_version("5")  # after the reload
    after = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
    llm.update_weight_version("6")  # vLLM's RL API, before the reload
    _push(llm, ckpts[2])
    assert llm.llm_engine.get_weight_version() == "6"  # not clobbered
    before = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
    _push(llm, ckpts[3])  # no label...
    unlabeled = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
    llm.llm_engine.set_weight_version("8")  # ...this one is for the next reload
    _push(llm, ckpts[1])
    nxt = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
    rec.close()
    assert rec.errors == 0, rec.error_messages
    got = [_versions(tmp_path / "t", o) for o in (after, before, unlabeled, nxt)]
    assert got == [[[5]] * 2, [[6]] * 2, [[None]] * 2, [[8]] * 2]
    syncs = _q(tmp_path / "t", "SELECT version, error FROM weight_syncs WHERE method <> 'baseline' ORDER BY t_end")
    assert [s[0] for s in syncs] == [5, 6, -1, 8]
    assert "after the change" in syncs[0][1] and "before the change" in syncs[1][1] and "unknown" in syncs[2][1]
    why = _q(tmp_path / "t", "SELECT extra->>'weight_version_unknown' FROM requests WHERE request_id = ?",
             [unlabeled[0].outputs[0].tracekit_request_id])[0][0]
    assert "no version stated before the next weight change" in why


# --------------------------------------------------------------------------- AsyncLLM mid-stream
ASYNC_JOB = """
import asyncio, json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import tracekit
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.v1.engine.async_llm import AsyncLLM

PROMPTS = ["the quick brown", "one two three", "a b c d", "add the numbers", "vllm samples rollouts",
           "the trainer computes", "0 1 2 3", "reinforcement learning"]


async def run(model, new, out):
    # float32: a prefill-only rescoring reproduces the decode-time logprobs (bitwise on AVX-512)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype="float32", gpu_memory_utilization=0.3,
                                                       enforce_eager=True, seed=0, max_model_len=512))
    try:
        rec = tracekit.Recorder(out, flush_interval=0.2)
        rec.wrap(engine)
        rec.log_weights(0, model)
        got, seen, started = {}, [0], asyncio.Event()

        async def stream(rid, prompt, sp):
            async for o in engine.generate(prompt, sp, rid):
                got[rid] = o
                seen[0] += 1
                if seen[0] > 60:
                    started.set()
                await asyncio.sleep(0.002)  # a consumer that lags a little

        long = SamplingParams(temperature=1.0, max_tokens=64, min_tokens=64, seed=1)
        tasks = [asyncio.create_task(stream(f"s{i}", p, long)) for i, p in enumerate(PROMPTS)]
        await started.wait()
        # The job pushes weights itself, mid-stream, and never labels the engine.
        await engine.collective_rpc("reload_weights", kwargs={"weights_path": new})
        late = [asyncio.create_task(stream(f"late{i}", p, SamplingParams(temperature=1.0, max_tokens=16, seed=9)))
                for i, p in enumerate(PROMPTS[:2])]
        await engine.reset_prefix_cache()
        await asyncio.gather(*late)  # requests entirely after the update finish before the statement
        rec.log_weights(1, new)
        await asyncio.gather(*tasks)
        rec.close()
        # Ground truth: each sequence rescored (prefill only) under v0 and v1 on this engine.
        seqs = {rid: (list(o.prompt_token_ids), list(o.outputs[0].token_ids), o.outputs[0].tracekit_request_id)
                for rid, o in got.items()}
        truth = {}
        for v, path in ((0, model), (1, new)):
            await engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
            await engine.reset_prefix_cache()
            for rid, (p, o, _) in seqs.items():
                async for r in engine.generate(TokensPrompt(prompt_token_ids=p + o), SamplingParams(
                        max_tokens=1, prompt_logprobs=0), f"score-{v}-{rid}"):
                    pl = r.prompt_logprobs
                truth.setdefault(rid, {})[v] = [pl[len(p) + i][t].logprob for i, t in enumerate(o)]
        return {"seqs": seqs, "truth": truth, "held": rec.versions.held_total, "errors": rec.error_messages}
    finally:
        engine.shutdown()


if __name__ == "__main__":
    res = asyncio.run(run(*sys.argv[1:4]))
    with open(sys.argv[3] + ".json", "w") as f:
        json.dump(res, f)
    os._exit(0)
"""


def _run_async_job(python: str, ckpts: dict[int, Path], tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / "t"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # AsyncLLM: own process
    run_job(python, ASYNC_JOB, [ckpts[0], ckpts[1], out], tmp_path, env=env)
    return json.loads(Path(str(out) + ".json").read_text()), out


def _check_against_truth(res: dict, trace: Path) -> dict[str, Any]:
    """Each token's truth: the version whose rescored logprob matches the recorded one within the
    engine's own prefill-vs-decode noise (measured on the late requests, which ran entirely on v1;
    0 on AVX-512 CPUs in float32: bitwise), or 'mixed' (computed by v1 on KV from v0: neither)."""
    from engine_noise import Noise

    recorded = {}
    for rid, (_prompt, out, tk) in res["seqs"].items():
        rows = _q(trace, "SELECT token_id, logprob, weight_version FROM tokens WHERE request_id = ? ORDER BY pos", [tk])
        assert [r[0] for r in rows] == out, rid
        recorded[rid] = rows
    d = [abs(r[1] - b) for rid, rows in recorded.items() if rid.startswith("late")
         for r, b in zip(rows, res["truth"][rid]["1"])]
    tol = Noise(sum(d) / len(d), max(d), len(d)).tol
    n: dict[str, Any] = dict(tokens=0, wrong=0, unknown=0, mixed=0, mixed_tagged_v1=0, pure_v0=0, pure_v1=0,
                             ambiguous=0, tol=tol)
    per_request: dict[str, list] = {}
    for rid, rows in recorded.items():
        tags = []
        for (_, lp, tag), a, b in zip(rows, res["truth"][rid]["0"], res["truth"][rid]["1"]):
            d0, d1 = abs(lp - a), abs(lp - b)
            truth = 0 if d0 <= tol < d1 else 1 if d1 <= tol < d0 else "mixed" if min(d0, d1) > tol else None
            n["tokens"] += 1
            n["unknown"] += tag is None
            if truth is None:  # both versions within the noise: cannot tell (must not happen here)
                n["ambiguous"] += 1
            elif truth == "mixed":
                n["mixed"] += 1
                n["mixed_tagged_v1"] += tag == 1
                n["wrong"] += tag is not None and tag != 1  # v1 computed it, on v0's KV: never v0
            else:
                n[f"pure_v{truth}"] += 1
                n["wrong"] += tag is not None and tag != truth
            if tag is not None and tag != (1 if truth == "mixed" else truth) and truth is not None:
                n.setdefault("wrong_at", []).append((rid, len(tags), tag, truth, d0, d1))
            tags.append(tag)
        per_request[rid] = tags
    n["per_request"] = per_request
    return n


def test_async_mid_stream_reload_by_the_job_against_rescored_truth(ckpts, tmp_path):
    """AsyncLLM on vLLM 0.32, the job reloads mid-stream with collective_rpc and states the version
    with log_weights: no token carries a wrong version and none is unknown."""
    res, trace = _run_async_job(sys.executable, ckpts, tmp_path)
    assert res["errors"] == []
    n = _check_against_truth(res, trace)
    print({k: v for k, v in n.items() if k != "per_request"})
    assert n["ambiguous"] == 0  # v0 and v1 are told apart on every token
    assert n["wrong"] == 0 and n["unknown"] == 0, (n.get("wrong_at"), {r: n["per_request"][r] for r, *_ in n.get("wrong_at", [])})
    assert n["pure_v0"] > 0 and n["pure_v1"] > 0 and n["mixed"] > 0  # the reload landed mid-stream
    assert n["mixed_tagged_v1"] == n["mixed"]
    assert all(t == [1] * len(t) for r, t in n["per_request"].items() if r.startswith("late"))
    assert res["held"] >= 2  # the late requests ended before the statement and waited for it
    syncs = _q(trace, "SELECT version, engine_checksum, ok, method FROM weight_syncs ORDER BY t_end")
    assert [(s[0], s[2], s[3]) for s in syncs] == [(0, True, "baseline"), (1, True, "collective_rpc:reload_weights")]
    assert syncs[0][1] and syncs[1][1] and syncs[0][1] != syncs[1][1]


@pytest.mark.venv_old
def test_async_mid_stream_reload_on_vllm_0_27_is_unknown_not_stale(old_python, ckpts, tmp_path):
    """vLLM 0.27.1 has no per-token spans: a request the reload landed in has unknown (null)
    tokens, never the previous version; requests after it get the stated version."""
    res, trace = _run_async_job(old_python, ckpts, tmp_path)
    assert res["errors"] == []
    n = _check_against_truth(res, trace)
    print({k: v for k, v in n.items() if k != "per_request"})
    assert n["ambiguous"] == 0 and n["wrong"] == 0 and n["mixed"] > 0
    for rid, tags in n["per_request"].items():
        assert tags == ([1] * len(tags) if rid.startswith("late") else [None] * len(tags)), rid
    why = _q(trace, "SELECT DISTINCT extra->>'weight_version_unknown' FROM requests WHERE weight_version_start IS NULL")
    assert len(why) == 1 and "no per-token spans" in why[0][0]
