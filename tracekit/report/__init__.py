"""Report: a self-contained HTML page plus PNG figures for one trace.

``write_report(trace, out_dir)`` writes ``report.html`` (inline CSS, figures embedded as base64
data URIs, no external reference of any kind) and the same figures as PNG files, and returns
their paths. Figures: per-step curves (clip rate, KL(new‖old), entropy, reward) per source, the
Δ distribution, mean |Δ| per step, and the attribution waterfall when an attribution is given
or can be computed from the trace's existing replays.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path
from string import Template
from typing import Any

from .. import __version__
from ..errors import TracekitError
from .data import ReportData, collect

TEMPLATE = Path(__file__).with_name("template.html")


class ReportError(TracekitError):
    """The report cannot be written as asked (bad output dir, unreadable attribution file)."""


def write_report(
    trace: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    attribution: dict[str, Any] | str | os.PathLike[str] | None = None,
    compute_attribution: bool = True,
    eps: float = 0.2,
) -> dict[str, Path]:
    """Write the report for ``trace`` into ``out_dir``; returns {name: path} of every file.

    ``attribution``: the JSON result of ``tracekit attribute --format json`` (dict or file).
    Without one and with ``compute_attribution``, attribution runs on the trace's recorded data and
    EXISTING replays only (no engine is started); if that fails the page says why.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a directory")
    data = collect(trace, eps=eps)
    attr, attr_note = _load_attribution(trace, attribution, compute_attribution)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create {out}: {e.strerror or e}") from None

    from . import plots

    figs: dict[str, bytes] = {
        "curves": plots.curves_png(data),
        "delta_hist": plots.delta_hist_png(data),
        "delta_by_step": plots.delta_by_step_png(data),
        "anchors": plots.anchors_png(data),
    }
    wf = _waterfall(attr)
    if wf is not None:
        figs["waterfall"] = plots.waterfall_png(*wf)
    elif attr is not None and not attr_note:
        attr_note = "the attribution has no ablation ladder with measured gaps (no replays were run): no waterfall"
    paths: dict[str, Path] = {}
    for name, png in figs.items():
        p = out / f"{name}.png"
        _atomic_write(p, png)
        paths[name] = p
    page = _render(data, figs, attr, attr_note)
    p = out / "report.html"
    _atomic_write(p, page.encode())
    paths["html"] = p
    return paths


# ---------------------------------------------------------------------- attribution
def _load_attribution(trace: Any, attribution: Any, compute: bool) -> tuple[dict[str, Any] | None, str | None]:
    if isinstance(attribution, dict):
        return attribution, None
    if attribution is not None:
        p = Path(attribution)
        try:
            return json.loads(p.read_text()), None
        except (OSError, ValueError) as e:
            raise ReportError(f"cannot read attribution {p}: {e}") from None
    if not compute:
        return None, "no attribution given (run `tracekit attribute TRACE --format json > a.json`, then --attribution a.json)"
    try:
        from ..attribute import attribute
    except ImportError:
        return None, "tracekit.attribute is not available in this install: attribution figure omitted"
    try:
        return attribute(trace, replay=False).as_dict(), None
    except TracekitError as e:
        return None, f"attribution not available: {e}"


def _waterfall(attr: dict[str, Any] | None) -> tuple[list[tuple[str, float]], float, float, str] | None:
    """(per-cause closed gap, total, residual, unit) from an attribution's ladder, if measured."""
    if not attr:
        return None
    total = (attr.get("gap") or {}).get("mean_abs_delta")
    rungs = [r for r in attr.get("ladder") or [] if r.get("applicable") and _num(r.get("closed")) is not None]
    if not isinstance(total, (int, float)) or not rungs:
        return None
    steps = [(str(r["cause"]), float(r["closed"])) for r in rungs]
    last = _num(rungs[-1].get("gap_after"))
    residual = last if last is not None else total - sum(v for _, v in steps)
    return steps, float(total), float(residual), "mean |Δ(recorded, trainer)| (nats)"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ---------------------------------------------------------------------- HTML
