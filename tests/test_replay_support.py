"""Helpers for the replay tests (no tests here): record a small REAL trace with a real engine.

The recording runs real ``vllm.LLM.generate`` calls (seeded sampling, logprobs=0) and writes
engines/requests/tokens/weights rows through TraceWriter and put_tensors, with an in-flight
weight update between batches (reload_weights + reset_prefix_cache), as an RL job would.
"""

from __future__ import annotations

import datetime as dt
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
    snapshot_labels: dict[int, int] | None = None,
) -> dict[int, dict[str, Any]]:
    """Record ``batches`` into a new trace at ``root``; returns {request_id: request row}.

    Each batch: ``version`` (int or None), ``tensors`` (to load before it, or None), ``prompts``
    and ``sampling`` (list of SamplingParams kwargs, one per prompt). The engine is left with
    the base weights. ``snapshot_labels`` stores version v's tensors under another label (a
    deliberately wrong trace for tests).
    """
    from vllm import SamplingParams

    from tracekit.capture.fingerprint import fingerprint_llm
    from tracekit.store.weights import put_tensors
    from tracekit.store.writer import TraceWriter

    w = TraceWriter(root, kind="record")
    eid = "rec-" + w.run_id[:8]
    w.write("engines", fingerprint_llm(llm, role="record", surface="llm", engine_args=engine_args,
                                       run_id=w.run_id, engine_id=eid))
    rows: dict[int, dict[str, Any]] = {}
    rid = 1 << 40
    stored: set[int] = set()
    for b in batches:
        v = b.get("version")
        if b.get("tensors") is not None:
            load_into(llm, b["tensors"], model_dir)
            if v is not None and v not in stored:
                label = (snapshot_labels or {}).get(v, v)
                stored.add(v)
                if label is not None:  # None: deliberately no snapshot for this version
                    src = b["tensors"] if label == v else next(x["tensors"] for x in batches if x.get("version") == label)
                    w.write("weights", put_tensors(root, src, version=v, step=v, run_id=w.run_id))
        sps = [SamplingParams(**s, logprobs=0) for s in b["sampling"]]
        t0 = dt.datetime.now(dt.timezone.utc)
        outs = llm.generate([{"prompt_token_ids": p} for p in b["prompts"]], sps, use_tqdm=False)
        for p, s, out in zip(b["prompts"], b["sampling"], outs):
            rid += 1
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [c.logprobs[i][t].logprob for i, t in enumerate(ids)]
            row = dict(
                request_id=rid, run_id=w.run_id, engine_id=eid, engine_request_id=out.request_id, surface="llm",
                step=v, group_id=None, sample_idx=0, prompt_token_ids=p, output_token_ids=ids,
                sampling_requested=s, sampling_resolved=s, temperature=s.get("temperature", 1.0),
                top_p=s.get("top_p", 1.0), top_k=s.get("top_k", 0), min_p=s.get("min_p", 0.0), seed=s.get("seed"),
                max_tokens=s.get("max_tokens"), num_logprobs=None, finish_reason=c.finish_reason,
                weight_version_start=v, weight_version_end=v, t_submit=t0, t_finish=dt.datetime.now(dt.timezone.utc),
            )
            w.write("requests", row)
            w.write_columns("tokens", {"pos": list(range(len(ids))), "token_id": ids, "logprob": lps},
                            request_id=rid, weight_version=v)
            rows[rid] = {**row, "logprobs": lps}
    if any(b.get("tensors") is not None for b in batches):
        restore(llm, model_dir)
    w.close()
    return rows
