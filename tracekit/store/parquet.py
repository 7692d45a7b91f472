"""Parquet encoding choices for every part, derived from the column declarations.

Measured on a synthetic RL trace (bench/size.py, docs/benchmarks.md): zstd level 1 (higher
buys nothing on high-entropy logprobs), byte-stream-split for float columns and token ids,
delta encoding for sorted integer ids, dictionary for strings, and pages of 128 Ki rows: zstd
then sees each byte stream of a byte-stream-split page as a long run with its own Huffman table
(pyarrow's default 20 000-row pages cost +0.4 B/token).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..schema import Table
from .location import RemotePath, TraceRoot

COMPRESSION = "zstd"
COMPRESSION_LEVEL = 1
ROW_GROUP_SIZE = 1 << 20
MAX_ROWS_PER_PAGE = 1 << 17


def write_options(table: Table, schema: pa.Schema) -> dict[str, Any]:
    """Keyword arguments for ``pq.write_table`` for a part of ``table``."""
    dictionary: list[str] = []
    encodings: dict[str, str] = {}
    for col in table.columns:
        if col.name not in schema.names:
            continue
        # A list column's values live in the leaf column "<name>.list.element".
        leaf = f"{col.name}.list.element" if col.type.startswith("list<") else col.name
        if col.encoding == "delta":
            encodings[leaf] = "DELTA_BINARY_PACKED"
        elif col.encoding == "byte_stream_split":
            encodings[leaf] = "BYTE_STREAM_SPLIT"
        elif col.encoding == "dictionary" or col.type in ("string", "json"):
            dictionary.append(col.name)
    return dict(
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        use_dictionary=dictionary,
        column_encoding=encodings or None,
        row_group_size=ROW_GROUP_SIZE,
        max_rows_per_page=MAX_ROWS_PER_PAGE,
        write_statistics=True,
        write_page_checksum=True,  # lets validate detect bit flips in data pages
    )


def write_part_atomic(arrow_table: pa.Table, table: Table, final_path: TraceRoot) -> int:
    """Write ``arrow_table`` so that ``final_path`` appears only when complete.

    Temp file in the same directory (hidden, not matched by ``*.parquet``), fsync, rename,
    fsync the directory. Returns the bytes written. On an object store the object appears only
    when its upload completes (see :mod:`.location`): no temp name is needed.
    """
    if isinstance(final_path, RemotePath):
        with final_path.open_output() as out:
            pq.write_table(arrow_table, out, **write_options(table, arrow_table.schema))
        return final_path.stat().st_size
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.with_name("." + final_path.name + ".tmp")
    try:
        pq.write_table(arrow_table, tmp, **write_options(table, arrow_table.schema))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size = tmp.stat().st_size
        os.rename(tmp, final_path)
        fsync_dir(final_path.parent)
        return size
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
