"""A corpus of bad inputs, generated at test time from one good trace (no binary blobs in git).

``build_good_trace`` records a small but complete trace through the real ``TraceWriter`` and
``put_tensors``; every ``Case`` copies it, breaks one thing, and names the CLI invocation that
must refuse it with one clear line on stderr and exit code 2 (tests/test_bad_inputs.py).
Run ``python tests/bad_inputs.py OUT`` to materialise the corpus for manual poking.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit.schema import table
from tracekit.store import TraceWriter
from tracekit.store.parquet import write_part_atomic
from tracekit.store.weights import blob_path, put_tensors

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
N_REQ = 6
N_TOK = 5


def build_good_trace(root: Path) -> Path:
    """A valid trace holding every table, two weight versions and one replay."""
    w = TraceWriter(root, flush_interval=60, meta={"purpose": "bad-input corpus"})
    rid = w.run_id
    w.write("engines", {"engine_id": "e0", "run_id": rid, "created_at": NOW, "model": "/models/tiny",
                        "dtype": "bfloat16", "logprobs_mode": "raw_logprobs"})
    rng = np.random.default_rng(0)
    for v in (0, 1):
        tensors = {"lm_head.weight": rng.standard_normal((8, 4)).astype(np.float32),
                   "embed.weight": np.ones((8, 4), np.float32)}  # frozen: one blob for both versions
        w.write("weights", put_tensors(root, tensors, version=v, step=v, run_id=rid))
        w.write("weight_syncs", {"engine_id": "e0", "run_id": rid, "version": v, "step": v, "ok": True})
    w.write("requests", [
        {"request_id": i, "run_id": rid, "engine_id": "e0", "step": i // 3, "group_id": f"g{i // 3}",
         "sample_idx": i % 3, "prompt_token_ids": [1, 2, 3], "output_token_ids": list(range(10, 10 + N_TOK)),
         "sampling_requested": {"temperature": 0.7}, "sampling_resolved": {"temperature": 0.7, "top_p": 1.0},
         "temperature": 0.7, "weight_version_start": i // 3, "weight_version_end": i // 3, "t_submit": NOW}
        for i in range(N_REQ)
    ])
    for i in range(N_REQ):
        lp = -rng.random(N_TOK).astype(np.float32)
        w.write_columns("tokens", {"pos": np.arange(N_TOK, dtype=np.int32),
                                   "token_id": np.arange(10, 10 + N_TOK, dtype=np.int32), "logprob": lp},
                        request_id=i, weight_version=i // 3)
        w.write_columns("trainer", {"pos": np.arange(N_TOK, dtype=np.int32), "logprob": lp - 0.01},
                        request_id=i, policy_version=i // 3, step=i // 3)
    rw = TraceWriter(root, kind="replay", flush_interval=60)
    (root / "replays" / "r1").mkdir(parents=True, exist_ok=True)
    (root / "replays" / "r1" / "replay.json").write_text(json.dumps({"name": "r1", "mode": "score"}))
    for i in range(N_REQ):
        rw.write("replay_requests", {"request_id": i, "mode": "score", "status": "ok", "num_tokens": N_TOK},
                 replay="r1")
        rw.write_columns("replay_tokens", {"pos": np.arange(N_TOK, dtype=np.int32),
                                           "token_id": np.arange(10, 10 + N_TOK, dtype=np.int32),
                                           "logprob": -rng.random(N_TOK).astype(np.float32)},
                         request_id=i, replay="r1")
    for s in (w.close(), rw.close()):
        assert s.dropped == 0 and not s.errors, s
    return root


# ---------------------------------------------------------------------------- mutation helpers
def _part(root: Path, tname: str) -> Path:
    parts = sorted((root / table(tname).path).glob("*.parquet"))
    assert parts, f"no {tname} part"
    return parts[0]


def _truncate(frac: float, tname: str = "tokens") -> Callable[[Path, Path], None]:
    def f(root: Path, work: Path) -> None:
        p = _part(root, tname)
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * frac)])
    return f


def _flip_data_page(tname: str, column: str) -> Callable[[Path, Path], None]:
    """Flip one bit inside ``column``'s data page payload (page checksums must catch it)."""
    def f(root: Path, work: Path) -> None:
        p = _part(root, tname)
        md = pq.read_metadata(p)
        rg = md.row_group(0)
        cc = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == column)
        off = cc.data_page_offset + cc.total_compressed_size - 3  # last bytes: payload, not header
        data = bytearray(p.read_bytes())
        data[off] ^= 0x10
        p.write_bytes(bytes(data))
    return f


