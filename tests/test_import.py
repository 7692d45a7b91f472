"""`tracekit import pipelinerl|slime|trl|verl` on dumps written the way each stack writes them
(tests/import_fixtures.py): field mapping, provenance, null reasons, bad inputs (exit 2, one line,
nothing written), never unpickling, and the imported trace through info/validate/sql/attribute/report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from import_fixtures import (
    PIPELINERL_BASE_VLLM_KWARGS,
    orjson_dumps,
    pipelinerl_group,
    slime_sample,
    training_text,
    write_pipelinerl_config,
    write_pipelinerl_stream,
    write_slime_rollout,
    write_slime_train,
    write_trl_completions,
    write_verl_dump,
)

from tracekit.importers import import_run
from tracekit.store import Trace

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracekit.cli", *args], capture_output=True, text=True, timeout=300)


def q(trace: Path, sql: str) -> list[tuple[Any, ...]]:
    return Trace(trace).query(sql)


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_model))
    t.chat_template = CHAT_TEMPLATE
    return t


def _pipelinerl_run(exp: Path, tok: Any, *, groups: int = 3, attempts: int = 4, seed: int = 0) -> dict[str, Any]:
    """A synthetic PipelineRL run: per group, `attempts` rollouts of one prompt, as the actor dumps them."""
    rng = np.random.default_rng(seed)
    truth: dict[tuple[str, int], dict[str, Any]] = {}
    lines = []
    for g in range(groups):
        msgs = [{"role": "user", "content": f"add the numbers {g}"}]
        texts = []
        for i in range(attempts):
            n = int(rng.integers(3, 9))
            ids = rng.integers(3, 500, n).tolist()
            lps = (-rng.exponential(1.0, n)).astype(np.float32).astype(float).tolist()
            fr = "length" if i == 0 else "stop"
            t = training_text(tok, msgs, tok.decode(ids), ids, lps, fr, 0, n)
            t["prompt_tokens"] = len(t["input_ids"]) - n
            texts.append(t)
        rewards = [float(i % 2) for i in range(attempts)]
        line = pipelinerl_group(texts, scheduler="train scheduler for llms 0", group=g, model_version=g // 2 * 64,
                                rewards=rewards, seed=g)
        lines.append(line)
        for r in line:
            truth[(r["group_id"], r["metadata"]["rollout_index"])] = r
    write_pipelinerl_stream(exp, lines)
    cfg = {"model_path": "/models/never-here", "llm": {"parameters": {"max_tokens": 8192, "temperature": 1.0}},
           "test_llm": {"parameters": {"max_tokens": 8192, "temperature": 1.0, "top_p": 0.95, "top_k": 50}},
           "actor": {"llm_max_rollouts": 64}, "vllm_config": {"vllm_kwargs": dict(PIPELINERL_BASE_VLLM_KWARGS)}}
    write_pipelinerl_config(exp, cfg)
    return truth


# ---------------------------------------------------------------------- PipelineRL
def test_pipelinerl_fields_versions_groups_config_and_provenance(tmp_path: Path, tok: Any) -> None:
    exp = tmp_path / "exp"
    truth = _pipelinerl_run(exp, tok)
    res = import_run("pipelinerl", exp, tmp_path / "t")
    assert res.requests == 12 and res.tokens == sum(len(r["logprobs"]) for r in truth.values())
    rows = q(tmp_path / "t", "SELECT request_id, group_id, sample_idx, prompt_token_ids, output_token_ids, reward, "
                             "weight_version_start, weight_version_end, finish_reason, temperature, max_tokens, step, "
                             "surface, num_logprobs, sampling_requested FROM requests ORDER BY request_id")
    for rid, gid, idx, prompt, out, reward, v0, v1, fr, temp, mt, step, surface, nlp, sreq in rows:
        r = truth[(gid, idx)]
        n = len(r["logprobs"])
        assert prompt + out == r["input_ids"] and len(out) == n
        assert reward == r["reward"] and v0 == v1 == r["metadata"]["model_version"]
        assert fr == ("length" if not r["finished"] else None)
        assert temp == 1.0 and mt == 8192 and step is None and surface == "import" and nlp == 1
        assert json.loads(sreq) == {"max_tokens": 8192, "temperature": 1.0, "logprobs": 1,
                                    "include_stop_str_in_output": True, "skip_special_tokens": False}
        toks = q(tmp_path / "t", f"SELECT token_id, logprob, weight_version FROM tokens WHERE request_id = {rid} ORDER BY pos")
        assert [t[0] for t in toks] == out
        assert [t[1] for t in toks] == [float(np.float32(x)) for x in r["logprobs"]]  # float32, bit-exact
        assert {t[2] for t in toks} == {r["metadata"]["model_version"]}
    # groups: one per line, rollout_index 0..3 each
    assert q(tmp_path / "t", "SELECT count(DISTINCT group_id), max(sample_idx) FROM requests") == [(3, 3)]
    eng = q(tmp_path / "t", "SELECT role, surface, dtype, logprobs_mode, enable_prefix_caching, async_scheduling, "
                            "max_model_len, default_sampling_params, model, vllm_version, engine_args FROM engines")
    assert len(eng) == 1
    role, surface, dtype, mode, pc, asy, mml, dsp, model, vv, args = eng[0]
    assert (role, surface, dtype, mode, pc, asy, mml) == ("record", "import", "bfloat16", "processed_logprobs",
                                                          False, False, 10000)
    assert json.loads(dsp) == {} and model == "/models/never-here" and vv is None
    assert json.loads(args)["max_num_seqs"] == 64  # ${actor.llm_max_rollouts} resolved
    m = json.loads((tmp_path / "t" / "trace.json").read_text())["import"]
    assert m["source_format"] == "pipelinerl" and "58d3934" in m["source_version"]
    import hashlib

    want = {str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest() for p in exp.rglob("*") if p.is_file()}
    assert {f["path"]: f["sha256"] for f in m["files"]} == want
    nulls = m["null_fields"]
    for k in ("requests.step", "requests.seed", "trainer", "engines.vllm_version", "requests.num_cached_tokens"):
        assert nulls.get(k), k
    assert "tokens.logprob" not in nulls and "tokens.weight_version" not in nulls


def test_pipelinerl_imported_trace_works_downstream(tmp_path: Path, tok: Any) -> None:
    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok)
    out = tmp_path / "t"
    r = run_cli("import", "pipelinerl", str(exp), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "12 requests" in r.stdout
    for args in (["info", str(out)], ["validate", str(out)],
                 ["sql", str(out), "SELECT weight_version, count(*) FROM tokens GROUP BY 1 ORDER BY 1"]):
        r = run_cli(*args)
        assert r.returncode == 0, (args, r.stderr)
    assert "ok:" in run_cli("validate", str(out)).stdout
    info = json.loads(run_cli("info", str(out), "--format", "json").stdout)
    assert info["import"]["source_format"] == "pipelinerl" and info["requests"] == 12
    r = run_cli("attribute", str(out), "--no-replay", "--format", "json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {c["id"] for c in res["causes"]} >= {"logprob_mode", "runtime_defaults", "weight_sync", "lm_head_precision"}
    assert any("no trainer logprobs" in n for n in res["notes"])  # the gap it explains is undefined: said so
    r = run_cli("report", str(out), "--out", str(tmp_path / "rep"), "--no-attribution")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "report.html").exists()


def test_pipelinerl_block_reader_equals_the_line_reader(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorised block path (pyarrow JSON) and the per-line path write the same rows."""
    from tracekit.importers import pipelinerl

    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok, groups=5)
    f = exp / "streams" / "actor" / "0" / "0" / "0.jsonl"
    lines = f.read_text().splitlines()
    rec = json.loads(lines[2])
    rec[0]["logprobs"][1] = None  # orjson's NaN
    rec[1]["finished"] = False
    del rec[2]["metadata"]["model_version"]
    f.write_text("\n".join(lines[:2] + [orjson_dumps(rec)] + lines[3:]) + "\n")
    fast = import_run("pipelinerl", exp, tmp_path / "fast")
    monkeypatch.setattr(pipelinerl, "_columns", lambda *a, **k: None)
    slow = import_run("pipelinerl", exp, tmp_path / "slow")
    assert fast.null_fields == slow.null_fields and fast.tokens == slow.tokens
    for sql in ("SELECT * EXCLUDE (run_id) FROM requests ORDER BY request_id",
                "SELECT * FROM tokens ORDER BY request_id, pos"):
        a, b = q(tmp_path / "fast", sql), q(tmp_path / "slow", sql)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert repr(x) == repr(y), (x, y)
    assert q(tmp_path / "fast", "SELECT count(*) - count(logprob) FROM tokens") == [(1,)]
    assert "null at 1 position" in fast.null_fields["tokens.logprob"]


