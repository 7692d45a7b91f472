"""What every importer shares: hashed streaming reads of the input files, and a sink that streams
rows into a ``TraceWriter`` of kind "import" inside a hidden temp directory, renamed into place
only when the whole import succeeded (a failed or interrupted import leaves nothing at ``--out``).

The sink buffers requests and their tokens as numpy arrays and hands them to the writer as Arrow
tables of about ``TOKEN_BATCH`` tokens, waiting for each batch to be on disk before taking the
next: memory stays bounded by one batch whatever the size of the input.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import SourceError, TraceFormatError
from ..schema import table as get_table
from ..store.location import RemotePath, as_root, copy_path
from ..store.manifest import MANIFEST
from ..store.parquet import fsync_dir
from ..store.writer import TraceWriter

TOKEN_BATCH = 1 << 20  # tokens per batch handed to the writer (and flushed) at once
SYNC_TOKENS = 4 * TOKEN_BATCH  # block imports: tokens between waits for the writer
_READ_BLOCK = 1 << 22


@dataclass
class ImportResult:
    """What an import wrote: the trace, its provenance block (trace.json ``import``) and counts."""

    path: Path
    source_format: str
    source_version: str
    requests: int
    tokens: int
    seconds: float
    files: list[dict[str, Any]]
    null_fields: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------- reading inputs
class HashedFile:
    """One input file, read once in blocks; every byte read also goes into its sha256."""

    def __init__(self, path: str | os.PathLike[str], root: Path | None = None) -> None:
        self.path = Path(path)
        try:
            self.name = str(self.path.resolve().relative_to(Path(root).resolve())) if root is not None else str(self.path)
        except ValueError:  # outside the source directory (a --config elsewhere)
            self.name = str(self.path)
        self._sha = hashlib.sha256()
        self.size = 0

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, line without its newline). A last line without a newline is a
        write cut short: SourceError, so a truncated dump never imports as if it were whole."""
        for first, block in self.blocks(_READ_BLOCK):
            yield from enumerate(block.split(b"\n")[:-1], first)

    def blocks(self, size: int) -> Iterator[tuple[int, bytes]]:
        """(number of the block's first line, about ``size`` bytes of whole lines, each ending in
        a newline). Truncation is refused as in ``lines``."""
        lineno = 1
        rest = b""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below, generator
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read ({e.strerror or e})") from None
        with f:
            while True:
                chunk = f.read(max(size, _READ_BLOCK))
                if not chunk:
                    break
                self._sha.update(chunk)
                self.size += len(chunk)
                buf = rest + chunk
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    rest = buf
                    continue
                block, rest = buf[:cut], buf[cut:]
                yield lineno, block
                lineno += block.count(b"\n")
        if rest.strip():
            raise SourceError(f"{self.path}: truncated: line {lineno} has no end of line (the write was cut short)")

    def read_bytes(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self._sha.update(data)
        self.size += len(data)
        return data

    def hash_only(self) -> None:
        """Hash a file another reader (pyarrow, torch) consumes."""
        try:
            with open(self.path, "rb") as f:
                while chunk := f.read(_READ_BLOCK):
                    self._sha.update(chunk)
                    self.size += len(chunk)
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def record(self) -> dict[str, Any]:
        return {"path": self.name, "sha256": self._sha.hexdigest(), "bytes": self.size}


def parse_json_line(f: HashedFile, lineno: int, line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{f.path}:{lineno}: not JSON ({str(e).splitlines()[0][:80]})") from None


def load_config(path: str | os.PathLike[str] | None, root: Path | None = None) -> tuple[dict[str, Any], HashedFile | None]:
    """A run config (YAML or JSON) as a plain dict, with its hashed file. YAML is read with
    ``yaml.safe_load`` (no tags, no objects): a config never runs code either."""
    if path is None:
        return {}, None
    hf = HashedFile(path, root)
    data = hf.read_bytes()
    try:
        if Path(path).suffix == ".json":
            cfg = json.loads(data)
        else:
            try:
                import yaml
            except ImportError:
                raise SourceError(f"{path}: reading a YAML config needs PyYAML (pip install pyyaml)") from None
            cfg = yaml.safe_load(data)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad input
        raise SourceError(f"{path}: not a readable config ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"{path}: not a config (top level is not a mapping)")
    return _resolve_interpolations(cfg), hf


def _resolve_interpolations(cfg: dict[str, Any]) -> dict[str, Any]:
    """OmegaConf.save keeps ``${a.b}`` references unresolved: resolve the plain ones (a whole value
    that names another key); anything fancier stays as text."""

    def walk(v: Any, depth: int = 0) -> Any:
        if isinstance(v, dict):
            return {k: walk(x, depth) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, depth) for x in v]
        if isinstance(v, str) and v.startswith("${") and v.endswith("}") and v.count("${") == 1 and depth < 8:
            ref = v[2:-1]
            default: Any = None
            if ref.startswith("oc.select:"):  # ${oc.select:path,default}
                ref, _, dflt = ref[len("oc.select:"):].partition(",")
                default = _scalar(dflt) if dflt else None
            target = get_path(cfg, ref.strip())
            if target is None:
                target = default
            return v if target is None else walk(target, depth + 1)
        return v

    return walk(cfg)


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def get_path(d: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


@dataclass
class Source:
    """An import's inputs: the dump files, the directory paths are recorded against, the config."""

    paths: list[Path]
    root: Path
    cfg: dict[str, Any]
    files: list[HashedFile]  # hashed as they are read; the config first


def open_source(src: str | os.PathLike[str], config: str | os.PathLike[str] | None,
                find: Any) -> Source:
    """``src`` as one file or a directory ``find(dir)`` lists the dump files of, plus ``config``."""
    src = Path(src)
    if src.is_file():
        paths = [src]
    elif src.is_dir():
        paths = find(src)
    else:
        raise SourceError(f"{src}: no such file or directory")
    root = src if src.is_dir() else src.parent
    cfg, cfg_file = load_config(config, root)
    return Source(paths, root, cfg, [cfg_file] if cfg_file else [])


def null_all(sink: Any, columns: Any, why: str, table: str = "requests") -> None:
    for c in columns:
        sink.null(f"{table}.{c}", why)


# ---------------------------------------------------------------------- sampling params
# vLLM's SamplingParams() defaults for the fields a generation_config can set (as
# tracekit.causes.context.VLLM_SAMPLING_DEFAULTS; top_k 0 = off since vLLM 0.8, -1 before).
VLLM_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
RESOLVED_COLUMNS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")


def resolve_sampling(requested: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a vLLM engine resolves ``requested`` to: its own defaults, then the generation_config
    defaults it applies (``defaults``; None = unknown, e.g. mode 'auto' without the model dir),
    then what the caller set."""
    if defaults is None:
        return None
    return {**VLLM_DEFAULTS, **defaults, **{k: v for k, v in requested.items() if v is not None}}


def resolved_columns(resolved: Mapping[str, Any] | None) -> dict[str, Any]:
    if not resolved:
        return {}
    return {k: resolved[k] for k in RESOLVED_COLUMNS if resolved.get(k) is not None}


# ---------------------------------------------------------------------- the sink
class _Batch:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.prompt: list[np.ndarray | None] = []
        self.output: list[np.ndarray] = []
        self.logprob: list[np.ndarray | None] = []
        self.version: list[np.ndarray | int | None] = []
        self.trainer: list[np.ndarray | None] = []
        self.tokens = 0


class ImportSink:
    """Streams imported requests into a new trace at ``out``, atomically.

    Use as a context manager: leaving it by an exception removes the temp directory; ``commit``
    renames it into place and writes the provenance block into trace.json."""

    def __init__(self, out: str | os.PathLike[str], *, source_format: str) -> None:
        self.out = as_root(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise TraceFormatError(f"{self.out}: already exists; an import never writes into an existing path")
        self.source_format = source_format
        if isinstance(self.out, RemotePath):
            # An object store has no rename: build the trace locally, upload it at commit with
            # trace.json last, so the prefix is not a trace until every part is there.
            self.tmp = Path(tempfile.mkdtemp(prefix="tracekit-import-")) / "trace"
        else:
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TraceFormatError(f"{self.out.parent}: cannot create ({e.strerror or e})") from None
            self.tmp = self.out.parent / f".{self.out.name}.import-{uuid.uuid4().hex[:8]}.tmp"
        self.writer = TraceWriter(self.tmp, kind="import", flush_interval=3600.0, part_max_rows=TOKEN_BATCH,
                                  max_queue_rows=8 * TOKEN_BATCH)
        if not self.writer.ok:
            self._abort()
            raise TraceFormatError(f"{self.out}: cannot write the trace ({'; '.join(self.writer.stats().errors)})")
        self.run_id = self.writer.run_id
        self.null_fields: dict[str, str] = {}
        self.notes: list[str] = []
        self.requests = 0
        self.tokens = 0
        self._filled: set[str] = set()
        self._b = _Batch()
        self._unsynced = 0
        self._t0 = time.perf_counter()
        self._done = False

    # -------------------------------------------------------------- context manager
    def __enter__(self) -> ImportSink:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if not self._done:
            self._abort()

    def _abort(self) -> None:
        self._done = True
        try:
            self.writer.close(timeout=10.0)
        finally:
            shutil.rmtree(self.tmp.parent if isinstance(self.out, RemotePath) else self.tmp, ignore_errors=True)

    # -------------------------------------------------------------- rows
    def null(self, column: str, reason: str) -> None:
        """Say why ``table.column`` is null (wholly or where noted) in this import."""
        self.null_fields.setdefault(column, reason)

    def add_engine(self, row: Mapping[str, Any]) -> None:
        r = {"run_id": self.run_id, "created_at": _dt.datetime.now(_dt.timezone.utc), **row}
        self._filled.update(f"engines.{k}" for k, v in r.items() if v is not None)
        self.writer.write("engines", {k: jsonish(v) for k, v in r.items()})

    def add_request(
        self,
        *,
        output: np.ndarray,
        prompt: np.ndarray | None,
        logprob: np.ndarray | None = None,
        version: np.ndarray | int | None = None,
        trainer: np.ndarray | None = None,
        **fields: Any,
    ) -> int:
        """Queue one sample. ``logprob`` / ``version`` / ``trainer`` arrays align with ``output``;
        NaN in ``logprob`` or ``trainer`` and -1 in a ``version`` array mean null at that position.
        ``fields`` are requests columns (dicts become JSON)."""
        rid = self.requests + len(self._b.rows)
        n = len(output)
        for name, arr in (("logprob", logprob), ("version", version), ("trainer", trainer)):
            if isinstance(arr, np.ndarray) and len(arr) != n:
                raise SourceError(f"request {rid}: {len(arr)} {name} values for {n} tokens")
        row = {"request_id": rid, **fields}
        b = self._b
        b.rows.append(row)
        b.prompt.append(prompt)
        b.output.append(output)
        b.logprob.append(logprob)
        b.version.append(version)
        b.trainer.append(trainer)
        b.tokens += n
        if b.tokens >= TOKEN_BATCH:
            self.flush()
        return rid

    def flush(self) -> None:
        """Write the queued requests (and their tokens) and wait until they are on disk."""
        b, self._b = self._b, _Batch()
        if b.rows:
            lens = np.fromiter((len(o) for o in b.output), dtype=np.int64, count=len(b.output))
            plens = np.fromiter((0 if p is None else len(p) for p in b.prompt), dtype=np.int64, count=len(b.prompt))
            keys = dict.fromkeys(k for r in b.rows for k in r)
            cols = {k: [jsonish(r.get(k)) for r in b.rows] for k in keys if k not in ("request_id", "run_id", "surface")}
            lp = _concat([x if x is not None else np.full(n, np.nan, np.float32) for x, n in zip(b.logprob, lens)],
                         np.float32)
            vs = [v.astype(np.int64) if isinstance(v, np.ndarray) else np.full(n, -1 if v is None else int(v), np.int64)
                  for v, n in zip(b.version, lens)]
            self._write_block(
                columns=cols, output=_concat(b.output, np.int32), output_lens=lens,
                prompt=_concat([p for p in b.prompt if p is not None], np.int32), prompt_lens=plens,
                prompt_null=np.array([p is None for p in b.prompt]), logprob=lp, version=_concat(vs, np.int64),
                trainer=b.trainer if any(t is not None for t in b.trainer) else None, steps=[r.get("step") for r in b.rows])
        self._sync()

    def add_block(self, *, columns: Mapping[str, Any], output: np.ndarray, output_lens: np.ndarray,
                  prompt: np.ndarray, prompt_lens: np.ndarray, logprob: np.ndarray | None,
                  version: np.ndarray | None) -> None:
        """Queue many requests at once, as columns (the fast path of the JSONL importers):
        ``columns`` are per-request requests columns (lists or Arrow arrays), ``output`` /
        ``prompt`` the concatenated token ids with their per-request lengths, ``logprob`` (NaN =
        null) and ``version`` (-1 = null) per output token."""
        if self._b.rows:  # queued row-wise requests first: ids stay in file order
            self.flush()
        self._write_block(columns=columns, output=output, output_lens=output_lens, prompt=prompt,
                          prompt_lens=prompt_lens, prompt_null=None, logprob=logprob, version=version)
        # The writer thread turns every TOKEN_BATCH queued tokens into a part while the next block
        # is parsed; requests (few rows, long prompt lists) wait in its buffer until a sync, so
        # sync every few batches: memory stays bounded and requests parts stay large.
        if self._unsynced >= SYNC_TOKENS:
            self._sync()

    def _write_block(self, *, columns: Mapping[str, Any], output: np.ndarray, output_lens: np.ndarray,
                     prompt: np.ndarray | None, prompt_lens: np.ndarray, prompt_null: np.ndarray | None,
                     logprob: np.ndarray | None, version: np.ndarray | None,
                     trainer: list[np.ndarray | None] | None = None, steps: list[Any] | None = None) -> None:
        n_req = len(output_lens)
        ids = np.arange(self.requests, self.requests + n_req, dtype=np.int64)
        self.requests += n_req
        total = int(output_lens.sum())
        self.tokens += total
        self._unsynced += total
        schema = get_table("requests").arrow_schema
        cols: dict[str, Any] = {"request_id": pa.array(ids), "run_id": pa.array([self.run_id] * n_req, pa.string()),
                                "surface": pa.array(["import"] * n_req, pa.string())}
        for k, v in columns.items():
            arr = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, type=schema.field(k).type)
            cols[k] = arr
            if arr.null_count < len(arr):
                self._filled.add(f"requests.{k}")
        cols["output_token_ids"] = _list_array(output, output_lens)
        cols["prompt_token_ids"] = _list_array(prompt, prompt_lens, prompt_null)
        self._filled.update(("requests.output_token_ids", "tokens.request_id", "tokens.pos", "tokens.token_id"))
        if prompt_null is None or not prompt_null.all():
            self._filled.add("requests.prompt_token_ids")
        self.writer.write("requests", pa.table(cols))
        if total:
            starts = np.repeat(np.cumsum(output_lens) - output_lens, output_lens)
            tcols: dict[str, Any] = {
                "request_id": pa.array(np.repeat(ids, output_lens)),
                "pos": pa.array((np.arange(total, dtype=np.int64) - starts).astype(np.int32)),
                "token_id": pa.array(np.asarray(output, np.int32)),
            }
            if logprob is not None:
                mask = np.isnan(logprob)
                if not mask.all():
                    self._filled.add("tokens.logprob")
                tcols["logprob"] = pa.array(np.asarray(logprob, np.float32), mask=mask if mask.any() else None)
            if version is not None:
                vmask = version < 0
                if not vmask.all():
                    self._filled.add("tokens.weight_version")
                tcols["weight_version"] = pa.array(version, mask=vmask if vmask.any() else None, type=pa.int64())
            self.writer.write("tokens", pa.table(tcols))
        if trainer is not None:
            self.writer.write("trainer", self._trainer_table(ids, output_lens, trainer, version, steps or []))

    def _trainer_table(self, ids: np.ndarray, lens: np.ndarray, trainer: list[np.ndarray | None],
                       version: np.ndarray | None, steps: list[Any]) -> pa.Table:
        rid, pos, lp, pv, st = [], [], [], [], []
        off = np.cumsum(lens) - lens
        for i, t in enumerate(trainer):
            if t is None:
                continue
            keep = ~np.isnan(t)
            k = int(keep.sum())
            rid.append(np.full(k, ids[i], np.int64))
            pos.append(np.arange(lens[i], dtype=np.int32)[keep])
            lp.append(t[keep].astype(np.float32))
            v = version[off[i]:off[i] + lens[i]] if version is not None else np.full(lens[i], -1, np.int64)
            pv.append(v[keep])
            st.append(np.full(k, -1 if steps[i] is None else int(steps[i]), np.int64))
        self._filled.add("trainer.logprob")
        pvc, stc = np.concatenate(pv), np.concatenate(st)
        return pa.table({
            "request_id": pa.array(np.concatenate(rid)), "pos": pa.array(np.concatenate(pos)),
            "logprob": pa.array(np.concatenate(lp)),
            "policy_version": pa.array(pvc, mask=pvc < 0), "step": pa.array(stc, mask=stc < 0),
        })

    def _sync(self) -> None:
        self._unsynced = 0
        if not self.writer.flush(timeout=None):
            raise TraceFormatError(f"{self.out}: writing the trace timed out")
        st = self.writer.stats()
        if st.dropped or st.errors:
            raise TraceFormatError(f"{self.out}: writing the trace failed: {(st.errors or ['rows dropped'])[-1]}")

    # -------------------------------------------------------------- commit
    def commit(self, *, source_version: str, files: list[HashedFile], extra: Mapping[str, Any] | None = None) -> ImportResult:
        """Write the last batch, close the writer, record provenance, rename into place."""
        self.flush()
        if self.requests == 0:
            raise SourceError(f"no {self.source_format} samples found in the input")
        st = self.writer.close(timeout=None)
        if st.dropped or st.errors or st.rows_pending:
            raise TraceFormatError(f"{self.out}: writing the trace failed: {(st.errors or ['rows dropped'])[-1]}")
        for t in ("requests", "tokens", "engines"):
            for c in get_table(t).columns:
                key = f"{t}.{c.name}"
                if key not in self._filled:
                    self.null_fields.setdefault(key, f"the {self.source_format} dump has no such field")
        for t in ("trainer", "rewards", "weights", "weight_syncs"):
            if not any(k.startswith(f"{t}.") for k in self._filled):
                self.null_fields.setdefault(t, f"the {self.source_format} dump holds no {t} rows")
        seconds = time.perf_counter() - self._t0
        block = {
            "source_format": self.source_format,
            "source_version": source_version,
            "files": [f.record() for f in files],
            "null_fields": dict(sorted(self.null_fields.items())),
            "notes": list(self.notes),
            "requests": self.requests,
            "tokens": self.tokens,
            **(extra or {}),
        }
        mpath = self.tmp / MANIFEST
        m = json.loads(mpath.read_text())
        m["import"] = block
        tmp = self.tmp / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(m, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mpath)
        fsync_dir(self.tmp)
        if isinstance(self.out, RemotePath):
            self._upload()
        else:
            try:
                os.rename(self.tmp, self.out)
            except OSError as e:
                raise TraceFormatError(f"{self.out}: cannot move the finished import into place ({e.strerror or e})") from None
            fsync_dir(self.out.parent)
        self._done = True
        return ImportResult(self.out, self.source_format, source_version, self.requests, self.tokens, seconds,
                            block["files"], block["null_fields"], list(self.notes))

    def _upload(self) -> None:
        assert isinstance(self.out, RemotePath)
        try:
            for p in sorted(self.tmp.iterdir()):
                if p.name != MANIFEST:
                    copy_path(p, self.out / p.name)
            copy_path(self.tmp / MANIFEST, self.out / MANIFEST)  # last: now it is a trace
        except OSError as e:
            raise TraceFormatError(f"{self.out}: cannot upload the finished import ({str(e).splitlines()[0]})") from None
        finally:
            shutil.rmtree(self.tmp.parent, ignore_errors=True)


def jsonish(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray | None:
    if not parts:
        return None
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts])


def _list_array(values: np.ndarray | None, lens: np.ndarray, nulls: np.ndarray | None = None) -> pa.Array:
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    vals = pa.array(np.asarray(values if values is not None else np.zeros(0), np.int32), type=pa.int32())
    mask = np.concatenate([nulls, [False]]) if nulls is not None and nulls.any() else None
    return pa.ListArray.from_arrays(pa.array(offsets, mask=mask, type=pa.int32()), vals)
