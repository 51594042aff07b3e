"""Heatmap: sharing by process over time, from a result's per-process table."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl
from matplotlib import colors as mcolors
from matplotlib import colormaps
from matplotlib.figure import Figure

from ksmtrace.errors import KsmtraceError
from ksmtrace.plot._common import new_figure, run_labels, runs_subtitle, style, titles

VALUES = ("fraction", "merged")
SCALES = ("percentile", "log", "linear")
MAX_PANELS = 6
PERCENTILES = (2.0, 98.0)


def process_order(results: Sequence, top: int = 20) -> list[tuple[int, int, str]]:
    """One row order for every panel: ``(proc, pid, comm)`` of the ``top`` processes ranked by their
    merged pages summed over all snapshots of all ``results``, then candidate pages, then pid.  A
    process keeps its row in every panel, so panels compare row by row."""
    if top < 1:
        raise KsmtraceError("heatmap: --top must be at least 1")
    parts = []
    for r in results:
        if r.procs is None:
            raise KsmtraceError(f"result {r.run_id} has no per-process table (<run_id>.procs.parquet)")
        if r.procs.height:
            parts.append(r.procs.select("proc", "pid", "comm", "merged_pages", "candidate_pages"))
    if not parts:
        return []
    rank = (
        pl.concat(parts)
        .group_by("proc")
        .agg(pl.col("merged_pages").sum().alias("m"), pl.col("candidate_pages").sum().alias("c"),
             pl.col("pid").first(), pl.col("comm").first())
        .sort(["m", "c", "pid", "proc"], descending=[True, True, False, False])
        .head(top)
    )
    return [(int(p), int(pid), str(c or "?")) for p, pid, c in zip(rank["proc"], rank["pid"], rank["comm"])]


def heatmap_matrix(result, *, value: str = "fraction", top: int = 20,
                   order: Sequence[tuple[int, int, str]] | None = None) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """``(matrix, row_labels, times_s, n_procs)`` for one run.

    ``matrix[i, s]`` is, for the i-th process of ``order`` (default: :func:`process_order` of this
    run alone: the top ``top`` by merged pages over all snapshots, then by pid),
    ``merged_pages / candidate_pages`` (``value='fraction'``) or ``merged_pages``
    (``value='merged'``) at snapshot ``s``; NaN where the process had no candidate pages.
    ``n_procs`` is how many processes the run has in all.
    """
    if value not in VALUES:
        raise KsmtraceError(f"unknown heatmap value {value!r} (choose {', '.join(VALUES)})")
    if top < 1:
        raise KsmtraceError("heatmap: --top must be at least 1")
    procs = result.procs
    if procs is None:
        raise KsmtraceError(f"result {result.run_id} has no per-process table (<run_id>.procs.parquet)")
    times = result.table["t_s"].to_numpy()
    n_snaps = len(times)
    if order is None:
        order = process_order([result], top)
    n_procs = procs["proc"].n_unique() if procs.height else 0
    if not order:
        return np.zeros((0, n_snaps)), [], times, n_procs
    row_of = {p: i for i, (p, _, _) in enumerate(order)}
    mat = np.full((len(order), n_snaps), np.nan)
    sub = procs.filter(pl.col("proc").is_in(list(row_of)) & (pl.col("candidate_pages") > 0))
    rows = np.array([row_of[int(p)] for p in sub["proc"].to_list()], dtype=int)
    cols = sub["snap"].to_numpy().astype(int)
    merged = sub["merged_pages"].to_numpy().astype(float)
    cand = sub["candidate_pages"].to_numpy().astype(float)
    ok = cols < n_snaps
    mat[rows[ok], cols[ok]] = (merged / cand)[ok] if value == "fraction" else merged[ok]
    labels = [f"{c} ({pid})" for _, pid, c in order]
    return mat, labels, times, n_procs


def _norm(values: np.ndarray, value: str, scale: str) -> tuple[mcolors.Normalize, str]:
    finite = values[np.isfinite(values)]
    unit = "merged / candidate pages (fraction)" if value == "fraction" else "merged pages (count of 4 KiB pages)"
    hi_default = 1.0 if value == "fraction" else max(float(finite.max()) if finite.size else 1.0, 1.0)
    if scale == "linear":
        return mcolors.Normalize(vmin=0.0, vmax=hi_default), f"{unit}, linear scale"
    if scale == "log":
        pos = finite[finite > 0]
        lo = float(pos.min()) if pos.size else (1e-3 if value == "fraction" else 1.0)
        hi = float(pos.max()) if pos.size else hi_default
        if hi <= lo:
            hi = lo * 10
        return mcolors.LogNorm(vmin=lo, vmax=hi), f"{unit}, log scale; 0 drawn in light grey"
    # percentile: the colours span the 2nd..98th percentile of the non-empty cells, outliers clip
    if finite.size:
        lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
    else:
        lo, hi = 0.0, hi_default
    if hi <= lo:
        lo, hi = (0.0, hi_default) if hi_default > lo else (lo, lo + 1.0)
    return (mcolors.Normalize(vmin=lo, vmax=hi),
            f"{unit}, percentile scale: colours span the {_ordinal(PERCENTILES[0])}–{_ordinal(PERCENTILES[1])} percentile "
            f"of cells ({lo:.3g}–{hi:.3g}), beyond that clipped")


def _ordinal(x: float) -> str:
    n = int(x)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{x:g}{suffix}"


def _edges(times: np.ndarray) -> np.ndarray:
    if times.size == 0:
        return np.array([0.0, 1.0])
    if times.size == 1:
        return np.array([times[0] - 0.5, times[0] + 0.5])
    mid = (times[1:] + times[:-1]) / 2
    return np.concatenate([[times[0] - (mid[0] - times[0])], mid, [times[-1] + (times[-1] - mid[-1])]])


def heatmap(results: Sequence, *, value: str = "fraction", top: int = 20, scale: str | None = None) -> Figure:
    """Sharing by process over time: one row per process (the ``top`` with the most merged pages),
    one column per snapshot, colour = ``merged_pages / candidate_pages`` (``value='fraction'``,
    default scale ``percentile``) or ``merged_pages`` (``value='merged'``, default scale ``log``).
    Blank cells: the process had no candidate pages then.  One panel per run (up to 6), one
    shared colour scale."""
    if not results:
        raise KsmtraceError("heatmap: no results to plot")
    if len(results) > MAX_PANELS:
        raise KsmtraceError(f"heatmap: {len(results)} results given; draw at most {MAX_PANELS} at once")
    scale = scale or ("percentile" if value == "fraction" else "log")
    if scale not in SCALES:
        raise KsmtraceError(f"unknown heatmap scale {scale!r} (choose {', '.join(SCALES)})")
    order = process_order(results, top)
    mats = [heatmap_matrix(r, value=value, top=top, order=order) for r in results]
    allv = np.concatenate([m[0].ravel() for m in mats]) if mats else np.zeros(0)
    norm, cbar_label = _norm(allv, value, scale)
    cmap = colormaps["viridis"].with_extremes(bad="#ffffff", under="#d9d9d9", over="#fde725")
    labels = run_labels(results)
    with style():
        n = len(results)
        fig = new_figure(10.5, 1.6 + 4.4 * n)
        axes = fig.subplots(n, 1, squeeze=False)[:, 0]
        mesh = None
        for ax, r, lab, (mat, rowlab, times, n_procs) in zip(axes, results, labels, mats):
            if mat.shape[0] == 0:
                ax.text(0.5, 0.5, "no process had candidate pages", ha="center", va="center", transform=ax.transAxes)
            else:
                y = np.arange(mat.shape[0] + 1) - 0.5
                shown = mat
                if scale == "log":  # zeros (nothing merged yet) get the "under" colour, not the blank one
                    shown = np.where(np.isfinite(mat) & (mat <= 0), norm.vmin * 0.5, mat)
                data = np.ma.masked_invalid(shown)
                mesh = ax.pcolormesh(_edges(times), y, data, cmap=cmap, norm=norm, shading="flat",
                                     rasterized=mat.size > 20000, gid=f"heatmap:{r.run_id}")
                ax.set_yticks(np.arange(mat.shape[0]), rowlab, fontsize=7)
                ax.set_ylim(mat.shape[0] - 0.5, -0.5)
            ax.grid(False)
            ax.set_ylabel("process (comm (pid))")
            ax.set_xlabel("time since first snapshot (s)")
            ax.set_title(f"{lab}: {n_procs} processes", loc="left")
        if mesh is not None:
            extend = "neither"
            if scale == "percentile":
                extend = "both"
            elif scale == "log":
                extend = "min"
            cb = fig.colorbar(mesh, ax=list(axes), extend=extend, fraction=0.04, pad=0.01)
            cb.set_label(cbar_label, fontsize=7.5)
        what = "fraction of candidate pages merged" if value == "fraction" else "merged pages"
        titles(fig, f"Sharing by process over time ({what})", runs_subtitle(
            results, extra=f"rows: the top {len(order)} processes by merged pages over all panels, in the same order "
                           "in every panel"))
    return fig