def _flip_footer(root: Path, work: Path) -> None:
    p = _part(root, "requests")
    data = bytearray(p.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    for k in range(start + 2, start + footer_len // 2, 7):  # scramble the thrift metadata
        data[k] ^= 0xFF
    p.write_bytes(bytes(data))


def _overwrite_part(tname: str, content: bytes) -> Callable[[Path, Path], None]:
    def f(root: Path, work: Path) -> None:
        _part(root, tname).write_bytes(content)
    return f


def _plant_part(tname: str, arrow: pa.Table, *, as_table: str | None = None) -> Callable[[Path, Path], None]:
    """Write ``arrow`` as an extra complete part of ``tname`` (bypassing the writer's checks)."""
    def f(root: Path, work: Path) -> None:
        d = root / table(tname).path
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(arrow, d / "part-99999999999999999999-planted-000001.parquet")
    return f


def _rows(tname: str, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=table(tname).arrow_schema)


def _plant_rows(tname: str, rows: list[dict]) -> Callable[[Path, Path], None]:
    """Extra rows with the right schema, written like the writer would (a valid part)."""
    def f(root: Path, work: Path) -> None:
        t = table(tname)
        write_part_atomic(_rows(tname, rows), t, root / t.path / "part-99999999999999999999-planted-000001.parquet")
    return f


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def f(root: Path, work: Path) -> None:
        p = root / "trace.json"
        m = json.loads(p.read_text())
        edit(m)
        p.write_text(json.dumps(m, indent=2))
    return f


def _manifest_bytes(content: bytes) -> Callable[[Path, Path], None]:
    def f(root: Path, work: Path) -> None:
        (root / "trace.json").write_bytes(content)
    return f


def _remove_manifest(root: Path, work: Path) -> None:
    (root / "trace.json").unlink()


def _manifest_is_dir(root: Path, work: Path) -> None:
    (root / "trace.json").unlink()
    (root / "trace.json").mkdir()


def _weights_sha(root: Path, name: str = "lm_head.weight", version: int = 1) -> str:
    t = pq.read_table(_part(root, "weights")).to_pylist()
    return next(r["sha256"] for r in t if r["name"] == name and r["version"] == version)


def _missing_blob(root: Path, work: Path) -> None:
    blob_path(root, _weights_sha(root)).unlink()


def _corrupt_blob(root: Path, work: Path) -> None:
    p = blob_path(root, _weights_sha(root))
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


class _Unpickled:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"lm_head.weight": _Unpickled(marker)})


def _plant_blob(content: Callable[[Path], bytes], version: int) -> Callable[[Path, Path], None]:
    """A blob stored under its own (correct) sha256 and a weights row naming it as ``version``."""
    def f(root: Path, work: Path) -> None:
        data = content(work)
        sha = hashlib.sha256(data).hexdigest()
        p = blob_path(root, sha)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        _plant_rows("weights", [{"version": version, "step": version, "name": "lm_head.weight", "sha256": sha,
                                 "created_at": NOW}])(root, work)
    return f


def _replace_blob_with_pickle(root: Path, work: Path) -> None:
    """Keep the row's sha256 but put a pickle where the safetensors blob should be."""
    blob_path(root, _weights_sha(root)).write_bytes(pickle_payload(work / "UNPICKLED"))


def _not_a_trace(root: Path, work: Path) -> None:
    shutil.rmtree(root)
    root.mkdir()
    (root / "notes.txt").write_text("just a directory\n")


def _a_file(root: Path, work: Path) -> None:
    shutil.rmtree(root)
    root.write_text("not a directory\n")


def _gone(root: Path, work: Path) -> None:
    shutil.rmtree(root)


def _bad_replay_meta(root: Path, work: Path) -> None:
    (root / "replays" / "r1" / "replay.json").write_text("{not json")


def _noop(root: Path, work: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path, Path], None]  # (trace root, scratch dir outside the trace)
    argv: tuple[str, ...]  # "{trace}" and "{work}" are filled in
    expect: str  # a substring the error line must contain (case-insensitive)
    known_bug: str | None = None  # test runs as a strict xfail until fixed


_tok = table("tokens")
_R = {"run_id": "x", "request_id": 1}

