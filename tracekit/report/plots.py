"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from typing import Any

from .data import ReportData

CURVES = (
    ("clip_rate", "clip rate (|r − 1| > ε)"),
    ("kl_new_old", "KL(new‖old) estimate"),
    ("entropy", "entropy (nats)"),
    ("reward", "reward (mean per step)"),
)


_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "^", "v", "D", "x", "+")


def _int_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _label(source: str, reference: str | None) -> str:
    return f"{source} (vs {reference})" if reference and source != reference else source


def curves_png(d: ReportData) -> bytes:
    """2×2 per-step curves; one line per source, plus the job's own log when it wrote one."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    job = {int(r["step"]): r for r in d.job_metrics or [] if "step" in r}
    for ax, (key, title) in zip(axes.flat, CURVES):
        plotted = False
        for src in d.sources:
            pts = sorted((s, v.get(key)) for s, v in d.curves.get(src, {}).items() if v.get(key) is not None)
            if key == "reward" and src != d.reference:
                continue  # reward belongs to the sample, not the logprob source
            if key in ("clip_rate", "kl_new_old") and src == d.reference:
                continue  # the reference against itself is 0 by definition; the job log shows its own
            if pts:
                i = d.sources.index(src)
                # Sources often coincide exactly (a same-config replay is bitwise the recording):
                # distinct dashes and markers, drawn first-listed on top, keep each one visible.
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=_STYLES[i % len(_STYLES)],
                        marker=_MARKERS[i % len(_MARKERS)], ms=4, zorder=10 - i, alpha=0.9,
                        label="requests" if key == "reward" else
                        (_label(src, d.reference) if key in ("clip_rate", "kl_new_old") else src))
                plotted = True
        has_ref = any(v.get(key) is not None for v in d.curves.get(d.reference or "", {}).values())
        jp = sorted((s, r.get(key)) for s, r in job.items() if r.get(key) is not None)
        if jp and not (key == "entropy" and has_ref):  # the trainer's entropy is already plotted
            ax.plot([p[0] for p in jp], [p[1] for p in jp], "k--", marker="s", ms=3,
                    label="job log (reward)" if key == "reward" else "trainer update (job log)")
            plotted = True
        if key in ("clip_rate", "kl_new_old"):
            # Engine/trainer mismatch (~1e-3) and the job's own update (~1e-1) on one axis.
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_ylabel(key + (" (symlog)" if key in ("clip_rate", "kl_new_old") else ""))
        if plotted:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no data in this trace", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[1]:
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(_int_locator())
    fig.suptitle(f"Per-step RL curves by logprob source (ε = {d.eps})")
    fig.tight_layout()
    return _png(fig)


def delta_hist_png(d: ReportData) -> bytes:
    """Distribution of Δ = reference − source per source (log-scaled counts)."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    vals = {s: np.asarray(v) for s, v in d.deltas.items() if len(v)}
    if vals:
        lo = min(float(v.min()) for v in vals.values())
        hi = max(float(v.max()) for v in vals.values())
        if hi - lo < 1e-6:
            lo, hi = lo - 1e-3, hi + 1e-3
        bins = np.linspace(lo, hi, 80)
        for i, (s, v) in enumerate(vals.items()):
            mad = float(np.abs(v).mean())
            # Identical sources (a bitwise replay) would hide each other: thick first, dashed later.
            ax.hist(v, bins=bins, histtype="step", linewidth=max(1.2, 3.0 - 0.7 * i),
                    linestyle=_STYLES[i % len(_STYLES)], label=f"{_label(s, d.reference)}  mean|Δ|={mad:.3g}")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pair of sources to compare", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"Δ = logprob({d.reference}) − logprob(source)  (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title("Per-token logprob gap distribution")
    fig.tight_layout()
    return _png(fig)


def delta_by_step_png(d: ReportData) -> bytes:
    """Mean |Δ| per step per source: a weight-sync lag or a drifting engine shows as a trend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    any_ = False
    for src in d.sources:
        pts = sorted((s, v.get("mean_abs_delta")) for s, v in d.curves.get(src, {}).items()
                     if v.get("mean_abs_delta") is not None)
        if pts and src != d.reference:
            i = d.sources.index(src)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=_STYLES[i % len(_STYLES)],
                    marker=_MARKERS[i % len(_MARKERS)], ms=4, zorder=10 - i, label=_label(src, d.reference))
            any_ = True
    if any_:
        ax.legend(fontsize=8)
        ax.set_yscale("log")
    ax.set_xlabel("RL step")
    ax.xaxis.set_major_locator(_int_locator())
    ax.set_ylabel("mean |Δ| (nats, log scale)")
    ax.set_title("Logprob gap per step")
    fig.tight_layout()
    return _png(fig)


def waterfall_png(steps: list[tuple[str, float]], total: float, residual: float, unit: str) -> bytes:
    """Gap at the start, one bar per cause closing its share, what is left."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = ["observed gap"] + [c for c, _ in steps] + ["residual"]
    level = total
    ax.bar(0, total, color="#555555")
    ax.text(0, total, f"{total:.3g}", ha="center", va="bottom", fontsize=9)
    for i, (_, v) in enumerate(steps, start=1):
        bottom = level - v
        ax.bar(i, v, bottom=bottom, color="#d62728" if v > 0 else "#2ca02c")
        txt = "0" if abs(v) < 5e-5 else (f"−{v:.3g}" if v > 0 else f"+{-v:.3g}")
        ax.text(i, max(level, bottom), txt, ha="center", va="bottom", fontsize=9)
        level = bottom
    ax.bar(len(labels) - 1, residual, color="#1f77b4")
    ax.text(len(labels) - 1, residual, f"{residual:.3g}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(total, level, residual) * 1.15 or 1.0)  # headroom for the value labels
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15, ha="right")
    ax.set_ylabel(unit)
    ax.set_title("Share of the gap each cause closes (ablation ladder)")
    fig.tight_layout()
    return _png(fig)


def anchors_png(d: ReportData) -> bytes:
    """The RL stacks' own mismatch metrics by step for one pair: gaps (left), TRL's IS ratio (right)."""
    from .data import ANCHOR_PLOT

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    *gaps, ratio = ANCHOR_PLOT
    for ax, names in ((axes[0], gaps), (axes[1], [ratio])):
        plotted = False
        for i, name in enumerate(names):
            pts = sorted((s, v) for s, v in d.anchors.get(name, {}).items() if v is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=_STYLES[i % len(_STYLES)],
                        marker=_MARKERS[i % len(_MARKERS)], ms=4, label=name)
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "no pair of sources to compare", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(_int_locator())
    axes[0].axhline(0.01, color="grey", linestyle=":", linewidth=1, label="verl: probs diff mean > 0.01 = problem")
    axes[1].axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axes[0].set_yscale("symlog", linthresh=1e-4)  # a bitwise replay is 0; engine/trainer gaps ~1e-3
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("verl probs diff, slime |Δ|, PipelineRL KL(new‖old) (symlog)")
    axes[1].set_title("TRL IS ratio mean (sequence_mask, C_max 3)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    a, b = d.anchor_pair or ("-", "-")
    fig.suptitle(f"Anchor metrics by step: rollout a = {a}, training b = {b}")
    fig.tight_layout()
    return _png(fig)
