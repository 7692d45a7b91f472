"""Replay plan: which requests to run, with which weights and which engine config.

Reads the trace (parent side, DuckDB): the recorded requests with their completion and weight
version, the snapshots per version, the recording engine's fingerprint, and the replay's own
ledger (``replay_requests``) so a resumed or sharded run skips what is already done.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import TracekitError, WeightsError
from ..store.reader import Trace
from ..store.reader import json_value as _json

# Fingerprint columns that map 1:1 onto vLLM engine args of the same name.
_DIRECT_ARGS = ("dtype", "logprobs_mode", "enable_prefix_caching", "block_size", "max_model_len",
                "max_logprobs", "async_scheduling")
# Values vLLM resolves per platform (they show up among the effective args) but that must be
# re-resolved on the replay box, e.g. a CPU worker class would break a GPU replay.
_PLATFORM_ARGS = ("worker_cls", "disable_custom_all_reduce", "distributed_executor_backend", "device")


class PlanError(TracekitError):
    """The trace cannot be replayed as asked (bad shard, no engine fingerprint, ...)."""


@dataclass
class Group:
    """Requests replayed under one weight version (None: the model as loaded).

    Holds only ids and labels; payloads (prompt, completion, params) are streamed from the
    trace batch by batch (:func:`iter_requests`), so a 100 M-token trace is never in memory.
    """

    version: int | None
    tensors: list[tuple[str, str]]  # (tensor name, blob sha256); empty: no reload
    request_ids: list[int]
    labels: dict[int, int | None]  # request_id -> recorded version label
    num_tokens: int = 0


@dataclass
class Plan:
    groups: list[Group]
    skipped: list[tuple[int, int | None, str]]  # (request_id, version, why)
    base_engine: dict[str, Any] | None
    engines_seen: list[str]
    done: int  # requests this shard already has in the ledger (resume)
    shard: tuple[int, int] | None
    notes: list[str] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return sum(len(g.request_ids) for g in self.groups)

    @property
    def num_tokens(self) -> int:
        return sum(g.num_tokens for g in self.groups)


def parse_shard(s: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'i/n' (0-based i) → (i, n)."""
    if s is None:
        return None
    if isinstance(s, tuple):
        i, n = s
    else:
        try:
            a, b = str(s).split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise PlanError(f"--shard must look like I/N (e.g. 0/4), got {s!r}") from None
    if n < 1 or not 0 <= i < n:
        raise PlanError(f"--shard {i}/{n}: need 0 <= I < N")
    return i, n


def shard_index(request_ids: Any, n: int) -> np.ndarray:
    """Deterministic shard of each request id (splitmix64 hash mod n): the same on every machine."""
    x = np.asarray(request_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n)).astype(np.int64)


def in_shard(request_ids: Any, shard: tuple[int, int] | None) -> np.ndarray:
    ids = np.asarray(request_ids, dtype=np.int64)
    if shard is None:
        return np.ones(len(ids), dtype=bool)
    return shard_index(ids, shard[1]) == shard[0]


# One light row per request: what planning needs (payloads are fetched later, per group).
_INDEX_SQL = """
SELECT r.request_id, r.engine_id,
       coalesce(r.weight_version_start, t.v0) AS version,
       (r.weight_version_start IS NOT NULL AND r.weight_version_end IS NOT NULL
        AND r.weight_version_start <> r.weight_version_end) AS mixed,
       coalesce(len(r.output_token_ids), t.n, 0) AS n_out
FROM requests r
LEFT JOIN (SELECT request_id, arg_min(weight_version, pos) AS v0, count(*) AS n
           FROM tokens GROUP BY request_id) t USING (request_id)
ORDER BY r.request_id
"""

# Payloads of the requests listed in the registered table ``_tk_ids``, in request_id order, with
# the recorded per-token logprob and weight version (the parent copies them next to the replay's
# own values; they never go to the worker).
_PAYLOAD_SQL = """
SELECT r.request_id, r.prompt_token_ids,
       coalesce(r.output_token_ids, t.ids) AS output,
       t.pos AS recorded_pos, t.lps AS recorded_logprob, t.wvs AS recorded_weight_version,
       r.sampling_resolved, r.temperature, r.top_p, r.top_k, r.min_p, r.seed, r.max_tokens
FROM requests r SEMI JOIN _tk_ids USING (request_id)
LEFT JOIN (SELECT request_id, list(token_id ORDER BY pos) AS ids, list(pos ORDER BY pos) AS pos,
                  list(logprob ORDER BY pos) AS lps, list(weight_version ORDER BY pos) AS wvs
           FROM tokens SEMI JOIN _tk_ids USING (request_id)
           GROUP BY request_id) t USING (request_id)
ORDER BY r.request_id
"""


