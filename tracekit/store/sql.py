"""Read-only SQL over a trace: what `tracekit sql` lets a user run.

Two independent locks, so one bug does not open the trace to writes:
1. DuckDB itself: no external access except reading the trace directory, no extension
   install/load, configuration locked so a query cannot undo it.
2. A statement whitelist from DuckDB's own parser: only SELECT-like statements run, so COPY,
   ATTACH, INSTALL, LOAD, SET, CREATE, INSERT, EXPORT ... are refused before execution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from ..errors import QueryError
from .reader import one_line

_ALLOWED = {"SELECT", "EXPLAIN", "PRAGMA"}
# PRAGMAs that only describe; anything else (e.g. PRAGMA enable_profiling='x' writing files) is refused.
_READ_PRAGMAS = ("show_tables", "show_tables_expanded", "table_info", "show", "database_size", "version")


def lock_down(con: duckdb.DuckDBPyConnection, root: Path | None) -> None:
    """Make ``con`` unable to touch anything but reading files below ``root`` (None: no file at
    all, for a remote trace whose tables are Arrow datasets registered before the lock)."""
    if root is not None:
        root_s = str(Path(root).resolve()).replace("'", "''")
        con.execute(f"SET allowed_directories=['{root_s}/']")
    con.execute("SET enable_external_access=false")
    con.execute("SET autoload_known_extensions=false")
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET lock_configuration=true")


def check_read_only(sql: str) -> list[str]:
    """Split ``sql`` into statements and refuse any that is not a read; returns the statements."""
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"invalid SQL: {one_line(e)}") from None
    if not stmts:
        raise QueryError("empty query")
    out = []
    for s in stmts:
        kind = s.type.name if hasattr(s.type, "name") else str(s.type)
        text = s.query.strip()
        if kind not in _ALLOWED:
            raise QueryError(f"refused: {kind} statements are not allowed, `tracekit sql` is read-only")
        if kind == "PRAGMA" and not text.lower().removeprefix("pragma").strip().startswith(_READ_PRAGMAS):
            raise QueryError("refused: only descriptive PRAGMAs are allowed, `tracekit sql` is read-only")
        if kind == "EXPLAIN" and " analyze" in text.lower()[:20]:
            inner = text.split(None, 2)[-1]
            check_read_only(inner)
        out.append(text)
    return out


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run read-only ``sql`` (possibly several statements); returns the last one's columns and rows."""
    cols: list[str] = []
    rows: list[tuple[Any, ...]] = []
    for stmt in check_read_only(sql):
        try:
            cur = con.execute(stmt)
            cols = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchall() if cur.description else []
        except duckdb.Error as e:
            raise QueryError(one_line(e)) from None
    return cols, rows
