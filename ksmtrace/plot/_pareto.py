"""Pareto: memory saved against ksmd CPU seconds and against COW breaks, one point per run."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ksmtrace.pareto import non_dominated
from ksmtrace.errors import KsmtraceError
from ksmtrace.plot import palette
from ksmtrace.plot._common import (check_units, frames_to, legend_outside, new_figure, place_labels, require,
                                   run_labels, runs_subtitle, style, titles, unit_label)

Y_METRICS = ("saved", "pct")


def pareto_points(results: Sequence, *, y: str = "saved", units: str = "MiB", cost=None) -> dict[str, np.ndarray]:
    """The numbers a Pareto figure plots: ``y`` (mean frames_saved in ``units``, or mean % of
    the oracle), ``cpu_s`` (ksmd CPU seconds under ``cost``) and ``cow_breaks`` (total), per run."""
    if y not in Y_METRICS:
        raise KsmtraceError(f"unknown y metric {y!r} (choose {', '.join(Y_METRICS)})")
    check_units(units)
    if y == "saved":
        yv = np.array([float(r.table["frames_saved"].mean() or 0.0) if r.table.height else 0.0 for r in results])
        yv = frames_to(yv, units)
    else:
        vals = []
        for r in results:
            o = float(r.table["oracle_saved"].mean() or 0.0) if r.table.height else 0.0
            s = float(r.table["frames_saved"].mean() or 0.0) if r.table.height else 0.0
            vals.append(100.0 * s / o if o > 0 else np.nan)
        yv = np.array(vals, dtype=float)
    return {
        "y": yv,
        "cpu_s": np.array([r.cpu_seconds(cost) for r in results], dtype=float),
        "cow_breaks": np.array([float(r.table["cow_breaks"].sum()) if r.table.height else 0.0 for r in results]),
    }


def _scale(ax, values: np.ndarray, axis_label: str) -> str:
    """Log (or symlog, with zeros) x scale when the values span more than two decades."""
    pos = values[np.isfinite(values) & (values > 0)]
    if pos.size >= 2 and pos.max() / pos.min() > 100:
        if (values <= 0).any():
            thresh = float(pos.min())
            ax.set_xscale("symlog", linthresh=thresh)
            return f"{axis_label}, symlog scale (linear below {thresh:.3g})"
        ax.set_xscale("log")
        return f"{axis_label}, log scale"
    return axis_label


def _steps_post(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of a ``drawstyle="steps-post"`` line through (x, y)."""
    if x.size < 2:
        return x, y
    sx = np.repeat(x, 2)[1:]
    sy = np.repeat(y, 2)[:-1]
    return sx, sy


def pareto(results: Sequence, *, y: str = "saved", units: str = "MiB", cost=None, annotate: int = 12) -> Figure:
    """Two panels, one point per run (colour and marker = policy, as in every figure): memory saved
    (``y='saved'``: mean frames_saved in ``units``; ``y='pct'``: mean % of the oracle) against
    ksmd CPU seconds (left) and against total COW breaks (right).  The oracle is a ceiling — a
    perfect dedup at no CPU — so its runs are a dashed horizontal line, never points and never on
    a front.  The other runs no run beats on both axes of a panel (the non-dominated front: more
    saved, less CPU / fewer COW breaks) are ringed, joined by a black staircase and labelled where
    a label fits without overprinting (up to ``annotate`` per panel)."""
    from ksmtrace.engine.cost import resolve_cost_model

    require(results, "pareto")
    model = resolve_cost_model(cost)
    pts = pareto_points(results, y=y, units=units, cost=model)
    is_oracle = np.array([r.spec.get("policy") == "oracle" for r in results], dtype=bool)
    policies = []
    for r in results:
        if r.spec.get("policy") not in policies and r.spec.get("policy") != "oracle":
            policies.append(r.spec.get("policy"))
    labels = run_labels(results, with_policy=len(policies) > 1)
    ylabel = f"memory saved, mean over snapshots ({unit_label(units)})" if y == "saved" else "memory saved, mean % of the oracle (%)"
    with style():
        fig = new_figure(13.0, 5.8)
        axes = fig.subplots(1, 2, sharey=True)
        panels = [
            (axes[0], pts["cpu_s"], f"ksmd CPU time (s, cost model {model.name!r})", "CPU"),
            (axes[1], pts["cow_breaks"], "COW breaks, total over the run (count)", "COW breaks"),
        ]
        ceiling = float(np.nanmax(pts["y"][is_oracle])) if is_oracle.any() and np.isfinite(pts["y"][is_oracle]).any() else None
        fronts = []
        for ax, xv, xlabel, what in panels:
            runs = ~is_oracle
            front = np.zeros(len(results), dtype=bool)
            if runs.any():
                front[runs] = non_dominated(maximize=[pts["y"][runs]], minimize=[xv[runs]])
            for pol in policies:
                idx = np.array([i for i, r in enumerate(results) if r.spec.get("policy") == pol], dtype=int)
                st = palette.policy_style(pol)
                ax.scatter(xv[idx], pts["y"][idx], s=28, color=st.color, marker=st.marker,
                           alpha=0.8, label=pol, gid=f"points:{pol}", zorder=3)
            if ceiling is not None:
                ax.axhline(ceiling, color=palette.ORACLE_COLOR, linestyle=palette.ORACLE_LINESTYLE, linewidth=1.2,
                           label="oracle: perfect dedup, no CPU (ceiling)", gid="oracle-ceiling", zorder=2)
            fi = np.flatnonzero(front & np.isfinite(pts["y"]))
            order = fi[np.lexsort((-pts["y"][fi], xv[fi]))]
            if order.size:
                ax.plot(xv[order], pts["y"][order], color="black", linewidth=1.0, drawstyle="steps-post", zorder=2,
                        label=f"non-dominated front ({order.size} of {int((~is_oracle).sum())} runs)", gid="front")
                ax.scatter(xv[order], pts["y"][order], s=90, facecolors="none", edgecolors="black", linewidths=1.2,
                           zorder=4, gid="front-points")
            fronts.append(order)
            ax.set_xlabel(_scale(ax, xv, xlabel))
            ax.set_title(f"memory saved vs {what}: more is better up, less is better left", loc="left")
            ax.set_ylim(bottom=0)
        axes[0].set_ylabel(ylabel)
        axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.08)  # (shared) headroom: the best runs' labels fit above them
        legend_outside(axes[1])
        titles(fig, "Saving vs cost, one point per run", runs_subtitle(results, model.name))
        for (ax, xv, _, _), order in zip(panels, fronts):
            groups: dict[tuple[float, float], list[int]] = {}  # runs at one point get one label
            for i in order:
                groups.setdefault((float(xv[i]), float(pts["y"][i])), []).append(int(i))
            chosen = list(groups.values())[:annotate]
            texts = [labels[m[0]] + (f" (+{len(m) - 1} more here)" if len(m) > 1 else "") for m in chosen]
            rest = np.flatnonzero(~is_oracle)
            place_labels(ax, [xv[m[0]] for m in chosen], [pts["y"][m[0]] for m in chosen], texts,
                         gids=[f"front-label:{results[m[0]].run_id}" for m in chosen], others=(xv[rest], pts["y"][rest]),
                         lines=[_steps_post(xv[order], pts["y"][order])] if order.size else ())
    return fig