def test_attribute_on_an_import_without_config_is_not_absent(tmp_path: Path, tok: Any) -> None:
    from tracekit.attribute import attribute

    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok, groups=1)
    import_run("pipelinerl", exp / "streams" / "actor" / "0" / "0" / "0.jsonl", tmp_path / "t")
    res = attribute(tmp_path / "t", replay=False).as_dict()
    verdicts = {c["id"]: c["verdict"] for c in res["causes"]}
    assert verdicts["logprob_mode"] == "inconclusive" and verdicts["runtime_defaults"] == "inconclusive"
    assert verdicts["weight_sync"] == "inconclusive"  # no checksums or syncs in the dump: not "absent"


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.import-")]


@pytest.mark.parametrize("case", ["truncated", "not_json", "lengths", "labels", "schema", "not_group", "version",
                                  "empty"])
def test_pipelinerl_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, tok: Any, case: str) -> None:
    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok, groups=2)
    f = exp / "streams" / "actor" / "0" / "0" / "0.jsonl"
    lines = f.read_text().splitlines()
    rec = json.loads(lines[1])
    if case == "truncated":
        f.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    elif case == "not_json":
        f.write_text(lines[0] + "\n{oops\n")
    elif case == "lengths":
        rec[0]["logprobs"] = rec[0]["logprobs"][:-1]
    elif case == "labels":
        rec[0]["labels"][-1] = 12345
    elif case == "schema":
        del rec[0]["input_ids"]
    elif case == "not_group":
        rec = {"text": "x"}
    elif case == "version":
        rec[0]["metadata"]["model_version"] = "v3"
    elif case == "empty":
        f.write_text("")
    if case in ("lengths", "labels", "schema", "not_group", "version"):
        f.write_text(lines[0] + "\n" + orjson_dumps(rec) + "\n")
    r = run_cli("import", "pipelinerl", str(exp), "--out", str(tmp_path / "t"))
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    _no_leftovers(tmp_path, "t")


