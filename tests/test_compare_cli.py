"""`tracekit diff` and the canned forensic queries (`sql --list/--query/--show`) on hand-made traces."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_metrics import make_trace

from tracekit.cli import cli
from tracekit.compare import queries


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    reqs = [
        {"request_id": 1, "engine_id": "e", "step": 0, "temperature": 0.7, "weight_version_start": 0,
         "weight_version_end": 1, "sampling_requested": {"temperature": 0.7},
         "sampling_resolved": {"temperature": 0.7, "top_k": 8, "top_p": 1.0}},
        {"request_id": 2, "engine_id": "e", "step": 1, "temperature": 1.0, "num_cached_tokens": 128,
         "weight_version_start": 1, "weight_version_end": 1,
         "sampling_requested": {"temperature": 1.0, "top_k": -1}, "sampling_resolved": {"temperature": 1.0, "top_k": 0}},
    ]
    make_trace(tmp_path / "t", reqs, {1: [-1.0, -2.0, -0.5], 2: [-0.3, -0.2]}, {1: [-1.1, -2.0, -0.1], 2: [-1.0, -0.2]},
               token_versions={1: 0, 2: 1},
               engines=[{"engine_id": "e", "logprobs_mode": "processed_logprobs", "head_dtype": "float32"}],
               weight_syncs=[{"engine_id": "e", "version": 1, "engine_checksum": "a", "t_end": t0},
                             {"engine_id": "e", "version": 2, "engine_checksum": "a", "t_end": t0 + dt.timedelta(1)},
                             {"engine_id": "e", "version": 3, "engine_checksum": "b", "t_end": t0 + dt.timedelta(2)}])
    return tmp_path / "t"


def _json(args: list[str]) -> list[dict]:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_every_canned_query_runs_and_is_listed(trace: Path) -> None:
    listed = {d["name"]: d["description"] for d in _json(["sql", str(trace), "--list", "--format", "json"])}
    names = [q.name for q in queries.all_queries()]
    assert set(listed) == set(names) and len(names) >= 8
    for name in names:
        assert listed[name], f"{name}.sql needs a '-- description' first line"
        r = CliRunner().invoke(cli, ["sql", str(trace), "--query", name, "--format", "csv"])
        assert r.exit_code == 0, (name, r.output)
    shown = CliRunner().invoke(cli, ["sql", str(trace), "--query", "worst_tokens", "--show"])
    assert "token_diff('recorded', 'trainer')" in shown.output


def test_resolved_vs_requested_reports_only_real_differences(trace: Path) -> None:
    rows = _json(["sql", str(trace), "--query", "resolved_vs_requested", "--format", "json"])
    # top_k 8 was applied to request 1; request 2's -1 vs 0 are both "off"; top_p 1.0 is the default.
    assert [(r["field"], r["requested"], r["resolved"], r["requests"]) for r in rows] == [("top_k", -1.0, 8.0, 1)]


def test_weight_sync_checks_flags_an_unchanged_checksum(trace: Path) -> None:
    rows = _json(["sql", str(trace), "--query", "weight_sync_checks", "--format", "json"])
    assert [r["unchanged"] for r in rows] == [None, True, False]


def test_spans_and_cache_queries(trace: Path) -> None:
    spans = _json(["sql", str(trace), "--query", "weight_update_spans", "--format", "json"])
    assert [s["request_id"] for s in spans] == [1]
    hits = {r["cache_hit"]: r for r in _json(["sql", str(trace), "--query", "prefix_cache_hits", "--format", "json"])}
    assert hits[True]["tokens"] == 2 and hits[False]["tokens"] == 3
    worst = _json(["sql", str(trace), "--query", "worst_tokens", "--format", "json"])
    assert worst[0]["request_id"] == 2 and worst[0]["pos"] == 0  # |Δ| 0.7


def test_diff_formats_and_bad_input(trace: Path) -> None:
    rows = _json(["diff", str(trace), "--by", "step", "--format", "json"])
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["mean_abs_delta"] == pytest.approx(0.35, abs=1e-6)
    r = CliRunner().invoke(cli, ["diff", str(trace), "--by", "position", "--format", "csv"])
    assert r.exit_code == 0
    table = list(csv.DictReader(io.StringIO(r.output)))
    assert [t["position"] for t in table] == ["0", "1", "2"]
    r = CliRunner().invoke(cli, ["diff", str(trace), "--by", "weight_version"])
    assert r.exit_code == 0 and "recorded − trainer" in r.output
    r = CliRunner().invoke(cli, ["diff", str(trace), "--a", "replay:none"])
    assert r.exit_code == 2 and "unknown source" in r.output
    r = CliRunner().invoke(cli, ["diff", str(trace), "--eps", "2"])
    assert r.exit_code == 2 and "eps" in r.output
    r = CliRunner().invoke(cli, ["diff", str(trace), "--by", "nope"])
    assert r.exit_code == 2
