"""Recorder on a real in-process vLLM engine (offline ``vllm.LLM``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tracekit
from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine

PROMPTS = ["the quick brown fox", "one two three", "add the numbers", "a b c d"]


def _q(trace: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = Trace(trace).connect(read_only=False)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _fresh(rec_dir: Path) -> tracekit.Recorder:
    return tracekit.Recorder(rec_dir, flush_interval=0.2)


@pytest.fixture(scope="module")
def llm(engine_pool, tiny_model):
    return engine_pool(tiny_model)


def _unwrap(llm):
    """Drop the hooks a previous test installed (the engine is shared)."""
    for name in ("generate", "chat", "collective_rpc", "get_default_sampling_params"):
        llm.__dict__.pop(name, None)
    for name in ("collective_rpc", "set_weight_version"):
        llm.llm_engine.__dict__.pop(name, None)
    llm.__dict__.pop("_tracekit_recorder", None)
    llm.__dict__.pop("_tracekit_hooks", None)


def test_wrapped_llm_returns_same_samples_and_types_and_records_exact_logprobs(llm, tmp_path):
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput

    _unwrap(llm)
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, n=2)
    sp_lp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, n=2, logprobs=3)
    ref = llm.generate(PROMPTS, sp, use_tqdm=False)
    ref_lp = llm.generate(PROMPTS, sp_lp, use_tqdm=False)

    rec = _fresh(tmp_path / "t")
    assert rec.wrap(llm) is llm
    got = llm.generate(PROMPTS, sp, use_tqdm=False)
    got_lp = llm.generate(PROMPTS, sp_lp, use_tqdm=False)
    assert sp.logprobs is None  # the caller's params are never mutated
    for a, b in zip(ref, got):
        assert type(b) is RequestOutput and type(b.outputs[0]) is type(a.outputs[0])
        for x, y in zip(a.outputs, b.outputs):
            assert list(x.token_ids) == list(y.token_ids) and x.text == y.text
            assert y.logprobs is None and y.cumulative_logprob is None  # hidden from the caller
    for a, b in zip(ref_lp, got_lp):
        for x, y in zip(a.outputs, b.outputs):
            assert list(x.token_ids) == list(y.token_ids)
            assert [d[t].logprob for d, t in zip(x.logprobs, x.token_ids)] == [d[t].logprob for d, t in zip(y.logprobs, y.token_ids)]
    ids = rec.request_ids(got)
    assert len(ids) == len(PROMPTS) and all(len(i) == 2 for i in ids)
    assert ids[0][0] == got[0].outputs[0].tracekit_request_id
    st = rec.close()
    assert st.dropped == 0 and rec.errors == 0

    # Recorded logprobs equal vLLM's own, token by token (caller asked or not).
    for outs, asked in ((got, False), (got_lp, True)):
        for o, ref_o in zip(outs, ref_lp):
            for c, rc in zip(o.outputs, ref_o.outputs):
                rows = _q(tmp_path / "t", "SELECT token_id, logprob, top_token_ids, top_logprobs FROM tokens "
                          "WHERE request_id = ? ORDER BY pos", [c.tracekit_request_id])
                assert [r[0] for r in rows] == list(rc.token_ids)
                want = [d[t].logprob for d, t in zip(rc.logprobs, rc.token_ids)]
                assert [r[1] for r in rows] == pytest.approx(want, abs=0, rel=1e-6)  # float32 storage
                if asked:
                    assert all(len(r[2]) == 3 for r in rows)
                    top = sorted(((v.rank, t, v.logprob) for t, v in rc.logprobs[0].items() if v.rank <= 3))
                    assert rows[0][2] == [t for _, t, _ in top]
                else:
                    assert all(r[2] is None for r in rows)
    req = _q(tmp_path / "t", "SELECT group_id, sample_idx, num_logprobs, seed, temperature, top_p, max_tokens, "
             "prompt_token_ids, sampling_requested, finish_reason, num_cached_tokens, weight_version_start "
             "FROM requests WHERE request_id = ?", [ids[1][1]])[0]
    assert req[1] == 1 and req[2] is None and req[3] == 7 and req[4] == pytest.approx(0.8) and req[6] == 12
    assert req[7] == list(got[1].prompt_token_ids)
    assert json.loads(req[8]) == {"temperature": 0.8, "top_p": 0.9, "max_tokens": 12, "seed": 7, "n": 2}
    assert req[9] == got[1].outputs[1].finish_reason and req[10] == got[1].num_cached_tokens
    assert req[11] == 0  # unlabeled engine: the initial weight version
    groups = _q(tmp_path / "t", "SELECT group_id, count(*) FROM requests GROUP BY 1")
    assert sorted(n for _, n in groups) == [2] * 8  # 2 calls x 4 prompts, n=2 each


def _visible(outs) -> list:
    """Everything a caller can see in generate()'s outputs, minus tracekit's request-id attribute."""
    res = []
    for o in outs:
        d = {k: v for k, v in vars(o).items() if k not in ("outputs", "request_id", "metrics")}
        d["outputs"] = [{k: v for k, v in vars(c).items() if k != "tracekit_request_id"} for c in o.outputs]
        res.append(repr(d))
    return res


def test_fast_logprobs_path_records_vllms_exact_floats_and_hides_them(llm, tmp_path, monkeypatch):
    """The recorder's fast path for the logprobs it adds (capture/fastlp.py) must record exactly the
    float vLLM itself returns with logprobs=0, change nothing the caller sees, and leave requests
    whose caller asked for logprobs on vLLM's own (detokenizing) path."""
    from vllm import SamplingParams

    from tracekit.capture import fastlp

    _unwrap(llm)
    prompts = PROMPTS * 2
    sp = SamplingParams(temperature=1.0, max_tokens=40, seed=11, n=2)
    sp_asked = SamplingParams(temperature=1.0, max_tokens=40, seed=11, n=2, logprobs=0)
    ref = llm.generate(prompts, sp, use_tqdm=False)
    ref_flat = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=40, seed=11, n=2, logprobs=0,
                                                    flat_logprobs=True), use_tqdm=False)
    mixed = [sp if i % 2 == 0 else sp_asked for i in range(len(prompts))]
    ref_mixed = llm.generate(prompts, mixed, use_tqdm=False)

    calls = []
    orig = fastlp._fast_update
    monkeypatch.setattr(fastlp, "_fast_update", lambda self, lists: (calls.append(1), orig(self, lists))[1])
    rec = _fresh(tmp_path / "t")
    rec.wrap(llm)
    got = llm.generate(prompts, sp, use_tqdm=False)
    got_mixed = llm.generate(prompts, mixed, use_tqdm=False)
    assert fastlp.install() and calls, "fast path not taken on this engine"
    assert sp.extra_args is None and sp_asked.extra_args is None  # caller's params untouched
    assert _visible(got) == _visible(ref)  # the caller sees exactly what it would have seen
    assert _visible(got_mixed) == _visible(ref_mixed)  # incl. decoded tokens and ranks where it asked
    st = rec.close()
    assert st.dropped == 0 and rec.errors == 0

    n_tok = 0
    for outs in (got, got_mixed):
        for o, r in zip(outs, ref_flat):
            for c, rc in zip(o.outputs, r.outputs):
                rows = _q(tmp_path / "t", "SELECT token_id, logprob FROM tokens WHERE request_id = ? ORDER BY pos",
                          [c.tracekit_request_id])
                assert [x[0] for x in rows] == list(rc.token_ids)
                want = [rc.logprobs.logprobs[i] for i in rc.logprobs.start_indices]
                assert [x[1] for x in rows] == want  # bitwise: float32 from the engine, float32 in the trace
                n_tok += len(rows)
    assert n_tok == sum(len(c.token_ids) for outs in (got, got_mixed) for o in outs for c in o.outputs) > 0


