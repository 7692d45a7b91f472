"""Zero-code recording: `tracekit record -- python job.py` on the default multiprocess engine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from engine_noise import measure, recorded_requests
from proc import run_group

from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine

PROMPTS = ["the quick brown fox", "one two three", "add the numbers", "a b c d"]
SEEDS = [3, 4, 5, 6]

JOB = """
import json, os, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
              max_model_len=512)
    prompts = {prompts!r}
    params = [SamplingParams(temperature=0.8, max_tokens=8, seed=s) for s in {seeds!r}]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(c.logprobs is None for o in outs for c in o.outputs)  # the job never sees added logprobs
    json.dump([list(o.outputs[0].token_ids) for o in outs], open(sys.argv[2], "w"))
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)  # recorder must flush through the patched os._exit
"""


def _rows(trace: Path) -> list[tuple]:
    con = Trace(trace).connect(read_only=False)
    try:
        return con.execute(
            "SELECT r.prompt_token_ids, r.output_token_ids, r.seed, r.temperature, r.max_tokens, r.finish_reason, "
            "list(t.logprob ORDER BY t.pos), list(t.weight_version ORDER BY t.pos) "
            "FROM requests r JOIN tokens t USING (request_id) GROUP BY ALL ORDER BY r.seed").fetchall()
    finally:
        con.close()


def _api_trace(engine_pool, tiny_model, out: Path) -> tuple[list[tuple], float]:
    """The same requests recorded through the API path on the in-process engine: its rows, and
    the bound another process's run of them must meet (that engine's noise, measured on them)."""
    from vllm import SamplingParams

    import tracekit

    llm = engine_pool(tiny_model)
    rec = tracekit.Recorder(out)
    rec.wrap(llm)
    llm.generate(PROMPTS, [SamplingParams(temperature=0.8, max_tokens=8, seed=s) for s in SEEDS], use_tqdm=False)
    rec.close()
    for name in ("generate", "chat", "collective_rpc", "_tracekit_recorder", "_tracekit_hooks"):
        llm.__dict__.pop(name, None)
    return _rows(out), measure(llm, recorded_requests(out, None)).tol


def assert_same_content(a: list[tuple], b: list[tuple], tol: float) -> None:
    assert len(a) == len(b) == len(PROMPTS)
    for x, y in zip(a, b):
        assert x[:6] == y[:6]  # prompt ids, output ids, seed, temperature, max_tokens, finish reason
        assert x[6] == pytest.approx(y[6], abs=tol)  # multiprocess vs in-process: engine noise only
        assert x[7] == y[7]


def test_zero_code_record_matches_api_path_on_multiprocess_engine(engine_pool, tiny_model, tmp_path):
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB.format(prompts=PROMPTS, seeds=SEEDS)))
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the default engine users run
    cmd = [sys.executable, "-m", "tracekit.cli", "record", "--out", str(tmp_path / "zc"), "--flush-interval", "0.5",
           "--", sys.executable, str(job), str(tiny_model), str(tmp_path / "out.json")]
    rc, log = run_group(cmd, env=env, timeout=600)
    assert rc == 0, log[-3000:]
    zc = _rows(tmp_path / "zc")
    api, tol = _api_trace(engine_pool, tiny_model, tmp_path / "api")
    assert_same_content(zc, api, tol)
    con = Trace(tmp_path / "zc").connect(read_only=False)
    eng = con.execute("SELECT surface, engine_args FROM engines").fetchall()
    runs = con.execute("SELECT count(*) FILTER (WHERE event = 'close') FROM runs").fetchone()[0]
    con.close()
    assert len(eng) == 1 and eng[0][0] == "llm" and '"max_model_len": 512' in eng[0][1]
    assert runs == 1  # closed cleanly through os._exit


def test_record_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tracekit.cli", "record", "--out", str(tmp_path / "t"), "--",
                        str(tmp_path / "missing-binary")], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "command not found" in r.stderr
    (tmp_path / "f").write_text("x")
    r = subprocess.run([sys.executable, "-m", "tracekit.cli", "record", "--out", str(tmp_path / "f"), "--", "true"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_record_passes_the_job_exit_code_through(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tracekit.cli", "record", "--out", str(tmp_path / "t"), "--",
                        sys.executable, "-c", "import sys; sys.exit(3)"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 3
