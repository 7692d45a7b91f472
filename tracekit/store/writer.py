"""TraceWriter: rows from any thread → bounded queue → one background thread → Parquet parts.

Contract (the recorder relies on it):
- ``write`` never blocks and never raises. A full queue, a bad row or a failing disk turns into
  counted drops, reported by ``stats()`` and written to ``runs/`` on close.
- A part becomes visible only when complete (temp file, fsync, rename, fsync dir), so a
  ``kill -9`` loses at most what was buffered: one flush interval.
- Parts are rolled by size (``part_max_rows``) and by time (``flush_interval``); rows inside a
  part are sorted by the table's ``sort_by`` so Parquet's delta/dictionary encodings pay off.
"""

from __future__ import annotations

import atexit
import collections
import datetime as _dt
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__
from ..schema import Table
from ..schema import table as get_table
from .location import TraceRoot, as_root
from .manifest import ensure_manifest
from .parquet import write_part_atomic

log = logging.getLogger("tracekit.writer")

Rows = Mapping[str, Any] | Sequence[Mapping[str, Any]] | pa.RecordBatch | pa.Table


@dataclass
class WriterStats:
    rows_written: dict[str, int] = field(default_factory=dict)
    rows_dropped: dict[str, int] = field(default_factory=dict)
    parts_written: int = 0
    bytes_written: int = 0
    queue_high_water: int = 0
    errors: list[str] = field(default_factory=list)
    # Queued but not confirmed on disk when close() gave up waiting (slow or hung disk).
    rows_pending: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(self.rows_dropped.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_written": dict(self.rows_written),
            "rows_dropped": dict(self.rows_dropped),
            "parts_written": self.parts_written,
            "bytes_written": self.bytes_written,
            "queue_high_water": self.queue_high_water,
            "errors": list(self.errors[-20:]),
            "rows_pending": dict(self.rows_pending),
        }


_MAX_ERRORS = 100
_live_writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for w in list(_live_writers):
        w.close(timeout=10.0)


