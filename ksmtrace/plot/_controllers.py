"""The controllers figure: each controller's run on the ``ksm`` frontier, its saving over time
against the best static setting within its CPU, and the pages_to_scan it set (from
:func:`ksmtrace.analysis.controllers.compare_controllers`)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ksmtrace.plot import palette
from ksmtrace.plot._common import MIB, PAGE_SIZE, legend_outside, new_figure, style, titles
from ksmtrace.plot._frontier import _draw


def controllers(cc) -> Figure:
    """Three panels.  Left: saving (% of the oracle) against ksmd CPU (% of one core, log) — every
    static ``ksm`` setting of the sweep and its front, each controller's run as a large marker (a
    run with no CPU at all, ksmd stopped throughout, at the left edge).  Right, top: memory saved
    over time (MiB) for each controller (solid) and the static setting that saves the most within
    its CPU (dotted, same colour), under the oracle.  Right, bottom: the pages_to_scan ksmd used
    (log scale; gaps while ksmd was stopped)."""
    fr = cc.frontier
    with style():
        fig = new_figure(15.0, 8.0)
        grid = fig.add_gridspec(2, 2, width_ratios=[1.0, 1.15])
        ax = fig.add_subplot(grid[:, 0])
        ax_t = fig.add_subplot(grid[0, 1])
        ax_p = fig.add_subplot(grid[1, 1], sharex=ax_t)
        _draw(fr, "cpu_pct", "cpu", ax)
        cpus = [r["cpu_pct"] for r in cc.rows if r["cpu_pct"]] + [c for c in fr.runs["cpu_pct"].drop_nulls().to_list() if c > 0]
        lo = min(cpus) / 2.0 if cpus else 1e-3
        hi = max(cpus) * 2.0 if cpus else 1.0
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        styles = _run_styles(cc.rows)
        for r, (st, ls, filled) in zip(cc.rows, styles):
            x = r["cpu_pct"] if r["cpu_pct"] else lo * 1.15
            y = r["pct_of_oracle"] if r["pct_of_oracle"] is not None else 0.0
            note = " (no CPU: ksmd stopped throughout)" if not r["cpu_pct"] else ""
            ax.scatter([x], [y], s=110, color=st.color if filled else "none", marker=st.marker, edgecolors=st.color
                       if not filled else "black", linewidths=0.7 if filled else 1.6, zorder=5,
                       label=f"{r['controller']}: {y:.1f} % at {r['cpu_pct'] or 0:.3g} % CPU{note}",
                       gid=f"controller:{r['controller']}")
        ax.set_xlabel("ksmd CPU (% of one core, log scale)")
        ax.set_title("controllers on the static ksm frontier", loc="left")
        legend_outside(ax, where="below")

        oracle = cc.frontier.oracle
        if oracle is not None:
            t = oracle.table
            ax_t.plot(t["t_s"].to_numpy(), t["oracle_saved"].to_numpy() * PAGE_SIZE / MIB, color=palette.ORACLE_COLOR,
                      linestyle=palette.ORACLE_LINESTYLE, linewidth=1.2, label="oracle (perfect dedup)", gid="oracle")
        drawn: dict[str, list[str]] = {}
        for r, (st, ls, _) in zip(cc.rows, styles):
            res = cc.results[r["controller"]]
            t = res.table
            ax_t.plot(t["t_s"].to_numpy(), t["frames_saved"].to_numpy() * PAGE_SIZE / MIB, color=st.color, linestyle=ls,
                      marker=st.marker, markersize=3.5, linewidth=1.6, label=r["controller"], gid=f"saved:{r['controller']}")
            if r.get("static_at_cpu_run_id") in cc.statics:
                drawn.setdefault(r["static_at_cpu_run_id"], []).append(r["controller"])
            if "pages_to_scan" in t.columns:
                pts = t["pages_to_scan"].to_numpy().astype(float)
                if "run" in t.columns:
                    pts = np.where(t["run"].to_numpy() == 1, pts, np.nan)
                ax_p.plot(t["t_s"].to_numpy(), pts, color=st.color, linestyle=ls, marker=st.marker, markersize=3.5,
                          linewidth=1.4, drawstyle="steps-post", label=r["controller"], gid=f"pages:{r['controller']}")
        for rid, who in drawn.items():  # each static setting once, in the colour of the first it is quoted for
            ts = cc.statics[rid].table
            first = next(r for r in cc.rows if r["controller"] == who[0])
            ax_t.plot(ts["t_s"].to_numpy(), ts["frames_saved"].to_numpy() * PAGE_SIZE / MIB,
                      color=palette.controller_style(first["name"]).color, linestyle=(0, (1, 1.5)), linewidth=1.2, alpha=0.8,
                      label=f"static {first['static_at_cpu_settings']}\n  (the best within the CPU of {', '.join(who)})",
                      gid=f"static:{rid}")
        ax_t.set_ylim(bottom=0)
        ax_t.set_ylabel("memory saved (MiB)")
        ax_t.set_title("memory saved over time", loc="left")
        legend_outside(ax_t)
        if any(np.isfinite(line.get_ydata()).any() for line in ax_p.get_lines()):
            ax_p.set_yscale("log")
        ax_p.set_ylabel("pages_to_scan (pages per wake-up, log)")
        ax_p.set_xlabel("time since the first snapshot (s)")
        ax_p.set_title("what the controller set (gaps: ksmd stopped, run=0)", loc="left")
        legend_outside(ax_p)
        from ksmtrace.controllers import format_kib

        host = format_kib(cc.host_kib) if cc.host_kib else "no host size"
        titles(fig, "Controllers vs the best static ksm setting",
               f"trace {cc.trace_name} · scope {cc.scope} · host {host} · {fr.policy_runs('ksm').height} static settings · "
               f"controllers start from pages_to_scan=100, sleep_millisecs=20 · CPU from cost model {cc.cost_model!r}")
    return fig


def _run_styles(rows) -> list[tuple]:
    """Per run: the controller's style, and for its n-th run in the figure the n-th line style
    (dotted left for the static settings) and a hollow marker after the first."""
    seen: dict[str, int] = {}
    styles = ["-", "--", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    out = []
    for r in rows:
        n = seen.get(r["name"], 0)
        seen[r["name"]] = n + 1
        out.append((palette.controller_style(r["name"]), styles[n % len(styles)], n == 0))
    return out