def ledger_ids(con: Any, name: str) -> set[int]:
    rows = con.execute("SELECT DISTINCT request_id FROM replay_requests WHERE replay = ?", [name]).fetchall()
    return {int(r[0]) for r in rows}


def build_plan(
    trace: Trace,
    name: str,
    *,
    shard: str | tuple[int, int] | None = None,
    limit: int | None = None,
    resume: bool = False,
    allow_missing_weights: bool = False,
) -> Plan:
    sh = parse_shard(shard)
    con = trace.connect(read_only=False, check_parts=False)
    try:
        rows = con.execute(_INDEX_SQL).fetchall()
        cols = [d[0] for d in con.description]
        snaps: dict[int, list[tuple[str, str]]] = {}
        for v, n, sha in con.execute("SELECT version, name, sha256 FROM weights ORDER BY version, name").fetchall():
            snaps.setdefault(int(v), []).append((n, sha))
        synced = {int(v) for (v,) in con.execute("SELECT DISTINCT version FROM weight_syncs").fetchall()}
        done_ids = ledger_ids(con, name)
        engines = {r[0]: r for r in con.execute("SELECT * FROM engines").fetchall()}
        ecols = [d[0] for d in con.description]
    finally:
        con.close()

    reqs = [dict(zip(cols, r)) for r in rows]
    mask = in_shard([r["request_id"] for r in reqs], sh)
    mine = [r for r, m in zip(reqs, mask) if m]
    done_mine = [r for r in mine if r["request_id"] in done_ids]
    if done_mine and not resume:
        raise PlanError(
            f"replay {name!r} already has {len(done_mine)} request(s) of this "
            f"{'shard' if sh else 'trace'}; pass --resume to continue it or pick another --name"
        )
    todo = [r for r in mine if r["request_id"] not in done_ids]
    if limit is not None:
        todo = todo[: max(0, int(limit))]

    notes: list[str] = []
    groups: dict[int | None, Group] = {}
    skipped: list[tuple[int, int | None, str]] = []
    missing: Counter[int] = Counter()
    as_loaded: Counter[int] = Counter()
    n_mixed = 0
    # A trace that knows versions and has none for a request: the recorder could not know it
    # (docs/recording.md). Replaying it under any weights would compare against a guess.
    versioned = bool(snaps) or any(r["version"] is not None for r in reqs)
    unknown = 0
    for r in todo:
        label = None if r["version"] is None else int(r["version"])
        v = label
        if v is None and versioned:
            unknown += 1
            skipped.append((int(r["request_id"]), None, "weight version unknown (the recorder could not know it)"))
            continue
        if v is not None and v not in snaps:
            if v in synced:  # pushed by a weight sync but never snapshotted: cannot be rebuilt
                missing[v] += 1
                skipped.append((int(r["request_id"]), v, f"no weight snapshot for version {v}"))
                continue
            # Never synced: the weights the engine was started with, i.e. the model as loaded.
            as_loaded[v] += 1
            v = None
        n_mixed += bool(r["mixed"])
        g = groups.setdefault(v, Group(v, snaps.get(v, []) if v is not None else [], [], {}))
        g.request_ids.append(int(r["request_id"]))
        g.labels[int(r["request_id"])] = label
        g.num_tokens += int(r["n_out"] or 0)
    if as_loaded:
        vs = ", ".join(str(v) for v in sorted(as_loaded))
        notes.append(f"version(s) {vs} have no snapshot and were never synced (the engine's initial weights): "
                     "replayed with the model as loaded")
    if missing and not allow_missing_weights:
        vs = ", ".join(f"{v} ({n} requests)" for v, n in sorted(missing.items()))
        raise WeightsError(
            f"no weight snapshot in the trace for version(s) {vs}; pass --allow-missing-weights to skip them"
        )
    if unknown:
        notes.append(f"{unknown} request(s) have no known weight version and were skipped (not replayed under a guess)")
    if n_mixed:
        notes.append(f"{n_mixed} request(s) spanned a weight update; replayed under their first token's version")
    # The model as loaded first: after a reload the engine no longer holds the base weights.
    ordered = sorted(groups.values(), key=lambda g: (g.version is not None, g.version or 0))

    used = Counter(r["engine_id"] for r in todo if r["engine_id"] is not None)
    base = None
    if used:
        eid = used.most_common(1)[0][0]
        base = dict(zip(ecols, engines[eid])) if eid in engines else None
    elif engines:
        recs = [dict(zip(ecols, e)) for e in engines.values() if e[ecols.index("role")] != "replay"]
        base = recs[0] if recs else None
    if len(used) > 1:
        notes.append(f"requests came from {len(used)} engines; replay engine starts from {base and base['engine_id']}")
    return Plan(ordered, skipped, base, sorted(used), len(done_mine), sh, notes)


