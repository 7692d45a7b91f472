"""RL metrics between two logprob sources of a trace, as a Python API over the compare views.

Definitions (a, b are sources; tokens are the ones both sources have, joined on (request_id, pos)):
  Δ = logprob_a − logprob_b        ratio = exp(Δ)
  token clip rate at ε: share of tokens with |ratio − 1| > ε
  GSPO sequence ratio: exp(mean Δ over the sequence); sequence clip rate: share with |s − 1| > ε
  k1 = mean Δ, k3 = mean(exp(−Δ) − 1 + Δ): both estimate KL(a ‖ b) when the tokens were sampled
  from a (e.g. a = recorded engine, the behaviour policy).
Tokens whose Δ is ±inf (one side -inf) count as clipped but are left out of the means, k1 and
k3 and counted in ``nonfinite_tokens``; both sides -inf (Δ NaN) are left out of everything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import duckdb

from ..errors import QueryError
from ..store.reader import Trace, one_line
from . import views
from .views import AGG_KEYS, DEFAULT_EPS


@dataclass(frozen=True)
class Metrics:
    """Aggregate comparison of source a against source b over one group of tokens."""

    a: str
    b: str
    tokens: int
    requests: int
    mean_delta: float | None
    mean_abs_delta: float | None
    max_abs_delta: float | None
    clip_rate: float | None
    k1: float | None
    k3: float | None
    seq_clip_rate: float | None
    mean_seq_ratio: float | None
    nonfinite_tokens: int
    entropy_a: float | None
    entropy_b: float | None

    def as_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


def _clean(v: Any) -> Any:
    return finite_or_str(v)


def finite_or_str(v: Any) -> Any:
    """JSON-safe value: NaN → None, ±inf → '-inf'/'inf' (json.dumps would emit invalid JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


def json_safe(v: Any) -> Any:
    """``finite_or_str`` applied through nested dicts, lists and tuples (tuples become lists)."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return finite_or_str(v)


def list_sources(trace: Trace) -> list[str]:
    """Source names available in ``trace``: recorded, trainer, replay:<name>[:processed]."""
    return list(views.source_sql(trace))


def resolve_source(trace: Trace, name: str) -> str:
    """SQL SELECT for source ``name``; QueryError naming the known sources if unknown."""
    return views.source(views.source_sql(trace), name)


def diff_sql(trace: Trace, a: str, b: str, by: str = "step", eps: float = DEFAULT_EPS) -> str:
    """The SQL `tracekit diff` runs: direct scans of the two sources, no union view."""
    if by not in AGG_KEYS:
        raise QueryError(f"--by must be one of {', '.join(AGG_KEYS)}, not {by!r}")
    return views.diff_by_sql(views.pairs_sql(trace, a, b), by, eps)


def diff(
    trace: Trace | str,
    a: str,
    b: str,
    by: str = "step",
    eps: float = DEFAULT_EPS,
    con: duckdb.DuckDBPyConnection | None = None,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Metrics of a vs b grouped by ``by``: (column names, rows)."""
    t = trace if isinstance(trace, Trace) else Trace(trace)
    return run(t, diff_sql(t, a, b, by, eps), con)


def run(
    t: Trace, sql: str, con: duckdb.DuckDBPyConnection | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, rows) of ``sql`` on ``con`` (default: a read-only connection to ``t``, closed
    after); a DuckDB error becomes a one-line QueryError."""
    own = con is None
    con = con or views.connect(t)
    try:
        cur = con.execute(sql)
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
    finally:
        if own:
            con.close()


def overall(
    trace: Trace | str,
    a: str,
    b: str,
    eps: float = DEFAULT_EPS,
    con: duckdb.DuckDBPyConnection | None = None,
    where: str | None = None,
) -> Metrics:
    """One Metrics over every token both sources have (optionally restricted by ``where`` on
    request_info columns, e.g. ``"cache_hit"`` or ``"step >= 1"``)."""
    t = trace if isinstance(trace, Trace) else Trace(trace)
    sql = diff_sql(t, a, b, "all", eps)
    if where:
        sql = sql.replace("FROM request_info AS r\n", f"FROM (SELECT * FROM request_info WHERE {where}) AS r\n", 1)
    own = con is None
    con = con or views.connect(t)
    try:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        row = cur.fetchone()
    except duckdb.Error as e:
        raise QueryError(one_line(e)) from None
    finally:
        if own:
            con.close()
    d = dict(zip(cols, row)) if row else {}
    return Metrics(
        a=a,
        b=b,
        tokens=int(d.get("tokens") or 0),
        requests=int(d.get("requests") or 0),
        mean_delta=d.get("mean_delta"),
        mean_abs_delta=d.get("mean_abs_delta"),
        max_abs_delta=d.get("max_abs_delta"),
        clip_rate=d.get("clip_rate"),
        k1=d.get("k1"),
        k3=d.get("k3"),
        seq_clip_rate=d.get("seq_clip_rate"),
        mean_seq_ratio=d.get("mean_seq_ratio"),
        nonfinite_tokens=int(d.get("nonfinite_tokens") or 0),
        entropy_a=d.get("entropy_a"),
        entropy_b=d.get("entropy_b"),
    )
