"""`tracekit info`: what a trace holds, as a plain dict (the CLI renders it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from ..errors import TraceFormatError
from .reader import Trace, one_line

_ENGINE_COLS = [
    "engine_id", "role", "surface", "vllm_version", "torch_version", "platform", "model", "dtype",
    "logprobs_mode", "enable_prefix_caching", "async_scheduling", "head_dtype",
]


def info(root: str | Path) -> dict[str, Any]:
    trace = Trace(root)
    con = trace.connect(read_only=False)
    try:
        one = lambda sql: con.execute(sql).fetchone()  # noqa: E731
        n_tokens = one("SELECT count(*) FROM tokens")[0]
        steps = one("SELECT count(DISTINCT step), min(step), max(step) FROM requests")
        runs = con.execute(
            "SELECT run_id, kind, min(time) AS started, max(CASE WHEN event='close' THEN stats END) AS stats "
            "FROM runs GROUP BY run_id, kind ORDER BY started"
        ).fetchall()
        engines = con.execute(f"SELECT {', '.join(_ENGINE_COLS)} FROM engines ORDER BY created_at").fetchall()
        replays = []
        for name in trace.replay_names():
            meta = trace.replay_meta(name)
            r = con.execute(
                "SELECT count(*) FILTER (WHERE status='ok'), count(*) FILTER (WHERE status<>'ok') "
                "FROM replay_requests WHERE replay = ?", [name]
            ).fetchone()
            t = con.execute("SELECT count(*) FROM replay_tokens WHERE replay = ?", [name]).fetchone()[0]
            replays.append({"name": name, "mode": meta.get("mode"), "requests_ok": r[0],
                            "requests_not_ok": r[1], "tokens": t, "overrides": meta.get("overrides")})
        dropped: dict[str, int] = {}
        open_runs = 0
        for _, _, _, stats in runs:
            if stats is None:
                open_runs += 1
                continue
            for k, v in json.loads(stats).get("rows_dropped", {}).items():
                dropped[k] = dropped.get(k, 0) + int(v)
        size = trace.size_bytes()
        tok_bytes = sum(p.path.stat().st_size for p in trace.parts("tokens"))
        return {
            "path": str(trace.root),
            "trace_id": trace.manifest.get("trace_id"),
            "format_version": trace.manifest.get("format_version"),
            "created": trace.manifest.get("created"),
            "tracekit_version": trace.manifest.get("tracekit_version"),
            "runs": len(runs),
            "runs_not_closed": open_runs,
            "rows_dropped": dropped,
            "engines": [dict(zip(_ENGINE_COLS, e)) for e in engines],
            "steps": steps[0],
            "step_range": [steps[1], steps[2]],
            "requests": one("SELECT count(*) FROM requests")[0],
            "tokens": n_tokens,
            "trainer_tokens": one("SELECT count(*) FROM trainer")[0],
            "weight_versions_used": one("SELECT count(DISTINCT weight_version) FROM tokens")[0],
            "weight_snapshots": one("SELECT count(DISTINCT version) FROM weights")[0],
            "weight_syncs": one("SELECT count(*) FROM weight_syncs")[0],
            "replays": replays,
            "size_bytes": size,
            "tokens_bytes": tok_bytes,
            "bytes_per_token": (tok_bytes / n_tokens) if n_tokens else None,
            # `tracekit import` provenance (source format/version, input hashes, null reasons), or None
            "import": trace.manifest.get("import"),
        }
    except duckdb.Error as e:  # footers were fine, a data page is not
        raise TraceFormatError(f"{trace.root}: unreadable data ({one_line(e)}); run `tracekit validate`") from None
    finally:
        con.close()

