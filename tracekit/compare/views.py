"""DuckDB views that compare sources (recorded, trainer, replays); installed on every connection.

A *source* is one logprob per (request_id, pos):
  ``recorded``                 tokens.logprob (as the recording engine returned it)
  ``trainer``                  trainer.logprob (the trainer's own "old" logprob)
  ``replay:<name>``            replay_tokens.logprob of replay <name> (raw, teacher-forced)
  ``replay:<name>:processed``  replay_tokens.processed_logprob of replay <name>

Views and table macros (usable from ``tracekit sql`` and Python):
  ``token_sources``            long format: source, request_id, pos, logprob, entropy, weight_version
  ``comparison_sources``       the source names this trace has
  ``request_info``             one row per request with the grouping keys (step, group, sampling, cache hit)
  ``token_diff(a, b, eps:=0.2)``   per-token Δ = a − b, ratio, clipped, k3, entropies, keys
  ``seq_diff(a, b, eps:=0.2)``     per-request GSPO sequence ratio and clip, and token sums
  ``diff_by_<key>(a, b, eps:=0.2)`` aggregated metrics; key in AGG_KEYS

A comparison pairs the two sources' logprobs on (request_id, pos), an inner join. Replays made by
this tracekit copy the recorded logprob and weight version next to their own (``recorded_copy``
in replay.json): recorded vs such a replay reads the replay alone, no join (at 100 M tokens
5x less CPU and 1/10 of the memory of the join, docs/benchmarks.md). Every other pair is a hash join, robust to any part order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb

from ..errors import QueryError

if TYPE_CHECKING:
    from ..store.reader import Trace

DEFAULT_EPS = 0.2

# Grouping keys of ``diff_by_<key>``: SQL expression over request_info (r) / per-token rows (t).
# Keys that live on the request carry GSPO sequence metrics; per-token keys do not.
REQUEST_KEYS: dict[str, str] = {
    "step": "r.step",
    "request": "r.request_id",
    "group": "r.group_id",
    "sampling": "r.sampling",
    "temperature": "r.temperature",
    "cache_hit": "r.cache_hit",
    "all": "'all'",
}
TOKEN_KEYS: dict[str, str] = {
    "position": "s.pos",
    "weight_version": "s.weight_version",
}
AGG_KEYS = tuple(REQUEST_KEYS) + tuple(TOKEN_KEYS)

REQUEST_INFO_SQL = """
SELECT request_id, step, group_id, sample_idx, engine_id,
       temperature, top_p, top_k, min_p,
       format('T={} top_p={} top_k={} min_p={}',
              coalesce(temperature, 1.0), coalesce(top_p, 1.0),
              CASE WHEN coalesce(top_k, 0) <= 0 THEN -1 ELSE top_k END, coalesce(min_p, 0.0)) AS sampling,
       coalesce(num_cached_tokens, 0) > 0 AS cache_hit,
       weight_version_start, weight_version_end
FROM requests
"""

# Two sources paired on (request_id, pos): the inner hash join, for any two sources.
JOIN_PAIRS_SQL = """
SELECT x.request_id, x.pos, coalesce(x.weight_version, y.weight_version) AS weight_version,
       x.logprob AS logprob_a, y.logprob AS logprob_b, x.entropy AS entropy_a, y.entropy AS entropy_b
FROM {a} AS x
JOIN {b} AS y ON x.request_id = y.request_id AND x.pos = y.pos
"""

# One comparable token: both logprobs present. Δ is computed in DOUBLE. Token clip: ratio outside
# [1 − eps, 1 + eps]; a token with exactly one -inf side has ratio 0 or +inf and counts as clipped;
# both -inf gives Δ = NaN and the token is excluded from clip and KL (counted as nonfinite).
TOKEN_PAIR_SQL = """
SELECT p.request_id, p.pos, p.weight_version,
       p.logprob_a::DOUBLE AS logprob_a, p.logprob_b::DOUBLE AS logprob_b,
       p.logprob_a::DOUBLE - p.logprob_b::DOUBLE AS delta,
       abs(p.logprob_a::DOUBLE - p.logprob_b::DOUBLE) AS abs_delta,
       exp(p.logprob_a::DOUBLE - p.logprob_b::DOUBLE) AS ratio,
       isfinite(p.logprob_a::DOUBLE - p.logprob_b::DOUBLE) AS finite,
       CASE WHEN isnan(p.logprob_a::DOUBLE - p.logprob_b::DOUBLE) THEN NULL
            ELSE abs(exp(p.logprob_a::DOUBLE - p.logprob_b::DOUBLE) - 1.0) > {eps} END AS clipped,
       CASE WHEN isfinite(p.logprob_a::DOUBLE - p.logprob_b::DOUBLE)
            THEN exp(p.logprob_b::DOUBLE - p.logprob_a::DOUBLE) - 1.0 + (p.logprob_a::DOUBLE - p.logprob_b::DOUBLE) END AS k3,
       p.entropy_a, p.entropy_b
