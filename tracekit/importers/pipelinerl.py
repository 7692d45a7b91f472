"""PipelineRL: the JSONL rollout streams its actor writes (``streams: files``, the default backend).

Read from ServiceNow/PipelineRL@58d3934 (docs/import.md has the field-by-field map):
- ``<output_dir>/streams/<topic>/<instance>/<partition>/0.jsonl`` (pipelinerl/streams.py
  ``stream_dir``, ``stream_file``); topics ``actor`` (training rollouts) and ``actor_test`` (eval).
- one line per finished group: a JSON array of ``TrainingText.model_dump()`` written with
  ``orjson.dumps`` + ``"\\n"`` (streams.py ``FileStreamWriter.write``; actor.py ``ActorLoop._run``).
- a record: ``input_ids`` = prompt ids + generated ids, ``labels`` = -100 per prompt token + the
  generated ids, ``logprobs`` one per generated token as vLLM returned them, ``reward``,
  ``group_id``, ``finished`` (finish_reason != "length"), ``metadata.model_version`` /
  ``rollout_index`` / ``step_index`` (pipelinerl/rollouts.py ``TrainingText``;
  async_llm.py ``make_training_text``; actor.py ``rollout_and_maybe_produce_result``).
- the run config ``<output_dir>/conf/exp_config.yaml`` (launch.py ``main``): ``llm.parameters``
  / ``test_llm.parameters`` (sampling) and ``vllm_config.vllm_kwargs`` (engine flags).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from ..errors import SourceError
from .base import (
    HashedFile,
    ImportResult,
    ImportSink,
    get_path,
    jsonish,
    load_config,
    null_all,
    parse_json_line,
    resolve_sampling,
    resolved_columns,
)
from .engine import engine_row, note_engine_nulls

SOURCE = "ServiceNow/PipelineRL@58d3934"
TOPICS = {"actor": ("train", "llm.parameters"), "actor_test": ("test", "test_llm.parameters")}
MASKED = -100  # pipelinerl/finetune/data.py MASKED_TOKEN_ID
# What llm_async_generate adds to every request when collect_logprobs is on (async_llm.py).
_SENT_WITH_LOGPROBS = {"logprobs": 1, "include_stop_str_in_output": True, "skip_special_tokens": False}
_REQUIRED = ("input_ids", "labels", "logprobs")


def find_streams(src: Path) -> list[tuple[str, Path]]:
    """(topic, file) of every rollout stream file under ``src``: an experiment dir, its
    ``streams/`` dir, one topic dir, or one .jsonl file (taken as topic ``actor``)."""
    if src.is_file():
        return [("actor", src)]
    if not src.is_dir():
        raise SourceError(f"{src}: no such file or directory")
    base = src / "streams" if (src / "streams").is_dir() else src
    out: list[tuple[str, Path]] = []
    for topic in TOPICS:
        d = base / topic
        if d.is_dir():
            out += [(topic, p) for p in sorted(d.rglob("*.jsonl"))]
    if not out and src.name in TOPICS:
        out = [(src.name, p) for p in sorted(src.rglob("*.jsonl"))]
    if not out:
        raise SourceError(f"{src}: no PipelineRL rollout streams (streams/actor/<instance>/<partition>/0.jsonl)")
    return out


def find_config(src: Path, config: str | os.PathLike[str] | None) -> Path | None:
    if config is not None:
        return Path(config)
    for cand in (src / "conf" / "exp_config.yaml", src / ".hydra" / "config.yaml"):
        if src.is_dir() and cand.is_file():
            return cand
    return None


def import_pipelinerl(src: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str | None = None,
                      config: str | os.PathLike[str] | None = None) -> ImportResult:
    """Import a PipelineRL run (experiment dir, streams dir or one stream file) into a new trace."""
    src = Path(src)
    streams = find_streams(src)
    cfg_path = find_config(src, config)
    root = src if src.is_dir() else src.parent
    cfg, cfg_file = load_config(cfg_path, root)
    files: list[HashedFile] = ([cfg_file] if cfg_file else [])
    with ImportSink(out, source_format="pipelinerl") as sink:
        eng = _engine(sink, cfg, model, cfg_path)
        sampling = {}
        for topic, (_, key) in TOPICS.items():
            req = {**(get_path(cfg, key) or {}), **_SENT_WITH_LOGPROBS} if cfg else None
            res = resolve_sampling(req, eng["defaults"]) if req is not None else None
            sampling[topic] = (req, res)
        versions_seen: set[int] = set()
        null_lp = 0
        for topic, path in streams:
            hf = HashedFile(path, root)
            files.append(hf)
            split = TOPICS[topic][0]
            req, res = sampling[topic]
            const = {"engine_id": eng["engine_id"], "sampling_requested": req, "sampling_resolved": res,
                     "num_logprobs": 1, **resolved_columns(res)}
            null_lp += _read_stream(sink, hf, split, const, versions_seen)
        _null_reasons(sink, cfg, null_lp, cfg_path)
        version = ("TrainingText (pipelinerl.rollouts) with metadata.model_version/rollout_index/step_index, "
                   f"as written by {SOURCE} and releases since e115fb8 (2025-06-20)")
        return sink.commit(source_version=version, files=files, extra={
            "source": SOURCE, "weight_versions": sorted(versions_seen),
            "config": str(cfg_path) if cfg_path else None})


def _add(sink: ImportSink, rec: Any, const: dict[str, Any], split: str, where: str, versions: set[int]) -> int:
    if not isinstance(rec, dict) or any(k not in rec for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(rec, dict) or k not in rec]
        raise SourceError(f"{where}: not a PipelineRL TrainingText record (no {', '.join(missing)})")
    try:
        ids = np.asarray(rec["input_ids"], dtype=np.int64)
        labels = np.asarray(rec["labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: input_ids/labels are not lists of token ids") from None
    try:  # orjson writes NaN and ±inf as null: None -> NaN here, counted as null
        lp = np.asarray(rec["logprobs"], dtype=np.float32)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: logprobs is not a list of numbers") from None
    nulls = int(np.isnan(lp).sum()) if lp.ndim == 1 else 0
    n = len(lp)
    if ids.ndim != 1 or labels.shape != ids.shape or lp.ndim != 1 or n > len(ids):
        raise SourceError(f"{where}: {len(lp)} logprobs, {len(ids)} input_ids and {len(labels)} labels disagree")
    p = len(ids) - n
    if np.any(labels[:p] != MASKED) or np.any(labels[p:] != ids[p:]):
        raise SourceError(f"{where}: {n} logprobs but labels mark {int((labels != MASKED).sum())} generated tokens")
    meta = rec.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SourceError(f"{where}: metadata is not an object")
    mv = meta.get("model_version")
    if mv is not None and (not isinstance(mv, int) or mv < 0):
        raise SourceError(f"{where}: metadata.model_version {mv!r} is not a version number")
    if mv is not None:
        versions.add(mv)
    finished = rec.get("finished")
    reward = rec.get("reward")
    extra = {"split": split, "finished": finished, "n_predicted": rec.get("n_predicted"),
             "prompt_tokens": rec.get("prompt_tokens"), "output_tokens": rec.get("output_tokens"),
             "step_index": meta.get("step_index")}
    sink.add_request(
        output=ids[p:].astype(np.int32), prompt=ids[:p].astype(np.int32), logprob=lp, version=mv,
        group_id=rec.get("group_id"), sample_idx=meta.get("rollout_index"),
        finish_reason="length" if finished is False else None,
        weight_version_start=mv, weight_version_end=mv,
        reward=float(reward) if isinstance(reward, (int, float)) else None,
        extra=_extra(extra), **const)
    return nulls


def _extra(d: dict[str, Any]) -> str | None:
    d = {k: v for k, v in d.items() if v is not None}
    return json.dumps(d, sort_keys=True) if d else None


# ---------------------------------------------------------------------- fast path
# Lines are parsed in blocks by pyarrow's JSON reader (C++, threaded) into Arrow list arrays and
# checked with vectorised numpy; a block that fails to parse or to check is read again line by
# line with ``_add``, which imports it or names the bad line.
_BLOCK_BYTES = 16 << 20
_META = pa.struct([("model_version", pa.int64()), ("rollout_index", pa.int64()), ("step_index", pa.int64())])
_RECORD = pa.struct([
    ("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64())), ("logprobs", pa.list_(pa.float64())),
    ("reward", pa.float64()), ("group_id", pa.string()), ("finished", pa.bool_()), ("n_predicted", pa.int64()),
    ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("metadata", _META),
])
_PARSE = pa_json.ParseOptions(explicit_schema=pa.schema([("g", pa.list_(_RECORD))]), unexpected_field_behavior="ignore")


def _read_stream(sink: ImportSink, hf: HashedFile, split: str, const: dict[str, Any], versions: set[int]) -> int:
    """Parse block n+1 (pyarrow releases the GIL) while block n is checked and written."""
    nulls = 0
    with ThreadPoolExecutor(1, thread_name_prefix="tracekit-import-parse") as pool:
        pending = None
        for first, block in hf.blocks(_BLOCK_BYTES):
            nxt = (first, block, pool.submit(_parse, block))
            if pending is not None:
                nulls += _read_block(sink, hf, *pending, split, const, versions)
            pending = nxt
        if pending is not None:
            nulls += _read_block(sink, hf, *pending, split, const, versions)
    return nulls


def _parse(block: bytes) -> pa.Table | None:
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
    longest = int(np.diff(ends, prepend=-1).max())
    data = b'{"g":' + block[:-1].replace(b"\n", b'}\n{"g":') + b"}\n"  # one object per line: [..] -> {"g": [..]}
    try:
        return pa_json.read_json(io.BytesIO(data), parse_options=_PARSE,
                                 read_options=pa_json.ReadOptions(block_size=max(1 << 20, 2 * longest)))
    except (pa.ArrowException, ValueError):
        return None


def _read_block(sink: ImportSink, hf: HashedFile, first: int, block: bytes, parsed: Future[pa.Table | None],
                split: str, const: dict[str, Any], versions: set[int]) -> int:
    t = parsed.result()
    try:
        cols = _columns(t, split, const, versions) if t is not None else None
    except (pa.ArrowException, ValueError):
        cols = None
    if cols is not None:
        nulls = cols.pop("_nulls")
        sink.add_block(**cols)
        return nulls
    nulls = 0
    for lineno, line in enumerate(block.split(b"\n")[:-1], first):  # imports the block, or names the bad line
        if not line.strip():
            continue
        group = parse_json_line(hf, lineno, line)
        if not isinstance(group, list):
            raise SourceError(f"{hf.path}:{lineno}: not a PipelineRL group (a JSON array of TrainingText records)")
        for j, rec in enumerate(group):
            nulls += _add(sink, rec, const, split, f"{hf.path}:{lineno}: record {j}", versions)
    return nulls


def _np(a: pa.Array, dtype: Any) -> np.ndarray:
    return np.array(a.to_numpy(zero_copy_only=False), dtype=dtype)  # a writable copy


def _columns(t: pa.Table, split: str, const: dict[str, Any], versions: set[int]) -> dict[str, Any] | None:
    """The block as sink columns, or None when anything needs the per-line path."""
    g = t.column("g").combine_chunks()
    if g.null_count:
        return None
    recs = g.flatten()
    if len(recs) == 0 or recs.null_count:
        return None
    ids, labels, lps = (recs.field(k) for k in ("input_ids", "labels", "logprobs"))
    if ids.null_count or labels.null_count or lps.null_count:
        return None
    n_ids = _np(pc.list_value_length(ids), np.int64)
    n_lp = _np(pc.list_value_length(lps), np.int64)
    if not np.array_equal(n_ids, _np(pc.list_value_length(labels), np.int64)) or np.any(n_lp > n_ids):
        return None
    flat_ids = _np(ids.flatten(), np.int64)
    flat_labels = _np(labels.flatten(), np.int64)
    n_prompt = n_ids - n_lp
    local = np.arange(len(flat_ids), dtype=np.int64) - np.repeat(np.cumsum(n_ids) - n_ids, n_ids)
    is_out = local >= np.repeat(n_prompt, n_ids)
    if np.any(flat_labels[~is_out] != MASKED) or np.any(flat_labels[is_out] != flat_ids[is_out]):
        return None
    flat_lp = lps.flatten()
    lp = _np(flat_lp, np.float32)
    if flat_lp.null_count:
        lp[~_np(flat_lp.is_valid(), bool)] = np.nan
    mv = pc.struct_field(recs, ["metadata", "model_version"])
    mv_np = _np(mv.fill_null(0), np.int64)
    if np.any(mv_np < 0):  # a negative version: the per-line path names it
        return None
    if mv.null_count:
        mv_np[~_np(mv.is_valid(), bool)] = -1
    versions.update(np.unique(mv_np[mv_np >= 0]).tolist())
    meta = {k: pc.struct_field(recs, ["metadata", k]).to_pylist() for k in ("rollout_index", "step_index")}
    scal = {k: recs.field(k).to_pylist() for k in ("finished", "n_predicted", "prompt_tokens", "output_tokens")}
    finished = scal["finished"]
    # The usual record (every field set) formatted directly: json.dumps per record costs ~7% of
    # the import; the result is the same text (keys sorted, json.dumps separators).
    tmpl = ('{"finished": %s, "n_predicted": %d, "output_tokens": %d, "prompt_tokens": %d, "split": '
            + json.dumps(split) + ', "step_index": %d}')
    extra = [tmpl % ("true" if f else "false", n, o, p, si)
             if type(f) is bool and type(n) is int and type(o) is int and type(p) is int and type(si) is int else
             _extra({"split": split, "finished": f, "n_predicted": n, "prompt_tokens": p, "output_tokens": o,
                     "step_index": si})
             for f, n, p, o, si in zip(finished, scal["n_predicted"], scal["prompt_tokens"], scal["output_tokens"],
                                       meta["step_index"])]
    n = len(recs)
    mv_col = pa.array(mv_np, mask=mv_np < 0, type=pa.int64())
    columns: dict[str, Any] = {
        "group_id": recs.field("group_id"), "sample_idx": pa.array(meta["rollout_index"], pa.int32()),
        "finish_reason": pa.array(["length" if f is False else None for f in finished], pa.string()),
        "weight_version_start": mv_col, "weight_version_end": mv_col,
        "reward": recs.field("reward").cast(pa.float32()), "extra": pa.array(extra, pa.string()),
    }
    for k, v in const.items():
        columns[k] = [jsonish(v)] * n
    return {"columns": columns, "output": flat_ids[is_out], "output_lens": n_lp, "prompt": flat_ids[~is_out],
            "prompt_lens": n_prompt, "logprob": lp, "version": np.repeat(mv_np, n_lp),
            "_nulls": int(np.isnan(lp).sum())}


def _engine(sink: ImportSink, cfg: dict[str, Any], model: str | None, cfg_path: Path | None) -> dict[str, Any]:
    kwargs = get_path(cfg, "vllm_config.vllm_kwargs") or {}
    args = {k.replace("-", "_"): (True if v == "" else v) for k, v in kwargs.items()}
    model_path = model or get_path(cfg, "model_path")
    eid = "import-pipelinerl-" + hashlib.sha256(repr(sorted(args.items())).encode()).hexdigest()[:12]
    row, defaults = engine_row(eid, args, model_path, known=bool(cfg), extra={
        "source_format": "pipelinerl", "config": str(cfg_path) if cfg_path else None,
        "engine": "vllm (OpenAI server started by PipelineRL's launcher)",
        "llm_urls": get_path(cfg, "me.llm_urls"), "world": get_path(cfg, "world")})
    sink.add_engine(row)
    note_engine_nulls(sink, "PipelineRL", row)
    return {"engine_id": eid, "defaults": defaults}


def _null_reasons(sink: ImportSink, cfg: dict[str, Any], null_lp: int, cfg_path: Path | None) -> None:
    if null_lp:
        sink.null("tokens.logprob", f"null at {null_lp} position(s) where the stream holds null "
                                    "(orjson writes NaN and ±inf as null)")
    sink.null("requests.step", "PipelineRL records no trainer step per sample; metadata.model_version "
                               "(trainer samples seen at the last weight broadcast) is in weight_version_*")
    sink.null("requests.finish_reason", "PipelineRL keeps only finished = (finish_reason != 'length'): "
                                        "'length' where finished is false, null where it is true (stop, tool call, ...)")
    sink.null("requests.stop_reason", "not in TrainingText")
    sink.null("requests.seed", "PipelineRL sends no seed")
    sink.null("requests.num_cached_tokens", "vLLM's usage.prompt_tokens_details is not kept in TrainingText")
    null_all(sink, ("t_submit", "t_first_token", "t_finish"), "TrainingText has no timestamps")
    sink.null("requests.engine_request_id", "the OpenAI response id is not kept")
    sink.null("tokens.top_token_ids", "PipelineRL asks for logprobs=1 and keeps only the sampled token's")
    sink.null("tokens.top_logprobs", "PipelineRL asks for logprobs=1 and keeps only the sampled token's")
    sink.null("trainer", "PipelineRL streams no trainer-side logprobs (ref_logprobs are the reference model's, "
                         "filled by the preprocessor in training_data, not the actor stream)")
    sink.null("rewards", "the reward is known per sample: requests.reward")
    sink.null("weights", "PipelineRL keeps no weight snapshot per version; replay uses --model for every version")
    sink.null("weight_syncs", "weight_update_request has versions and times, but samples carry no time to align them")
    if not cfg:
        why = "no run config (conf/exp_config.yaml) found or given with --config"
        null_all(sink, ("sampling_requested", "sampling_resolved", "temperature", "top_p", "top_k", "min_p",
                        "max_tokens"), why)
        sink.null("engines", why + ": the engine row holds only what the stream implies")