def test_fast_logprobs_update_equals_vllms_own_update_and_falls_back():
    """fastlp._fast_update vs vLLM's LogprobsProcessor._update_sample_logprobs (no tokenizer) on
    one- and multi-position steps: identical FlatLogprobs and cumulative logprob; other shapes
    (top-k columns) go to vLLM's code unchanged."""
    import numpy as np
    from vllm.logprobs import create_sample_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsLists

    from tracekit.capture import fastlp

    assert fastlp.install()
    rng = np.random.default_rng(3)

    def proc(num=0):
        return LogprobsProcessor(tokenizer=None, logprobs=create_sample_logprobs(True), prompt_logprobs=None,
                                 cumulative_logprob=0.0, num_logprobs=num, num_prompt_logprobs=None)

    for cols, num in ((1, 0), (3, 2)):
        a, b = proc(num), proc(num)
        for npos in (1, 1, 3, 1, 2):
            lists = LogprobsLists(rng.integers(0, 512, (npos, cols)).astype(np.int32),
                                  -rng.random((npos, cols)).astype(np.float32) * 5, rng.integers(1, 40, npos), None)
            fastlp._orig_update(a, lists)
            fastlp._fast_update(b, lists)
        fa, fb = a.logprobs, b.logprobs
        for f in ("start_indices", "end_indices", "token_ids", "logprobs", "ranks", "decoded_tokens"):
            assert getattr(fa, f) == getattr(fb, f), f
        assert a.cumulative_logprob == b.cumulative_logprob