class TraceWriter:
    """Append rows to a trace directory from any number of threads.

    ``kind`` labels the run in ``runs/`` ('record', 'proxy', 'replay', ...). ``replay`` routes
    replay tables to ``replays/<replay>/``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        kind: str = "record",
        run_id: str | None = None,
        flush_interval: float = 1.0,
        part_max_rows: int = 1 << 20,
        max_queue_rows: int = 8 << 20,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.root: TraceRoot = Path(str(root))  # what an error names until as_root below accepts it
        self.kind = kind
        self.run_id = run_id or uuid.uuid4().hex
        self.flush_interval = float(flush_interval)
        self.part_max_rows = int(part_max_rows)
        self.max_queue_rows = int(max_queue_rows)
        self._stats = WriterStats()
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[str, str | None, Any, int]] = collections.deque()
        self._queued_rows = 0
        self._wake = threading.Event()
        self._flush_requests: list[threading.Event] = []
        self._closing = False
        self._closed = False
        self._seq = 0
        self._queued_since = time.monotonic()
        self._submitted: dict[str, int] = {}
        self.ok = True
        try:
            self.root = as_root(root)  # a URI the filesystem layer refuses is a recording error
            ensure_manifest(self.root, meta)
        except Exception as e:  # never raise into the job: record and drop everything
            self.ok = False
            self._error(f"cannot open trace {self.root}: {e}")
            log.warning("tracekit: recording disabled: %s", e)
        self._thread = threading.Thread(target=self._run, name="tracekit-writer", daemon=True)
        self._thread.start()
        _live_writers.add(self)
        # Queued with the first write, not here: a writer that never writes (a replay the engine
        # refuses, a recorder that saw no request) leaves runs/ untouched.
        self._start_row: dict[str, Any] | None = {
            "run_id": self.run_id,
            "event": "start",
            "time": _now(),
            "kind": kind,
            "tracekit_version": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": list(sys.argv),
        }

    # ------------------------------------------------------------------ caller side
    def write(self, table: str, rows: Rows, *, replay: str | None = None) -> bool:
        """Queue rows for ``table``: one row dict, a list of row dicts, or Arrow data.

        Returns False (and counts the drop) when the queue is full or the writer is closed.
        """
        try:
            n = _num_rows(rows)
            if n == 0:
                return True
            with self._lock:
                if self._start_row is not None:
                    start, self._start_row = self._start_row, None
                    self._enqueue_locked("runs", None, start, 1)
                ok = self._enqueue_locked(table, replay, rows, n)
            if self._queued_rows >= self.part_max_rows:
                self._wake.set()
            return ok
        except Exception as e:  # malformed input must not reach the job
            self._error(f"write({table}): {e}")
            return False

    def _enqueue_locked(self, table: str, replay: str | None, rows: Rows, n: int) -> bool:
        self._submitted[table] = self._submitted.get(table, 0) + n  # written+dropped+pending
        if self._closed or not self.ok or self._queued_rows + n > self.max_queue_rows:
            self._count_drop(table, n)
            return False
        if not self._queue:
            self._queued_since = time.monotonic()
        self._queue.append((table, replay, rows, n))
        self._queued_rows += n
        if self._queued_rows > self._stats.queue_high_water:
            self._stats.queue_high_water = self._queued_rows
        return True

    def write_columns(
        self, table: str, cols: Mapping[str, Any], *, replay: str | None = None, **const: Any
    ) -> bool:
        """Queue equal-length columns (lists, numpy or Arrow arrays); ``const`` fills every row.

        The cheap path for tokens: the caller hands over arrays, the writer thread converts.
        """
        try:
            return self.write(table, _Columns(cols, const), replay=replay)
        except Exception as e:
            self._error(f"write_columns({table}): {e}")
            return False

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything queued so far as parts; True when done within ``timeout``."""
        done = threading.Event()
        with self._lock:
            if self._closed:
                return True
            self._flush_requests.append(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> WriterStats:
        """Flush, write the run's 'close' row with its counters, and stop the thread.

        Waits at most ``timeout`` seconds so a dead disk cannot stall the job's exit.
        """
        with self._lock:
            already = self._closing
            self._closing = True
        if not already:
            self.flush(timeout)
            self._count_pending()
            with self._lock:
                wrote_something = self._start_row is None
            if wrote_something:  # a writer that wrote nothing leaves runs/ untouched
                self.write(
                    "runs",
                    {
                        "run_id": self.run_id,
                        "event": "close",
                        "time": _now(),
                        "kind": self.kind,
                        "tracekit_version": __version__,
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "stats": _json(self._stats.as_dict()),
                    },
                )
                self.flush(timeout)
            with self._lock:
                self._closed = True
            self._wake.set()
            self._thread.join(timeout)
            _live_writers.discard(self)
            self._count_pending()
        return self.stats()

    def _count_pending(self) -> None:
        with self._lock:
            s = self._stats
            pending = {t: n - s.rows_written.get(t, 0) - s.rows_dropped.get(t, 0) for t, n in self._submitted.items()}
            s.rows_pending = {t: n for t, n in pending.items() if n > 0}

    def stats(self) -> WriterStats:
        with self._lock:
            s = self._stats
            return WriterStats(
                dict(s.rows_written), dict(s.rows_dropped), s.parts_written, s.bytes_written,
                s.queue_high_water, list(s.errors), dict(s.rows_pending),
            )

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        buffers: dict[tuple[str, str | None], list[tuple[Any, int]]] = {}
        first_at: dict[tuple[str, str | None], float] = {}
        try:  # pyarrow's first conversion imports pandas (0.5-2 s): pay it before a flush is due
            pa.array([0])
        except Exception:  # noqa: BLE001, S110 - a warm-up only; real failures surface per part
            pass
        while True:
            # Sleep until the oldest buffered row is due, so a row waits at most one flush
            # interval (plus the write) whatever the tick: that bounds what a kill -9 loses.
            timeout = self._tick()
            if first_at:
                timeout = min(timeout, max(0.0, min(first_at.values()) + self.flush_interval - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            with self._lock:
                since = self._queued_since
                items = list(self._queue)
                self._queue.clear()
                self._queued_rows = 0
                flushes, self._flush_requests = self._flush_requests, []
                closed = self._closed
            now = time.monotonic()
            for tname, replay, rows, n in items:
                key = (tname, replay)
                buffers.setdefault(key, []).append((rows, n))
                first_at.setdefault(key, since)  # when the caller queued it, not when drained
            force = bool(flushes) or closed
            # Parent tables first: a crash between two renames leaves requests without tokens
            # (visible as short requests), never tokens without their request.
            for key in sorted(buffers, key=_table_order):
                buf = buffers[key]
                rows_in = sum(n for _, n in buf)
                if force or rows_in >= self.part_max_rows or now - first_at[key] >= self.flush_interval:
                    # A backlog (writer behind the producers) becomes several parts, not one huge
                    # one: memory of the conversion + sort stays bounded by part_max_rows.
                    for piece in _split(buf, self.part_max_rows):
                        self._write_part(key, piece)
                    del buffers[key]
                    del first_at[key]
            for ev in flushes:
                ev.set()
            if closed:
                return

    def _tick(self) -> float:
        return max(0.01, min(self.flush_interval, 1.0))

    def _write_part(self, key: tuple[str, str | None], buf: list[tuple[Any, int]]) -> None:
        tname, replay = key
        n = sum(k for _, k in buf)
        try:
            t = get_table(tname)
            data = _to_arrow(t, [rows for rows, _ in buf])
            if t.sort_by and not _is_sorted(data, t.sort_by):
                data = data.take(pc.sort_indices(data, [(c, "ascending") for c in t.sort_by]))
            self._seq += 1
            name = f"part-{time.time_ns():020d}-{self.run_id[:8]}-{self._seq:06d}.parquet"
            size = write_part_atomic(data, t, t.dir(self.root, replay) / name)
            with self._lock:
                self._stats.rows_written[tname] = self._stats.rows_written.get(tname, 0) + n
                self._stats.parts_written += 1
                self._stats.bytes_written += size
        except Exception as e:
            with self._lock:
                self._count_drop(tname, n)
            self._error(f"writing {tname} part ({n} rows): {e}")

    # ------------------------------------------------------------------ helpers
    def _count_drop(self, table: str, n: int) -> None:
        self._stats.rows_dropped[table] = self._stats.rows_dropped.get(table, 0) + n

    def _error(self, msg: str) -> None:
        if len(self._stats.errors) < _MAX_ERRORS:
            self._stats.errors.append(msg)
        if len(self._stats.errors) <= 3:
            log.warning("tracekit: %s", msg)


# Within one flush, parts are renamed in this order. Recorded data: parents before children, so a
# crash leaves at worst a request with fewer token rows, never tokens without their request.
# Replays: the ledger (replay_requests) goes last, so a ledger row never exists without its tokens
# and --resume can trust it.
_ORDER = ["runs", "engines", "replay_engines", "weights", "weight_syncs", "requests", "tokens", "trainer",
          "rewards", "replay_tokens", "replay_requests"]


def _table_order(key: tuple[str, str | None]) -> int:
    return _ORDER.index(key[0]) if key[0] in _ORDER else len(_ORDER)


def _split(buf: list[tuple[Any, int]], max_rows: int) -> list[list[tuple[Any, int]]]:
    """Consecutive groups of queued writes of about ``max_rows`` rows each (writes stay whole)."""
    out: list[list[tuple[Any, int]]] = [[]]
    rows = 0
    for item in buf:
        if rows >= max_rows:
            out.append([])
            rows = 0
        out[-1].append(item)
        rows += item[1]
    return out


def _is_sorted(data: pa.Table, keys: Sequence[str]) -> bool:
    """True when ``data`` is already ordered by the integer ``keys`` (a few ms per million rows,
    vs ~100 ms for sort + take); False when unsure (nulls, non-integer keys)."""
    cols = []
    for k in keys:
        c = data.column(k)
        if c.null_count or not pa.types.is_integer(c.type):
            return False
        cols.append(c.to_numpy())
    if data.num_rows < 2:
        return True
    tied = np.ones(data.num_rows - 1, dtype=bool)  # rows whose earlier keys are all equal
    for a in cols:
        prev, nxt = a[:-1], a[1:]
        if np.any(tied & (nxt < prev)):
            return False
        tied &= nxt == prev
    return True


def _num_rows(rows: Any) -> int:
    if isinstance(rows, (pa.RecordBatch, pa.Table)):
        return rows.num_rows
    if isinstance(rows, _Columns):
        return rows.n
    if isinstance(rows, Mapping):
        return 1
    return len(rows)


class _Columns:
    """A dict-of-columns write: equal-length columns plus constants broadcast to every row."""

    __slots__ = ("cols", "const", "n")

    def __init__(self, cols: Mapping[str, Any], const: Mapping[str, Any]) -> None:
        lens = {len(v) for v in cols.values()}
        if len(lens) > 1:
            raise ValueError(f"columns of unequal length {sorted(lens)}")
        self.cols = dict(cols)
        self.const = dict(const)
        self.n = lens.pop() if lens else (1 if const else 0)


def _to_arrow(t: Table, chunks: list[Any]) -> pa.Table:
    """One Arrow table from many queued writes; column writes are concatenated per column first
    (one conversion per part, not per request: the recorder queues one small write per request)."""
    schema = t.arrow_schema
    pieces: list[pa.Table] = []
    run: list[_Columns] = []
    dicts: list[Mapping[str, Any]] = []  # row dicts of consecutive writes, converted at once
    for rows in chunks:
        if isinstance(rows, _Columns):
            if dicts:
                pieces.append(_dicts_to_table(t, schema, dicts))
                dicts = []
            run.append(rows)
            continue
        if run:
            pieces.append(_columns_to_table(t, schema, run))
            run = []
        if isinstance(rows, (pa.RecordBatch, pa.Table)):
            if dicts:
                pieces.append(_dicts_to_table(t, schema, dicts))
                dicts = []
            if isinstance(rows, pa.RecordBatch):
                rows = pa.Table.from_batches([rows])
            pieces.append(_conform(rows, schema))
            continue
        # One conversion per part instead of one per write: per-row writes cost ~0.9 ms each
        # converted alone, ~30 us converted together (bench/ingest.py).
        if isinstance(rows, Mapping):
            dicts.append(rows)
        else:
            dicts.extend(rows)
    if run:
        pieces.append(_columns_to_table(t, schema, run))
    if dicts:
        pieces.append(_dicts_to_table(t, schema, dicts))
    out = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    for f in schema:
        if not f.nullable and out.column(f.name).null_count:
            raise ValueError(f"column {t.name}.{f.name} is required but has nulls")
    return out


def _dicts_to_table(t: Table, schema: pa.Schema, rows: list[Mapping[str, Any]]) -> pa.Table:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    data = {k: [r.get(k) for r in rows] for k in keys}
    return _from_data(t, schema, data, len(rows))


def _columns_to_table(t: Table, schema: pa.Schema, run: list[_Columns]) -> pa.Table:
    names: dict[str, None] = {}
    for c in run:
        names.update(dict.fromkeys(c.cols))
        names.update(dict.fromkeys(c.const))
    if t.sort_by and len(run) > 1:
        # Writes from concurrent producers interleave; ordering them by their constant first sort
        # key (request_id per request) usually leaves the part sorted, so the row sort is skipped.
        k = t.sort_by[0]
        heads = [c.const.get(k) if k not in c.cols else None for c in run]
        if all(type(h) is int for h in heads):
            run = [run[i] for i in sorted(range(len(run)), key=heads.__getitem__)]
    n = sum(c.n for c in run)
    lengths = np.fromiter((c.n for c in run), dtype=np.int64, count=len(run))
    data: dict[str, Any] = {}
    for name in names:
        consts = [c.const[name] for c in run if name in c.const and name not in c.cols]
        if len(consts) == len(run) and all(type(v) in (int, float) for v in consts):
            # the usual case (request_id=.., weight_version=.. per request): one np.repeat
            data[name] = np.repeat(np.array(consts), lengths)
            continue
        parts = []
        for c in run:
            if name in c.cols:
                parts.append(c.cols[name])
            else:
                parts.append(_repeat(c.const.get(name), c.n))
        data[name] = _concat(parts)
    return _from_data(t, schema, data, n)


def _repeat(v: Any, n: int) -> Any:
    if isinstance(v, (bool, int, float)) and not isinstance(v, bool) and v is not None:
        import numpy as np

        return np.full(n, v)
    return [v] * n


def _concat(parts: list[Any]) -> Any:
    import numpy as np

    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    out: list[Any] = []
    for p in parts:
        out.extend(p.tolist() if isinstance(p, np.ndarray) else p)
    return out


def _from_data(t: Table, schema: pa.Schema, data: dict[str, Any], n: int) -> pa.Table:
    unknown = set(data) - set(schema.names)
    if unknown:
        raise ValueError(f"unknown column(s) {sorted(unknown)} for table {t.name}")
    arrays = [_array(data[f.name], f) if f.name in data else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _array(values: Any, f: pa.Field) -> pa.Array:
    if f.type == pa.string() and not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = [v if v is None or isinstance(v, str) else _json(v) for v in values]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(f.type)
    return pa.array(values, type=f.type)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    unknown = set(t.column_names) - set(schema.names)
    if unknown:
        raise ValueError(f"unknown column(s) {sorted(unknown)}")
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _json(v: Any) -> str:
    import json

    return json.dumps(v, sort_keys=True, default=str)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