def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v, default=str))
    return html.escape(str(v))


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{_fmt(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool) else f"<td>{_fmt(v)}</td>"
            for v in r) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _render(d: ReportData, figs: dict[str, bytes], attr: dict[str, Any] | None, attr_note: str | None) -> str:
    s = d.summary
    summary = _table(["requests", "steps", "tokens", "trainer tokens", "weight versions", "snapshots", "replays"],
                     [[s["requests"], s["steps"], s["tokens"], s["trainer_tokens"], s["weight_versions"],
                       s["snapshots"], ", ".join(s["replays"]) or "none"]])
    engines = _table(list(d.engines[0]), [list(e.values()) for e in d.engines]) if d.engines else "<p>none recorded</p>"
    if d.totals:
        totals = _table(
            ["source", "tokens", "mean Δ", "mean |Δ|", "max |Δ|", f"clip rate (ε={d.eps})", "KL k3", "GSPO seq clip",
             "non-finite"],
            [[src, t["tokens"], t["mean_delta"], t["mean_abs_delta"], t["max_abs_delta"], t["clip_rate"], t["k3"],
              t["seq_clip_rate"], t["nonfinite_tokens"]] for src, t in d.totals.items()])
    else:
        totals = '<p class="note">Only one logprob source in this trace: nothing to compare.</p>'
    hist = _img(figs["delta_hist"], "distribution of per-token logprob gaps")
    by_step = _img(figs["delta_by_step"], "mean absolute gap per step")
    verdict, attribution = _attribution_html(attr, attr_note, figs.get("waterfall"))
    page = Template(TEMPLATE.read_text()).substitute(
        title=html.escape(str(d.trace)),
        subtitle=html.escape(f"{d.trace} · trace id {s['trace_id']} · created {s['created']}"),
        verdict=verdict, summary=summary, engines=engines, reference=html.escape(d.reference or "-"),
        totals=totals, fig_curves=_img(figs["curves"], "per-step clip rate, KL, entropy and reward by source"),
        fig_delta_hist=hist, fig_delta_by_step=by_step, attribution=attribution, version=__version__,
        fig_anchors=_img(figs["anchors"], "verl, slime, PipelineRL and TRL mismatch metrics by step"),
        anchor_pair=html.escape("a = {}, b = {}".format(*d.anchor_pair) if d.anchor_pair else "no pair of sources"),
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    return page


def _attribution_html(attr: dict[str, Any] | None, note: str | None, waterfall: bytes | None) -> tuple[str, str]:
    if attr is None:
        msg = f'<p class="note">{html.escape(note or "no attribution")}</p>'
        return msg, msg
    found = attr.get("found") or []
    gap = (attr.get("gap") or {}).get("mean_abs_delta")
    verdict = (f'<p><span class="present">Found: {html.escape(", ".join(found))}</span>' if found
               else '<p><span class="absent">No cause found</span>')
    verdict += f" · recorded-vs-trainer gap mean |Δ| = {_fmt(gap)}</p>" if gap is not None else "</p>"
    rows = []
    for c in attr.get("causes") or []:
        v = str(c.get("verdict"))
        ev = "".join(
            f"<details><summary>{html.escape(str(e.get('summary')))}</summary><code>{html.escape(str(e.get('query')))}</code>"
            f"<br>{_fmt(e.get('numbers'))}</details>"
            for e in c.get("evidence") or [])
        rows.append(f'<tr><td><code>{html.escape(str(c.get("id")))}</code></td><td class="{html.escape(v)}">{html.escape(v)}</td>'
                    f'<td class="num">{_fmt(c.get("share"))}</td><td>{html.escape(str(c.get("reason") or ""))}{ev}</td>'
                    f'<td>{html.escape(str(c.get("fix") or ""))}</td></tr>')
    table = ("<table><tr><th>cause</th><th>verdict</th><th>share of gap closed</th><th>evidence</th><th>fix</th></tr>"
             + "".join(rows) + "</table>")
    fig = _img(waterfall, "share of the gap each cause closes") if waterfall else ""
    extra = f'<p class="note">{html.escape(note)}</p>' if note else ""
    notes = "".join(f'<p class="note">{html.escape(str(n))}</p>' for n in attr.get("notes") or [])
    changes = "".join(
        f"<h3>engine settings replay:{html.escape(str(name))} changed vs the recorded engine</h3>"
        + _table(["setting", "recorded", "replay", "cause it can produce"],
                 [[c.get("knob"), c.get("recorded"), c.get("replay"), c.get("cause") or "-"] for c in rows_])
        for name, rows_ in (attr.get("engine_changes") or {}).items())
    return verdict, table + fig + extra + notes + _calibration_html(attr) + _migration_html(attr) + changes


def _calibration_html(attr: dict[str, Any]) -> str:
    cal = attr.get("calibration") or {}
    if not cal:
        return ""
    noise = "not measured" if cal.get("noise") is None else f"{_fmt(cal.get('noise'))} mean |Δ| on {cal.get('noise_tokens')} tokens"
    return (f'<p class="note">Tolerances from the trace: replay noise {html.escape(noise)} → tolerance '
            f'{_fmt(cal.get("tol"))}; floor {_fmt(cal.get("floor_used"))}; material gap {_fmt(cal.get("material_gap"))}.</p>')


def _migration_html(attr: dict[str, Any]) -> str:
    """The migration table: each changed setting restored on the new engine, and the version."""
    mig = attr.get("migration")
    if not mig:
        return ""
    gap = mig.get("gap") or {}
    rows = [[s.get("knob"), s.get("recorded"), s.get("new"), s.get("cause") or "-",
             (s.get("alone") or {}).get("mean_abs_delta"), s.get("share_alone"), s.get("share_needed"),
             s.get("share_cumulative"), ("moves the gap; " if s.get("moves_gate") else "") + (s.get("note") or "")]
            for s in mig.get("settings") or []]
    rows.append(["the version itself", mig.get("recorded_version"), mig.get("new_version"), "-",
                 (mig.get("remaining") or {}).get("mean_abs_delta"), "-", "-", mig.get("remaining_share"),
                 "left with every setting restored"])
    gate = mig.get("gate")
    gate_line = "" if not gate else (
        f'<p>Gate {html.escape(str(gate[0]))} ≤ {_fmt(gate[1])}: '
        + ('<span class="present">exceeded</span>, blame: ' + html.escape(", ".join(mig.get("flagged") or []))
           if mig.get("gate_exceeded") else '<span class="absent">holds</span>') + "</p>")
    return (f"<h3>Migration: vLLM {html.escape(str(mig.get('recorded_version')))} → "
            f"{html.escape(str(mig.get('new_version')))} (replay:{html.escape(str(mig.get('replay')))}, "
            f"{html.escape(str(mig.get('kind')))} logprobs)</h3>"
            f"<p>recorded vs new engine: mean |Δ| {_fmt(gap.get('mean_abs_delta'))}, clip rate {_fmt(gap.get('clip_rate'))}, "
            f"k3 {_fmt(gap.get('k3'))}</p>"
            + _table(["setting", "recorded", "new", "cause", "gap alone", "share alone", "share needed",
                      "cumulative share", "note"], rows)
            + gate_line)


def _atomic_write(p: Path, data: bytes) -> None:
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


__all__ = ["ReportError", "write_report"]
