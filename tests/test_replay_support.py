"""Helpers for the replay tests (no tests here): record a small REAL trace with a real engine.

The recording runs real ``vllm.LLM.generate`` calls (seeded sampling, logprobs=0) and writes
engines/requests/tokens/weights rows through TraceWriter and put_tensors, with an in-flight
weight update between batches (reload_weights + reset_prefix_cache), as an RL job would.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def perturbed(model_dir: Path, scale: float = 0.05, seed: int = 1) -> dict[str, Any]:
    """The model's tensors plus seeded noise of ``scale`` x each tensor's std (a 'trainer step')."""
    import safetensors.torch as st
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in st.load_file(str(Path(model_dir) / "model.safetensors")).items():
        f = t.float()
        noise = torch.randn(f.shape, generator=g) * (f.std() if f.numel() > 1 else 0.0) * scale
        out[name] = (f + noise).to(t.dtype)
    return out


def base_tensors(model_dir: Path) -> dict[str, Any]:
    import safetensors.torch as st

    return st.load_file(str(Path(model_dir) / "model.safetensors"))


def load_into(llm: Any, tensors: dict[str, Any], model_dir: Path) -> None:
    """Push ``tensors`` into the running engine like an RL weight sync does."""
    import safetensors.torch as st

    d = Path(tempfile.mkdtemp(prefix="tk-sync-"))
    try:
        st.save_file(tensors, str(d / "model.safetensors"))
        for p in Path(model_dir).iterdir():
            if p.is_file() and not p.name.endswith(".safetensors"):
                shutil.copy2(p, d / p.name)
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(d)})
        llm.reset_prefix_cache()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def restore(llm: Any, model_dir: Path) -> None:
    """Leave a shared engine as we found it: base weights, pointed at the original directory
    (in-process reload_weights repoints model_config.model at the reload path)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
    llm.reset_prefix_cache()


def prompts(n: int, seed: int = 0, lo: int = 6, hi: int = 20, vocab: int = 500) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def record_trace(
    root: Path,
    llm: Any,
    model_dir: Path,
    batches: list[dict[str, Any]],
    *,
    engine_args: dict[str, Any],
    snapshot_labels: dict[int, int | None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Record ``batches`` with the real Recorder into a new trace at ``root``.

    Each batch: ``version``, ``tensors`` to push before it (``Recorder.update_weights``: reload,
    label, reset prefix cache, weight_syncs row, snapshot) or None, ``prompts`` and ``sampling``
    (SamplingParams kwargs per prompt). ``snapshot_labels`` plants a weight-sync fault: version v's
    snapshot holds the tensors of another version (or none at all: None). The shared engine is
    unwrapped and left with its base weights and label. Returns {request_id: request row + logprobs}.
    """
    from vllm import SamplingParams

    from tracekit.capture import Recorder

    label_before = llm.llm_engine.get_weight_version() if hasattr(llm.llm_engine, "get_weight_version") else None
    rec = Recorder(root)
    rec.wrap(llm, engine_args=engine_args)
    by_version = {b["version"]: b["tensors"] for b in batches if b.get("tensors") is not None}
    try:
        for b in batches:
            v = b.get("version")
            if b.get("tensors") is not None:
                label = (snapshot_labels or {}).get(v, v)
                rec.update_weights(llm, v, b["tensors"], step=v, snapshot=label == v)
                if label is not None and label != v:
                    rec.log_weights(v, by_version[label], step=v, force=True)
            rec.step(v)
            sps = [SamplingParams(**sp) for sp in b["sampling"]]
            llm.generate([{"prompt_token_ids": p} for p in b["prompts"]], sps, use_tqdm=False)
    finally:
        rec.close()
        for attr in ("generate", "chat", "collective_rpc", "_tracekit_recorder", "_tracekit_hooks"):
            llm.__dict__.pop(attr, None)
        if by_version:
            restore(llm, model_dir)
        if hasattr(llm.llm_engine, "set_weight_version"):
            llm.llm_engine.set_weight_version(label_before)
    from tracekit.store.reader import Trace

    t = Trace(root)
    cols = ["request_id", "output_token_ids", "weight_version_start", "temperature", "top_k", "top_p", "sampling_resolved"]
    rows = {r[0]: dict(zip(cols, r)) for r in t.query(f"SELECT {', '.join(cols)} FROM requests")}
    for rid, lps in t.query("SELECT request_id, list(logprob ORDER BY pos) FROM tokens GROUP BY 1"):
        rows[rid]["logprobs"] = lps
    return rows


def two_version_recording(root: Path | str, llm: Any, model_dir: Path, sampling: Any,
                          engine_args: dict[str, Any]) -> dict[str, Any]:
    """test_replay's trace: 12 requests under v0 (the model's weights) and 12 under a perturbed
    v1, ``sampling(n, seed0)`` params each; with the recording engine's noise on its v0 requests
    (the shared engine holds v0's weights again after recording)."""
    from engine_noise import measure, recorded_requests

    p = prompts(24, seed=3)
    batches = [
        {"version": 0, "tensors": base_tensors(model_dir), "prompts": p[:12], "sampling": sampling(12, 0)},
        {"version": 1, "tensors": perturbed(model_dir, scale=0.05), "prompts": p[12:], "sampling": sampling(12, 100)},
    ]
    rows = record_trace(root, llm, model_dir, batches, engine_args=dict(engine_args))
    noise = measure(llm, recorded_requests(root, 0))
    return {"root": root, "rows": rows, "model": model_dir, "batches": batches, "noise": noise}


def test_plan_skips_requests_whose_version_is_unknown(tmp_path) -> None:
    """A token version the recorder could not know (null) is never replayed under a guess."""
    from test_metrics import make_trace

    from tracekit.replay.plan import build_plan

    reqs = [{"request_id": i, "prompt_token_ids": [1, 2], "output_token_ids": [3, 4], "step": 0,
             "weight_version_start": v, "weight_version_end": v} for i, v in ((1, 0), (2, None), (3, 0))]
    t = make_trace(tmp_path / "t", reqs, {1: [-1.0, -1.0], 2: [-1.0, -1.0], 3: [-1.0, -1.0]},
                   token_versions={1: 0, 3: 0})
    plan = build_plan(t, "r")
    planned = sorted(i for g in plan.groups for i in g.request_ids)
    assert planned == [1, 3]
    assert [(rid, why) for rid, _v, why in plan.skipped] == [(2, "weight version unknown (the recorder could not know it)")]
