"""Canned forensic queries: one readable .sql file each in queries/, first line '-- description'."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import QueryError

QUERY_DIR = Path(__file__).resolve().parent / "queries"


@dataclass(frozen=True)
class CannedQuery:
    name: str
    description: str
    sql: str


def all_queries() -> list[CannedQuery]:
    out = []
    for p in sorted(QUERY_DIR.glob("*.sql")):
        text = p.read_text()
        first = text.splitlines()[0] if text else ""
        desc = first[2:].strip() if first.startswith("--") else ""
        out.append(CannedQuery(p.stem, desc, text))
    return out


def get(name: str) -> CannedQuery:
    for q in all_queries():
        if q.name == name:
            return q
    known = ", ".join(q.name for q in all_queries())
    raise QueryError(f"no canned query named {name!r}; known: {known}")