def iter_requests(trace: Trace, group: Group, batch: int) -> Any:
    """Yield lists of at most ``batch`` request payloads of ``group``, in request_id order.

    One scan of the trace per group (DuckDB streams the result); the recorded label rides along.
    """
    import pyarrow as pa

    con = trace.connect(read_only=False, check_parts=False)
    try:
        con.register("_tk_ids", pa.table({"request_id": pa.array(group.request_ids, pa.int64())}))
        cur = con.execute(_PAYLOAD_SQL)
        cols = [d[0] for d in cur.description]
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            out = []
            for row in rows:
                req = _request(dict(zip(cols, row)))
                req["label"] = group.labels.get(req["request_id"])
                out.append(req)
            yield out
    finally:
        con.close()


def _request(r: dict[str, Any]) -> dict[str, Any]:
    s = r["sampling_resolved"]
    try:
        s = json.loads(s) if isinstance(s, str) else s
    except json.JSONDecodeError:
        s = None
    s = s if isinstance(s, dict) else None
    # Scalar columns mirror the resolved params; fall back to the JSON when an importer left them null.
    scal = {k: r[k] if r[k] is not None else (s or {}).get(k)
            for k in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")}
    return {
        "request_id": int(r["request_id"]),
        "prompt": [int(x) for x in (r["prompt_token_ids"] or [])],
        "output": [int(x) for x in (r["output"] or [])],
        "sampling": s,
        **scal,
        "recorded": Recorded(r["recorded_pos"] or [], r["recorded_logprob"] or [], r["recorded_weight_version"] or []),
    }


class Recorded:
    """The recording's per-token values of one request, looked up by position."""

    __slots__ = ("logprob", "pos", "weight_version")

    def __init__(self, pos: list[int], logprob: list[float | None], weight_version: list[int | None]) -> None:
        self.pos, self.logprob, self.weight_version = pos, logprob, weight_version

    def aligned(self, n: int) -> tuple[list[float | None], list[int | None]]:
        """(logprob, weight_version) at positions 0..n-1, None where the recording has no token."""
        if len(self.pos) >= n and (n == 0 or self.pos[n - 1] == n - 1):  # dense 0..len-1 (always, for our writer)
            return self.logprob[:n], self.weight_version[:n]
        lp: list[float | None] = [None] * n
        wv: list[int | None] = [None] * n
        for p, x, v in zip(self.pos, self.logprob, self.weight_version):
            if 0 <= p < n:
                lp[p], wv[p] = x, v
        return lp, wv


def recorded_engine_args(fp: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM engine kwargs that reproduce the recording engine's effective numerics config.

    Starts from the fingerprint's ``engine_args`` (as passed / non-default), then pins every
    effective value the fingerprint holds: model, dtype, logprobs_mode, prefix caching, block
    size, async scheduling, max_model_len, generation_config mode/overrides and the lm_head
    dtype (``hf_overrides.head_dtype`` when it differs from the model dtype).
    """
    if not fp:
        return {}
    args = {k: v for k, v in (_json(fp.get("engine_args")) or {}).items() if k not in _PLATFORM_ARGS}
    if fp.get("model"):
        args["model"] = fp["model"]
    for k in _DIRECT_ARGS:
        if fp.get(k) is not None:
            args[k] = fp[k]
    gen = _json(fp.get("generation_config"))
    if isinstance(gen, dict):
        if isinstance(gen.get("mode"), str):
            args["generation_config"] = gen["mode"]
        if gen.get("override"):
            args["override_generation_config"] = gen["override"]
    head, dtype = fp.get("head_dtype"), fp.get("dtype")
    hf = dict(_json(args.get("hf_overrides")) or {})
    if head and dtype and head != dtype:
        hf["head_dtype"] = head
    if hf:
        args["hf_overrides"] = hf
    else:
        args.pop("hf_overrides", None)
    return args