FROM ({pairs}) AS p
WHERE p.logprob_a IS NOT NULL AND p.logprob_b IS NOT NULL
"""

# The public per-token view adds the request's keys. Aggregations use TOKEN_PAIR_SQL and join
# request_info once per request instead: per token it cost +46 % CPU at 100 M tokens
# (docs/benchmarks.md).
TOKEN_DIFF_SQL = """
SELECT p.request_id, p.pos, r.step, r.group_id, r.sampling, r.temperature, r.cache_hit,
       p.* EXCLUDE (request_id, pos)
FROM ({pairs}) AS p
LEFT JOIN request_info AS r ON r.request_id = p.request_id
"""

# Per-request sums: token metrics aggregate exactly from these (Σ sums / Σ counts), and the GSPO
# sequence ratio exp(mean Δ over the sequence) is per request by definition. Sums of CASE, not
# FILTER clauses: 26 % less CPU for this aggregate (the query's hot spot once the join is gone).
SEQ_DIFF_SQL = """
SELECT g.*,
       exp(g.seq_mean_delta) AS seq_ratio,
       CASE WHEN isnan(g.seq_mean_delta) THEN NULL ELSE abs(exp(g.seq_mean_delta) - 1.0) > {eps} END AS seq_clipped
FROM (
    SELECT t.request_id,
           count(*) AS tokens,
           sum(t.finite::INT) AS finite_tokens,
           count(*) - sum(t.finite::INT) AS nonfinite_tokens,
           count(t.clipped) AS clip_defined,
           coalesce(sum(t.clipped::INT), 0) AS clipped_tokens,
           sum(CASE WHEN t.finite THEN t.delta END) AS sum_delta,
           sum(CASE WHEN t.finite THEN t.abs_delta END) AS sum_abs_delta,
           max(CASE WHEN t.finite THEN t.abs_delta END) AS max_abs_delta,
           sum(t.k3) AS sum_k3,
           sum(t.entropy_a) AS sum_entropy_a, count(t.entropy_a) AS n_entropy_a,
           sum(t.entropy_b) AS sum_entropy_b, count(t.entropy_b) AS n_entropy_b,
           avg(CASE WHEN NOT isnan(t.delta) THEN t.delta END) AS seq_mean_delta
    FROM ({token_pairs}) AS t
    GROUP BY t.request_id
) AS g
"""

# The metric columns every diff_by_<key> returns, from sums s.* (per request or per token key).
_METRICS = """
       coalesce(sum(s.tokens), 0)::BIGINT AS tokens,
       sum(s.sum_delta) / nullif(sum(s.finite_tokens), 0) AS mean_delta,
       sum(s.sum_abs_delta) / nullif(sum(s.finite_tokens), 0) AS mean_abs_delta,
       max(s.max_abs_delta) AS max_abs_delta,
       sum(s.clipped_tokens) / nullif(sum(s.clip_defined), 0) AS clip_rate,
       sum(s.sum_delta) / nullif(sum(s.finite_tokens), 0) AS k1,
       sum(s.sum_k3) / nullif(sum(s.finite_tokens), 0) AS k3,
       coalesce(sum(s.nonfinite_tokens), 0)::BIGINT AS nonfinite_tokens,
       sum(s.sum_entropy_a) / nullif(sum(s.n_entropy_a), 0) AS entropy_a,
       sum(s.sum_entropy_b) / nullif(sum(s.n_entropy_b), 0) AS entropy_b"""

BY_REQUEST_KEY_SQL = """
SELECT {key} AS {name},
       count(s.request_id) AS requests,{metrics},
       avg(s.seq_ratio) FILTER (WHERE s.seq_clipped IS NOT NULL) AS mean_seq_ratio,
       avg(s.seq_clipped::DOUBLE) AS seq_clip_rate
FROM request_info AS r
LEFT JOIN ({seq_diff}) AS s ON s.request_id = r.request_id
GROUP BY ALL
ORDER BY 1 NULLS FIRST
"""

BY_TOKEN_KEY_SQL = """
SELECT {key} AS {name},
       count(DISTINCT s.request_id) AS requests,{metrics},
       NULL::DOUBLE AS mean_seq_ratio,
       NULL::DOUBLE AS seq_clip_rate
