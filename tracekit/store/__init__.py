"""Trace storage: Parquet parts written atomically, read back as DuckDB views."""

from .reader import Trace, open_trace
from .writer import TraceWriter, WriterStats

__all__ = ["Trace", "TraceWriter", "WriterStats", "open_trace"]
