"""`tracekit demo` end to end at reduced size: real engines on both venvs, verdict = planted cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.venv_old]


def test_demo_names_the_planted_cause_and_writes_the_report(tmp_path: Path, old_python: str) -> None:
    """The demo upgrades, like `make demo`: it records on the older release (the second venv) and
    migrates to this venv's newer one."""
    out = tmp_path / "demo"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    res = subprocess.run(
        [old_python, "-m", "tracekit.cli", "demo", "--out", str(out), "--new-python", sys.executable,
         "--fault", "logprob_mode", "--steps", "2"],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "found logprob_mode; planted logprob_mode" in res.stdout
    attribution = json.loads((out / "attribution.json").read_text())
    verdicts = {c["id"]: c["verdict"] for c in attribution["causes"]}
    assert verdicts["logprob_mode"] == "present"
    assert [k for k, v in verdicts.items() if v == "present"] == ["logprob_mode"]
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html
    for png in ("curves.png", "delta_hist.png", "waterfall.png"):
        assert (out / "report" / png).stat().st_size > 10_000
    # The replay on the other engine version recorded its own fingerprint.
    from tracekit.store.reader import Trace

    versions = {v for (v,) in Trace(out / "trace").query("SELECT DISTINCT vllm_version FROM replay_engines")}
    assert versions and all(v for v in versions)
    # ... and attribute lists what that engine changed: here the release, recorded vs replayed.
    (release,) = [c for c in attribution["engine_changes"]["new-engine"] if c["knob"] == "vllm_version"]
    assert release["recorded"] != release["replay"] and release["cause"] is None
    assert "vllm_version" in res.stdout  # the rendered table of those changes
    assert "engine settings replay:new-engine changed vs the recorded engine" in html
    # The migration audit: the new engine returns processed logprobs (the fix); that setting is
    # most of the recorded-vs-new gap, the release itself the rest.
    mig = attribution["migration"]
    assert mig["recorded_version"] != mig["new_version"]
    (mode,) = [s for s in mig["settings"] if s["knob"] == "logprobs_mode"]
    assert mode["recorded"] == "raw_logprobs" and mode["new"] == "processed_logprobs" and mode["share_alone"] > 0.5
    assert "what each changed setting does" in res.stdout and "Migration: vLLM" in html