def test_chat_and_step_and_trainer_logprobs(llm, tmp_path):
    from vllm import SamplingParams

    _unwrap(llm)
    rec = _fresh(tmp_path / "t")
    rec.wrap(llm)
    rec.step(5)
    tmpl = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    out = llm.chat([[{"role": "user", "content": "the quick"}]] * 2, SamplingParams(max_tokens=6, seed=1),
                   chat_template=tmpl, use_tqdm=False)
    rid = rec.request_ids(out)[0][0]
    n = len(out[0].outputs[0].token_ids)
    rec.log_trainer_logprobs(rid, [-0.5] * n, policy_version=0)
    rec.close()
    rows = _q(tmp_path / "t", "SELECT step, group_id, sample_idx, extra FROM requests ORDER BY sample_idx")
    assert [r[0] for r in rows] == [5, 5] and rows[0][1] == rows[1][1] and [r[2] for r in rows] == [0, 1]
    assert json.loads(rows[0][3])["kind"] == "chat"
    tr = _q(tmp_path / "t", "SELECT pos, logprob, step, policy_version FROM trainer WHERE request_id = ? ORDER BY pos", [rid])
    assert len(tr) == n and tr[0] == (0, -0.5, 5, 0)


def test_fingerprint_records_effective_logprobs_mode(engine_pool, tiny_model, llm, tmp_path):
    from tracekit.capture.fingerprint import fingerprint_llm

    proc = engine_pool(tiny_model, logprobs_mode="processed_logprobs")
    raw = fingerprint_llm(llm)
    row = fingerprint_llm(proc, engine_args={"logprobs_mode": "processed_logprobs"})
    assert raw["logprobs_mode"] == "raw_logprobs" and row["logprobs_mode"] == "processed_logprobs"
    import torch
    import vllm

    assert row["vllm_version"] == vllm.__version__ and row["torch_version"] == torch.__version__
    assert row["platform"] == "cpu" and row["dtype"] == "bfloat16" and row["head_dtype"] == "bfloat16"
    assert row["model"] == str(tiny_model) and len(row["model_hash"]) == 64
    assert row["async_scheduling"] is False and row["enable_prefix_caching"] is True
    assert row["block_size"] == proc.llm_engine.vllm_config.cache_config.block_size
    assert row["engine_args"]["logprobs_mode"] == "processed_logprobs"
    assert row["capabilities"]["weight_version_spans"] is True
    assert row["env"].get("VLLM_CPU_KVCACHE_SPACE") == "1"
    _unwrap(proc)
    rec = _fresh(tmp_path / "t")
    rec.wrap(proc)
    rec.close()
    assert _q(tmp_path / "t", "SELECT logprobs_mode FROM engines") == [("processed_logprobs",)]
    _unwrap(proc)


def test_generation_config_defaults_show_up_as_resolved_params(engine_pool, model_factory, tmp_path):
    from vllm import SamplingParams

    model = model_factory(generation_config={"temperature": 0.5, "top_k": 20, "top_p": 0.95})
    llm = engine_pool(model)
    rec = _fresh(tmp_path / "t")
    rec.wrap(llm)
    llm.generate(["the quick"], None, use_tqdm=False)  # defaults apply (offline: only with None)
    llm.generate(["the quick"], SamplingParams(max_tokens=4), use_tqdm=False)  # explicit: used as given
    rec.close()
    rows = _q(tmp_path / "t", "SELECT sampling_requested, temperature, top_k, top_p FROM requests ORDER BY request_id")
    assert json.loads(rows[0][0]) == {} and rows[0][1:] == (0.5, 20, pytest.approx(0.95))
    assert json.loads(rows[1][0]) == {"max_tokens": 4} and rows[1][1:] == (1.0, 0, 1.0)
    eng = json.loads(_q(tmp_path / "t", "SELECT default_sampling_params FROM engines")[0][0])
    assert eng == {"temperature": 0.5, "top_k": 20, "top_p": 0.95}
    _unwrap(llm)