def test_import_refuses_an_existing_out_and_leaves_it_alone(tmp_path: Path, tok: Any) -> None:
    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok, groups=1)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep").write_text("x")
    r = run_cli("import", "pipelinerl", str(exp), "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["keep"]


def test_failure_after_parts_were_written_leaves_nothing(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad line after whole batches were flushed to disk: the temp trace is removed."""
    from tracekit.importers import base

    monkeypatch.setattr(base, "TOKEN_BATCH", 16)
    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok, groups=4)
    f = exp / "streams" / "actor" / "0" / "0" / "0.jsonl"
    f.write_text(f.read_text() + "[1]\n")
    from tracekit.errors import SourceError

    with pytest.raises(SourceError, match="not a PipelineRL TrainingText record"):
        import_run("pipelinerl", exp, tmp_path / "t")
    _no_leftovers(tmp_path, "t")


def test_pipelinerl_without_config_and_single_file(tmp_path: Path, tok: Any) -> None:
    exp = tmp_path / "exp"
    _pipelinerl_run(exp, tok, groups=1)
    f = exp / "streams" / "actor" / "0" / "0" / "0.jsonl"
    res = import_run("pipelinerl", f, tmp_path / "t")
    assert res.requests == 4
    nulls = res.null_fields
    assert "no run config" in nulls["requests.sampling_requested"]
    assert q(tmp_path / "t", "SELECT logprobs_mode, temperature FROM engines, requests LIMIT 1") == [(None, None)]


# ---------------------------------------------------------------------- slime
def _slime_samples(rollout_id: int) -> list[dict[str, Any]]:
    out = []
    for g in range(2):
        for k in range(2):
            prompt = [1, 5 + g, 7]
            resp = [20 + k, 21, 22, 23]
            out.append(slime_sample(group_index=g, index=g * 2 + k, prompt="p", tokens=prompt + resp, response="r",
                                    response_length=4, reward=0.5 * k, loss_mask=[1, 1, 1, 1],
                                    weight_versions=[str(rollout_id + 1)], rollout_log_probs=[-0.5, -0.25, -1.0, -2.0],
                                    status="truncated" if k else "completed", label="42", cached_tokens=2,
                                    prompt_tokens=3))
    # multi-turn: tool tokens (loss_mask 0) between two engine calls under two versions
    out.append(slime_sample(group_index=2, index=4, prompt="p", tokens=[1, 2, 30, 31, 90, 91, 32], response="r",
                            response_length=5, reward={"acc": 1.0, "fmt": 0.0}, loss_mask=[1, 1, 0, 0, 1],
                            weight_versions=[str(rollout_id + 1), str(rollout_id + 2)],
                            rollout_log_probs=[-0.1, -0.2, 0.0, 0.0, -0.3], cached_tokens=5, prompt_tokens=9))
    return out


def test_slime_fields_versions_loss_mask_and_reward_key(tmp_path: Path) -> None:
    tmpl = str(tmp_path / "dump" / "{rollout_id}.pt")
    for rid in (0, 1):
        write_slime_rollout(tmpl, rid, _slime_samples(rid))
    write_slime_rollout(tmpl, 1, _slime_samples(1)[:2], evaluation=True)
    (tmp_path / "args.json").write_text(json.dumps({"rollout_temperature": 0.8, "rollout_top_p": 0.9,
                                                    "rollout_max_response_len": 64, "reward_key": "acc"}))
    res = import_run("slime", tmp_path / "dump", tmp_path / "t", config=tmp_path / "args.json")
    assert res.requests == 12 and res.tokens == 2 * (4 * 4 + 5) + 2 * 4
    rows = q(tmp_path / "t", "SELECT step, group_id, sample_idx, finish_reason, reward, weight_version_start, "
                             "weight_version_end, num_cached_tokens, temperature, top_p, top_k, max_tokens, "
                             "prompt_token_ids, output_token_ids, extra FROM requests ORDER BY request_id")
    assert rows[0][:12] == (0, "train-0-0", 0, "stop", 0.0, 1, 1, 2, pytest.approx(0.8), pytest.approx(0.9), -1, 64)
    assert rows[1][2:4] == (1, "length") and rows[0][12:14] == ([1, 5, 7], [20, 21, 22, 23])
    mt = rows[4]
    assert mt[4] == 1.0 and (mt[5], mt[6]) == (1, 2) and mt[7] is None  # reward_key; two calls
    assert json.loads(mt[14])["non_generated_spans"] == [[2, 4]]
    toks = q(tmp_path / "t", "SELECT pos, logprob, weight_version FROM tokens WHERE request_id = 4 ORDER BY pos")
    assert [t[1] for t in toks] == pytest.approx([-0.1, -0.2, None, None, -0.3], nan_ok=True) or \
        [t[1] is None for t in toks] == [False, False, True, True, False]
    assert [t[2] for t in toks] == [1, 1, None, None, 2]
    ev = q(tmp_path / "t", "SELECT count(*) FROM requests WHERE group_id LIKE 'eval-%'")
    assert ev == [(2,)]
    m = json.loads((tmp_path / "t" / "trace.json").read_text())["import"]
    assert m["source_format"] == "slime" and "624b824a8" in m["source_version"]
    assert len(m["files"]) == 4 and "engines.logprobs_mode" in m["null_fields"]
    assert "loss_mask 0" in m["null_fields"]["tokens.logprob"]


def test_slime_dump_details_trainer_logprobs_become_the_trainer_table(tmp_path: Path) -> None:
    """--dump-details D: rollout_data/ and train_data/ side by side; two DP shards, interleaved."""
    import torch

    from tracekit.compare import metrics

    d = tmp_path / "details"
    samples = _slime_samples(3)
    write_slime_rollout(str(d / "rollout_data" / "{rollout_id}.pt"), 3, samples)
    shards = []
    for dp in (0, 1):
        pos = [i for i in range(len(samples)) if i % 2 == dp]
        rd = {
            "tokens": [torch.tensor(samples[i]["tokens"]) for i in pos],
            "response_lengths": [samples[i]["response_length"] for i in pos],
            "total_lengths": [len(samples[i]["tokens"]) for i in pos],
            "loss_masks": [torch.tensor(samples[i]["loss_mask"], dtype=torch.int) for i in pos],
            "rollout_log_probs": [torch.tensor(samples[i]["rollout_log_probs"]) for i in pos],
            "log_probs": [torch.tensor(samples[i]["rollout_log_probs"]) - 0.01 * (k + 1) for k, i in enumerate(pos)],
            "advantages": [torch.zeros(samples[i]["response_length"]) for i in pos],
            "sample_indices": [samples[i]["index"] for i in pos], "partition": pos,
            "raw_reward": [0.0] * len(samples), "micro_batch_indices": [[0, 1]], "num_microbatches": [1],
        }
        shards.append({"rank": dp, "data_parallel_rank": dp, "rollout_data": rd})
    write_slime_train(str(d / "train_data" / "{rollout_id}.pt"), 3, shards)
    res = import_run("slime", d, tmp_path / "t")
    assert "trainer" not in res.null_fields and len(res.files) == 2
    rows = q(tmp_path / "t", "SELECT request_id, pos, logprob, policy_version, step FROM trainer ORDER BY 1, 2")
    assert len(rows) == 4 * 4 + 3  # the multi-turn sample's two tool tokens are not trained on
    by = {}
    for rid, pos, lp, pv, step in rows:
        by.setdefault(rid, []).append((pos, lp, pv, step))
    # sample 1 sat on DP rank 1 (first there: -0.01), sample 4 on rank 0 (third there: -0.03)
    assert [round(x[1], 4) for x in by[1]] == [-0.51, -0.26, -1.01, -2.01]
    assert [x[0] for x in by[4]] == [0, 1, 4] and [x[2] for x in by[4]] == [4, 4, 5] and by[4][0][3] == 3
    m = metrics.overall(Trace(tmp_path / "t"), "recorded", "trainer")
    # recorded - trainer: samples 0, 1 by 0.01; 2, 3 by 0.02 (4 trained tokens each); 4 by 0.03 (3 tokens)
    assert m.tokens == 19 and m.mean_delta == pytest.approx((8 * 0.01 + 8 * 0.02 + 3 * 0.03) / 19, abs=1e-5)


def test_slime_pickles_are_refused_and_never_run(tmp_path: Path) -> None:
    import pickle

    import torch

    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"rollout_id": 0, "samples": [{"tokens": [1], "response_length": 0, "x": Payload()}]}, evil / "0.pt")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "0.pt").write_bytes(pickle.dumps({"rollout_id": 0, "samples": [Payload()]}))
    npy = tmp_path / "npy"
    npy.mkdir()
    torch.save({"rollout_id": 0, "samples": [{"tokens": np.arange(3), "response_length": 1}]}, npy / "0.pt")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    good = write_slime_rollout(str(trunc / "{rollout_id}.pt"), 0, _slime_samples(0))
    good.write_bytes(good.read_bytes()[:-100])
    for d, why in ((evil, "posix.system"), (bare, "not a torch.save zip"), (npy, "numpy"),
                   (trunc, "")):
        r = run_cli("import", "slime", str(d), "--out", str(tmp_path / "t"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert why in r.stderr, r.stderr
        _no_leftovers(tmp_path, "t")
    assert not marker.exists()
    pickle.loads((bare / "0.pt").read_bytes())  # the control: this payload really runs when unpickled
    assert marker.exists()


def test_slime_length_mismatch_is_refused(tmp_path: Path) -> None:
    s = _slime_samples(0)
    s[1]["rollout_log_probs"] = s[1]["rollout_log_probs"][:-1]
    write_slime_rollout(str(tmp_path / "d" / "{rollout_id}.pt"), 0, s)
    r = run_cli("import", "slime", str(tmp_path / "d"), "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "3 rollout_log_probs for response_length 4" in r.stderr
    _no_leftovers(tmp_path, "t")


# ---------------------------------------------------------------------- TRL
def test_trl_text_is_tokenized_groups_and_weighted_rewards(tmp_path: Path, tiny_model: Path, tok: Any) -> None:
    prompts = ["the quick", "the quick", "one two", "one two"]
    comps = ["brown fox", "lazy dog", "three", "four"]
    rw = {"accuracy": [1.0, 0.0, None, 1.0], "format": [0.5, 0.5, 0.5, 0.5]}
    write_trl_completions(tmp_path / "out", 10, prompts, comps, rw, [0.1, -0.1, 0.2, -0.2], extra={"pred": list("abcd")})
    write_trl_completions(tmp_path / "out", 11, prompts, comps, rw, [0.1, -0.1, 0.2, -0.2], extra={"pred": list("abcd")})
    write_trl_completions(tmp_path / "out", 12, prompts[::-1], comps, rw, [0.0] * 4)
    (tmp_path / "grpo.json").write_text(json.dumps({"num_generations": 2, "temperature": 0.7, "use_vllm": True,
                                                    "reward_weights": [1.0, 2.0], "max_completion_length": 32}))
    r = run_cli("import", "trl", str(tmp_path / "out"), "--out", str(tmp_path / "t"), "--model", str(tiny_model),
                "--config", str(tmp_path / "grpo.json"))
    assert r.returncode == 0, r.stderr
    rows = q(tmp_path / "t", "SELECT step, group_id, sample_idx, reward, temperature, max_tokens, prompt_token_ids, "
                             "output_token_ids, extra FROM requests ORDER BY request_id")
    assert len(rows) == 8  # step 11 repeats step 10's generation: skipped
    assert [r[0] for r in rows] == [10] * 4 + [12] * 4
    assert [r[1] for r in rows[:4]] == ["10-0", "10-0", "10-1", "10-1"] and [r[2] for r in rows[:4]] == [0, 1, 0, 1]
    assert [r[3] for r in rows[:4]] == [2.0, 1.0, 1.0, 2.0]  # 1*acc + 2*format, NaN skipped (nansum)
    assert rows[0][4] == pytest.approx(0.7) and rows[0][5] == 32
    assert rows[0][6] == tok("the quick", add_special_tokens=False)["input_ids"]
    assert rows[0][7] == tok("brown fox", add_special_tokens=False)["input_ids"]
    assert json.loads(rows[0][8])["pred"] == "a"
    assert [r[1] for r in rows[4:]] == ["12-0", "12-0", "12-1", "12-1"]
    assert q(tmp_path / "t", "SELECT count(*), count(logprob) FROM tokens")[0][1] == 0
    assert q(tmp_path / "t", "SELECT logprobs_mode FROM engines") == [("processed_logprobs",)]
    m = json.loads((tmp_path / "t" / "trace.json").read_text())["import"]
    assert "replay" in m["null_fields"]["tokens.logprob"] and any("re-tokenized" in n for n in m["notes"])
    r = run_cli("import", "trl", str(tmp_path / "out"), "--out", str(tmp_path / "t2"))
    assert r.returncode == 2 and "--model" in r.stderr
    _no_leftovers(tmp_path, "t2")


# ---------------------------------------------------------------------- verl
def test_verl_text_scores_steps_and_config(tmp_path: Path, tiny_model: Path, tok: Any) -> None:
    d = tmp_path / "rollouts"
    for step in (1, 2):
        write_verl_dump(d, step, ["the quick", "one two", "the quick"], ["brown fox", "three", "lazy dog"],
                        ["x", None, "x"], [1.0, 0.0, 0.5], {"acc": [True, False, True], "short": [1]})
    (tmp_path / "config.yaml").write_text(
        "data:\n  max_response_length: 128\nactor_rollout_ref:\n  model:\n    path: /m\n  rollout:\n    name: vllm\n"
        "    temperature: 0.9\n    top_p: 1\n    top_k: -1\n    response_length: ${oc.select:data.max_response_length,512}\n"
        "    logprobs_mode: processed_logprobs\n    enable_prefix_caching: true\n    engine_kwargs:\n      vllm: {}\n")
    res = import_run("verl", d, tmp_path / "t", model=str(tiny_model), config=tmp_path / "config.yaml")
    assert res.requests == 6
    rows = q(tmp_path / "t", "SELECT step, group_id, reward, temperature, max_tokens, output_token_ids, extra "
                             "FROM requests ORDER BY request_id")
    assert [r[0] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert [r[1] for r in rows[:3]] == ["1-0", "1-1", "1-0"] and [r[2] for r in rows[:3]] == [1.0, 0.0, 0.5]
    assert rows[0][3] == pytest.approx(0.9) and rows[0][4] == 128
    assert rows[2][5] == tok("lazy dog", add_special_tokens=False)["input_ids"]
    assert json.loads(rows[0][6]) == {"acc": True, "gts": "x"}  # 'short' has the wrong length: verl drops it
    assert q(tmp_path / "t", "SELECT logprobs_mode, enable_prefix_caching FROM engines") == [("processed_logprobs", True)]
    f = d / "2.jsonl"
    f.write_text(f.read_text() + '{"input": "a"}\n')
    r = run_cli("import", "verl", str(d), "--out", str(tmp_path / "t2"), "--model", str(tiny_model))
    assert r.returncode == 2 and "not a verl rollout dump line" in r.stderr
    _no_leftovers(tmp_path, "t2")


def test_import_bench_runs(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "import_speed.py"
    r = subprocess.run([sys.executable, str(bench), "--tokens", "30k", "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "M tokens/s" in r.stdout and not (tmp_path / "w").exists()


@pytest.mark.parametrize("stack", ["pipelinerl", "slime", "trl", "verl"])
def test_mutated_dumps_import_or_fail_with_a_tracekit_error(tmp_path: Path, tok: Any, tiny_model: Path,
                                                            stack: str) -> None:
    """Seeded byte flips, truncations and garbage in each stack's dump: the import either succeeds
    or raises a TracekitError (one line, exit 2 in the CLI); never another exception, never a
    partial trace."""
    import random
    import zlib

    from tracekit.errors import TracekitError

    src = tmp_path / "src"
    if stack == "pipelinerl":
        _pipelinerl_run(src, tok, groups=3)
        target = src / "streams" / "actor" / "0" / "0" / "0.jsonl"
    elif stack == "slime":
        target = write_slime_rollout(str(src / "{rollout_id}.pt"), 0, _slime_samples(0))
    elif stack == "trl":
        target = write_trl_completions(src, 1, ["a b", "a b"], ["c", "d"], {"r": [1.0, None]}, [0.0, 0.0])
    else:
        target = write_verl_dump(src, 1, ["a b", "a b"], ["c", "d"], ["x", None], [1.0, 0.0], {"acc": [1, 0]})
    good = target.read_bytes()
    rng = random.Random(zlib.crc32(stack.encode()))  # str hash() is salted per process
    kw = {"model": str(tiny_model)} if stack in ("trl", "verl") else {}
    outcomes = {"ok": 0, "refused": 0}
    for case in range(25):
        data = bytearray(good)
        kind = case % 5
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] = rng.randrange(256)
        elif kind == 1:
            data = data[: rng.randrange(len(data))]
        elif kind == 2:
            i = rng.randrange(len(data))
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        elif kind == 3:
            i, j = sorted(rng.randrange(len(data)) for _ in range(2))
            del data[i:j]
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 200)))
        target.write_bytes(bytes(data))
        out = tmp_path / f"t{case}"
        try:
            import_run(stack, src, out, **kw)
            outcomes["ok"] += 1
            assert Trace(out).query("SELECT count(*) FROM requests")[0][0] > 0
        except TracekitError as e:
            outcomes["refused"] += 1
            assert str(e) and "\n" not in str(e).strip(), e
            _no_leftovers(tmp_path, f"t{case}")
    assert outcomes["refused"] >= 10, outcomes
