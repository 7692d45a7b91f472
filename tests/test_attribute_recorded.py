"""Attribution logic on recorded data written with the real TraceWriter (no engine run).

This is how the branches that cannot be produced on CPU are tested: vLLM forces
``async_scheduling`` off on CPU, so an async-scheduling recording can only come from a GPU box.
The real-engine end-to-end tests are in test_attribute_engine.py.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_metrics import make_trace

from tracekit.attribute import attribute
from tracekit.cli import cli

ENGINE = {
    "engine_id": "e0", "role": "record", "model": "/nonexistent/model", "dtype": "bfloat16",
    "head_dtype": "float32", "logprobs_mode": "processed_logprobs", "enable_prefix_caching": True,
    "async_scheduling": False, "generation_config": json.dumps({"mode": "vllm"}), "default_sampling_params": "{}",
}


def _trace(root: Path, *, noise: float, engine: dict[str, Any] | None = None, temps: list[float] | None = None,
           plain_noise: float | None = None, checksums: list[str] | None = None) -> Path:
    """4 steps × 4 requests × 12 tokens; recorded = trainer + uniform noise of ±``noise``
    (``plain_noise`` for T=1 requests). One weight version per step, one sync per update."""
    rng = random.Random(0)
    temps = temps or [0.7]
    reqs, rec, tr, versions = [], {}, {}, {}
    rid = 1
    for step in range(4):
        for i in range(4):
            t = temps[i % len(temps)]
            samp = {"temperature": t, "max_tokens": 12}
            reqs.append({"request_id": rid, "engine_id": "e0", "step": step, "group_id": f"s{step}", "sample_idx": i,
                         "temperature": t, "sampling_requested": samp, "sampling_resolved": samp,
                         "weight_version_start": step, "weight_version_end": step})
            lps = [-rng.uniform(0.1, 3.0) for _ in range(12)]
            n = plain_noise if (t == 1.0 and plain_noise is not None) else noise
            tr[rid] = lps
            rec[rid] = [x + rng.uniform(-n, n) for x in lps]
            versions[rid] = step
            rid += 1
    now = dt.datetime.now(dt.timezone.utc)
    syncs = [{"engine_id": "e0", "version": v, "step": v, "t_end": now + dt.timedelta(seconds=v), "ok": True,
              "engine_checksum": (checksums or [f"c{k}" for k in range(4)])[v]} for v in range(1, 4)]
    make_trace(root, reqs, rec, tr, token_versions=versions, engines=[{**ENGINE, **(engine or {})}],
               weight_syncs=syncs)
    return root


def _verdicts(res: Any) -> dict[str, str]:
    return {c.id: c.verdict for c in res.causes}


def test_clean_recording_names_nothing(tmp_path: Path) -> None:
    res = attribute(_trace(tmp_path / "t", noise=0.02), replay=False)
    assert res.found() == []
    v = _verdicts(res)
    assert v["lm_head_precision"] == "absent" and v["runtime_defaults"] == "absent" and v["weight_sync"] == "absent"
    assert res.gap is not None and res.gap.mean_abs_delta == pytest.approx(0.01, abs=0.003)


def test_async_scheduling_with_unexplained_gap_is_runtime_defaults(tmp_path: Path) -> None:
    res = attribute(_trace(tmp_path / "t", noise=0.2, engine={"async_scheduling": True}), replay=False)
    assert "runtime_defaults" in res.found()
    rd = next(c for c in res.causes if c.id == "runtime_defaults")
    assert "async scheduling" in rd.reason and "async_scheduling=False" in rd.fix


def test_async_scheduling_without_a_gap_is_not_blamed(tmp_path: Path) -> None:
    res = attribute(_trace(tmp_path / "t", noise=0.02, engine={"async_scheduling": True}), replay=False)
    assert res.found() == []


def test_checksum_of_another_version_flags_weight_sync(tmp_path: Path) -> None:
    # The update to v2 left the engine checksum equal to v1's: the sync did not take effect.
    res = attribute(_trace(tmp_path / "t", noise=0.02, checksums=["c0", "c1", "c1", "c3"]), replay=False)
    assert res.found() == ["weight_sync"]
    ws = next(c for c in res.causes if c.id == "weight_sync")
    assert any(e.numbers.get("stale_syncs") == 2 for e in ws.evidence)  # v1<->v2 both ways


def test_gap_only_where_processing_applies_flags_logprob_mode(tmp_path: Path) -> None:
    tr = _trace(tmp_path / "t", noise=0.4, plain_noise=0.01, temps=[1.0, 0.7],
                engine={"logprobs_mode": "raw_logprobs"})
    res = attribute(tr, replay=False)
    assert res.found() == ["logprob_mode"]


def test_generation_config_defaults_in_resolved_params(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _trace(root, noise=0.2, engine={"generation_config": json.dumps({"mode": "auto"}),
                                     "default_sampling_params": json.dumps({"top_k": 8})})
    # Rewrite: the sampler used top_k=8 from the file on half the requests.
    res = attribute(root, replay=False)
    assert "runtime_defaults" not in res.found()  # nothing carries the defaults yet
    root2 = tmp_path / "t2"
    rng = random.Random(1)
    reqs = [{"request_id": i, "engine_id": "e0", "step": 0, "temperature": 0.7, "top_k": 8,
             "sampling_requested": {"temperature": 0.7}, "sampling_resolved": {"temperature": 0.7, "top_k": 8}}
            for i in range(1, 9)]
    lps = {i: [-rng.uniform(0.1, 3) for _ in range(10)] for i in range(1, 9)}
    make_trace(root2, reqs, {i: [x + 0.3 for x in v] for i, v in lps.items()}, lps,
               engines=[{**ENGINE, "generation_config": json.dumps({"mode": "auto"}),
                         "default_sampling_params": json.dumps({"top_k": 8})}])
    res2 = attribute(root2, replay=False)
    assert "runtime_defaults" in res2.found()
    rd = next(c for c in res2.causes if c.id == "runtime_defaults")
    assert any(e.numbers.get("requests_with_file_defaults") == 8 for e in rd.evidence)
    assert 'generation_config="vllm"' in rd.fix


def test_cli_fail_on_and_json(tmp_path: Path) -> None:
    clean = _trace(tmp_path / "clean", noise=0.02)
    asy = _trace(tmp_path / "async", noise=0.2, engine={"async_scheduling": True})
    run = CliRunner().invoke
    r = run(cli, ["attribute", str(clean), "--no-replay", "--fail-on", "any", "--format", "json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["found"] == [] and {c["id"] for c in d["causes"]} == {
        "logprob_mode", "runtime_defaults", "weight_sync", "lm_head_precision"}
    assert all(c["fix"] and c["evidence"] for c in d["causes"])
    assert run(cli, ["attribute", str(asy), "--no-replay", "--fail-on", "runtime_defaults"]).exit_code == 1
    assert run(cli, ["attribute", str(asy), "--no-replay", "--fail-on", "weight_sync"]).exit_code == 0
    r = run(cli, ["attribute", str(asy), "--no-replay"])
    assert r.exit_code == 0 and "runtime_defaults" in r.output and "verdict" in r.output
    assert run(cli, ["attribute", str(asy), "--fail-on", "nope"]).exit_code == 2
    assert run(cli, ["attribute", str(tmp_path / "missing")]).exit_code == 2


def test_trace_without_trainer_logprobs_gets_signatures_only(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_trace(root, [{"request_id": 1, "engine_id": "e0", "step": 0, "temperature": 0.7}], {1: [-1.0, -2.0]},
               engines=[{**ENGINE, "async_scheduling": True}])
    res = attribute(root)
    assert res.gap is None and res.ladder == [] and res.replays_run == []
    assert any("no trainer logprobs" in n for n in res.notes)


def test_prefix_cache_hits_far_off_the_trainer_flag_runtime_defaults(tmp_path: Path) -> None:
    """Later samples of a group hit the prefix cache and are computed on stale KV (e.g. no
    reset_prefix_cache() after a weight update): only they disagree with the trainer."""
    rng = random.Random(2)
    reqs, rec, tr = [], {}, {}
    for rid in range(1, 17):
        hit = rid % 2 == 0
        reqs.append({"request_id": rid, "engine_id": "e0", "step": 0, "temperature": 0.7,
                     "num_cached_tokens": 128 if hit else 0})
        tr[rid] = [-rng.uniform(0.1, 3.0) for _ in range(10)]
        n = 0.3 if hit else 0.01
        rec[rid] = [x + rng.uniform(-n, n) for x in tr[rid]]
    make_trace(tmp_path / "t", reqs, rec, tr, engines=[ENGINE])
    res = attribute(tmp_path / "t", replay=False)
    assert "runtime_defaults" in res.found()
    rd = next(c for c in res.causes if c.id == "runtime_defaults")
    assert "prefix-cache" in rd.reason and "reset_prefix_cache" in rd.fix


def test_replay_that_cannot_run_degrades_to_signatures(tmp_path: Path) -> None:
    """The recorded model path does not exist here: the ladder's replay cannot start, the
    report says why, and the data signatures still decide."""
    res = attribute(_trace(tmp_path / "t", noise=0.2, engine={"async_scheduling": True}))
    assert any("could not run" in n and "--model" in n for n in res.notes), res.notes
    assert res.replays_run == [] and "runtime_defaults" in res.found()


def test_a_migration_gate_that_cannot_run_fails_loudly(tmp_path: Path) -> None:
    """The new engine cannot run (here: no model): with a gate that is a one-line error (exit 2),
    never a pass; without one the cause verdicts stand and a note says why."""
    from tracekit.errors import TracekitError

    t = _trace(tmp_path / "t", noise=0.02)
    with pytest.raises(TracekitError):
        attribute(t, python="/bin/false", migration=True, gate=("clip_rate", 0.01))
    res = attribute(t, python="/bin/false", migration=True, replay=True)
    assert res.migration is None and any("migration audit could not run" in n for n in res.notes)
    r = CliRunner().invoke(cli, ["attribute", str(t), "--python", "/bin/false", "--gate", "clip_rate=0.01",
                                 "--fail-on", "any"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