def test_mid_run_weight_update_tags_tokens_and_snapshot_round_trips(engine_pool, model_factory, tmp_path):
    import safetensors.torch as st
    from vllm import SamplingParams

    from tracekit.store.weights import load_snapshot

    model = model_factory(arch="llama", seed=1)
    llm = engine_pool(model)
    rec = _fresh(tmp_path / "t")
    rec.wrap(llm)
    base = st.load_file(str(model / "model.safetensors"))
    rec.log_weights(0, model)
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=11)
    rec.step(0)
    before = llm.generate(PROMPTS, sp, use_tqdm=False)
    v1 = {k: (v * 1.05 if "mlp" in k else v) for k, v in base.items()}
    rec.step(1)
    rec.update_weights(llm, 1, v1)
    after = llm.generate(PROMPTS, sp, use_tqdm=False)
    rec.update_weights(llm, 2, v1)  # same tensors again: a sync that changed nothing
    rec.close()

    ids0 = [i[0] for i in rec.request_ids(before)]
    ids1 = [i[0] for i in rec.request_ids(after)]
    got = dict(_q(tmp_path / "t", "SELECT request_id, list_distinct(list(weight_version)) FROM tokens GROUP BY 1"))
    assert all(got[i] == [0] for i in ids0) and all(got[i] == [1] for i in ids1)
    reqs = dict(_q(tmp_path / "t", "SELECT request_id, weight_version_end FROM requests"))
    assert all(reqs[i] == 1 for i in ids1)
    syncs = _q(tmp_path / "t", "SELECT version, engine_checksum, error, snapshot FROM weight_syncs ORDER BY version")
    assert [s[0] for s in syncs] == [1, 2] and syncs[0][1] and syncs[0][3] is True
    assert syncs[1][1] == syncs[0][1] and "unchanged" in syncs[1][2]  # no-op sync is visible
    # The snapshot round-trips bit-exactly and unchanged tensors are stored once.
    snap = load_snapshot(Trace(tmp_path / "t"), 1)
    assert snap.keys() == v1.keys() and all((snap[k] == v1[k]).all() for k in v1)
    shas = _q(tmp_path / "t", "SELECT name, count(DISTINCT sha256) FROM weights WHERE version IN (0, 1) GROUP BY 1")
    assert {n: c for n, c in shas if "mlp" not in n} == {n: 1 for n, _ in shas if "mlp" not in n}
    # Tokens after the update really come from the new weights.
    assert any(list(a.outputs[0].token_ids) != list(b.outputs[0].token_ids) for a, b in zip(before, after)) or \
        _q(tmp_path / "t", "SELECT count(*) FROM tokens WHERE weight_version = 1")[0][0] > 0
    rec2 = _fresh(tmp_path / "restore")  # put the shared engine back to its original weights
    rec2.update_weights(llm, 0, model)
    rec2.close()
    _unwrap(llm)


