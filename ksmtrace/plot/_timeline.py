"""Timeline: memory saved per run against the oracle, with COW breaks and ksmd CPU per interval."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ksmtrace.plot import palette
from ksmtrace.plot._common import (cap_to, check_units, frames_to, legend_outside, new_figure, require, run_labels,
                                   runs_subtitle, style, titles, unit_label)


def timeline(results: Sequence, *, units: str = "MiB", cost=None, hash_only: bool = True) -> Figure:
    """Three panels sharing the time axis (seconds since the first snapshot):

    1. ``frames_saved`` of every run (``units``: ``MiB`` or ``frames``) and, dashed black, the
       oracle's ``oracle_saved`` for the same trace and scope (drawn once, even when an ``oracle``
       run is among ``results``), and, dotted grey, the naive hash-only duplicate count;
    2. COW breaks per snapshot interval (count), drawn over the interval they happened in;
    3. ksmd CPU seconds per interval under the cost model ``cost`` (default: the shipped one).

    Colours and markers are the policies' (:mod:`ksmtrace.plot.palette`); the legend sits beside
    the panels.  The memory axis is linear from 0 and its range is set by the runs and the oracle:
    the hash-only count, which overcounts, is drawn but clipped, and marked when it is off scale.
    """
    from ksmtrace.engine.cost import resolve_cost_model

    require(results, "timeline")
    check_units(units)
    model = resolve_cost_model(cost)
    labels = run_labels(results)
    styles = palette.run_styles(results)
    ul = unit_label(units)
    with style():
        fig = new_figure(12.0, 8.0)
        ax_mem, ax_cow, ax_cpu = fig.subplots(3, 1, sharex=True, height_ratios=[2.2, 1, 1])
        refs: dict[tuple, tuple] = {}
        for r in results:
            key = (r.spec.get("trace_fingerprint"), r.spec.get("scope"))
            refs.setdefault(key, (r, []))[1].append(r)
        many_refs = len(refs) > 1
        series_max = 0.0
        naive_max = 0.0
        for k, ((_, scope), (r, _)) in enumerate(refs.items()):
            t = r.table["t_s"].to_numpy()
            suffix = f" — {r.spec.get('trace_name')}, scope {scope}" if many_refs else ""
            oracle = frames_to(r.table["oracle_saved"].to_numpy().astype(float), units)
            series_max = max(series_max, float(np.nanmax(oracle)) if oracle.size else 0.0)
            ls = palette.ORACLE_LINESTYLE if k == 0 else palette.LINESTYLES[k % len(palette.LINESTYLES)]
            ax_mem.plot(t, oracle, color=palette.ORACLE_COLOR, linestyle=ls, linewidth=1.6,
                        label=f"oracle: perfect instantaneous dedup (100%){suffix}", gid="oracle", zorder=5)
            if hash_only:
                naive = frames_to(r.table["hash_only_saved"].to_numpy().astype(float), units)
                naive_max = max(naive_max, float(np.nanmax(naive)) if naive.size else 0.0)
                ax_mem.plot(t, naive, color=palette.HASH_ONLY_COLOR, linestyle=palette.HASH_ONLY_LINESTYLE,
                            linewidth=1.2, label=f"hash-only duplicates (naive, overcounts){suffix}", gid="hash_only",
                            zorder=5)
        for r, lab, st in zip(results, labels, styles):
            t = r.table["t_s"].to_numpy()
            marker = st["marker"] if len(t) <= 60 else None
            is_oracle = r.spec.get("policy") == "oracle"
            if not is_oracle:  # the oracle's frames_saved is the dashed reference line itself
                saved = frames_to(r.table["frames_saved"].to_numpy().astype(float), units)
                series_max = max(series_max, float(np.nanmax(saved)) if saved.size else 0.0)
                frac = r.summary.get("fraction_of_oracle_mean")
                pct = f", mean {100 * frac:.0f}% of oracle" if isinstance(frac, (int, float)) and frac == frac else ""
                ax_mem.plot(t, saved, color=st["color"], linestyle=st["linestyle"], marker=marker, markersize=3,
                            label=f"{lab}{pct}", gid=f"run:{r.run_id}")
            cow_style = {"color": st["color"], "linestyle": palette.ORACLE_LINESTYLE if is_oracle else st["linestyle"]}
            ax_cow.plot(t, r.table["cow_breaks"].to_numpy(), drawstyle="steps-pre", gid=f"run:{r.run_id}",
                        label=f"{lab} (COW breaks)" if is_oracle else None, **cow_style)
            if not is_oracle:  # the oracle does no work
                ax_cpu.plot(t, r.cpu_per_snapshot(model), color=st["color"], linestyle=st["linestyle"],
                            drawstyle="steps-pre", gid=f"run:{r.run_id}")
        ax_mem.set_ylabel(f"memory saved ({ul})")
        ax_mem.set_title(f"frames_saved per run vs oracle_saved ({ul})", loc="left")
        ax_cow.set_ylabel("COW breaks per\ninterval (count)")
        ax_cow.set_title("COW breaks of merged pages in each snapshot interval (the oracle's: dashed black)", loc="left")
        ax_cpu.set_ylabel("ksmd CPU per\ninterval (s)")
        ax_cpu.set_title(f"daemon CPU time in each snapshot interval (cost model {model.name!r})", loc="left")
        ax_cpu.set_xlabel("time since first snapshot (s)")
        cap_to(ax_mem, series_max, naive_max)
        top = ax_mem.get_ylim()[1]
        if hash_only and naive_max > top:
            ax_mem.text(0.99, 0.98, f"hash-only count off scale (up to {naive_max:,.0f} {ul})",
                        transform=ax_mem.transAxes, ha="right", va="top", fontsize=7, color=palette.HASH_ONLY_COLOR,
                        gid="hash_only_off_scale")
        for ax in (ax_cow, ax_cpu):
            ax.set_ylim(bottom=0)
        n_entries = len(ax_mem.get_legend_handles_labels()[1])
        legend_outside(ax_mem, fontsize=7.5 if n_entries <= 10 else 6.5)
        titles(fig, "Memory saved over time", runs_subtitle(results, model.name))
    return fig
