"""The migration audit on real engines: a trace recorded on this venv's vLLM, replayed on the second
venv's release (tracekit.migration). Planted config changes on the new engine must be named with
their share; with no config change the whole gap is the version's; the gate drives exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tracekit.cli import cli
from tracekit.demo.job import engine_spec, run_job
from tracekit.migration import migrate
from tracekit.testing.faults import Faults

pytestmark = [pytest.mark.engine, pytest.mark.venv_old]

SMALL: dict[str, Any] = {"steps": 2, "group_size": 4, "prompts_per_step": 3, "max_tokens": 12}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, engine_pool: Any) -> Path:
    """A clean run of the toy job (processed logprobs at T 0.7, fp32 head) on this venv."""
    model, args = engine_spec(Faults(), tiny_model)
    out = tmp_path_factory.mktemp("mig") / "trace"
    run_job(out, tiny_model, faults=Faults(), llm=engine_pool(model, **args), **SMALL)
    return out


def test_planted_settings_on_the_new_engine_are_named_with_their_share(recorded: Path, old_python: str) -> None:
    mig = migrate(recorded, python=old_python, engine_args={"logprobs_mode": "raw_logprobs"},
                  hf_overrides={"head_dtype": "bfloat16"}, gate=("mean_abs_delta", 0.05))
    by = {s.knob: s for s in mig.settings}
    assert {"logprobs_mode", "head_dtype"} <= set(by), [s.knob for s in mig.settings]
    assert by["logprobs_mode"].cause == "logprob_mode" and by["head_dtype"].cause == "lm_head_precision"
    assert mig.kind == "raw" and mig.gap is not None and mig.gap.mean_abs_delta > 0.05
    # Raw vs processed at T 0.7 is most of the gap; the bf16 head is a real but smaller part.
    assert by["logprobs_mode"].share_alone > 0.5
    assert by["head_dtype"].share_alone > 0
    assert by["logprobs_mode"].moves_gate
    # Everything restored: what is left is the version itself, and it is small.
    assert mig.remaining is not None and mig.remaining.mean_abs_delta < 0.01
    assert mig.gate_exceeded and "logprobs_mode" in mig.flagged()
    assert mig.recorded_version != mig.new_version


def test_a_pure_version_change_is_the_version(recorded: Path, old_python: str) -> None:
    mig = migrate(recorded, python=old_python, gate=("mean_abs_delta", -1.0))  # any gap exceeds it
    assert not [s for s in mig.settings if s.knob in ("logprobs_mode", "head_dtype", "dtype")]
    assert mig.remaining_share is None or mig.remaining_share == pytest.approx(1.0, abs=0.05) or not mig.settings
    assert mig.flagged() == ["version"] or [s for s in mig.settings if s.moves_gate]
    assert any(c.knob == "vllm_version" for c in mig.context_changes)


def test_cli_gates_an_upgrade(recorded: Path, old_python: str) -> None:
    args = ["attribute", str(recorded), "--python", old_python, "--engine-arg", "logprobs_mode=raw_logprobs",
            "--format", "json"]
    r = CliRunner().invoke(cli, [*args, "--gate", "clip_rate=0.0001", "--fail-on", "logprobs_mode"])
    assert r.exit_code == 1, r.output
    d = json.loads(r.output)
    assert d["migration"]["gate_exceeded"] and "logprobs_mode" in d["migration"]["flagged"]
    ok = CliRunner().invoke(cli, [*args, "--gate", "clip_rate=1.0", "--fail-on", "any"])
    assert ok.exit_code == 0, ok.output  # replays reused; a clean trace, a gate that holds
    bad = CliRunner().invoke(cli, [*args, "--gate", "nonsense=1"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_works_without_trainer_logprobs(recorded: Path, old_python: str, tmp_path: Path) -> None:
    """The recording is the reference: a trace whose trainer never logged gets the same audit."""
    import shutil

    from tracekit.attribute import attribute

    bare = tmp_path / "bare"
    shutil.copytree(recorded, bare, ignore=shutil.ignore_patterns("replays"))
    shutil.rmtree(bare / "trainer")
    res = attribute(bare, python=old_python, migration=True, engine_args={"logprobs_mode": "raw_logprobs"},
                    gate=("mean_abs_delta", 0.05))
    assert res.gap is None and res.migration is not None
    (mode,) = [s for s in res.migration.settings if s.knob == "logprobs_mode"]
    assert mode.share_alone > 0.5 and res.migration.gate_exceeded and "logprobs_mode" in res.migration.flagged()
