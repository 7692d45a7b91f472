"""`tracekit validate`: schema of every part, keys, references and weight blobs.

Errors make the trace unfit for replay/attribution; warnings are expected after a crash
(a request whose token part was not yet renamed) or by design (snapshots every N versions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from ..errors import TraceFormatError
from ..schema import tables
from .location import fs_path
from .reader import Trace, check_part, one_line
from .weights import verify as verify_weights


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    message: str


# (name, SQL counting offending rows, level, message template)
_CHECKS: list[tuple[str, str, str, str]] = [
    ("dup_requests", "SELECT count(*) FROM (SELECT request_id FROM requests GROUP BY 1 HAVING count(*) > 1)",
     "error", "{n} duplicate request_id(s) in requests"),
    ("dup_tokens", "SELECT count(*) FROM (SELECT request_id, pos FROM tokens GROUP BY 1, 2 HAVING count(*) > 1)",
     "error", "{n} duplicate (request_id, pos) in tokens"),
    ("dup_engines", "SELECT count(*) FROM (SELECT engine_id FROM engines GROUP BY 1 HAVING count(*) > 1)",
     "error", "{n} duplicate engine_id(s) in engines"),
    ("orphan_tokens", "SELECT count(*) FROM tokens t ANTI JOIN requests r USING (request_id)",
     "error", "{n} token(s) whose request_id is not in requests"),
    ("orphan_replay_tokens", "SELECT count(*) FROM replay_tokens t ANTI JOIN requests r USING (request_id)",
     "error", "{n} replayed token(s) whose request_id is not in requests"),
    ("unknown_engine", "SELECT count(*) FROM requests r WHERE engine_id IS NOT NULL AND engine_id NOT IN (SELECT engine_id FROM engines)",
     "error", "{n} request(s) name an engine_id that is not in engines"),
    ("short_requests",
     "SELECT count(*) FROM requests r LEFT JOIN (SELECT request_id, count(*) AS n FROM tokens GROUP BY 1) t USING (request_id) "
     "WHERE coalesce(t.n, 0) < len(r.output_token_ids)",
     "warning", "{n} request(s) have fewer token rows than output tokens (a crash between parts, or dropped rows)"),
    ("orphan_trainer", "SELECT count(*) FROM trainer t ANTI JOIN requests r USING (request_id)",
     "warning", "{n} trainer row(s) whose request_id is not in requests (yet)"),
    ("trainer_past_sample",
     "SELECT count(*) FROM trainer t JOIN requests r USING (request_id) WHERE t.pos >= len(r.output_token_ids)",
     "warning", "{n} trainer logprob(s) at positions past their sample's last token (more logprobs than tokens: "
     "misaligned? comparisons ignore them)"),
    ("orphan_rewards", "SELECT count(*) FROM rewards t ANTI JOIN requests r USING (request_id)",
     "warning", "{n} reward row(s) whose request_id is not in requests (yet)"),
    ("versions_without_snapshot",
     "SELECT count(DISTINCT weight_version) FROM tokens WHERE weight_version IS NOT NULL "
     "AND weight_version NOT IN (SELECT version FROM weights)",
     "warning", "{n} weight version(s) used by tokens have no snapshot (replay needs --allow-missing-weights for them)"),
]


def validate(root: str | Path, *, deep: bool = True) -> list[Finding]:
    """All problems found in the trace at ``root`` (raises TraceFormatError if it is not one)."""
    trace = Trace(root)
    findings: list[Finding] = []
    for part in trace.parts():
        try:
            check_part(part)
            if deep:  # full decode with page checksums catches bit flips in data pages
                fs, path = fs_path(part.path)
                pq.read_table(path, page_checksum_verification=True, filesystem=fs)
        except TraceFormatError as e:
            findings.append(Finding("error", str(e)))
        except Exception as e:
            findings.append(Finding("error", f"{part.path}: unreadable data ({one_line(e)})"))
    leftovers = [p for p in trace.root.rglob(".*.tmp") if p.is_file()]
    if leftovers:  # a kill -9 mid-part or mid-blob leaves its hidden temp file behind
        findings.append(Finding("warning", f"{len(leftovers)} hidden temp file(s) left by an interrupted "
                                "writer (never read; safe to delete when no writer is running)"))
    if any(f.level == "error" for f in findings):
        return findings  # the SQL checks below would only fail on the same files
    con = trace.connect(read_only=False, check_parts=False)
    try:
        for t in tables().values():
            for c in t.columns:
                if not c.nullable:
                    n = con.execute(f"SELECT count(*) FROM {t.name} WHERE {c.name} IS NULL").fetchone()[0]
                    if n:
                        findings.append(Finding("error", f"{n} row(s) of {t.name} have no {c.name}"))
        for _, sql, level, msg in _CHECKS:
            n = con.execute(sql).fetchone()[0]
            if n:
                findings.append(Finding(level, msg.format(n=n)))
    except duckdb.Error as e:  # e.g. a corrupt data page under --quick (pages not decoded above)
        findings.append(Finding("error", f"unreadable data ({one_line(e)})"))
        return findings
    finally:
        con.close()
    findings.extend(Finding("error", p) for p in verify_weights(trace))
    return findings
