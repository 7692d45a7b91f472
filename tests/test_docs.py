"""Docs stay true to the code: the format reference is generated from schemas/."""

from __future__ import annotations

from pathlib import Path

from tracekit.schema import markdown

ROOT = Path(__file__).resolve().parents[1]


def test_trace_format_doc_matches_schemas() -> None:
    doc = (ROOT / "docs" / "trace-format.md").read_text()
    assert doc == markdown(), "docs/trace-format.md is stale: run `tracekit schema --markdown > docs/trace-format.md`"


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:8]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
