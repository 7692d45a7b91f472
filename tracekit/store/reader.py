"""Open a trace directory and expose every table as a DuckDB view.

Views read the Parquet parts in place (``*.parquet`` never matches the hidden temp files of a
part being written), so a trace can be queried while it is being recorded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from ..errors import QueryError, TraceFormatError
from ..schema import Table, tables
from .location import RemotePath, TraceRoot, as_root, fs_path
from .manifest import read_manifest

REPLAYS_DIR = "replays"
REPLAY_META = "replay.json"


@dataclass(frozen=True)
class Part:
    table: str
    replay: str | None
    path: TraceRoot


def _sql_str(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


class Trace:
    """A trace directory: manifest checked on open, tables as DuckDB views on ``connect()``.

    ``root`` is a local directory or a URI (``s3://bucket/prefix``; see :mod:`.location`).
    """

    def __init__(self, root: str | Path | RemotePath) -> None:
        self.root: TraceRoot = as_root(root)
        self.manifest: dict[str, Any] = read_manifest(self.root)

    # ------------------------------------------------------------------ layout
    def replay_names(self) -> list[str]:
        d = self.root / REPLAYS_DIR
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def replay_meta(self, name: str) -> dict[str, Any]:
        p = self.root / REPLAYS_DIR / name / REPLAY_META
        if not p.exists():
            return {"name": name}
        try:
            m = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceFormatError(f"{p}: corrupt replay metadata ({one_line(e)})") from None
        if not isinstance(m, dict):
            raise TraceFormatError(f"{p}: corrupt replay metadata (not a JSON object)")
        return m

    def parts(self, table: str | None = None) -> Iterator[Part]:
        """Every complete part on disk, optionally of one table."""
        for t in tables().values():
            if table and t.name != table:
                continue
            if t.is_replay_table:
                for r in self.replay_names():
                    for p in sorted(t.dir(self.root, r).glob("*.parquet"), key=str):
                        yield Part(t.name, r, p)
            else:
                for p in sorted(t.dir(self.root).glob("*.parquet"), key=str):
                    yield Part(t.name, None, p)

    def size_bytes(self) -> int:
        if isinstance(self.root, RemotePath):  # one listing carries every size: no stat per object
            return self.root.tree_size()
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ DuckDB
    def connect(self, *, read_only: bool = True, check_parts: bool = True,
                install: Callable[[duckdb.DuckDBPyConnection, Trace], None] | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with one view per table.

        ``read_only`` locks the connection down for untrusted SQL (see :mod:`tracekit.store.sql`).
        ``check_parts`` reads every part's footer first so a corrupt file is named up front.
        ``install`` adds a layer's own views before the lock-down (``tracekit.compare.views.connect``
        passes the comparison views: the store does not know them).
        """
        if check_parts:
            self.check_parts()
        con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
        con.execute(f"SET temp_directory={_sql_str(tempfile.gettempdir())}")
        try:  # DuckDB reads every footer to bind the views: a bad part must be a clear error
            for t in tables().values():
                con.execute(f"CREATE VIEW {t.name} AS {self._view_sql(t, con)}")
            self._create_replays_view(con)
            if install is not None:
                install(con, self)
        except duckdb.Error as e:
            con.close()
            raise TraceFormatError(f"{self.root}: cannot read the trace's tables ({one_line(e)}); "
                                   "run `tracekit validate` to find the bad part") from None
        if read_only:
            from .sql import lock_down

            # A remote trace is read through Arrow datasets registered above: DuckDB itself
            # needs no file access (and no httpfs extension) at all.
            lock_down(con, None if isinstance(self.root, RemotePath) else self.root)
        return con

    def _view_sql(self, t: Table, con: duckdb.DuckDBPyConnection) -> str:
        if isinstance(self.root, RemotePath):
            return self._arrow_view_sql(t, con)
        if t.is_replay_table:
            names = [r for r in self.replay_names() if any(t.dir(self.root, r).glob("*.parquet"))]
            if not names:
                return _empty_select(t, extra="NULL::VARCHAR AS replay")
            files = ", ".join(_sql_str(t.dir(self.root, r) / "*.parquet") for r in names)
            pattern = f"/{REPLAYS_DIR}/([^/]+)/"
            return (
                f"SELECT regexp_extract(filename, {_sql_str(pattern)}, 1) AS replay, "
                f"* EXCLUDE (filename) FROM read_parquet([{files}], union_by_name=true, filename=true)"
            )
        scan = self.scan_sql(t.name)
        return f"SELECT * FROM {scan}" if scan else _empty_select(t)

    def _arrow_view_sql(self, t: Table, con: duckdb.DuckDBPyConnection) -> str:
        """A remote table: its parts as one pyarrow dataset per replay, scanned by DuckDB
        through Arrow (projection and filter pushdown included). The table's declared schema
        fills columns that older parts lack with nulls, as ``union_by_name`` does locally."""
        import pyarrow.dataset as ds

        fs, _ = fs_path(self.root)

        def register(replay: str | None) -> str | None:
            parts = sorted(t.dir(self.root, replay).glob("*.parquet"), key=str)
            if not parts:
                return None
            name = _arrow_name(t.name, replay)
            con.register(name, ds.dataset([fs_path(p)[1] for p in parts], schema=t.arrow_schema,
                                          format="parquet", filesystem=fs))
            return name

        if t.is_replay_table:
            selects = [f"SELECT {_sql_str(r)} AS replay, * FROM {a}"
                       for r in self.replay_names() if (a := register(r)) is not None]
            return " UNION ALL BY NAME ".join(selects) if selects else _empty_select(t, extra="NULL::VARCHAR AS replay")
        a = register(None)
        return f"SELECT * FROM {a}" if a else _empty_select(t)

    def scan_sql(self, table: str, replay: str | None = None) -> str | None:
        """A FROM-able scan of one table's parts (of one replay), or None when it has none.

        On a connection from :meth:`connect`: a local trace reads the files in place, a remote one
        the Arrow dataset registered there. Lets a query on one replay skip the others' files."""
        from ..schema import table as get_table

        t = get_table(table)
        d = t.dir(self.root, replay) if t.is_replay_table else t.dir(self.root)
        if not any(d.glob("*.parquet")):
            return None
        if isinstance(self.root, RemotePath):
            return _arrow_name(table, replay)
        return f"read_parquet({_sql_str(d / '*.parquet')}, union_by_name=true)"

    def _create_replays_view(self, con: duckdb.DuckDBPyConnection) -> None:
        rows = []
        for r in self.replay_names():
            m = self.replay_meta(r)
            rows.append((r, m.get("mode"), json.dumps(m)))
        con.execute("CREATE TABLE replays (replay VARCHAR, mode VARCHAR, meta JSON)")
        if rows:
            con.executemany("INSERT INTO replays VALUES (?, ?, ?)", rows)

    def check_parts(self) -> None:
        """Read every part's footer; raise TraceFormatError naming the first bad file."""
        parts = list(self.parts())
        if isinstance(self.root, RemotePath) and len(parts) > 1:
            # One round trip per footer: overlap them (the first bad part in order is still named).
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(16, len(parts))) as pool:
                for _ in pool.map(check_part, parts):
                    pass
            return
        for part in parts:
            check_part(part)

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one trusted query on a fresh read-only connection (Python API convenience)."""
        con = self.connect()
        try:
            return con.execute(sql, params or []).fetchall()
        except duckdb.Error as e:
            raise QueryError(one_line(e)) from None
        finally:
            con.close()


def check_part(part: Part) -> pq.FileMetaData:
    """Footer and schema check of one part; TraceFormatError with the file name if bad."""
    from ..schema import table as get_table

    t = get_table(part.table)
    try:
        if isinstance(part.path, RemotePath):
            with part.path.open_input() as f:
                md = pq.read_metadata(f)
        else:
            md = pq.read_metadata(part.path)
    except Exception as e:
        raise TraceFormatError(f"{part.path}: not a readable Parquet part ({one_line(e)})") from None
    schema = md.schema.to_arrow_schema()
    want = t.arrow_schema
    for f in schema:
        if f.name not in want.names:
            raise TraceFormatError(f"{part.path}: column {f.name!r} is not in the {t.name} schema")
        if not f.type.equals(want.field(f.name).type):
            raise TraceFormatError(
                f"{part.path}: column {f.name!r} has type {f.type}, schema says {want.field(f.name).type}"
            )
    for f in want:
        if not f.nullable and f.name not in schema.names:
            raise TraceFormatError(f"{part.path}: required column {f.name!r} is missing")
    return md


def _arrow_name(table: str, replay: str | None) -> str:
    """Name of a remote table's registered Arrow dataset (replay names may hold '.' and '-')."""
    import hashlib

    return f"_arrow_{table}" if replay is None else f"_arrow_{table}_{hashlib.sha1(replay.encode()).hexdigest()[:12]}"


def _empty_select(t: Table, extra: str | None = None) -> str:
    cols = [f"NULL::{_duck_type(c.type)} AS {c.name}" for c in t.columns]
    if extra:
        cols.insert(0, extra)
    return f"SELECT {', '.join(cols)} WHERE false"


def _duck_type(spec: str) -> str:
    if spec.startswith("list<"):
        return _duck_type(spec[5:-1]) + "[]"
    return {
        "string": "VARCHAR",
        "json": "VARCHAR",
        "bool": "BOOLEAN",
        "int32": "INTEGER",
        "int64": "BIGINT",
        "float32": "FLOAT",
        "float64": "DOUBLE",
        "timestamp": "TIMESTAMPTZ",
    }[spec]


def one_line(e: BaseException) -> str:
    """First meaningful line of an exception message."""
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return type(e).__name__


def open_trace(root: str | Path | RemotePath) -> Trace:
    return Trace(root)


def json_value(v: Any) -> Any:
    """A JSON column's value (sampling params, engine args, ...): parsed when it is a string,
    None when that string is not valid JSON (a damaged row must not stop a replay or a report)."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return None
    return v
