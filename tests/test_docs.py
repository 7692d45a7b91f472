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


def test_relative_links_in_docs_resolve() -> None:
    """Every relative markdown link in README.md and docs/ points at a file of the repo."""
    import re

    bad = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad
