"""Fidelity figures: real and simulated KSM trajectories overlaid; fidelity against the snapshot
interval.  Same conventions as :mod:`ksmtrace.plot` (Agg canvas, fixed style, units on every axis,
deterministic output); save with :func:`ksmtrace.plot.save`."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ksmtrace.plot._common import color, legend_outside, new_figure, style, titles

PANELS = (
    ("merged pages", "pages", ("pages_sharing", "pages_shared", "ksm_zero_pages")),
    ("unstable tree and volatile items", "pages", ("pages_unshared", "pages_volatile")),
    ("full scans since KSM started", "scans", ("full_scans",)),
    ("pages scanned / skipped since KSM started", "pages", ("pages_scanned", "pages_skipped")),
    ("COW breaks of KSM pages since KSM started (real: cow_ksm)", "COW breaks", ("cow_ksm",)),
    ("ksmd CPU since KSM started", "CPU (s)", ("ksmd_cpu_s",)),
)
_SIM_COL = {"ksmd_cpu_s": "cpu_s"}


def trajectories(report, *, t_max: float | None = None) -> Figure:
    """Six panels over time (s since the first snapshot): every compared counter, real (solid)
    and simulated (dashed), with KSM's start (dotted) and the time to 90% of the final sharing."""
    real, sim = report.real, report.sim
    rt = real["t_s"].to_numpy()
    st = sim["t_s"].to_numpy()
    with style():
        fig = new_figure(15.0, 8.5)
        axes = fig.subplots(3, 2, sharex=True).ravel()
        for ax, (title, unit, names) in zip(axes, PANELS):
            for j, name in enumerate(names):
                sc = _SIM_COL.get(name, name)
                if name not in real.columns or sc not in sim.columns:
                    continue
                rv = real[name].cast(float).to_numpy()
                sv = sim[sc].cast(float).to_numpy()
                if np.all(np.isnan(rv)) and np.all(np.isnan(sv)):
                    continue
                if name == "ksm_zero_pages" and np.nanmax(np.abs(np.nan_to_num(rv))) == 0 and np.nanmax(np.abs(np.nan_to_num(sv))) == 0:
                    continue
                c = color(j)
                ax.plot(rt, rv, color=c, linewidth=1.4, label=f"{name} real", gid=f"real:{name}")
                ax.plot(st, sv, color=c, linewidth=1.4, linestyle="--", label=f"{name} simulated", gid=f"sim:{name}")
                if name in ("pages_sharing", "ksm_zero_pages"):
                    try:
                        row = report.row(name)
                    except KeyError:
                        row = {}
                    for key, ls in (("t90_real", "-"), ("t90_sim", "--")):
                        t90 = row.get(key)
                        if t90 is not None:
                            ax.axvline(report.start_s + t90, color=c, linestyle=ls, linewidth=0.7, alpha=0.6)
            ax.axvline(report.start_s, color="#000000", linestyle=":", linewidth=0.9, label="KSM started")
            ax.set_title(title, loc="left")
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            if t_max is not None:
                ax.set_xlim(right=t_max)
            legend_outside(ax, fontsize=6.5)
        for ax in axes[-2:]:
            ax.set_xlabel("time since the first snapshot (s)")
        iv = f"{report.interval_s:.3g} s" if report.interval_s else "-"
        sub = (f"trace {report.trace_name} · kernel {report.kernel_release or '?'} · ksm replay {_p(report.params)}\n"
               f"scope recorded · snapshots every {iv} · CPU from cost model {report.cost_model!r}\n"
               "solid: real kernel (ground truth) · dashed: simulated · thin vertical lines: time to 90% of the final value")
        titles(fig, "Fidelity: real KSM vs the replay", sub)
    return fig


def interval_plot(rows: Sequence[dict], *, rewrite_period: float | None = None, full_scan_s: float | None = None) -> Figure:
    """Fidelity against the snapshot interval (one row per interval from
    :func:`ksmtrace.fidelity.interval.interval_study`): |error| of final pages_sharing, NRMSE of
    pages_sharing, simulated COW breaks / real cow_ksm, |t90 error| / full-scan period."""
    iv = np.array([r["interval_s"] for r in rows], dtype=float)

    def col(key):
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=float)

    with style():
        fig = new_figure(14.0, 6.5)
        (a1, a2), (a3, a4) = fig.subplots(2, 2, sharex=True)
        a1.plot(iv, 100 * np.abs(col("sharing_final_err")), marker="o", color=color(0), label="|error| of final pages_sharing")
        a1.plot(iv, 100 * col("sharing_nrmse"), marker="s", color=color(1), label="NRMSE of pages_sharing")
        a1.axhline(1.0, color="#888888", linestyle=":", label="1% goal")
        a1.set_ylabel("error (%)")
        a1.set_title("merged pages", loc="left")
        a2.plot(iv, col("cow_ratio"), marker="o", color=color(2), label="simulated COW breaks / real cow_ksm")
        a2.axhspan(0.95, 1.05, color="#2ca02c", alpha=0.12, label="±5% goal")
        a2.set_ylabel("ratio")
        a2.set_title("COW breaks", loc="left")
        a3.plot(iv, col("t90_err_scans"), marker="o", color=color(3), label="|t90 error| in full-scan periods")
        a3.axhline(1.0, color="#888888", linestyle=":", label="goal: one full scan")
        a3.set_ylabel("full-scan periods")
        a3.set_title("time to 90% of final sharing", loc="left")
        a4.plot(iv, col("volatile_nrmse") * 100, marker="o", color=color(4), label="NRMSE of pages_volatile")
        a4.plot(iv, col("unshared_nrmse") * 100, marker="s", color=color(5), label="NRMSE of pages_unshared")
        a4.set_ylabel("error (%)")
        a4.set_title("lazily counted trees", loc="left")
        for ax in (a1, a2, a3, a4):
            ax.set_xscale("log")
            if rewrite_period:
                ax.axvline(rewrite_period, color="#d62728", linestyle="--", linewidth=0.8, label=f"rewrite period {rewrite_period:g} s")
            if full_scan_s:
                ax.axvline(full_scan_s, color="#1f77b4", linestyle="--", linewidth=0.8, label=f"full-scan period {full_scan_s:.2g} s")
            legend_outside(ax, fontsize=6.5)
            ax.set_ylim(bottom=0)
        for ax in (a3, a4):
            ax.set_xlabel("snapshot interval (s, log scale)")
        titles(fig, "Fidelity against the snapshot interval",
               "one capture at the shortest interval, every k-th snapshot kept; writes between two snapshots are invisible without soft-dirty")
    return fig


def _p(params) -> str:
    keys = ("pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "max_page_sharing")
    return " ".join(f"{k}={int(params[k]) if isinstance(params[k], bool) else params[k]}" for k in keys if k in params)
