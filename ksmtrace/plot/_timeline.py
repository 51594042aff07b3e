"""Timeline: memory saved per run against the oracle, with COW breaks and ksmd CPU per interval."""
from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure

from ksmtrace.plot._common import (NAIVE_COLOR, ORACLE_COLOR, check_units, color, frames_to, new_figure,
                                   require, run_labels, runs_subtitle, style, titles, unit_label)


def timeline(results: Sequence, *, units: str = "MiB", cost=None, hash_only: bool = True) -> Figure:
    """Three panels sharing the time axis (seconds since the first snapshot):

    1. ``frames_saved`` of every run (``units``: ``MiB`` or ``frames``) and, dashed black, the
       oracle's ``oracle_saved`` for the same trace and scope (and, dotted grey, the naive
       hash-only duplicate count);
    2. COW breaks per snapshot interval (count), drawn over the interval they happened in;
    3. ksmd CPU seconds per interval under the cost model ``cost`` (default: the shipped one).
    """
    from ksmtrace.engine.cost import resolve_cost_model

    require(results, "timeline")
    check_units(units)
    model = resolve_cost_model(cost)
    labels = run_labels(results)
    ul = unit_label(units)
    with style():
        fig = new_figure(10.0, 8.0)
        ax_mem, ax_cow, ax_cpu = fig.subplots(3, 1, sharex=True, height_ratios=[2.2, 1, 1])
        refs: dict[tuple, tuple] = {}
        for r in results:
            key = (r.spec.get("trace_fingerprint"), r.spec.get("scope"))
            refs.setdefault(key, (r, []))[1].append(r)
        many_refs = len(refs) > 1
        for (_, scope), (r, _) in refs.items():
            t = r.table["t_s"].to_numpy()
            suffix = f" — {r.spec.get('trace_name')}, scope {scope}" if many_refs else ""
            ax_mem.plot(t, frames_to(r.table["oracle_saved"].to_numpy().astype(float), units), color=ORACLE_COLOR,
                        linestyle="--", linewidth=1.6, label=f"oracle: perfect instantaneous dedup{suffix}", gid="oracle", zorder=5)
            if hash_only:
                ax_mem.plot(t, frames_to(r.table["hash_only_saved"].to_numpy().astype(float), units), color=NAIVE_COLOR,
                            linestyle=":", linewidth=1.2, label=f"hash-only duplicates (naive, overcounts){suffix}", gid="hash_only", zorder=5)
        for i, (r, lab) in enumerate(zip(results, labels)):
            t = r.table["t_s"].to_numpy()
            saved = r.table["frames_saved"].to_numpy().astype(float)
            frac = r.summary.get("fraction_of_oracle_mean")
            pct = f", mean {100 * frac:.0f}% of oracle" if isinstance(frac, (int, float)) and frac == frac else ""
            marker = "o" if len(t) <= 60 else None
            ax_mem.plot(t, frames_to(saved, units), color=color(i), marker=marker, markersize=3,
                        label=f"{lab}{pct}", gid=f"run:{r.run_id}")
            ax_cow.plot(t, r.table["cow_breaks"].to_numpy(), color=color(i), drawstyle="steps-pre", label=lab, gid=f"run:{r.run_id}")
            ax_cpu.plot(t, r.cpu_per_snapshot(model), color=color(i), drawstyle="steps-pre", label=lab, gid=f"run:{r.run_id}")
        ax_mem.set_ylabel(f"memory saved ({ul})")
        ax_mem.set_title(f"frames_saved per run vs oracle_saved ({ul})", loc="left")
        ax_cow.set_ylabel("COW breaks per\ninterval (count)")
        ax_cow.set_title("COW breaks of merged pages in each snapshot interval", loc="left")
        ax_cpu.set_ylabel("ksmd CPU per\ninterval (s)")
        ax_cpu.set_title(f"daemon CPU time in each snapshot interval (cost model {model.name!r})", loc="left")
        ax_cpu.set_xlabel("time since first snapshot (s)")
        for ax in (ax_mem, ax_cow, ax_cpu):
            ax.set_ylim(bottom=0)
        n_entries = len(results) + len(refs) * (2 if hash_only else 1)
        ax_mem.legend(loc="best", ncol=1 if n_entries <= 10 else 2, fontsize=7.5 if n_entries <= 10 else 6.0)
        titles(fig, "Memory saved over time", runs_subtitle(results, model.name))
    return fig