CASES: list[Case] = [
    # --- Parquet parts
    Case("truncated_part_validate", _truncate(0.5), ("validate", "{trace}"), "not a readable parquet part"),
    Case("truncated_part_info", _truncate(0.9), ("info", "{trace}"), "not a readable parquet part"),
    Case("empty_part_sql", _truncate(0.0), ("sql", "{trace}", "SELECT count(*) FROM tokens"), "parquet"),
    Case("truncated_requests_part_validate", _truncate(0.5, "requests"), ("validate", "{trace}"), "parquet"),
    Case("bitflip_data_page_validate", _flip_data_page("tokens", "logprob"), ("validate", "{trace}"), "unreadable data"),
    Case("bitflip_requests_page_validate", _flip_data_page("requests", "request_id"), ("validate", "{trace}"),
         "unreadable data"),
    Case("bitflip_footer_info", _flip_footer, ("info", "{trace}"), "parquet"),
    Case("text_file_as_part_sql", _overwrite_part("tokens", b"request_id,pos\n1,2\n"),
         ("sql", "{trace}", "SELECT 1"), "not a readable parquet part"),
    Case("random_bytes_as_part_validate", _overwrite_part("trainer", bytes(range(256)) * 4),
         ("validate", "{trace}"), "not a readable parquet part"),
    Case("wrong_column_type_validate",
         _plant_part("tokens", pa.table({"request_id": pa.array(["1"]), "pos": pa.array([0], pa.int32()),
                                         "token_id": pa.array([1], pa.int32())})),
         ("validate", "{trace}"), "has type string"),
    Case("unknown_column_info",
         _plant_part("tokens", pa.table({"request_id": pa.array([1], pa.int64()), "pos": pa.array([0], pa.int32()),
                                         "token_id": pa.array([1], pa.int32()), "surprise": pa.array([1.0])})),
         ("info", "{trace}"), "not in the tokens schema"),
    Case("missing_required_column_validate",
         _plant_part("tokens", pa.table({"request_id": pa.array([1], pa.int64()), "pos": pa.array([0], pa.int32())})),
         ("validate", "{trace}"), "required column 'token_id' is missing"),
    Case("other_tables_part_in_tokens_sql",
         _plant_part("tokens", pa.table({"run_id": ["x"], "event": ["start"]})),
         ("sql", "{trace}", "SELECT count(*) FROM tokens"), "not in the tokens schema"),
    # --- manifest / path
    Case("manifest_missing_info", _remove_manifest, ("info", "{trace}"), "no trace.json"),
    Case("manifest_not_json_validate", _manifest_bytes(b"{\"format\": \"tracekit-trace\", "),
         ("validate", "{trace}"), "corrupt manifest"),
    Case("manifest_binary_sql", _manifest_bytes(bytes(range(256))), ("sql", "{trace}", "SELECT 1"), "corrupt manifest"),
    Case("manifest_newer_format_info", _manifest(lambda m: m.update(format_version=99)), ("info", "{trace}"),
         "newer than this tracekit"),
    Case("manifest_older_format_sql", _manifest(lambda m: m.update(format_version=0)),
         ("sql", "{trace}", "SELECT 1"), "older than"),
    Case("manifest_version_not_int_validate", _manifest(lambda m: m.update(format_version="1")),
         ("validate", "{trace}"), "not an integer"),
    Case("manifest_schema_hash_mismatch_validate",
         _manifest(lambda m: m["schema_hashes"].update(tokens="0" * 64)), ("validate", "{trace}"), "different schema"),
    Case("manifest_other_format_info", _manifest(lambda m: m.update(format="something-else")), ("info", "{trace}"),
         "not a tracekit manifest"),
    Case("manifest_is_list_info", _manifest_bytes(b"[1, 2, 3]"), ("info", "{trace}"), "not a tracekit manifest"),
    Case("manifest_is_directory_info", _manifest_is_dir, ("info", "{trace}"), "manifest"),
    Case("not_a_trace_dir_validate", _not_a_trace, ("validate", "{trace}"), "not a trace"),
    Case("trace_is_a_file_info", _a_file, ("info", "{trace}"), "not a trace"),
    Case("trace_missing_sql", _gone, ("sql", "{trace}", "SELECT 1"), "no such trace"),
    Case("replay_meta_corrupt_info", _bad_replay_meta, ("info", "{trace}"), "corrupt replay metadata"),
    # --- integrity (validate)
    Case("duplicate_request_ids_validate",
         _plant_rows("requests", [{"request_id": 0, "run_id": "x"}, {"request_id": 1, "run_id": "x"}]),
         ("validate", "{trace}"), "duplicate request_id"),
    Case("tokens_without_request_validate",
         _plant_rows("tokens", [{"request_id": 999, "pos": 0, "token_id": 5}]), ("validate", "{trace}"),
         "not in requests"),
    Case("duplicate_token_positions_validate",
         _plant_rows("tokens", [{"request_id": 0, "pos": 0, "token_id": 5}]), ("validate", "{trace}"),
         "duplicate (request_id, pos)"),
    Case("replay_tokens_without_request_validate",
         lambda root, work: write_part_atomic(
             _rows("replay_tokens", [{"request_id": 4242, "pos": 0, "token_id": 1}]), table("replay_tokens"),
             root / "replays" / "r1" / "tokens" / "part-99999999999999999999-planted-000001.parquet"),
         ("validate", "{trace}"), "replayed token"),
    Case("request_unknown_engine_validate",
         _plant_rows("requests", [{"request_id": 77, "run_id": "x", "engine_id": "nope"}]), ("validate", "{trace}"),
         "engine_id that is not in engines"),
    # --- weights
    Case("weight_blob_missing_validate", _missing_blob, ("validate", "{trace}"), "is missing"),
    Case("weight_blob_missing_export", _missing_blob, ("weights", "export", "{trace}", "1", "--out", "{work}/out"),
         "is missing"),
    Case("weight_blob_wrong_hash_validate", _corrupt_blob, ("validate", "{trace}"), "sha256"),
    Case("weight_blob_wrong_hash_verify", _corrupt_blob, ("weights", "verify", "{trace}"), "sha256"),
    Case("weight_blob_wrong_hash_export", _corrupt_blob, ("weights", "export", "{trace}", "1", "--out", "{work}/out"),
         "sha256"),
    Case("snapshot_not_safetensors_export", _plant_blob(lambda work: b"\x00" * 8 + b"garbage" * 10, 7),
         ("weights", "export", "{trace}", "7", "--out", "{work}/out"), "not a tracekit safetensors blob"),
    Case("snapshot_huge_header_export", _plant_blob(lambda work: (10**12).to_bytes(8, "little") + b"{}", 7),
         ("weights", "export", "{trace}", "7", "--out", "{work}/out"), "not a tracekit safetensors blob"),
    Case("pickle_as_blob_export", _plant_blob(lambda work: pickle_payload(work / "UNPICKLED"), 8),
         ("weights", "export", "{trace}", "8", "--out", "{work}/out"), "not a tracekit safetensors blob"),
    Case("pickle_as_blob_validate", _plant_blob(lambda work: pickle_payload(work / "UNPICKLED"), 8),
         ("validate", "{trace}"), "not a tracekit safetensors blob"),
    Case("pickle_replacing_blob_export", _replace_blob_with_pickle,
         ("weights", "export", "{trace}", "1", "--out", "{work}/out"), "sha256"),
    Case("no_snapshot_for_version_export", _noop, ("weights", "export", "{trace}", "5", "--out", "{work}/out"),
         "no weight snapshot for version 5"),
    Case("export_out_is_a_file", lambda root, work: (work / "afile").write_text("x"),
         ("weights", "export", "{trace}", "1", "--out", "{work}/afile"), "afile: exists and is not a directory"),
    Case("unknown_model_path_export", _noop,
         ("weights", "export", "{trace}", "1", "--out", "{work}/out", "--like", "{work}/no/such/model"), "does not exist"),
    # --- SQL
    Case("sql_invalid", _noop, ("sql", "{trace}", "SELEC * FROM tokens"), "invalid sql"),
    Case("sql_unknown_table", _noop, ("sql", "{trace}", "SELECT * FROM no_such_table"), "no_such_table"),
    Case("sql_insert", _noop, ("sql", "{trace}", "INSERT INTO replays VALUES ('x', 'y', '{}')"), "read-only"),
    Case("sql_create", _noop, ("sql", "{trace}", "CREATE TABLE evil AS SELECT * FROM tokens"), "read-only"),
    Case("sql_drop_view", _noop, ("sql", "{trace}", "DROP VIEW tokens"), "read-only"),
    Case("sql_copy_out", _noop, ("sql", "{trace}", "COPY tokens TO '{work}/out.csv'"), "read-only"),
    Case("sql_copy_into_trace", _noop, ("sql", "{trace}", "COPY (SELECT 1 AS request_id) TO '{trace}/tokens/x.parquet'"),
         "read-only"),
    Case("sql_export_database", _noop, ("sql", "{trace}", "EXPORT DATABASE '{work}/exp'"), "read-only"),
    Case("sql_attach", _noop, ("sql", "{trace}", "ATTACH '{work}/evil.duckdb' AS evil"), "read-only"),
    Case("sql_install", _noop, ("sql", "{trace}", "INSTALL httpfs"), "read-only"),
    Case("sql_load", _noop, ("sql", "{trace}", "LOAD httpfs"), "read-only"),
    Case("sql_set_config", _noop, ("sql", "{trace}", "SET enable_external_access = true"), "read-only"),
    Case("sql_reset_config", _noop, ("sql", "{trace}", "RESET lock_configuration"), "read-only"),
    Case("sql_pragma_config", _noop, ("sql", "{trace}", "PRAGMA memory_limit='1GB'"), "read-only"),
    Case("sql_call", _noop, ("sql", "{trace}", "CALL pragma_version()"), "read-only"),
    Case("sql_read_then_write", _noop, ("sql", "{trace}", "SELECT 1; COPY tokens TO '{work}/out2.csv'"), "read-only"),
    Case("sql_explain_analyze_copy", _noop, ("sql", "{trace}", "EXPLAIN ANALYZE COPY tokens TO '{work}/o.csv'"),
         "read-only"),
    Case("sql_read_outside_trace", _noop, ("sql", "{trace}", "SELECT * FROM read_text('/etc/passwd')"),
         "permission"),
    Case("sql_glob_outside_trace", _noop, ("sql", "{trace}", "SELECT * FROM glob('/etc/*')"), "permission"),
    Case("sql_read_csv_dotdot", _noop, ("sql", "{trace}", "SELECT * FROM read_csv('{trace}/../../../../../../../../../../../../../../../etc/passwd')"),
         "permission"),
    Case("sql_empty", _noop, ("sql", "{trace}", "  ;  "), "empty query"),
    Case("sql_unknown_canned_query", _noop, ("sql", "{trace}", "--query", "no_such_query"), "no canned query"),
    # --- replay: model paths and engine args (checked before any engine starts)
    Case("replay_recorded_model_missing", _noop, ("replay", "{trace}", "--name", "x", "--no-progress"),
         "does not exist here"),
    Case("replay_unknown_model_path", _noop,
         ("replay", "{trace}", "--name", "x", "--model", "{work}/no/such/model", "--no-progress"), "does not exist"),
    Case("replay_engine_arg_vllm_rejects", _noop,
         ("replay", "{trace}", "--name", "x", "--model", "{work}", "--engine-arg", "no_such_arg=1", "--no-progress"),
         "no engine arg 'no_such_arg'"),
    # --- CLI arguments
    Case("cli_unknown_command", _noop, ("frobnicate", "{trace}"), "no such command"),
    Case("cli_unknown_option", _noop, ("info", "{trace}", "--bogus"), "no such option"),
    Case("cli_missing_argument", _noop, ("info",), "missing argument"),
    Case("cli_bad_choice", _noop, ("sql", "{trace}", "SELECT 1", "--format", "xml"), "invalid value"),
    Case("cli_version_not_int", _noop, ("weights", "export", "{trace}", "latest", "--out", "{work}/o"),
         "invalid value"),
    Case("cli_export_missing_out", _noop, ("weights", "export", "{trace}", "1"), "missing option"),
]


def materialise(case: Case, good: Path, base: Path) -> tuple[Path, Path]:
    """Copy the good trace to ``base/<case>/trace``, apply the case; returns (trace, work dir)."""
    d = base / case.name
    work = d / "work"
    trace = d / "trace"
    work.mkdir(parents=True)
    shutil.copytree(good, trace)
    case.make(trace, work)
    return trace, work


def argv_for(case: Case, trace: Path, work: Path) -> list[str]:
    return [a.replace("{trace}", str(trace)).replace("{work}", str(work)) for a in case.argv]


def tree_digest(path: Path) -> str:
    """sha256 over every entry below ``path`` (names, kinds, bytes): byte-identical means equal."""
    h = hashlib.sha256()
    if not path.exists():
        return "absent"
    if path.is_file():
        return hashlib.sha256(b"file" + path.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path)).encode()
        if p.is_dir():
            h.update(b"D" + rel + b"\0")
        else:
            h.update(b"F" + rel + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


if __name__ == "__main__":  # python tests/bad_inputs.py OUT
    out = Path(sys.argv[1])
    good = build_good_trace(out / "_good")
    for c in CASES:
        t, w = materialise(c, good, out)
        print(f"{c.name}: tracekit {' '.join(argv_for(c, t, w))}")
