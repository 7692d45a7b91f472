"""trace.json: create it once, atomically; check it on every open."""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import TraceFormatError
from ..schema import FORMAT_NAME, FORMAT_VERSION, schema_hashes, tables
from .location import RemotePath, as_root
from .parquet import fsync_dir

MANIFEST = "trace.json"


def new_manifest(meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tracekit_version": __version__,
        "trace_id": uuid.uuid4().hex,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "schema_hashes": schema_hashes(),
        "meta": meta or {},
    }


def read_manifest(root: str | Path | RemotePath) -> dict[str, Any]:
    """Parse and check ``root/trace.json``; raise TraceFormatError with a one-line reason."""
    root = as_root(root)
    if not root.exists():
        raise TraceFormatError(f"{root}: no such trace directory")
    if not root.is_dir():
        raise TraceFormatError(f"{root}: not a trace (not a directory)")
    path = root / MANIFEST
    if not path.exists():
        raise TraceFormatError(f"{root}: not a trace (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFormatError(f"{path}: corrupt manifest ({_short(e)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{path}: not a tracekit manifest (format != {FORMAT_NAME!r})")
    v = m.get("format_version")
    if not isinstance(v, int):
        raise TraceFormatError(f"{path}: corrupt manifest (format_version {v!r} is not an integer)")
    if v > FORMAT_VERSION:
        raise TraceFormatError(
            f"{path}: trace format version {v} is newer than this tracekit supports "
            f"({FORMAT_VERSION}); upgrade tracekit"
        )
    if v < FORMAT_VERSION:
        raise TraceFormatError(
            f"{path}: trace format version {v} is older than this tracekit reads ({FORMAT_VERSION})"
        )
    hashes = m.get("schema_hashes")
    if not isinstance(hashes, dict):
        raise TraceFormatError(f"{path}: corrupt manifest (schema_hashes missing)")
    ours = tables()
    for name, h in hashes.items():
        if name in ours and h not in ours[name].readable_hashes:
            raise TraceFormatError(
                f"{path}: table {name!r} was written with a different schema than this tracekit's "
                f"(hash {str(h)[:12]} != {ours[name].hash[:12]}) at the same format version"
            )
    return m


def ensure_manifest(root: str | Path | RemotePath, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create the trace at ``root`` if it does not exist yet, else check it is compatible.

    Safe against concurrent creators: the manifest is linked into place, which fails if another
    process got there first, and then that one's manifest is checked instead.
    """
    root = as_root(root)
    if isinstance(root, RemotePath):
        return _ensure_remote(root, meta)
    path = root / MANIFEST
    if path.exists():
        return read_manifest(root)
    if root.exists() and not root.is_dir():
        raise TraceFormatError(f"{root}: not a directory")
    if root.exists() and any(not p.name.startswith(f".{MANIFEST}.") for p in root.iterdir()):
        if path.exists():  # another process created it meanwhile
            return read_manifest(root)
        # Refuse to scatter parts into an unrelated directory.
        raise TraceFormatError(f"{root}: directory is not empty and has no {MANIFEST}; not a trace")
    root.mkdir(parents=True, exist_ok=True)
    m = new_manifest(meta)
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(m, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return read_manifest(root)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(root)
    return m


def _ensure_remote(root: RemotePath, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Object stores have no exclusive create through pyarrow: write the manifest, then read
    back what is there and use it, so concurrent creators converge on one trace_id (S3 reads
    are strongly consistent). Start a trace with one writer before fanning out to many."""
    path = root / MANIFEST
    if path.exists():
        return read_manifest(root)
    if root.is_file():
        raise TraceFormatError(f"{root}: not a directory")
    if any(p.name != MANIFEST for p in root.iterdir()):
        raise TraceFormatError(f"{root}: prefix is not empty and has no {MANIFEST}; not a trace")
    path.write_text(json.dumps(new_manifest(meta), indent=2) + "\n")
    return read_manifest(root)


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
