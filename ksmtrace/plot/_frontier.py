"""Frontier figures: each policy's saving against its CPU, and against its COW breaks, swept over
its scan rate, under the oracle's ceiling (from :func:`ksmtrace.analysis.frontier.frontier`)."""
from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from ksmtrace.plot import palette
from ksmtrace.plot._common import legend_outside, new_figure, style, titles

FRONT_COLUMN = {"cpu": "on_cpu_front", "cow": "on_cow_front"}


def _subtitle(fr) -> str:
    return (f"trace {fr.trace_name} · scope {fr.scope} · {fr.runs.height} runs over {fr.duration_s:.0f} s · every policy "
            f"swept over its scan rate, starting at the first snapshot · CPU from cost model {fr.cost_model!r}")


def _draw(fr, x_col: str, which: str, ax) -> None:
    for pol in fr.policies:
        st = palette.policy_style(pol)
        d = fr.policy_runs(pol).filter(pl.col("pct_of_oracle").is_not_null())
        x = d[x_col].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        y = d["pct_of_oracle"].to_numpy()
        ax.scatter(x, y, s=16, color=st.color, marker=st.marker, alpha=0.3, linewidths=0, gid=f"runs:{pol}", zorder=2)
        f = d.filter(pl.col(FRONT_COLUMN[which])).sort([x_col, "pct_of_oracle"])
        ax.plot(f[x_col].cast(pl.Float64).to_numpy(), f["pct_of_oracle"].to_numpy(), color=st.color, marker=st.marker,
                markersize=5, linewidth=1.6, drawstyle="steps-post", label=f"{pol}: front of {d.height} settings",
                gid=f"front:{pol}", zorder=3)
    ax.axhline(100.0, color=palette.ORACLE_COLOR, linestyle=palette.ORACLE_LINESTYLE, linewidth=1.3,
               label=f"oracle: perfect dedup, the ceiling (100 % = {fr.oracle_saved_mean * 4096 / 2**20:,.0f} MiB)",
               gid="oracle-ceiling", zorder=1)
    ax.set_ylim(0, 105)
    ax.set_ylabel("memory saved, mean over the trace (% of the oracle)")


def frontier_cpu(fr) -> Figure:
    """Saving (mean, % of the oracle) against ksmd CPU (% of one core, log scale): every run of
    every policy (light points) and each policy's front (the line: no other setting of that policy
    saves more for less CPU), the CPU budgets of the frontier's table (dotted), and the oracle as
    the ceiling."""
    with style():
        fig = new_figure(12.0, 6.0)
        ax = fig.subplots(1, 1)
        _draw(fr, "cpu_pct", "cpu", ax)
        cpu = fr.runs["cpu_pct"].drop_nulls().to_numpy()
        pos = cpu[cpu > 0]
        lo = min([float(pos.min())] + list(fr.budgets_pct)) / 1.5 if pos.size else min(fr.budgets_pct) / 1.5
        hi = max([float(pos.max())] + list(fr.budgets_pct)) * 1.5 if pos.size else max(fr.budgets_pct) * 1.5
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        for b in fr.budgets_pct:
            ax.axvline(b, color="#777777", linestyle=":", linewidth=0.9, gid=f"budget:{b:g}", zorder=1)
        ax.plot([], [], color="#777777", linestyle=":", linewidth=0.9,
                label="CPU budgets of the table: " + ", ".join(f"{b:g} %" for b in fr.budgets_pct))
        ax.set_xlabel("ksmd CPU (% of one core, log scale) = modelled CPU seconds / trace duration")
        ax.set_title("memory saved vs CPU: up and left is better", loc="left")
        legend_outside(ax)
        titles(fig, "Frontier: memory saved for the CPU it costs", _subtitle(fr))
    return fig


def frontier_cow(fr) -> Figure:
    """Saving (mean, % of the oracle) against COW breaks over the trace (symlog: linear below 10):
    every run of every policy and each policy's front (no other setting of that policy saves more
    with fewer COW breaks), and the oracle as the ceiling."""
    with style():
        fig = new_figure(12.0, 6.0)
        ax = fig.subplots(1, 1)
        _draw(fr, "cow_breaks", "cow", ax)
        cow = fr.runs["cow_breaks"].to_numpy().astype(float)
        ax.set_xscale("symlog", linthresh=10.0)
        ax.set_xlim(-0.5, max(float(cow.max()) if cow.size else 10.0, 10.0) * 1.6)
        ax.set_xlabel("COW breaks of merged pages over the trace (count, symlog scale: linear below 10)")
        ax.set_title("memory saved vs COW breaks: up and left is better", loc="left")
        legend_outside(ax)
        titles(fig, "Frontier: memory saved for the COW breaks it causes", _subtitle(fr))
    return fig


def frontier_points(fr, which: str = "cpu") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each policy's front as drawn: ``{policy: (x, y)}`` (x: CPU % or COW breaks, y: % of oracle)."""
    x_col = "cpu_pct" if which == "cpu" else "cow_breaks"
    out = {}
    for pol in fr.policies:
        f = fr.policy_runs(pol).filter(pl.col(FRONT_COLUMN[which]) & pl.col("pct_of_oracle").is_not_null())
        f = f.sort([x_col, "pct_of_oracle"])
        out[pol] = (f[x_col].cast(pl.Float64).to_numpy(), f["pct_of_oracle"].to_numpy())
    return out
