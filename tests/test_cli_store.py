"""`tracekit info | validate | sql | weights` on good and bad traces: one line + exit 2 on bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tracekit.store import TraceWriter
from tracekit.store.weights import put_tensors


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracekit.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def good_trace(tmp_path: Path) -> Path:
    root = tmp_path / "trace"
    w = TraceWriter(root, flush_interval=60)
    w.write("engines", {"engine_id": "e0", "run_id": w.run_id, "created_at": __import__("datetime").datetime.now(
        __import__("datetime").timezone.utc), "vllm_version": "0.32.0", "logprobs_mode": "raw_logprobs"})
    for rid in range(4):
        n = 5 + rid
        w.write("requests", {"request_id": rid, "run_id": w.run_id, "engine_id": "e0", "step": rid // 2,
                             "prompt_token_ids": [1, 2], "output_token_ids": list(range(n)),
                             "weight_version_start": 0, "weight_version_end": 0})
        w.write_columns("tokens", {"pos": np.arange(n, dtype=np.int32), "token_id": np.arange(n, dtype=np.int32),
                                   "logprob": np.linspace(-2, 0, n, dtype=np.float32)},
                        request_id=rid, weight_version=0)
    w.write("weights", put_tensors(root, {"w": np.ones((4, 4), dtype=np.float32)}, version=0, step=0))
    w.close()
    return root


def assert_bad(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert needle.lower() in lines[0].lower(), lines[0]


def test_info_reports_counts(good_trace: Path) -> None:
    res = run_cli("info", str(good_trace), "--format", "json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert (d["requests"], d["tokens"], d["steps"], d["weight_snapshots"]) == (4, 26, 2, 1)
    assert d["engines"][0]["vllm_version"] == "0.32.0"
    assert d["bytes_per_token"] > 0
    assert run_cli("info", str(good_trace)).returncode == 0


def test_validate_ok(good_trace: Path) -> None:
    res = run_cli("validate", str(good_trace))
    assert res.returncode == 0, res.stderr
    assert "ok:" in res.stdout


def test_sql_formats(good_trace: Path) -> None:
    res = run_cli("sql", str(good_trace), "SELECT count(*) AS n FROM tokens", "--format", "csv")
    assert res.stdout.splitlines() == ["n", "26"]
    res = run_cli("sql", str(good_trace), "SELECT request_id FROM requests ORDER BY 1", "--format", "json")
    assert [r["request_id"] for r in json.loads(res.stdout)] == [0, 1, 2, 3]
    res = run_cli("sql", str(good_trace), "--format", "csv", stdin="SELECT 41 + 1 AS x;")
    assert res.stdout.splitlines() == ["x", "42"]
    res = run_cli("sql", str(good_trace), "--list")
    assert res.returncode == 0 and "tokens_by_step" in res.stdout


@pytest.mark.parametrize(
    "query",
    [
        "COPY tokens TO '{out}/x.csv'",
        "COPY (SELECT 1) TO '{trace}/tokens/evil.parquet'",
        "ATTACH '{out}/x.db' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO requests (request_id, run_id) VALUES (99, 'x')",
        "DROP VIEW tokens",
        "EXPORT DATABASE '{out}/exp'",
        "SELECT 1; DELETE FROM requests",
        "SELECT * FROM read_csv('/etc/passwd')",
        "PRAGMA enable_profiling",
        "SELECT * FROM query('COPY tokens TO ''{out}/y.csv''')",
    ],
)
def test_sql_is_read_only(good_trace: Path, tmp_path: Path, query: str) -> None:
    before = tree_hash(good_trace)
    out = tmp_path / "out"
    out.mkdir()
    res = run_cli("sql", str(good_trace), query.format(out=out, trace=good_trace))
    assert res.returncode == 2, res.stdout
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert tree_hash(good_trace) == before
    assert list(out.iterdir()) == []


def test_bad_sql_is_one_line(good_trace: Path) -> None:
    assert_bad(run_cli("sql", str(good_trace), "SELEC 1"), "syntax error")
    assert_bad(run_cli("sql", str(good_trace), "SELECT nope FROM tokens"), "nope")
    assert_bad(run_cli("sql", str(good_trace), "--query", "no_such_query"), "no canned query")


def _first_part(root: Path, table: str) -> Path:
    return sorted((root / table).glob("*.parquet"))[0]


def test_missing_manifest(good_trace: Path) -> None:
    (good_trace / "trace.json").unlink()
    assert_bad(run_cli("info", str(good_trace)), "not a trace")


def test_corrupt_manifest(good_trace: Path) -> None:
    (good_trace / "trace.json").write_text("{not json")
    assert_bad(run_cli("validate", str(good_trace)), "corrupt manifest")


def test_newer_format_version(good_trace: Path) -> None:
    m = json.loads((good_trace / "trace.json").read_text())
    m["format_version"] = 99
    (good_trace / "trace.json").write_text(json.dumps(m))
    before = tree_hash(good_trace)
    assert_bad(run_cli("sql", str(good_trace), "SELECT 1"), "newer than this tracekit")
    assert tree_hash(good_trace) == before


def test_truncated_part(good_trace: Path) -> None:
    p = _first_part(good_trace, "tokens")
    p.write_bytes(p.read_bytes()[:100])
    before = tree_hash(good_trace)
    for cmd in (["info"], ["validate"], ["sql", "--", "SELECT 1"]):
        res = run_cli(cmd[0], str(good_trace), *cmd[1:])
        assert res.returncode == 2, (cmd, res.stderr)
        assert p.name in res.stderr and "Traceback" not in res.stderr
    assert tree_hash(good_trace) == before


def test_not_parquet_part(good_trace: Path) -> None:
    (good_trace / "tokens" / "part-zzz.parquet").write_text("hello")
    assert_bad(run_cli("info", str(good_trace)), "not a readable parquet part")


def test_part_with_wrong_schema(good_trace: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"request_id": pa.array(["a"]), "pos": [0]}), good_trace / "tokens" / "part-bad.parquet")
    assert_bad(run_cli("validate", str(good_trace)), "request_id")


def test_path_that_is_not_a_trace(tmp_path: Path) -> None:
    assert_bad(run_cli("info", str(tmp_path / "nope")), "no such trace")
    (tmp_path / "f").write_text("x")
    assert_bad(run_cli("info", str(tmp_path / "f")), "not a directory")
    assert_bad(run_cli("info", str(tmp_path)), "not a trace")


def test_weights_verify_catches_tampered_blob(good_trace: Path) -> None:
    assert run_cli("weights", "verify", str(good_trace)).returncode == 0
    blob = next((good_trace / "weights" / "blobs").rglob("*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert_bad(run_cli("weights", "verify", str(good_trace)), "sha256")
    res = run_cli("validate", str(good_trace))
    assert res.returncode == 2 and "sha256" in res.stderr


def test_validate_finds_orphan_tokens(good_trace: Path) -> None:
    w = TraceWriter(good_trace, flush_interval=60)
    w.write_columns("tokens", {"pos": np.arange(3, dtype=np.int32), "token_id": np.arange(3, dtype=np.int32)},
                    request_id=12345)
    w.close()
    res = run_cli("validate", str(good_trace))
    assert res.returncode == 2 and "not in requests" in res.stderr


def test_validate_warns_about_trainer_logprobs_past_the_sample(good_trace: Path) -> None:
    w = TraceWriter(good_trace, flush_interval=60)  # request 0 has 5 tokens; the trainer sent 7
    w.write_columns("trainer", {"pos": np.arange(7, dtype=np.int32), "logprob": np.zeros(7, dtype=np.float32)},
                    request_id=0, step=0, policy_version=0)
    w.close()
    res = run_cli("validate", str(good_trace))
    assert res.returncode == 0 and "2 trainer logprob(s) at positions past" in res.stdout + res.stderr


def test_sql_json_is_strict_json(good_trace: Path) -> None:
    res = run_cli("sql", str(good_trace), "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, "
                  "['-inf'::DOUBLE, 1.5] AS c, {'x': 'nan'::FLOAT} AS d", "--format", "json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert got == [{"a": None, "b": "inf", "c": ["-inf", 1.5], "d": {"x": None}}]


def test_bad_cli_arguments() -> None:
    res = run_cli("info")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = run_cli("no-such-command")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_interactive_shell_runs_queries_and_keeps_history(good_trace: Path, tmp_path: Path) -> None:
    """A real pseudo-terminal: the shell prompts, runs a query, survives an error, saves history."""
    import os
    import pty
    import select
    import time

    hist = tmp_path / "hist"
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["TRACEKIT_HISTORY"] = str(hist)
        os.environ["COLUMNS"] = "120"
        os.execv(sys.executable, [sys.executable, "-m", "tracekit.cli", "sql", str(good_trace)])
    out = b""

    def read_until(needle: bytes, timeout: float = 60) -> None:
        nonlocal out
        end = time.time() + timeout
        while needle not in out and time.time() < end:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        assert needle in out, out[-500:]

    read_until(b"tracekit> ")
    os.write(fd, b"SELECT count(*) AS n_tokens\r")
    os.write(fd, b"FROM tokens;\r")
    read_until(b"26")
    os.write(fd, b"COPY tokens TO '/tmp/nope.csv';\r")
    read_until(b"read-only")
    os.write(fd, b".quit\r")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "FROM tokens;" in hist.read_text()
