"""verl: the JSONL files ``trainer.rollout_data_dir`` (and ``validation_data_dir``) receive.

Read from volcengine/verl@b178a3cd5 (v0.7.0+125; docs/import.md has the map):
- ``<dir>/<global_steps>.jsonl``, one ``json.dumps(entry, ensure_ascii=False)`` per line
  (verl/trainer/ppo/ray_trainer.py ``RayPPOTrainer._dump_generations``);
- keys ``input`` / ``output`` (``tokenizer.batch_decode(..., skip_special_tokens=True)`` of the
  prompts and responses), ``gts`` (ground truth), ``score`` (``token_level_scores.sum(-1)``, the
  reward before any KL penalty), ``step``, then every ``reward_extra_infos_dict`` key with one
  value per row (``_log_rollout_data``).
- no token ids, logprobs, weight versions or group ids: rows are in ``balance_batch`` order.
- sampling and engine flags: ``actor_rollout_ref.rollout.*`` of the Hydra config
  (verl/trainer/config/rollout/rollout.yaml: name, temperature, top_k, top_p, response_length,
  dtype, enable_prefix_caching, logprobs_mode, max_model_len, engine_kwargs.vllm).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ..errors import SourceError
from .base import (
    HashedFile,
    ImportResult,
    ImportSink,
    get_path,
    null_all,
    open_source,
    parse_json_line,
)
from .engine import engine_row, note_engine_nulls
from .text import TEXT_NOTES, TEXT_NULLS, load_tokenizer, tokenize

SOURCE = "volcengine/verl@b178a3cd5"
_FIXED = ("input", "output", "gts", "score", "step")
_ROWS = 4096  # rows tokenized and written at once


def find_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.jsonl"), key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.name))
    if not files:
        raise SourceError(f"{src}: no verl rollout dumps (<step>.jsonl)")
    return files


def import_verl(src: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str | None = None,
                config: str | os.PathLike[str] | None = None) -> ImportResult:
    """Import verl rollout/validation dumps (text only: ``model`` tokenizes them)."""
    source = open_source(src, config, find_files)
    paths, root, cfg, files = source.paths, source.root, source.cfg, source.files
    tok = load_tokenizer(model, "verl")
    with ImportSink(out, source_format="verl") as sink:
        eid, requested = _engine(sink, cfg, model)
        old = False
        for path in paths:
            hf = HashedFile(path, root)
            files.append(hf)
            groups: dict[str, int] = {}
            rows: list[dict[str, Any]] = []
            for lineno, line in hf.lines():
                if not line.strip():
                    continue
                r = parse_json_line(hf, lineno, line)
                if not isinstance(r, dict) or any(k not in r for k in ("input", "output", "step")):
                    raise SourceError(f"{path}:{lineno}: not a verl rollout dump line (no input/output/step)")
                old |= "gts" not in r
                rows.append(r)
                if len(rows) >= _ROWS:
                    _flush(sink, tok, rows, groups, str(path), eid, requested)
                    rows = []
            _flush(sink, tok, rows, groups, str(path), eid, requested)
        for k, v in TEXT_NULLS.items():
            sink.null(k, v)
        sink.notes.extend(TEXT_NOTES)
        sink.notes.append("group_id is inferred: rows of one step with the same input text (verl dumps no uid and "
                          "reorders rows with balance_batch)")
        sink.null("trainer", "verl does not dump old_log_probs / rollout_log_probs (they live in the batch only)")
        if not cfg:
            why = "no verl config given (--config: the run's Hydra config.yaml)"
            null_all(sink, ("sampling_requested", "sampling_resolved", "temperature", "top_p", "top_k", "max_tokens"), why)
        version = (f"rollout_data_dir JSONL as written by {SOURCE} (v0.6.0 and later; "
                   + ("no 'gts' key: an older release, v0.4.1/v0.5.0)" if old else "with 'gts')"))
        return sink.commit(source_version=version, files=files, extra={"source": SOURCE})


def _flush(sink: ImportSink, tok: Any, rows: list[dict[str, Any]], groups: dict[str, int], where: str, eid: str,
           requested: dict[str, Any] | None) -> None:
    if not rows:
        return
    prompts = tokenize(tok, [r["input"] for r in rows], where)
    outs = tokenize(tok, [r["output"] for r in rows], where)
    counts: dict[str, int] = {}
    for r, p, o in zip(rows, prompts, outs):
        step = r["step"]
        if not isinstance(step, int):
            raise SourceError(f"{where}: step {step!r} is not an integer")
        g = groups.setdefault(r["input"], len(groups))
        gid = f"{step}-{g}"
        idx = counts.get(gid, 0)
        counts[gid] = idx + 1
        score = r.get("score")
        extra = {k: v for k, v in r.items() if k not in ("input", "output", "score", "step")}
        sink.add_request(
            output=o, prompt=p, engine_id=eid, step=step, group_id=gid, sample_idx=None,
            reward=float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
            sampling_requested=requested, sampling_resolved=requested,
            **{k: requested[k] for k in ("temperature", "top_p", "top_k", "max_tokens")
               if requested and requested.get(k) is not None},
            extra=extra or None)
    sink.null("requests.sample_idx", "verl reorders rows (balance_batch): the order within a group is unknown")


def _engine(sink: ImportSink, cfg: dict[str, Any], model: str | None) -> tuple[str, dict[str, Any] | None]:
    ro = get_path(cfg, "actor_rollout_ref.rollout") or {}
    name = ro.get("name") if isinstance(ro.get("name"), str) and ro.get("name") != "???" else None
    args: dict[str, Any] = {}
    if ro:
        for k in ("dtype", "enable_prefix_caching", "logprobs_mode", "max_model_len", "gpu_memory_utilization",
                  "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "enforce_eager"):
            if ro.get(k) is not None:
                args[k] = ro[k]
        args.update(get_path(ro, f"engine_kwargs.{name or 'vllm'}") or {})
    model_path = model or get_path(cfg, "actor_rollout_ref.model.path")
    eid = "import-verl-" + hashlib.sha256(repr(sorted(args.items())).encode()).hexdigest()[:12]
    row, _ = engine_row(eid, args, model_path, known=name == "vllm", engine=name or "unknown",
                        extra={"source_format": "verl", "engine": name})
    row["generation_config"] = None
    row["default_sampling_params"] = None
    sink.add_engine(row)
    note_engine_nulls(sink, "verl", row)
    sink.null("engines.generation_config", "verl passes the sampling fields explicitly")
    if not ro:
        return eid, None
    req = {"temperature": ro.get("temperature"), "top_p": ro.get("top_p"), "top_k": ro.get("top_k"),
           "max_tokens": _int(ro.get("response_length"))}
    return eid, {k: v for k, v in req.items() if v is not None}


def _int(v: Any) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"\d+", v):
        return int(v)
    return None
