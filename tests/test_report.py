"""`tracekit report`: a self-contained HTML page and PNG figures from a real recorded job."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tracekit.cli import cli
from tracekit.demo.job import engine_spec, run_job
from tracekit.report import write_report
from tracekit.report.data import collect
from tracekit.testing.faults import Faults

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = {"curves", "delta_hist", "delta_by_step"}


@pytest.fixture(scope="module")
def fault_trace(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, engine_pool: Any) -> Path:
    """A short real job with the logprob_mode fault: two sources that visibly disagree."""
    faults = Faults(logprob_mode=True)
    model, args = engine_spec(faults, tiny_model)
    out = tmp_path_factory.mktemp("report") / "trace"
    run_job(out, tiny_model, faults=faults, llm=engine_pool(model, **args), steps=2, group_size=4,
            prompts_per_step=3, max_tokens=10)
    return out


def _external_refs(page: str) -> list[str]:
    """Anything that would make the browser fetch something: remote or relative src/href,
    CSS url()/@import, scripts, stylesheets, fonts."""
    bad = re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[^"'\s>]+""", page, flags=re.IGNORECASE)
    bad += re.findall(r"https?://", page, flags=re.IGNORECASE)
    bad += re.findall(r"@import|url\(|<script|<link|<iframe|@font-face", page, flags=re.IGNORECASE)
    return bad


@pytest.mark.engine
def test_report_writes_every_figure_as_png_and_embeds_them(fault_trace: Path, tmp_path: Path) -> None:
    paths = write_report(fault_trace, tmp_path / "rep")
    assert FIGURES <= set(paths) and "html" in paths
    page = paths["html"].read_text()
    for name in paths.keys() - {"html"}:
        png = paths[name].read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000
        assert base64.b64encode(png).decode() in page  # the same figure, inline
    assert page.count('src="data:image/png;base64,') == len(paths) - 1
    assert _external_refs(page) == []
    # The numbers on the page are the trace's: recorded raw vs trainer processed logprobs.
    d = collect(fault_trace)
    assert d.reference == "trainer" and "recorded" in d.totals
    assert d.totals["recorded"]["mean_abs_delta"] > 0.05
    assert f'{d.totals["recorded"]["mean_abs_delta"]:.4g}' in page
    assert "raw_logprobs" in page  # the engine fingerprint table


@pytest.mark.engine
def test_report_curves_have_one_point_per_step_and_source(fault_trace: Path) -> None:
    d = collect(fault_trace)
    assert sorted(d.curves["recorded"]) == [0, 1]
    for step in (0, 1):
        c = d.curves["recorded"][step]
        assert 0.0 <= c["clip_rate"] <= 1.0 and c["kl_new_old"] >= 0.0 and c["mean_abs_delta"] > 0.0
        assert d.curves["trainer"][step]["entropy"] > 0.0
    assert d.job_metrics and [s["step"] for s in d.job_metrics] == [0, 1]


@pytest.mark.engine
def test_report_without_attribution_says_so(fault_trace: Path, tmp_path: Path) -> None:
    paths = write_report(fault_trace, tmp_path / "rep", compute_attribution=False)
    assert "waterfall" not in paths
    assert "no attribution given" in paths["html"].read_text()


@pytest.mark.engine
def test_report_uses_a_given_attribution_json(fault_trace: Path, tmp_path: Path) -> None:
    """Attribution from the trace's recorded data (no replays run): verdicts on the page."""
    from tracekit.attribute import attribute

    res = attribute(fault_trace, replay=False).as_dict()
    f = tmp_path / "attr.json"
    f.write_text(json.dumps(res))
    r = CliRunner().invoke(cli, ["report", str(fault_trace), "--out", str(tmp_path / "rep"), "--attribution", str(f)])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    for c in res["causes"]:
        assert f"<code>{c['id']}</code>" in page
    assert _external_refs(page) == []


def test_report_on_a_missing_trace_is_one_line_exit_2(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "error" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.engine
def test_report_out_is_a_file_is_one_line_exit_2(fault_trace: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(cli, ["report", str(fault_trace), "--out", str(f)])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert f.read_text() == "x"
