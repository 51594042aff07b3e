"""Breakdown: where a trace's duplicate frames are (zero, within one process, across processes),
and what a same-domain-only rule would keep.  Drawn from the trace, not from a replay."""
from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from ksmtrace.errors import KsmtraceError
from ksmtrace.plot._common import (NAIVE_COLOR, ORACLE_COLOR, cap_to, check_units, frames_to, legend_outside, new_figure,
                                   style, titles, unit_label)

PARTS = (
    ("zero_saved", "all-zero pages (→ kernel zero page)", "#bdbdbd"),
    ("within_process_saved", "non-zero, within one process", "#17becf"),
    ("across_process_saved", "non-zero, across processes", "#ff7f0e"),
)
# none of these is a policy's colour (ksmtrace.plot.palette): this figure shows the trace, no policy
SAME_DOMAIN_COLOR = "#bcbd22"
NONZERO_COLOR = "#e377c2"


def breakdown(data, *, scope: str | None = None, trace_name: str | None = None, units: str = "MiB") -> Figure:
    """Top: the oracle's saving at every snapshot split into zero pages, duplicates within one
    process and duplicates across processes (stacked; the stack's top is ``oracle_saved``), with
    what a same-domain-only rule keeps (green) and the naive hash-only count (dotted grey).
    Bottom: the same savings as a percentage of the frames the candidate pages use with no dedup.

    ``data``: a DataFrame from :func:`ksmtrace.analysis.breakdown.breakdown`, or a trace (then
    computed under ``scope``; default: the one :func:`ksmtrace.replay.choose_scope` picks).
    """
    check_units(units)
    if not isinstance(data, pl.DataFrame):
        from ksmtrace.analysis.breakdown import breakdown as compute

        from ksmtrace.replay import resolve_scope

        trace_name = trace_name or getattr(data, "name", None)
        scope = resolve_scope(data, scope)[0]
        data = compute(data, scope)
    if data.height == 0:
        raise KsmtraceError("breakdown: no snapshots to plot")
    ul = unit_label(units)
    t = data["t_s"].to_numpy().astype(float)
    col = {c: data[c].to_numpy().astype(float) for c in data.columns if c != "snap"}
    with style():
        fig = new_figure(12.0, 7.6)
        ax, axp = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1.2])
        stack = [frames_to(col[c], units) for c, _, _ in PARTS]
        if t.size == 1:  # one snapshot: bars, since an area needs two points
            bottom = np.zeros(1)
            for (c, lab, colr), v in zip(PARTS, stack):
                ax.bar(t, v, bottom=bottom, width=0.8, color=colr, label=lab, gid=f"part:{c}")
                bottom = bottom + v
        else:
            polys = ax.stackplot(t, *stack, colors=[c for _, _, c in PARTS], labels=[lab for _, lab, _ in PARTS], alpha=0.85)
            for p, (c, _, _) in zip(polys, PARTS):
                p.set_gid(f"part:{c}")
        mk = "o" if t.size <= 60 else None
        ax.plot(t, frames_to(col["oracle_saved"], units), color=ORACLE_COLOR, linewidth=1.2, marker=mk, markersize=2.5,
                label="oracle_saved (total: perfect dedup)", gid="oracle_saved")
        ax.plot(t, frames_to(col["same_domain_saved"], units), color=SAME_DOMAIN_COLOR, linestyle="--", linewidth=1.8,
                marker=mk, markersize=2.5, label="same-domain preset keeps (nothing shared across uid+cgroup)",
                gid="same_domain_saved")
        naive = frames_to(col["hash_only_saved"], units)
        ax.plot(t, naive, color=NAIVE_COLOR, linestyle=":", linewidth=1.2,
                label="hash-only duplicates (naive, overcounts)", gid="hash_only_saved")
        ax.set_ylabel(f"duplicate frames ({ul})")
        top = float(np.nanmax(frames_to(col["oracle_saved"], units))) if t.size else 0.0
        naive_max = float(np.nanmax(naive)) if naive.size else 0.0
        cap_to(ax, top, naive_max)
        if naive_max > ax.get_ylim()[1]:
            ax.text(0.99, 0.98, f"hash-only count off scale (up to {naive_max:,.0f} {ul})", transform=ax.transAxes,
                    ha="right", va="top", fontsize=7, color=NAIVE_COLOR, gid="hash_only_off_scale")
        ax.set_title(f"frames a perfect dedup frees, by kind ({ul}; fork-shared frames count once)", loc="left")
        legend_outside(ax)

        base = col["base_frames"]
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = {k: np.where(base > 0, 100.0 * v / base, np.nan) for k, v in col.items()}
        axp.plot(t, pct["oracle_saved"], color=ORACLE_COLOR, label="all duplicates (oracle)", gid="pct:oracle_saved")
        axp.plot(t, pct["nonzero_saved"], color=NONZERO_COLOR, label="excluding zero pages", gid="pct:nonzero_saved")
        axp.plot(t, pct["same_domain_saved"], color=SAME_DOMAIN_COLOR, linestyle="--", label="same-domain-only rule",
                 gid="pct:same_domain_saved")
        axp.plot(t, pct["within_process_saved"], color=PARTS[1][2], label="non-zero within one process",
                 gid="pct:within_process_saved")
        axp.set_ylabel("% of frames with no dedup (%)")
        axp.set_xlabel("time since first snapshot (s)")
        axp.set_ylim(bottom=0)
        axp.set_title("the same savings as a share of the memory the candidate pages use", loc="left")
        if not np.isfinite(pct["oracle_saved"]).any():
            axp.text(0.5, 0.5, "no candidate pages in this scope: no share to draw", transform=axp.transAxes,
                     ha="center", va="center", fontsize=8, gid="no-candidates")
            axp.set_ylim(0, 100)
        legend_outside(axp)
        mean = lambda c: float(np.nanmean(pct[c])) if np.isfinite(pct[c]).any() else None  # noqa: E731
        if mean("oracle_saved") is None:
            shares = "no candidate pages in this scope (nothing to deduplicate)"
        else:
            shares = (f"mean: duplicates {mean('oracle_saved'):.1f}%, excl. zero {mean('nonzero_saved'):.1f}%, "
                      f"same-domain {mean('same_domain_saved'):.1f}% of frames")
        sub = " · ".join([f"trace {trace_name or '?'}", f"scope {scope or '?'}", f"{data.height} snapshots", shares])
        titles(fig, "Sharing breakdown (from the trace, no replay)", sub)
    return fig
