"""`attribute` on REAL recordings: the toy GRPO job on a real vLLM CPU engine, clean and with
planted faults (tracekit.testing.faults), attributed with real score replays (tracekit.replay).

It must name exactly the planted cause(s), and nothing for the clean run. Engines come from
``engine_pool`` keyed by the job's engine spec (shared with test_demo_job.py); each attribution
runs only the replays its ladder needs (one for a clean run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tracekit.attribute import Attribution, attribute
from tracekit.cli import cli
from tracekit.demo.job import engine_spec, run_job
from tracekit.testing.faults import Faults

pytestmark = pytest.mark.engine

SMALL: dict[str, Any] = {"steps": 3, "group_size": 4, "prompts_per_step": 4, "max_tokens": 12}

SCENARIOS = [
    (),
    ("logprob_mode",),
    ("runtime_defaults",),
    ("weight_sync",),
    ("lm_head_precision",),
    ("weight_sync", "lm_head_precision"),
    # Raw logprobs hide the file's top-k (it changes processed logprobs only): the ladder must
    # read the trainer's kind on the most-fixed replay to see both.
    ("logprob_mode", "runtime_defaults"),
]

# What the fix must name for each planted cause (vLLM's own argument names).
FIX_NAMES = {
    "logprob_mode": "processed_logprobs",
    "runtime_defaults": 'generation_config="vllm"',
    "weight_sync": "reload_weights",  # the demo reloads the previous checkpoint (a stale push)
    "lm_head_precision": '"head_dtype": "float32"',
}


@pytest.fixture(scope="module")
def attributed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, engine_pool: Any):
    """``attributed(faults)`` → (trace path, Attribution) for a recorded reduced-size job."""
    cache: dict[str, tuple[Path, Attribution]] = {}

    def go(names: tuple[str, ...]) -> tuple[Path, Attribution]:
        faults = Faults.of(*names)
        key = str(faults)
        if key not in cache:
            model, args = engine_spec(faults, tiny_model)
            llm = engine_pool(model, **args)
            out = tmp_path_factory.mktemp("attr") / key
            run_job(out, tiny_model, faults=faults, llm=llm, **SMALL)
            cache[key] = (out, attribute(out))
        return cache[key]

    return go


@pytest.mark.parametrize("planted", SCENARIOS, ids=lambda p: "+".join(p) or "clean")
def test_attribute_names_exactly_the_planted_causes(attributed: Any, planted: tuple[str, ...]) -> None:
    _trace, res = attributed(planted)
    verdicts = {c.id: (c.verdict, c.reason) for c in res.causes}
    assert sorted(res.found()) == sorted(planted), verdicts
    assert res.gap is not None and res.gap.tokens > 0
    for c in res.causes:
        assert c.evidence, c.id
        if c.id in planted:
            assert FIX_NAMES[c.id] in c.fix
            if c.rung is not None and c.rung.applicable:  # its fix closes part of the gap, alone or last
                assert max(c.rung.share or 0, c.rung.share_alone or 0, c.rung.share_needed or 0) > 0
        else:
            assert c.verdict == "absent", (c.id, c.reason)
    # The faithful same-config replay reproduces the recording except where weights were wrong.
    assert res.ladder and res.ladder[0].cause == "weight_sync" and res.ladder[0].applicable
    if not planted:
        assert len(res.replays_run) == 1  # a clean run needs one replay
        assert res.gap.mean_abs_delta < 0.03  # bf16 engine vs fp32 trainer floor (docs/vllm-cpu.md)


@pytest.mark.parametrize("planted", [(), ("logprob_mode",)], ids=["clean", "logprob_mode"])
def test_cli_gate_reuses_the_ladder_replays(attributed: Any, planted: tuple[str, ...]) -> None:
    trace, _ = attributed(planted)
    r = CliRunner().invoke(cli, ["attribute", str(trace), "--format", "json", "--fail-on", "any"])
    assert r.exit_code == (1 if planted else 0), r.output
    d = json.loads(r.output)
    assert d["replays_run"] == [] and d["replays_used"]  # existing attr-* replays were reused
    assert d["found"] == list(planted)
    ok = CliRunner().invoke(cli, ["attribute", str(trace), "--fail-on", "lm_head_precision"])
    assert ok.exit_code == 0 and "verdict" in ok.output


def test_diff_on_a_real_recording(attributed: Any, tiny_model: Path, engine_pool: Any) -> None:
    from engine_noise import measure, recorded_requests

    trace, res = attributed(("logprob_mode",))
    r = CliRunner().invoke(cli, ["diff", str(trace), "--a", "recorded", "--b", "trainer", "--by", "step",
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [x["step"] for x in rows] == list(range(SMALL["steps"]))
    assert sum(x["tokens"] for x in rows) == res.gap.tokens
    # The raw recording equals the raw score replay up to the recording engine's prefill-vs-decode
    # noise, measured here on its v0 requests (0 on AVX-512 CPUs, ~1e-3 mean on AMX ones); the
    # processed replay is what the trainer sees.
    model, args = engine_spec(Faults.of("logprob_mode"), tiny_model)  # the engine that recorded it
    noise = measure(engine_pool(model, **args), recorded_requests(trace, 0))
    base = res.ladder[0].replay
    r = CliRunner().invoke(cli, ["diff", str(trace), "--a", "recorded", "--b", f"replay:{base}", "--by", "all",
                                 "--format", "json"])
    (row,) = json.loads(r.output)
    assert row["mean_abs_delta"] <= noise.tol_mean, (row, noise)
    r = CliRunner().invoke(cli, ["diff", str(trace), "--a", f"replay:{base}:processed", "--b", "trainer",
                                 "--by", "all", "--format", "json"])
    (proc,) = json.loads(r.output)
    assert proc["mean_abs_delta"] < 0.5 * res.gap.mean_abs_delta


@pytest.mark.venv_old
def test_attribute_with_replays_on_another_vllm_release(attributed: Any, old_python: str) -> None:
    """The ladder's replays run in the second venv (another vllm-cpu release) via --python; the
    existing same-venv replays are not reused for it, and a clean run stays clean."""
    from tracekit.store.reader import Trace

    trace, first = attributed(())
    res = attribute(trace, python=old_python)
    assert res.replays_run and all(n not in first.replays_used for n in res.replays_run)
    meta = Trace(trace).replay_meta(res.replays_run[0])
    assert meta["python"] == old_python and meta.get("target_vllm_version")
    assert res.found() == [], {c.id: c.reason for c in res.causes}
