"""The trace contract, loaded from schemas/*.json: Arrow schemas, versions, hashes.

Everything that knows a column (writer, reader, validate, docs) derives it from here,
so the JSON files are the single declaration of the format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "json": pa.string(),  # JSON text; DuckDB casts with ::JSON
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def arrow_type(spec: str) -> pa.DataType:
    """Map a schema type string (e.g. ``list<int32>``) to an Arrow type."""
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(arrow_type(spec[5:-1]))
    try:
        return _SCALARS[spec]
    except KeyError:
        raise ValueError(f"unknown column type {spec!r} in schemas/") from None


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    description: str
    encoding: str | None = None
    since: int = 1  # table version that added the column (additive evolution: nullable only)

    @property
    def arrow(self) -> pa.DataType:
        return arrow_type(self.type)


@dataclass(frozen=True)
class Table:
    name: str
    version: int
    path: str  # relative to the trace root; "{replay}" is filled per replay
    description: str
    columns: tuple[Column, ...]
    sort_by: tuple[str, ...] = ()
    primary_key: tuple[str, ...] = ()
    references: dict[str, str] = field(default_factory=dict)

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.arrow, nullable=c.nullable) for c in self.columns],
            metadata={b"tracekit.table": self.name.encode(), b"tracekit.version": str(self.version).encode()},
        )

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def hash(self) -> str:
        """sha256 of what readers depend on: names, types, nullability, version."""
        return self.hash_at(self.version)

    def hash_at(self, version: int) -> str:
        """The hash this table had at ``version``: its columns with ``since <= version``."""
        canon = [self.name, version, [[c.name, c.type, c.nullable] for c in self.columns if c.since <= version]]
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()

    @property
    def readable_hashes(self) -> frozenset[str]:
        """Hashes of every version this reader reads: later versions only add nullable columns,
        so a part of an older version reads as the new schema with those columns null."""
        return frozenset(self.hash_at(v) for v in range(1, self.version + 1))

    def dir(self, root: Path, replay: str | None = None) -> Path:
        if "{replay}" in self.path:
            if not replay:
                raise ValueError(f"table {self.name} needs a replay name")
            return root / self.path.format(replay=replay)
        return root / self.path

    @property
    def is_replay_table(self) -> bool:
        return "{replay}" in self.path


def _load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@lru_cache(maxsize=1)
def manifest_spec() -> dict[str, Any]:
    return _load(SCHEMA_DIR / "trace.json")


FORMAT_VERSION: int = int(manifest_spec()["format_version"])
FORMAT_NAME = "tracekit-trace"


@lru_cache(maxsize=1)
def tables() -> dict[str, Table]:
    """All table declarations, keyed by name, in a stable order."""
    out: dict[str, Table] = {}
    for p in sorted(SCHEMA_DIR.glob("*.json")):
        d = _load(p)
        if p.stem == "trace":
            continue
        cols = tuple(
            Column(c["name"], c["type"], bool(c.get("nullable", True)), c.get("description", ""), c.get("encoding"),
                   int(c.get("since", 1)))
            for c in d["columns"]
        )
        for c in cols:
            arrow_type(c.type)  # fail early on a typo in schemas/
            if c.since > 1 and not c.nullable:
                raise ValueError(f"schemas/{p.name}: column {c.name!r} added in version {c.since} must be nullable")
        out[d["name"]] = Table(
            name=d["name"],
            version=int(d["version"]),
            path=d["path"],
            description=d.get("description", ""),
            columns=cols,
            sort_by=tuple(d.get("sort_by", ())),
            primary_key=tuple(d.get("primary_key", ())),
            references=dict(d.get("references", {})),
        )
    return out


def table(name: str) -> Table:
    try:
        return tables()[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(tables())}") from None


def schema_hashes() -> dict[str, str]:
    return {name: t.hash for name, t in tables().items()}


def markdown() -> str:
    """The trace format reference (docs/trace-format.md), generated from schemas/."""
    m = manifest_spec()
    out = [
        "# Trace format reference",
        "",
        "<!-- generated by `tracekit schema --markdown > docs/trace-format.md`; do not edit by hand -->",
        "",
        f"Format version **{FORMAT_VERSION}**. A trace is a directory (or object-store prefix) holding "
        "`trace.json` and one folder of Parquet parts per table. Parts are append-only and appear "
        "atomically (hidden temp file, fsync, rename); readers glob `*.parquet`. Floats are float32; "
        "encodings per column below (zstd level 1 for all).",
        "",
        "Tables evolve additively: a new table version may only add nullable columns (marked "
        "*since vN* below). Readers accept a trace whose manifest holds the hash of any earlier "
        "version of a table and read its older parts with the new columns null; any other change "
        "bumps the format version.",
        "",
        "## trace.json",
        "",
        m["description"],
        "",
        "| field | type | description |",
        "|---|---|---|",
    ]
    out += [f"| `{f['name']}` | {f['type']} | {f['description']} |" for f in m["fields"]]
    for t in tables().values():
        out += ["", f"## {t.name}", "", f"Path: `{t.path}/` · schema version {t.version} · hash `{t.hash[:12]}`", "",
                t.description, ""]
        if t.primary_key:
            out.append(f"Key: ({', '.join(t.primary_key)}). Sorted by: ({', '.join(t.sort_by)}).")
        if t.references:
            out.append("References: " + ", ".join(f"`{k}` → `{v}`" for k, v in t.references.items()) + ".")
        out += ["", "| column | type | null | encoding | description |", "|---|---|---|---|---|"]
        for c in t.columns:
            out.append(f"| `{c.name}` | {c.type} | {'yes' if c.nullable else 'no'} | {c.encoding or ''} | "
                       f"{c.description}{f' *(since v{c.since})*' if c.since > 1 else ''} |")
    return "\n".join(out) + "\n"
