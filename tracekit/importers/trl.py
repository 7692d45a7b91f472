"""TRL GRPOTrainer: the completions tables ``log_completions=True`` writes.

Read from huggingface/trl@f2cd577 (v1.9.0+26; docs/import.md has the map):
- ``<output_dir>/completions/completions_{global_step:05d}.parquet``, written by pandas
  ``to_parquet`` on the main process at every ``log()`` (trl/trainer/grpo_trainer.py
  ``GRPOTrainer.log``; the directory is made in ``__init__``);
- columns ``step`` (global_step), ``prompt`` and ``completion`` (``batch_decode(...,
  skip_special_tokens=True)``), one float column per reward function (NaN where it returned
  None), ``log_extra`` columns, ``advantage`` (``_generate_and_score_completions``);
- rows: the last ``generation_batch_size`` samples (deques), each prompt's ``num_generations``
  samples contiguous; a generation logged at several ``log()`` calls appears in several files.
- sampling: ``GRPOConfig`` temperature/top_p/top_k/min_p/repetition_penalty/
  max_completion_length (trl/trainer/grpo_config.py), passed explicitly to vLLM, whose engine
  TRL builds with ``logprobs_mode="processed_logprobs"`` (trl/generation/vllm_generation.py;
  trl/scripts/vllm_serve.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from .base import HashedFile, ImportResult, ImportSink, null_all, open_source
from .engine import engine_row, note_engine_nulls
from .text import TEXT_NOTES, TEXT_NULLS, load_tokenizer, tokenize

SOURCE = "huggingface/trl@f2cd577"
_FIXED = ("step", "prompt", "completion", "advantage")
# GRPOConfig defaults (trl/trainer/grpo_config.py) for the sampling fields TRL passes to the engine.
_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
             "max_completion_length": 256}


def find_files(src: Path) -> list[Path]:
    d = src / "completions" if (src / "completions").is_dir() else src
    files = sorted(d.glob("completions_*.parquet")) or sorted(d.glob("*.parquet"))
    if not files:
        raise SourceError(f"{src}: no TRL completions tables (completions/completions_<step>.parquet)")
    return files


def import_trl(src: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str | None = None,
               config: str | os.PathLike[str] | None = None) -> ImportResult:
    """Import TRL GRPO completions tables (text only: ``model`` tokenizes them)."""
    import pyarrow.parquet as pq

    source = open_source(src, config, find_files)
    paths, root, cfg, files = source.paths, source.root, source.cfg, source.files
    tok = load_tokenizer(model, "TRL")
    g = cfg.get("num_generations")
    weights = cfg.get("reward_weights")
    with ImportSink(out, source_format="trl") as sink:
        eid, requested = _engine(sink, cfg, model)
        prev: tuple[list[str], list[str]] | None = None
        dup = ungrouped = 0
        for path in paths:
            hf = HashedFile(path, root)
            files.append(hf)
            hf.hash_only()
            try:
                t = pq.read_table(path)
                missing = [c for c in ("step", "prompt", "completion") if c not in t.column_names]
                # pyarrow does not validate strings on read: corrupt UTF-8 fails when decoded here
                d = {c: t.column(c).to_pylist() for c in t.column_names if c != "__index_level_0__"}
            except Exception as e:  # noqa: BLE001 - pyarrow's errors for corrupt/truncated files vary
                raise SourceError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:100]})") from None
            if missing:
                raise SourceError(f"{path}: not a TRL completions table (no {', '.join(missing)} column)")
            key = (d["prompt"], d["completion"])
            if key == prev:  # the same generation logged again (logging_steps < steps_per_generation)
                dup += 1
                continue
            prev = key
            rewards = [c for c in d if c not in _FIXED and _numeric(d[c])]
            if weights is not None and len(weights) != len(rewards):
                raise SourceError(f"{path}: {len(rewards)} reward columns but reward_weights has {len(weights)}")
            n = t.num_rows
            prompts = tokenize(tok, d["prompt"], str(path))
            outs = tokenize(tok, d["completion"], str(path))
            grouped = isinstance(g, int) and g > 0 and n % g == 0 and all(
                len(set(d["prompt"][i:i + g])) == 1 for i in range(0, n, g))
            ungrouped += not grouped
            for i in range(n):
                step = d["step"][i]
                rs = [d[c][i] for c in rewards]
                ws = weights or [1.0] * len(rs)
                vals = [w * r for w, r in zip(ws, rs) if r is not None and not math.isnan(r)]
                extra = {"rewards": {c: d[c][i] for c in rewards}, "advantage": d.get("advantage", [None] * n)[i],
                         **{c: d[c][i] for c in d if c not in _FIXED and c not in rewards}}
                sink.add_request(
                    output=outs[i], prompt=prompts[i], engine_id=eid, step=int(step) if step is not None else None,
                    group_id=f"{step}-{i // g}" if grouped else None, sample_idx=i % g if grouped else None,
                    reward=float(np.sum(vals)) if vals else None,
                    sampling_requested=requested, sampling_resolved=requested,
                    **{k: requested[k] for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens")
                       if requested and requested.get(k) is not None},
                    extra=extra)
        if dup:
            sink.notes.append(f"{dup} file(s) repeat the previous file's samples (the same generation logged at "
                              "several steps) and were skipped")
        _nulls(sink, cfg, ungrouped)
        return sink.commit(source_version=f"completions parquet of GRPOTrainer.log as in {SOURCE} "
                                          "(TRL >= v0.28.0 writes it; earlier releases only print / log to wandb)",
                           files=files, extra={"source": SOURCE})


def _numeric(col: list[Any]) -> bool:
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in col)


def _engine(sink: ImportSink, cfg: dict[str, Any], model: str | None) -> tuple[str, dict[str, Any] | None]:
    use_vllm = bool(cfg.get("use_vllm"))
    args: dict[str, Any] = {}
    if use_vllm:  # trl/generation/vllm_generation.py builds LLM(..., logprobs_mode="processed_logprobs")
        args = {"logprobs_mode": "processed_logprobs", "max_model_len": cfg.get("vllm_max_model_length"),
                "gpu_memory_utilization": cfg.get("vllm_gpu_memory_utilization"),
                "model_impl": cfg.get("vllm_model_impl"), "enable_sleep_mode": cfg.get("vllm_enable_sleep_mode")}
        args = {k: v for k, v in args.items() if v is not None}
    eid = f"import-trl-{'vllm-' + str(cfg.get('vllm_mode', 'colocate')) if use_vllm else 'transformers'}"
    row, _ = engine_row(eid, args, model, known=use_vllm, engine="vllm" if use_vllm else "transformers",
                        extra={"source_format": "trl", "engine": "vllm" if use_vllm else
                               ("transformers generate" if cfg else "unknown (no GRPOConfig given)"),
                               "vllm_mode": cfg.get("vllm_mode") if use_vllm else None})
    row["generation_config"] = None
    row["default_sampling_params"] = None
    sink.add_engine(row)
    note_engine_nulls(sink, "TRL", row)
    sink.null("engines.generation_config", "TRL passes every sampling field explicitly (generation_config unused)")
    if not cfg:
        return eid, None
    req = {k: cfg.get(k, v) for k, v in _SAMPLING.items()}
    req["max_tokens"] = req.pop("max_completion_length")
    return eid, {k: v for k, v in req.items() if v is not None}


def _nulls(sink: ImportSink, cfg: dict[str, Any], ungrouped: int) -> None:
    for k, v in TEXT_NULLS.items():
        sink.null(k, v)
    sink.notes.extend(TEXT_NOTES)
    sink.null("trainer", "TRL keeps sampling_per_token_logps and the policy's logprobs in memory only")
    if not cfg:
        why = "no GRPOConfig given (--config: its JSON/YAML)"
        null_all(sink, ("sampling_requested", "sampling_resolved", "temperature", "top_p", "top_k", "min_p",
                        "max_tokens", "group_id", "sample_idx"), why)
    elif ungrouped:
        sink.null("requests.group_id", f"{ungrouped} table(s) are not whole groups of num_generations equal prompts")
        sink.null("requests.sample_idx", "see group_id")