FROM (SELECT t.request_id, t.pos, t.weight_version,
             1 AS tokens, t.finite::INT AS finite_tokens, (NOT t.finite)::INT AS nonfinite_tokens,
             (t.clipped IS NOT NULL)::INT AS clip_defined, coalesce(t.clipped, false)::INT AS clipped_tokens,
             CASE WHEN t.finite THEN t.delta END AS sum_delta,
             CASE WHEN t.finite THEN t.abs_delta END AS sum_abs_delta,
             CASE WHEN t.finite THEN t.abs_delta END AS max_abs_delta,
             t.k3 AS sum_k3,
             t.entropy_a AS sum_entropy_a, (t.entropy_a IS NOT NULL)::INT AS n_entropy_a,
             t.entropy_b AS sum_entropy_b, (t.entropy_b IS NOT NULL)::INT AS n_entropy_b
      FROM ({token_pairs}) AS t) AS s
GROUP BY ALL
ORDER BY 1 NULLS FIRST
"""


def _sql_str(s: object) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _replay_rel(trace: Trace, name: str) -> str | None:
    """A scan of replay ``name``'s tokens alone (a filter on one replay never scans the others),
    or None when it has no parts yet."""
    return trace.scan_sql("replay_tokens", name)


def source_sql(trace: Trace) -> dict[str, str]:
    """Source name → a SELECT of (request_id, pos, logprob, entropy, weight_version)."""
    out = {
        "recorded": "SELECT request_id, pos, logprob, NULL::FLOAT AS entropy, weight_version FROM tokens",
        "trainer": "SELECT request_id, pos, logprob, entropy, policy_version AS weight_version FROM trainer",
    }
    for name in trace.replay_names():
        rel = _replay_rel(trace, name)
        if rel is None:
            continue
        out[f"replay:{name}"] = f"SELECT request_id, pos, logprob, entropy, weight_version FROM {rel}"
        out[f"replay:{name}:processed"] = (
            f"SELECT request_id, pos, processed_logprob AS logprob, entropy, weight_version FROM {rel}"
        )
    return out


def copied_pairs_sql(trace: Trace) -> dict[tuple[str, str], str]:
    """(a, b) → pair SELECT read from one replay alone, for recorded vs every replay that copied
    the recorded values (both orders, raw and processed).

    Only a replay run on this very trace qualifies (its replay.json has ``recorded_copy`` and
    this trace's id): a counterfactual replay made in a scratch trace, or one written by an older
    tracekit or an importer, is compared by the hash join."""
    from ..errors import TraceFormatError

    out: dict[tuple[str, str], str] = {}
    tid = trace.manifest.get("trace_id")
    for name in trace.replay_names():
        rel = _replay_rel(trace, name)
        if rel is None:
            continue
        try:
            meta = trace.replay_meta(name)
        except TraceFormatError:
            continue  # reported by validate; the hash join still works
        if meta.get("recorded_copy") is not True or not tid or meta.get("trace_id") != tid:
            continue
        for suffix, col in (("", "logprob"), (":processed", "processed_logprob")):
            src = f"replay:{name}{suffix}"
            out[("recorded", src)] = (
                "SELECT request_id, pos, coalesce(recorded_weight_version, weight_version) AS weight_version, "
                f"recorded_logprob AS logprob_a, {col} AS logprob_b, NULL::FLOAT AS entropy_a, entropy AS entropy_b "
                f"FROM {rel}"
            )
            out[(src, "recorded")] = (
                "SELECT request_id, pos, coalesce(weight_version, recorded_weight_version) AS weight_version, "
                f"{col} AS logprob_a, recorded_logprob AS logprob_b, entropy AS entropy_a, NULL::FLOAT AS entropy_b "
                f"FROM {rel}"
            )
    return out


def join_pairs_sql(a: str, b: str) -> str:
    """Two sources (SELECTs or relation names) paired on (request_id, pos) by a hash join."""
    return JOIN_PAIRS_SQL.format(a=_rel(a), b=_rel(b))


def source(srcs: dict[str, str], name: str) -> str:
    """``srcs[name]`` (from source_sql); QueryError naming the known sources if unknown."""
    if name not in srcs:
        raise QueryError(f"unknown source {name!r}; this trace has: {', '.join(srcs)}")
    return srcs[name]


def pairs_sql(trace: Trace, a: str, b: str) -> str:
    """Sources ``a`` and ``b`` (names) paired on (request_id, pos): one replay scan when it
    carries the recorded copy, else the hash join. QueryError for an unknown name."""
    srcs = source_sql(trace)
    sa, sb = source(srcs, a), source(srcs, b)
    fast = copied_pairs_sql(trace).get((a, b))
    return fast if fast is not None else join_pairs_sql(sa, sb)


def token_pairs_sql(pairs: str, eps: float | str = DEFAULT_EPS) -> str:
    """Per-token Δ metrics of a pair relation (see pairs_sql), no request keys."""
    return TOKEN_PAIR_SQL.format(pairs=pairs, eps=_eps(eps))


def token_diff_sql(pairs: str, eps: float | str = DEFAULT_EPS) -> str:
    """Per-token comparison of a pair relation, with the request's keys."""
    return TOKEN_DIFF_SQL.format(pairs=token_pairs_sql(pairs, eps))


def seq_diff_sql(pairs: str, eps: float | str = DEFAULT_EPS) -> str:
    return SEQ_DIFF_SQL.format(token_pairs=token_pairs_sql(pairs, eps), eps=_eps(eps))


def diff_by_sql(pairs: str, by: str, eps: float | str = DEFAULT_EPS) -> str:
    """Aggregated metrics of a pair relation grouped by ``by`` (one of AGG_KEYS)."""
    name = {"request": "request_id", "group": "group_id", "all": "scope"}.get(by, by)
    if by in REQUEST_KEYS:
        return BY_REQUEST_KEY_SQL.format(key=REQUEST_KEYS[by], name=name, metrics=_METRICS,
                                         seq_diff=seq_diff_sql(pairs, eps))
    if by in TOKEN_KEYS:
        return BY_TOKEN_KEY_SQL.format(key=TOKEN_KEYS[by], name=name, metrics=_METRICS,
                                       token_pairs=token_pairs_sql(pairs, eps))
    raise QueryError(f"cannot group by {by!r}; choose one of: {', '.join(AGG_KEYS)}")


def _rel(x: str) -> str:
    x = x.strip()
    return f"({x})" if x.upper().startswith(("SELECT", "WITH", "FROM")) else x


def _eps(eps: float | str) -> str:
    if isinstance(eps, str):
        return f"({eps})::DOUBLE"  # a macro parameter name
    e = float(eps)
    if not (0.0 < e < 1.0):
        raise QueryError(f"eps must be in (0, 1), got {eps}")
    return repr(e)


def connect(trace: Trace, *, read_only: bool = True, check_parts: bool = True) -> duckdb.DuckDBPyConnection:
    """``trace.connect`` plus the comparison views and macros: the connection to compare on."""
    return trace.connect(read_only=read_only, check_parts=check_parts, install=install)


def install(con: duckdb.DuckDBPyConnection, trace: Trace) -> None:
    """Create the comparison views and macros on ``con`` (a connection from ``Trace.connect``)."""
    sources = source_sql(trace)
    union = "\nUNION ALL\n".join(
        f"SELECT {_sql_str(name)} AS source, * FROM ({sql})" for name, sql in sources.items()
    )
    con.execute(f"CREATE VIEW token_sources AS {union}")
    names = ", ".join(f"({_sql_str(n)})" for n in sources)
    con.execute(f"CREATE VIEW comparison_sources AS SELECT * FROM (VALUES {names}) AS s(source)")
    con.execute(f"CREATE VIEW request_info AS {REQUEST_INFO_SQL}")
    # Macros take source names; constant filters prune every other branch: of token_sources, and
    # of the pair union (copied pairs read one replay; any other (a, b) takes the hash join).
    a_rel = "(SELECT * FROM token_sources WHERE source = a)"
    b_rel = "(SELECT * FROM token_sources WHERE source = b)"
    copied = copied_pairs_sql(trace)
    conds = [f"(a = {_sql_str(x)} AND b = {_sql_str(y)})" for x, y in copied]
    branches = [f"SELECT * FROM ({sql}) WHERE {c}" for sql, c in zip(copied.values(), conds)]
    branches.append(f"SELECT * FROM ({join_pairs_sql(a_rel, b_rel)}) WHERE NOT ({' OR '.join(conds) or 'false'})")
    pairs = "\nUNION ALL\n".join(branches)
    con.execute(f"CREATE MACRO token_diff(a, b, eps := {DEFAULT_EPS}) AS TABLE {token_diff_sql(pairs, 'eps')}")
    con.execute(f"CREATE MACRO seq_diff(a, b, eps := {DEFAULT_EPS}) AS TABLE {seq_diff_sql(pairs, 'eps')}")
    for key in AGG_KEYS:
        con.execute(f"CREATE MACRO diff_by_{key}(a, b, eps := {DEFAULT_EPS}) AS TABLE {diff_by_sql(pairs, key, 'eps')}")
