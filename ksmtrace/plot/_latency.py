"""Latency: the CDF of merge latency per run, from the result's latency histogram."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ksmtrace.plot import palette
from ksmtrace.plot._common import legend_outside, new_figure, require, run_labels, runs_subtitle, style, titles


def latency_cdf_points(result) -> tuple[np.ndarray, np.ndarray]:
    """``(x_s, cdf)``: the fraction of merges whose latency is at most ``x_s`` seconds.

    The histogram's bins are log-spaced (bin 0 is under 1 ms, then four bins per octave of ms);
    each merge is placed at its bin's *upper* edge (the convention of
    :meth:`~ksmtrace.results.RunResult.latency_quantile`), so the curve is a lower bound of the true
    CDF.  The first point, at half a millisecond, is 0.  Empty when the run merged nothing.
    """
    from ksmtrace.engine.state import lat_bin_edges_ms

    h = np.asarray(result.latency_hist, dtype=float)
    tot = h.sum()
    if tot <= 0:
        return np.zeros(0), np.zeros(0)
    edges = lat_bin_edges_ms()
    upper_ms = np.append(edges[1:], edges[-1] * 2)[: h.size]
    last = int(np.flatnonzero(h)[-1])
    cdf = np.cumsum(h)[: last + 1] / tot
    x = np.concatenate([[0.5], upper_ms[: last + 1]]) / 1000.0
    return x, np.concatenate([[0.0], cdf])


def latency(results: Sequence) -> Figure:
    """Merge-latency CDF per run on a log time axis (seconds).  Merge latency is the time from the
    moment two equal pages both exist (and stay equal) to the moment they share a frame."""
    require(results, "latency")
    labels = run_labels(results)
    styles = palette.run_styles(results)
    with style():
        fig = new_figure(12.0, 5.6)
        ax = fig.subplots(1, 1)
        xmax = 1e-3
        for r, lab, st in zip(results, labels, styles):
            x, y = latency_cdf_points(r)
            n = int(np.asarray(r.latency_hist).sum())
            line = {"color": st["color"], "linestyle": st["linestyle"]}
            if x.size == 0:
                ax.plot([], [], label=f"{lab}: no merges", gid=f"run:{r.run_id}", **line)
                continue
            p50, p90 = r.latency_quantile(0.5), r.latency_quantile(0.9)
            ax.plot(x, y, drawstyle="steps-post", gid=f"run:{r.run_id}", **line,
                    label=f"{lab} (n={n:,} merges, p50 ≤ {p50:.3g} s, p90 ≤ {p90:.3g} s)")
            xmax = max(xmax, float(x[-1]))
        ax.axhline(0.5, color="#999999", linestyle=":", linewidth=0.8)
        ax.axhline(0.9, color="#999999", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(4e-4, xmax * 1.5)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("merge latency (s, log scale)")
        ax.set_ylabel("fraction of merges with latency ≤ x (fraction)")
        ax.set_title("time from two equal pages existing to sharing one frame", loc="left")
        legend_outside(ax)
        titles(fig, "Merge latency CDF", runs_subtitle(
            results, extra="each merge at its histogram bin's upper edge; under 1 ms drawn at 1 ms"))
    return fig
