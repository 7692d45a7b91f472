"""`tracekit demo` / `make demo`: the whole migration audit, for real, on 2 CPU cores.

1. build a tiny model (no hub),
2. record the toy GRPO job on this venv's vLLM with faults planted ("the old config"),
3. replay it on the new engine (``new_python``: a venv with another vLLM release, with the config
   the team migrates to: by default the fixes for the planted faults),
4. attribute the recorded-vs-trainer gap (the replays run on that engine) and split the
   recorded-vs-new gap by changed setting (the migration audit),
5. write the HTML + PNG report, and print a short verdict with the paths.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TracekitError
from ..testing.faults import Faults

# The two causes the published migration fixed first; both reproduce on CPU.
DEFAULT_FAULTS = ("logprob_mode", "lm_head_precision")


@dataclass
class DemoResult:
    out: Path
    trace: Path
    report: dict[str, Path]
    attribution: dict[str, Any]
    result: Any  # tracekit.attribute.Attribution (for the terminal rendering)
    found: list[str]
    planted: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return sorted(self.found) == sorted(self.planted)


def run_demo(
    out: str | os.PathLike[str],
    *,
    faults: tuple[str, ...] = DEFAULT_FAULTS,
    new_python: str | None = None,
    steps: int = 4,
    group_size: int = 4,
    prompts_per_step: int = 4,
    max_tokens: int = 16,
    seed: int = 0,
    new_engine_args: dict[str, Any] | None = None,
    new_hf_overrides: dict[str, Any] | None = None,
    log: Callable[[str], Any] = print,
) -> DemoResult:
    """Run the demo into ``out`` (must be absent or empty) and return what it found and wrote.

    ``new_engine_args`` / ``new_hf_overrides``: the new engine's config; None = the fixes for the
    planted faults (what a team would switch on when it upgrades)."""
    from ..attribute import attribute
    from ..replay import replay
    from ..report import write_report
    from ..testing.tiny_model import build_tiny_model
    from .job import run_job

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TracekitError(f"{out} exists and is not empty; pass another --out or remove it")
    if new_python and not Path(new_python).exists():
        raise TracekitError(f"--new-python {new_python}: no such interpreter")
    planted = Faults.of(*faults)
    timings: dict[str, float] = {}
    t = time.time()

    log(f"[1/5] building a tiny Qwen2 model in {out / 'model'}")
    model = build_tiny_model(out / "model", arch="qwen2", seed=seed)
    timings["model"] = time.time() - t

    t = time.time()
    trace = out / "trace"
    log(f"[2/5] recording the toy GRPO job (faults planted: {', '.join(faults) or 'none'}) into {trace}")
    job = run_job(trace, model, faults=planted, steps=steps, group_size=group_size,
                  prompts_per_step=prompts_per_step, max_tokens=max_tokens, seed=seed,
                  log=lambda s: log("      " + s))
    timings["record"] = time.time() - t
    log(f"      {job.requests} requests, {job.tokens} tokens, weight versions "
        f"{job.weight_versions[0]}..{job.weight_versions[-1]}, mean |engine - trainer| {job.mean_abs_delta():.4f}")

    t = time.time()
    engine = _engine_version(new_python)
    ea, hf = new_config(planted) if new_engine_args is None and new_hf_overrides is None else \
        (dict(new_engine_args or {}), dict(new_hf_overrides or {}))
    log(f"[3/5] replaying the trace on {engine} with {_describe(ea, hf)}")
    replay(trace, "new-engine", python=new_python, engine_args=ea, hf_overrides=hf, progress=False)
    timings["replay"] = time.time() - t

    t = time.time()
    log("[4/5] attributing the recorded-vs-trainer gap and splitting the recorded-vs-new gap by setting")
    result = attribute(trace, python=new_python, migration=True, engine_args=ea, hf_overrides=hf,
                       gate=("clip_rate", 0.01))
    attribution = result.as_dict()
    (out / "attribution.json").write_text(json.dumps(attribution, indent=2, default=str))
    timings["attribute"] = time.time() - t

    t = time.time()
    log(f"[5/5] writing the report into {out / 'report'}")
    report = write_report(trace, out / "report", attribution=attribution)
    timings["report"] = time.time() - t
    return DemoResult(out, trace, report, attribution, result, list(result.found()), list(faults), timings)


def new_config(planted: Faults) -> tuple[dict[str, Any], dict[str, Any]]:
    """The new engine's settings in the demo: the fixes for the planted config faults."""
    ea: dict[str, Any] = {}
    hf: dict[str, Any] = {}
    if planted.logprob_mode:
        ea["logprobs_mode"] = "processed_logprobs"
    if planted.runtime_defaults:
        ea["generation_config"] = "vllm"
    if planted.lm_head_precision:
        hf["head_dtype"] = "float32"
    return ea, hf


def _describe(ea: dict[str, Any], hf: dict[str, Any]) -> str:
    items = [f"{k}={v}" for k, v in ea.items()] + [f"hf_overrides.{k}={v}" for k, v in hf.items()]
    return ", ".join(items) if items else "the recorded config"


def _engine_version(python: str | None) -> str:
    """'vLLM X in <python>' of the replay interpreter (for the log line)."""
    import subprocess
    import sys

    exe = python or sys.executable
    try:
        v = subprocess.run([exe, "-c", "import vllm; print(vllm.__version__)"], check=False, capture_output=True,
                           text=True, timeout=120).stdout.strip()
    except Exception:  # noqa: BLE001 - only for the message
        v = "?"
    return f"vLLM {v or '?'} ({exe})"
