"""Weight snapshots as content-addressed safetensors blobs.

One blob per tensor at ``weights/blobs/<sha[:2]>/<sha>.safetensors``, where sha is the sha256 of
the blob file. A tensor that did not change between versions has the same bytes, hence the same
blob: frozen layers are stored once. Blobs are only ever read with safetensors (never pickle) and
only after their sha256 matches the ``weights`` row that names them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from ..errors import TracekitError, WeightsError
from .location import RemotePath, TraceRoot, as_root
from .parquet import fsync_dir

if TYPE_CHECKING:
    from .reader import Trace

BLOB_DIR = Path("weights") / "blobs"
_KEY = "tensor"  # the single key inside every blob


def blob_path(root: str | Path | RemotePath, sha: str) -> TraceRoot:
    return as_root(root) / BLOB_DIR / sha[:2] / f"{sha}.safetensors"


def _serialize(t: Any) -> tuple[bytes, str, list[int]]:
    """safetensors bytes of one tensor (torch or numpy), its dtype name and shape."""
    if type(t).__module__.startswith("torch"):
        import safetensors.torch as st

        data = st.save({_KEY: t.detach().to("cpu").contiguous()})
    else:
        import numpy as np
        import safetensors.numpy as sn

        data = sn.save({_KEY: np.ascontiguousarray(t)})
    n = int.from_bytes(data[:8], "little")
    import json

    info = json.loads(data[8 : 8 + n])[_KEY]
    return data, info["dtype"], list(info["shape"])


def put_tensors(
    root: TraceRoot, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], *, version: int, step: int | None,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Store each tensor as a blob (skipping ones already present); return ``weights`` rows.

    Blobs are written before their rows are queued, so a row never names a blob that is not
    complete on disk (temp file, fsync, rename).
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    now = _dt.datetime.now(_dt.timezone.utc)
    rows = []
    created: list[TraceRoot] = []
    try:
        return _put(root, items, version, step, run_id, now, rows, created)
    except BaseException:
        # A snapshot that fails half-way (full disk) has no rows: drop the blobs it created so
        # they do not keep eating the space the trace's parts need.
        for p in created:
            p.unlink(missing_ok=True)
        raise


def _put(root: TraceRoot, items: Iterable[tuple[str, Any]], version: int, step: int | None, run_id: str | None,
         now: _dt.datetime, rows: list[dict[str, Any]], created: list[TraceRoot]) -> list[dict[str, Any]]:
    for name, t in items:
        data, dtype, shape = _serialize(t)
        sha = hashlib.sha256(data).hexdigest()
        path = blob_path(root, sha)
        if isinstance(path, RemotePath):  # content-addressed: an object appears whole or not at all
            if not path.exists():
                path.write_bytes(data)
                created.append(path)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # threads too
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                created.append(path)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk must not keep a half blob eating space
                raise
            fsync_dir(path.parent)
        rows.append(
            dict(version=version, step=step, name=name, sha256=sha, dtype=dtype, shape=shape,
                 nbytes=len(data) - 8 - int.from_bytes(data[:8], "little"), created_at=now, run_id=run_id)
        )
    return rows


def read_blob(root: str | Path | RemotePath, sha: str) -> bytes:
    """The verified bytes of one blob; WeightsError if missing or if the hash does not match."""
    path = blob_path(root, sha)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"weight blob {sha[:12]} is missing ({path})") from None
    except OSError as e:
        raise WeightsError(f"weight blob {sha[:12]} unreadable: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise WeightsError(f"weight blob {path} fails its sha256 check (got {got[:12]}, want {sha[:12]})")
    _check_safetensors(data, path)
    return data


def _check_safetensors(data: bytes, path: TraceRoot) -> None:
    import json

    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n <= 0 or 8 + n > len(data):
            raise ValueError("bad header length")
        header = json.loads(data[8 : 8 + n])
        if _KEY not in header:
            raise ValueError(f"no {_KEY!r} entry")
    except Exception as e:
        raise WeightsError(f"weight blob {path} is not a tracekit safetensors blob ({e})") from None


def snapshot_rows(trace: Trace, version: int) -> list[tuple[str, str]]:
    """(name, sha256) of every tensor of ``version``; WeightsError when there is no snapshot."""
    con = trace.connect(read_only=False, check_parts=False)
    try:
        rows = con.execute(
            "SELECT name, sha256 FROM weights WHERE version = ? ORDER BY name", [version]
        ).fetchall()
    except duckdb.Error as e:  # a corrupt weights part
        raise WeightsError(f"cannot read the weights table of {trace.root}: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
    if not rows:
        raise WeightsError(f"no weight snapshot for version {version} in {trace.root}")
    return rows


def load_snapshot(trace: Trace, version: int) -> dict[str, Any]:
    """Verified torch tensors of one version, keyed by checkpoint tensor name."""
    import safetensors.torch as st

    return {name: st.load(read_blob(trace.root, sha))[_KEY] for name, sha in snapshot_rows(trace, version)}


def export_snapshot(trace: Trace, version: int, out_dir: Path, *, like: Path | None = None) -> Path:
    """Write ``version`` as ``out_dir/model.safetensors`` (what vLLM's reload_weights reads).

    ``like``: a model directory whose config.json / generation_config.json / tokenizer files are
    copied beside it, because vLLM re-reads generation defaults from the reload path.
    """
    import shutil

    import safetensors.torch as st

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TracekitError(f"{out_dir}: exists and is not a directory (the output is a directory; "
                            "model.safetensors is written into it)")
    tensors = load_snapshot(trace, version)  # verify everything before creating anything
    out_dir.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(out_dir / "model.safetensors"))
    if like is not None:
        for p in Path(like).iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and p.name != "model.safetensors.index.json":
                shutil.copy2(p, out_dir / p.name)
    return out_dir


def verify(trace: Trace) -> list[str]:
    """Problems with the weight blobs the ``weights`` table names (empty list: all good)."""
    con = trace.connect(read_only=False, check_parts=False)
    try:
        rows = con.execute("SELECT DISTINCT sha256 FROM weights ORDER BY 1").fetchall()
    except duckdb.Error as e:  # a corrupt weights part
        return [f"cannot read the weights table: {str(e).splitlines()[0]}"]
    finally:
        con.close()
    problems = []
    for (sha,) in rows:
        try:
            read_blob(trace.root, sha)
        except WeightsError as e:
            problems.append(str(e))
    return problems
