"""Recorder lifecycle on a shared real engine: close/unwrap, take-over by a second recorder, rewards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracekit.capture.recorder import Recorder
from tracekit.store.reader import Trace

pytestmark = pytest.mark.engine


def _n_requests(root: Path) -> int:
    return Trace(root).query("SELECT count(*) FROM requests")[0][0]


def test_close_unwraps_and_a_second_recorder_takes_over(tmp_path: Path, tiny_model: Path, engine_pool: Any) -> None:
    from vllm import SamplingParams

    llm = engine_pool(tiny_model)
    cls_generate = type(llm).generate
    sp = SamplingParams(max_tokens=4, seed=1)

    a = Recorder(tmp_path / "a", flush_interval=0.05)
    a.wrap(llm)
    llm.generate(["one two"], sp, use_tqdm=False)
    b = Recorder(tmp_path / "b", flush_interval=0.05)
    b.wrap(llm)  # takes over: a must not record this call as well
    outs = llm.generate(["one two"], sp, use_tqdm=False)
    b.log_reward(b.request_ids(outs)[0][0], 0.5, step=3)
    a.close()  # a no longer owns the engine: its close leaves b's hooks alone
    llm.generate(["one two"], sp, use_tqdm=False)
    b.close()  # unwraps
    assert "generate" not in vars(llm) and getattr(llm, "_tracekit_recorder", None) is None
    assert type(llm).generate is cls_generate
    llm.generate(["one two"], sp, use_tqdm=False)  # recorded by nobody

    assert _n_requests(tmp_path / "a") == 1
    assert _n_requests(tmp_path / "b") == 2
    rows = Trace(tmp_path / "b").query(
        "SELECT w.reward, w.step FROM rewards w JOIN requests r USING (request_id)")
    assert rows == [(0.5, 3)]
