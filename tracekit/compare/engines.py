"""What changed between the recorded engine and a replay's engine: the migration's config diff.

Both fingerprints are in the trace (``engines``, ``replay_engines``), taken the same way from the
running engine, so the diff is of *effective* settings (what vLLM resolved), not of the flags a
user typed. JSON columns are compared key by key (``generation_config.mode``, ``env.VLLM_…``).
Settings that say where or how the replay ran rather than how it computes are left out (ids,
model path, ``max_logprobs``, which a score replay raises to -1, tracekit's capability probes),
as are env vars vLLM fills with per-process random names and generation_config.json bookkeeping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import duckdb

# Fingerprint columns compared, in report order; JSON ones are flattened to dotted keys.
FIELDS = (
    "vllm_version", "torch_version", "transformers_version", "python_version", "platform", "device_name",
    "model_hash", "dtype", "head_dtype", "logprobs_mode", "enable_prefix_caching", "block_size",
    "async_scheduling", "max_model_len", "generation_config", "default_sampling_params", "env",
)
_JSON_FIELDS = {"generation_config", "default_sampling_params", "env"}
# Per-process random names, and generation_config.json bookkeeping that does not sample anything.
_IGNORED = {
    "env.VLLM_DIST_IDENT", "env.VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME",
    "generation_config.file.transformers_version", "generation_config.file._from_model_config",
}


@dataclass(frozen=True)
class EngineChange:
    """One setting that differs; ``cause`` is the cause whose knob it is (None: context only)."""

    knob: str
    recorded: Any
    replay: Any
    cause: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def _settings(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in FIELDS:
        v = row.get(f)
        if f in _JSON_FIELDS and isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                pass  # compared as the raw string
        _flatten(f, v, out)
    return {k: v for k, v in out.items() if k not in _IGNORED}


def _row(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> dict[str, Any] | None:
    cur = con.execute(sql, params)
    r = cur.fetchone()
    return None if r is None else dict(zip([d[0] for d in cur.description], r, strict=True))


def engine_changes(
    con: duckdb.DuckDBPyConnection, replay: str, knob_causes: Mapping[str, str] | None = None
) -> list[EngineChange] | None:
    """Settings of ``replay``'s engine that differ from the recorded engine it replays.

    The recorded engine is the replay's ``base_engine_id`` (``replay.json``), else the only
    recorded engine. ``knob_causes`` maps a fingerprint column to a cause id (a dotted key maps
    through its column). None when either fingerprint is missing.
    """
    meta = _row(con, "SELECT meta FROM replays WHERE replay = ?", [replay])
    base = json.loads(meta["meta"]).get("base_engine_id") if meta and meta["meta"] else None
    if base:
        rec = _row(con, "SELECT * FROM engines WHERE engine_id = ? ORDER BY created_at LIMIT 1", [base])
    elif con.execute("SELECT count(DISTINCT engine_id) FROM engines").fetchone()[0] == 1:
        rec = _row(con, "SELECT * FROM engines LIMIT 1", [])
    else:
        rec = None
    new = _row(con, "SELECT * FROM replay_engines WHERE replay = ? ORDER BY created_at LIMIT 1", [replay])
    if rec is None or new is None:
        return None
    a, b = _settings(rec), _settings(new)
    causes = knob_causes or {}
    return [
        EngineChange(k, a.get(k), b.get(k), causes.get(k.split(".", 1)[0]))
        for k in dict.fromkeys([*a, *b])  # report order: FIELDS, then keys as they come
        if a.get(k) != b.get(k)
    ]