def test_reload_the_job_pushes_itself_is_observed_and_labeled(engine_pool, model_factory, tmp_path):
    """llm.collective_rpc("reload_weights") by the job: a weight_syncs row with the engine's checksum.
    Unlabeled and never stated: the recorder labels the engine and the tokens get the ordinal of the
    reload (1), not the stale label (0); labeled by the job first: the job's label (7) is kept.
    (tests/test_versions.py covers statements, stale pushes and AsyncLLM.)"""
    from test_replay_support import load_into, perturbed
    from vllm import SamplingParams

    model = model_factory(arch="llama", seed=1)
    llm = engine_pool(model)
    rec = _fresh(tmp_path / "t")
    rec.wrap(llm)
    sp = SamplingParams(temperature=1.0, max_tokens=4, seed=3)
    try:
        outs = [llm.generate(PROMPTS[:2], sp, use_tqdm=False)]
        load_into(llm, perturbed(model, seed=2), model)  # unlabeled
        outs.append(llm.generate(PROMPTS[:2], sp, use_tqdm=False))
        llm.llm_engine.set_weight_version("7")  # labeled first, then reloaded
        load_into(llm, perturbed(model, seed=3), model)
        assert llm.llm_engine.get_weight_version() == "7"
        outs.append(llm.generate(PROMPTS[:2], sp, use_tqdm=False))
        rec.close()
    finally:
        _unwrap(llm)
        rec2 = _fresh(tmp_path / "restore")  # the shared engine back to its weights and label
        rec2.update_weights(llm, 0, model)
        rec2.close()
        llm.llm_engine.set_weight_version("default")
    assert rec.errors == 0, rec.error_messages
    got = dict(_q(tmp_path / "t", "SELECT request_id, list_distinct(list(weight_version)) FROM tokens GROUP BY 1"))
    assert [[got[c.tracekit_request_id] for o in out for c in o.outputs] for out in outs] == \
        [[[0]] * 2, [[1]] * 2, [[7]] * 2]
    syncs = _q(tmp_path / "t", "SELECT version, method, error, engine_checksum FROM weight_syncs ORDER BY t_end")
    assert [(v, m) for v, m, _, _ in syncs] == [(1, "collective_rpc:reload_weights"), (7, "collective_rpc:reload_weights")]
    assert "ordinal 1" in syncs[0][2] and "the job's own engine label before the change" in syncs[1][2]
    assert syncs[0][3] and syncs[1][3] and syncs[0][3] != syncs[1][3]  # checksums of the pushed weights


def test_params_from_get_default_sampling_params_record_only_what_the_job_changed(engine_pool, model_factory, tmp_path):
    """A job that builds its params from llm.get_default_sampling_params() and sets n, max_tokens,
    seed and logprobs: requested = those four; the model's generation_config defaults (temperature
    0.5, top_k 20) are resolved, not requested. Params built from SamplingParams() are unchanged."""
    from vllm import SamplingParams

    model = model_factory(generation_config={"temperature": 0.5, "top_k": 20, "top_p": 0.95})
    llm = engine_pool(model)
    _unwrap(llm)
    rec = _fresh(tmp_path / "t")
    rec.wrap(llm)
    sp = llm.get_default_sampling_params()
    assert sp.temperature == 0.5 and sp.top_k == 20
    sp.n, sp.max_tokens, sp.seed, sp.logprobs = 2, 5, 3, 0
    out = llm.generate(["the quick"], sp, use_tqdm=False)
    per_prompt = [llm.get_default_sampling_params() for _ in range(2)]
    for i, p in enumerate(per_prompt):
        p.max_tokens, p.seed = 4, i
    out2 = llm.generate(["the quick", "one two"], per_prompt, use_tqdm=False)
    out3 = llm.generate(["the quick"], SamplingParams(temperature=0.5, max_tokens=4), use_tqdm=False)
    rec.close()
    _unwrap(llm)
    assert len(out[0].outputs) == 2 and out[0].outputs[0].logprobs is not None  # the job asked for them
    rows = {r[0]: r[1:] for r in _q(tmp_path / "t", "SELECT request_id, sampling_requested, temperature, top_k, "
                                     "top_p, num_logprobs FROM requests")}
    r = rows[out[0].outputs[0].tracekit_request_id]
    assert json.loads(r[0]) == {"n": 2, "max_tokens": 5, "seed": 3, "logprobs": 0}
    assert r[1:] == (0.5, 20, pytest.approx(0.95), 0)
    for o, seed in zip(out2, (0, 1)):
        r = rows[o.outputs[0].tracekit_request_id]
        assert json.loads(r[0]) == {"max_tokens": 4, "seed": seed} and r[1:3] == (0.5, 20)
    assert json.loads(rows[out3[0].outputs[0].tracekit_request_id][0]) == {"temperature": 0.5, "max_tokens": 4}


def test_recorder_never_raises_into_the_job_on_unwritable_dir(llm, tmp_path):
    from vllm import SamplingParams

    _unwrap(llm)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = tracekit.Recorder(blocker / "trace")  # cannot be created
    rec.wrap(llm)
    out = llm.generate(["the quick"], SamplingParams(max_tokens=4, seed=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].logprobs is None
    assert rec.log_weights(0, {"x": __import__("torch").zeros(2)}) is False
    st = rec.close()
    assert st.dropped > 0 and st.rows_dropped.get("requests") == 1
    _unwrap(llm)
