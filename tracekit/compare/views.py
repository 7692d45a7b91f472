"""DuckDB views that compare sources (recorded, trainer, replays); installed on every connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb

if TYPE_CHECKING:
    from ..store.reader import Trace


def install(con: duckdb.DuckDBPyConnection, trace: "Trace") -> None:
    """Create the comparison views on ``con`` (a connection from ``Trace.connect``)."""
    return None
