"""slime: the files ``--save-debug-rollout-data`` writes (one ``torch.save`` per rollout).

Read from THUDM/slime@624b824a8 (v0.3.1+38; docs/import.md has the field-by-field map):
- path ``template.format(rollout_id=...)``, eval rollouts as ``eval_<id>``
  (slime/observability/rollout_data_utils.py ``save_debug_rollout_data``);
- payload ``{"rollout_id": int, "samples": [Sample.to_dict()]}``: train samples flattened with
  each group contiguous (slime/ray/rollout.py ``RolloutManager.generate``);
- with ``--dump-details D`` also ``D/train_data/{rollout_id}.pt`` (``--save-debug-train-data``):
  the trainer's ``log_probs`` per sample, matched by ``rollout_position``
  (slime/observability/train_data_utils.py ``_build_dump_payload``) -> the trainer table;
- ``Sample.to_dict()`` = the dataclass ``__dict__`` with ``status`` as its string and
  ``spec_info`` / ``prefix_cache_info`` as dicts (slime/utils/types.py ``Sample``): ``tokens`` =
  prompt + response ids, ``response_length``, ``rollout_log_probs`` (one per response token, 0.0 on
  tool/env tokens), ``loss_mask`` (0 = not generated), ``weight_versions`` (one str per engine
  call), ``group_index``, ``index``, ``reward`` (float or dict), ``status``, ``label``, ``metadata``.
The engine is SGLang: its logprobs and flags come from slime's arguments (``--config``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from .base import HashedFile, ImportResult, ImportSink, null_all, open_source
from .engine import engine_row, note_engine_nulls
from .safe_torch import load_torch_file

SOURCE = "THUDM/slime@624b824a8"
_FINISH = {"completed": "stop", "truncated": "length", "aborted": "abort"}
# slime's argparse defaults for the rollout sampling flags (slime/utils/arguments.py).
_SAMPLING_ARGS = {"rollout_temperature": ("temperature", 1.0), "rollout_top_p": ("top_p", 1.0),
                  "rollout_top_k": ("top_k", -1), "rollout_max_response_len": ("max_tokens", None)}


def find_files(src: Path) -> list[Path]:
    d = src / "rollout_data" if (src / "rollout_data").is_dir() else src  # --dump-details D
    files = sorted(d.glob("*.pt"), key=_file_order)
    if not files:
        raise SourceError(f"{src}: no slime debug rollout files (*.pt from --save-debug-rollout-data)")
    return files


def _file_order(p: Path) -> tuple[int, int, str]:
    m = re.search(r"(eval_)?(\d+)", p.stem)
    return (1 if m and m.group(1) else 0, int(m.group(2)) if m else 0, p.name)


def import_slime(src: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str | None = None,
                 config: str | os.PathLike[str] | None = None) -> ImportResult:
    """Import slime debug rollout files (one .pt, a directory of them, or a --dump-details dir)."""
    source = open_source(src, config, find_files)
    paths, root, files = source.paths, source.root, source.files
    cfg = {k.replace("-", "_"): v for k, v in source.cfg.items()}
    with ImportSink(out, source_format="slime") as sink:
        eid, requested = _engine(sink, cfg, model)
        stats = {"versions": set(), "multi_call": 0, "dict_reward": 0, "masked": 0, "no_logprobs": 0,
                 "keys": set(), "trained": 0}
        train_dir = _train_dir(Path(src))
        for path in paths:
            hf = HashedFile(path, root)
            files.append(hf)
            obj = load_torch_file(hf.read_bytes(), str(path))
            if not isinstance(obj, dict) or not isinstance(obj.get("samples"), list):
                raise SourceError(f"{path}: not a slime debug rollout file (no 'samples' list)")
            rid = obj.get("rollout_id")
            if not isinstance(rid, int):
                raise SourceError(f"{path}: rollout_id {rid!r} is not an integer")
            split = "eval" if path.stem.startswith("eval_") else "train"
            trained = _train_logprobs(train_dir, rid, root, files) if split == "train" and train_dir else {}
            stats["trained"] += len(trained)
            seen: dict[Any, int] = {}
            for j, s in enumerate(obj["samples"]):
                _add(sink, s, f"{path}: sample {j}", rid, split, seen, eid, requested, cfg, stats, trained.get(j))
        _null_reasons(sink, cfg, stats)
        keys = stats["keys"]
        version = (f"Sample.to_dict() as written by {SOURCE}" +
                   ("; has group_index/weight_versions (slime >= 2395239, 2025-09)" if "weight_versions" in keys else
                    "; no weight_versions/group_index (slime before 2395239, 2025-09)") +
                   ("; prefix_cache_info (>= cbe2334, 2026-01)" if "prefix_cache_info" in keys else ""))
        return sink.commit(source_version=version, files=files, extra={
            "source": SOURCE, "weight_versions": sorted(stats["versions"])})


def _train_dir(src: Path) -> Path | None:
    """``--dump-details D`` writes D/rollout_data/{rollout_id}.pt and D/train_data/{rollout_id}.pt
    (slime/utils/arguments.py): the train side sits beside the rollout side."""
    d = src if src.is_dir() else src.parent
    for cand in (d / "train_data", d.parent / "train_data"):
        if cand.is_dir() and cand != d:
            return cand
    return None


def _train_logprobs(train_dir: Path, rollout_id: int, root: Path, files: list[HashedFile]) -> dict[int, np.ndarray]:
    """The trainer's own logprobs per rollout-dump position, from ``--save-debug-train-data``
    (slime/observability/train_data_utils.py ``_build_dump_payload``: format_version 2, one
    ``samples`` entry per trained sample with ``rollout_position`` = its index in the rollout
    dump and ``log_probs`` restored to the full response length)."""
    out: dict[int, np.ndarray] = {}
    for path in sorted(train_dir.glob(f"{rollout_id}.pt")) + sorted(train_dir.glob(f"{rollout_id}_*.pt")):
        hf = HashedFile(path, root)
        files.append(hf)
        obj = load_torch_file(hf.read_bytes(), str(path))
        if not isinstance(obj, dict) or not isinstance(obj.get("samples"), list) or obj.get("rollout_id") != rollout_id:
            raise SourceError(f"{path}: not a slime train debug file of rollout {rollout_id} (no 'samples' list)")
        for j, t in enumerate(obj["samples"]):
            if not isinstance(t, dict) or not isinstance(t.get("rollout_position"), int) or t.get("log_probs") is None:
                raise SourceError(f"{path}: sample {j}: no rollout_position/log_probs (format_version 2 needed)")
            out.setdefault(t["rollout_position"], _floats(t["log_probs"], f"{path}: sample {j}", "log_probs"))
    return out


def _ints(v: Any, where: str, what: str) -> np.ndarray:
    try:
        a = np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: {what} is not a list of integers") from None
    return a


def _floats(v: Any, where: str, what: str) -> np.ndarray:
    try:
        return np.asarray(v.float().numpy() if hasattr(v, "numpy") else v, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: {what} is not a list of numbers") from None


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive 1s."""
    d = np.diff(np.concatenate([[0], (mask != 0).astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def _add(sink: ImportSink, s: Any, where: str, rollout_id: int, split: str, seen: dict[Any, int], eid: str,
         requested: dict[str, Any] | None, cfg: dict[str, Any], stats: dict[str, Any],
         trained: np.ndarray | None = None) -> None:
    if not isinstance(s, dict) or "tokens" not in s or "response_length" not in s:
        raise SourceError(f"{where}: not a slime Sample dict (no tokens/response_length)")
    stats["keys"].update(s)
    toks = _ints(s["tokens"], where, "tokens")
    r = s["response_length"]
    if not isinstance(r, int) or r < 0 or r > len(toks):
        raise SourceError(f"{where}: response_length {r!r} does not fit {len(toks)} tokens")
    p = len(toks) - r
    lp = None
    if s.get("rollout_log_probs") is not None:
        lp = _floats(s["rollout_log_probs"], where, "rollout_log_probs")
        if len(lp) != r:
            raise SourceError(f"{where}: {len(lp)} rollout_log_probs for response_length {r}")
    else:
        stats["no_logprobs"] += 1
    mask = None
    if s.get("loss_mask") is not None:
        mask = _ints(s["loss_mask"], where, "loss_mask")
        if len(mask) != r:
            raise SourceError(f"{where}: {len(mask)} loss_mask entries for response_length {r}")
    if lp is not None and mask is not None and not mask.all():
        lp = lp.copy()
        lp[mask == 0] = np.nan  # slime writes 0.0 there: tokens the engine did not generate
        stats["masked"] += 1
    if trained is not None:
        if len(trained) != r:
            raise SourceError(f"{where}: {len(trained)} trainer log_probs for response_length {r}")
        if mask is not None and not mask.all():
            trained = trained.copy()
            trained[mask == 0] = np.nan  # not trained on: no trainer row
    wv_raw = s.get("weight_versions") or []
    try:
        wv = [int(v) for v in wv_raw]
    except (TypeError, ValueError):
        raise SourceError(f"{where}: weight_versions {wv_raw!r} are not version numbers") from None
    stats["versions"].update(wv)
    runs = _runs(mask) if mask is not None else ([(0, r)] if r else [])
    version: np.ndarray | int | None = None
    if wv and len(set(wv)) == 1:
        version = wv[0]
    elif wv and len(runs) == len(wv):  # one engine call per generated span (multi-turn)
        version = np.full(r, -1, np.int64)
        for (a, b), v in zip(runs, wv):
            version[a:b] = v
    if len(wv) > 1:
        stats["multi_call"] += 1
    reward = s.get("reward")
    key = cfg.get("reward_key")
    if isinstance(reward, dict):
        reward = reward.get(key) if key else None
        stats["dict_reward"] += 1
    gi = s.get("group_index")
    gkey = (rollout_id, split, gi)
    idx = seen.get(gkey, 0)
    seen[gkey] = idx + 1
    status = s.get("status")
    pci = s.get("prefix_cache_info") or {}
    extra = {"split": split, "status": status, "index": s.get("index"), "label": s.get("label"),
             "rollout_id": s.get("rollout_id"), "remove_sample": s.get("remove_sample") or None,
             "non_generated_spans": [[a, b] for a, b in _runs(1 - mask)] if mask is not None and not mask.all() else None,
             "weight_versions": wv_raw if len(wv_raw) > 1 else None,
             "reward": s.get("reward") if isinstance(s.get("reward"), dict) else None,
             "metadata": s.get("metadata") or None}
    res = dict(requested) if requested is not None else None
    sink.add_request(
        output=toks[p:].astype(np.int32), prompt=toks[:p].astype(np.int32), logprob=lp, version=version,
        trainer=trained,
        engine_id=eid, step=rollout_id, group_id=None if gi is None else f"{split}-{rollout_id}-{gi}",
        sample_idx=idx if gi is not None else None,
        finish_reason=_FINISH.get(str(status)) if status is not None else None,
        weight_version_start=wv[0] if wv else None, weight_version_end=wv[-1] if wv else None,
        num_cached_tokens=int(pci["cached_tokens"]) if len(wv) <= 1 and isinstance(pci.get("cached_tokens"), int) and wv else None,
        reward=float(reward) if isinstance(reward, (int, float)) and not isinstance(reward, bool) else None,
        sampling_requested=requested, sampling_resolved=res,
        **({k: v for k, v in (res or {}).items() if k in ("temperature", "top_p", "top_k", "max_tokens") and v is not None}),
        extra={k: v for k, v in extra.items() if v is not None})


def _engine(sink: ImportSink, cfg: dict[str, Any], model: str | None) -> tuple[str, dict[str, Any] | None]:
    args = {k[len("sglang_"):]: v for k, v in cfg.items() if k.startswith("sglang_")}
    model_path = model or cfg.get("hf_checkpoint")
    eid = "import-slime-" + hashlib.sha256(repr(sorted(args.items())).encode()).hexdigest()[:12]
    row, _ = engine_row(eid, {"dtype": args.get("dtype")} if args.get("dtype") else {}, model_path, known=False,
                        engine="sglang", extra={"source_format": "slime", "engine": "sglang", "sglang_args": args or None})
    row["engine_args"] = args or None
    sink.add_engine(row)
    note_engine_nulls(sink, "slime", row)
    sink.null("engines.logprobs_mode", "SGLang engine: slime's dump does not say which logprob kind it returned")
    sink.null("engines.generation_config", "SGLang engine (slime passes temperature/top_p/top_k explicitly)")
    requested = None
    if cfg:
        requested = {}
        for arg, (name, default) in _SAMPLING_ARGS.items():
            v = cfg.get(arg, default)
            if v is not None:
                requested[name] = v
    return eid, requested


def _null_reasons(sink: ImportSink, cfg: dict[str, Any], st: dict[str, Any]) -> None:
    if st["masked"]:
        sink.null("tokens.logprob", f"null on tool/environment tokens (loss_mask 0) of {st['masked']} sample(s): "
                                    "slime writes 0.0 there, the engine did not generate them")
    if st["no_logprobs"]:
        sink.null("tokens.logprob", f"{st['no_logprobs']} sample(s) have rollout_log_probs None")
    if st["multi_call"]:
        sink.null("tokens.weight_version", f"{st['multi_call']} sample(s) span several engine calls: per-token "
                                           "versions only where the generated spans match weight_versions one to one")
    if st["dict_reward"]:
        sink.null("requests.reward", "reward is a dict; its reward_key field (--config reward_key) is used, "
                                     "the dict is in extra.reward")
    if not st["versions"]:
        sink.null("tokens.weight_version", "no weight_versions in the samples (slime before 2395239)")
    sink.null("requests.num_cached_tokens", "prefix_cache_info.cached_tokens only for single-call samples "
                                            "(it sums over engine calls)")
    sink.null("requests.seed", "not in the Sample")
    sink.null("requests.min_p", "slime does not pass min_p")
    sink.null("requests.stop_reason", "not in the Sample (status only)")
    sink.null("requests.engine_request_id", "not in the Sample (extra.index is slime's sample counter)")
    null_all(sink, ("t_submit", "t_first_token", "t_finish"), "the Sample has no timestamps")
    sink.null("tokens.top_token_ids", "slime keeps top-p kept ids (rollout_top_p_token_ids), not top-k logprobs")
    sink.null("tokens.top_logprobs", "slime keeps no top-k logprobs")
    if not st["trained"]:
        sink.null("trainer", "no --save-debug-train-data files beside the rollout dump (train_data/{rollout_id}.pt, "
                             "as --dump-details writes them): the rollout dump has no trainer logprobs")
    sink.null("weights", "slime keeps no weight snapshot per version; replay uses --model for every version")
    sink.null("weight_syncs", "the dump has versions but no update times")
    if not cfg:
        why = "no slime arguments given (--config: a JSON/YAML of slime's args, e.g. the wandb config)"
        null_all(sink, ("sampling_requested", "sampling_resolved", "temperature", "top_p", "top_k", "max_tokens"), why)
