"""One run recorded three times on the same real vLLM engine: by tracekit's Recorder, as PipelineRL's
actor dumps it (tests/import_fixtures.py reproduces make_training_text, the actor's group dump and
FileStreamWriter) and as slime's --save-debug-rollout-data saves its Samples. Each imported dump must
equal the tracekit trace on every field both hold, and the imported trace must replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from import_fixtures import (
    pipelinerl_group,
    slime_sample,
    training_text,
    write_pipelinerl_config,
    write_pipelinerl_stream,
    write_slime_rollout,
)
from test_import import CHAT_TEMPLATE
from test_recorder import _unwrap

import tracekit
from tracekit.importers import import_run
from tracekit.schema import table
from tracekit.store import Trace

pytestmark = pytest.mark.engine

SCHED = "train scheduler for llms 0"
ATTEMPTS = 3
PARAMS = {"max_tokens": 10, "temperature": 1.0}
# Columns that are the importer's own bookkeeping, or JSON whose shape differs by design (compared
# key by key below): everything else the import fills must equal the recording.
OWN = {"request_id", "run_id", "engine_id", "surface", "extra", "sampling_requested", "sampling_resolved", "reward"}


def _rows(trace: Path, sql: str) -> list[dict[str, Any]]:
    con = Trace(trace).connect(read_only=False)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def _record_run(llm: Any, model: Path, tmp: Path) -> dict[str, Any]:
    """Generate 4 groups (2 per weight version, one slime rollout per version) through the Recorder;
    dump them as PipelineRL and as slime do."""
    import safetensors.torch as st
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = CHAT_TEMPLATE
    rec = tracekit.Recorder(tmp / "rec", flush_interval=0.2)
    rec.wrap(llm)
    rec.log_weights(0, model)
    ids_map: dict[int, tuple[str, int]] = {}
    slime_map: dict[int, tuple[str, int]] = {}
    lines = []
    rollouts: dict[int, list[dict[str, Any]]] = {}
    for g, text in enumerate(["add the numbers", "one two three", "the quick brown fox", "a b c d"]):
        version = g // 2
        if g == 2:  # the trainer broadcasts version 1 (same tensors: the engine stays comparable)
            rec.update_weights(llm, 1, st.load_file(str(model / "model.safetensors")))
        rec.step(version)  # slime: one rollout per version
        msgs = [{"role": "user", "content": text}]
        enc = tok.apply_chat_template(msgs, add_special_tokens=True, add_generation_prompt=True)
        prompt_ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        # what llm_async_generate sends: llm.parameters + logprobs=1, include_stop_str_in_output, no skip
        sp = SamplingParams(**PARAMS, logprobs=1, include_stop_str_in_output=True, skip_special_tokens=False)
        gid = f"{SCHED}_{g}"
        with rec.group(gid):
            outs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids) for _ in range(ATTEMPTS)], sp,
                                use_tqdm=False)
        texts, rewards = [], []
        for i, o in enumerate(outs):
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = [c.logprobs[k][t].logprob for k, t in enumerate(toks)]
            texts.append(training_text(tok, msgs, c.text, toks, lps, c.finish_reason, len(o.prompt_token_ids),
                                       len(toks)))
            rewards.append(float(len(toks) % 3))
            rid = c.tracekit_request_id
            rec.log_reward(rid, rewards[-1])
            ids_map[rid] = (gid, i)
            # slime: Sample built by sglang_rollout.generate + append_response_tokens (all tokens trainable)
            samples = rollouts.setdefault(version, [])
            samples.append(slime_sample(
                group_index=g, index=len(samples), prompt=text, tokens=prompt_ids + toks, response=c.text,
                response_length=len(toks), reward=rewards[-1], loss_mask=[1] * len(toks),
                weight_versions=[str(version)], rollout_log_probs=lps,
                status="truncated" if c.finish_reason == "length" else "completed",
                cached_tokens=o.num_cached_tokens or 0, prompt_tokens=len(prompt_ids)))
            slime_map[rid] = (f"train-{version}-{g}", i)
        lines.append(pipelinerl_group(texts, scheduler=SCHED, group=g, model_version=version, rewards=rewards, seed=g))
    st_ = rec.close()
    assert st_.dropped == 0 and rec.errors == 0
    fp = _rows(tmp / "rec", "SELECT * FROM engines WHERE role = 'record'")[0]
    exp = tmp / "exp"
    write_pipelinerl_stream(exp, lines)
    # The launcher's flags for this engine (conf/base.yaml vllm_kwargs, with the values it ran with).
    kwargs = {"dtype": "bfloat16", "max_model_len": 512, "gpu-memory-utilization": 0.3, "enforce-eager": "",
              "seed": 0, "enable-prefix-caching": fp["enable_prefix_caching"], "return-tokens-as-token-ids": ""}
    write_pipelinerl_config(exp, {"model_path": str(model), "llm": {"parameters": dict(PARAMS)},
                                  "test_llm": {"parameters": dict(PARAMS)}, "vllm_config": {"vllm_kwargs": kwargs}})
    for version, samples in rollouts.items():
        write_slime_rollout(str(tmp / "slime" / "{rollout_id}.pt"), version, samples)
    (tmp / "slime_args.json").write_text(json.dumps({"rollout_temperature": PARAMS["temperature"],
                                                     "rollout_max_response_len": PARAMS["max_tokens"]}))
    return {"rec": tmp / "rec", "exp": exp, "slime": tmp / "slime", "slime_args": tmp / "slime_args.json",
            "ids": ids_map, "slime_ids": slime_map, "fp": fp}


@pytest.fixture(scope="module")
def run(engine_pool, tiny_model, tmp_path_factory) -> dict[str, Any]:
    llm = engine_pool(tiny_model)
    _unwrap(llm)
    tmp = tmp_path_factory.mktemp("run")
    try:
        return _record_run(llm, tiny_model, tmp)
    finally:
        restore = tracekit.Recorder(tmp / "restore", flush_interval=0.2)
        restore.update_weights(llm, 0, tiny_model)
        restore.close()
        _unwrap(llm)


def _assert_common(rec: Path, imp: Path, ids: dict[int, tuple[str, int]], skip: set[str] = frozenset()) -> set[str]:
    """Every requests/tokens column the import filled equals the recording, request by request
    (matched by group and index in the group); returns the columns compared."""
    rec_req = {r["request_id"]: r for r in _rows(rec, "SELECT * FROM requests")}
    rec_rew = {r["request_id"]: r["reward"] for r in _rows(rec, "SELECT * FROM rewards")}
    imp_req = {(r["group_id"], r["sample_idx"]): r for r in _rows(imp, "SELECT * FROM requests")}
    compared: set[str] = set()
    for rid, key in ids.items():
        a, b = rec_req[rid], imp_req[key]
        for c in table("requests").column_names:
            if c in OWN or c in skip or b[c] is None:
                continue
            assert b[c] == a[c], (c, a[c], b[c])
            compared.add(c)
        assert b["reward"] == rec_rew[rid]
        for c in ("sampling_requested", "sampling_resolved"):
            ja, jb = json.loads(a[c]), json.loads(b[c])
            common = (set(ja) & set(jb)) - skip
            assert common and {k: ja[k] for k in common} == {k: jb[k] for k in common}, c
        ta = _rows(rec, f"SELECT * FROM tokens WHERE request_id = {rid} ORDER BY pos")
        tb = _rows(imp, f"SELECT * FROM tokens WHERE request_id = {b['request_id']} ORDER BY pos")
        assert len(ta) == len(tb) > 0
        for x, y in zip(ta, tb):
            for c in table("tokens").column_names:
                if c != "request_id" and y[c] is not None:
                    assert y[c] == x[c], (c, x[c], y[c])  # logprobs: float32 bit-exact
                    compared.add(f"tokens.{c}")
    return compared


def test_pipelinerl_dump_imports_to_the_tracekit_trace_of_the_same_run(run, tiny_model, tmp_path) -> None:
    res = import_run("pipelinerl", run["exp"], tmp_path / "imp", model=str(tiny_model))
    assert res.requests == len(run["ids"]) == 4 * ATTEMPTS
    compared = _assert_common(run["rec"], tmp_path / "imp", run["ids"])
    assert {"prompt_token_ids", "output_token_ids", "group_id", "sample_idx", "weight_version_start",
            "weight_version_end", "temperature", "max_tokens", "num_logprobs", "tokens.token_id", "tokens.logprob",
            "tokens.weight_version", "tokens.pos"} <= compared
    assert {r["weight_version_start"] for r in _rows(tmp_path / "imp", "SELECT * FROM requests")} == {0, 1}
    e = _rows(tmp_path / "imp", "SELECT * FROM engines")[0]
    for c in ("model", "model_hash", "dtype", "logprobs_mode", "enable_prefix_caching", "max_model_len",
              "default_sampling_params"):
        assert e[c] is not None and e[c] == run["fp"][c], (c, run["fp"][c], e[c])

    # The imported trace replays with the model (both versions: the model as loaded, same tensors).
    from tracekit.replay import replay

    rr = replay(tmp_path / "imp", "same", progress=False, model=str(tiny_model))
    assert rr.requests_ok == res.requests and rr.tokens == res.tokens
    d = _rows(tmp_path / "imp", "SELECT max(abs(t.logprob - r.logprob)) AS m FROM tokens t JOIN replay_tokens r "
                                "USING (request_id, pos) WHERE r.replay = 'same'")[0]["m"]
    assert d is not None and d < 0.05


def test_slime_dump_imports_to_the_tracekit_trace_of_the_same_run(run, tmp_path) -> None:
    res = import_run("slime", run["slime"], tmp_path / "imp", config=run["slime_args"])
    assert res.requests == len(run["slime_ids"]) == 4 * ATTEMPTS
    # top_k: slime states SGLang's "off" (-1); this vLLM resolves it as 0 (the engine here is vLLM).
    # group_id: named per rollout by the importer ("train-<rollout>-<group_index>"): same partition.
    compared = _assert_common(run["rec"], tmp_path / "imp", run["slime_ids"], skip={"top_k", "group_id"})
    rec_groups = {r["request_id"]: r["group_id"] for r in _rows(run["rec"], "SELECT * FROM requests")}
    pairs = {(rec_groups[rid], key[0]) for rid, key in run["slime_ids"].items()}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 4
    assert {"prompt_token_ids", "output_token_ids", "step", "sample_idx", "finish_reason", "weight_version_start",
            "weight_version_end", "num_cached_tokens", "temperature", "top_p", "max_tokens", "tokens.token_id",
            "tokens.logprob", "tokens.weight_version"} <= compared
