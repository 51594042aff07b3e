"""The ``advise`` figure: the search against the CPU budget, and the recommended run over time."""
from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from ksmtrace.errors import KsmtraceError
from ksmtrace.plot import palette
from ksmtrace.plot._common import MIB, PAGE_SIZE, legend_outside, new_figure, place_labels, style, titles

STAGE_ALPHA = {"grid": 0.45, "refine": 0.6, "switches": 0.75, "advisor": 0.9}


def advise(adv) -> Figure:
    """Left: every ``ksm`` setting the search replayed — mean saving (% of the oracle) against ksmd
    CPU (% of one core, log scale); hollow = over the budget (or the latency target); the budget
    dotted, the oracle dashed (the ceiling), the recommendation ringed.  Right: the recommended
    settings' saving over the trace (MiB) under the oracle's, with the times to 50 % and 90 % of
    the final saving and the unmerge headroom (the most it ever saved)."""
    if adv.result is None or adv.search.height == 0:
        raise KsmtraceError("advise: no setting fits the budget, so there is no recommended run to draw")
    st = palette.policy_style("ksm")
    with style():
        fig = new_figure(13.0, 5.6)
        ax, axt = fig.subplots(1, 2, width_ratios=[1.1, 1])
        s = adv.search.filter(pl.col("cpu_pct").is_not_null() & pl.col("pct_of_oracle").is_not_null())
        for stage, alpha in STAGE_ALPHA.items():
            d = s.filter(pl.col("stage") == stage)
            if not d.height:
                continue
            ok = (d["within_budget"] & d["meets_latency"]).to_numpy()
            x, y = d["cpu_pct"].to_numpy(), d["pct_of_oracle"].to_numpy()
            ax.scatter(x[ok], y[ok], s=26, color=st.color, marker=st.marker, alpha=alpha, linewidths=0,
                       label=f"ksm, {stage} ({int(ok.sum())} within budget)", gid=f"search:{stage}")
            ax.scatter(x[~ok], y[~ok], s=26, facecolors="none", edgecolors=st.color, marker=st.marker, alpha=alpha,
                       gid=f"search-over:{stage}")
        ax.scatter([], [], s=26, facecolors="none", edgecolors=st.color, marker=st.marker, label="over the budget "
                   "(or the latency target)")
        rec = s.filter(pl.col("recommended"))
        if rec.height:
            r = rec.row(0, named=True)
            ax.scatter([r["cpu_pct"]], [r["pct_of_oracle"]], s=140, facecolors="none", edgecolors="black",
                       linewidths=1.5, label="recommended", gid="recommended", zorder=4)
        ax.axvline(adv.cpu_budget_pct, color="#777777", linestyle=":", linewidth=1.0,
                   label=f"CPU budget {adv.cpu_budget_pct:g} % of a core", gid="budget")
        ax.axhline(100.0, color=palette.ORACLE_COLOR, linestyle=palette.ORACLE_LINESTYLE, linewidth=1.2,
                   label="oracle: perfect dedup (the ceiling)", gid="oracle-ceiling")
        xs = s["cpu_pct"].to_numpy()
        pos = xs[xs > 0]
        lo = min(float(pos.min()) if pos.size else adv.cpu_budget_pct, adv.cpu_budget_pct) / 1.5
        hi = max(float(pos.max()) if pos.size else adv.cpu_budget_pct, adv.cpu_budget_pct) * 1.5
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, 105)
        ax.set_xlabel("ksmd CPU (% of one core, log scale)")
        ax.set_ylabel("memory saved, mean over the trace (% of the oracle)")
        ax.set_title(f"the search: {adv.search.height} ksm settings replayed", loc="left")
        legend_outside(ax, where="below", ncol=2)

        res = adv.result
        t = res.table["t_s"].to_numpy()
        saved = res.table["frames_saved"].to_numpy() * (PAGE_SIZE / MIB)
        oracle = res.table["oracle_saved"].to_numpy() * (PAGE_SIZE / MIB)
        axt.plot(t, oracle, color=palette.ORACLE_COLOR, linestyle=palette.ORACLE_LINESTYLE, linewidth=1.4,
                 label="oracle: perfect dedup", gid="oracle")
        axt.plot(t, saved, color=st.color, marker=st.marker if len(t) <= 60 else None, markersize=3,
                 label="recommended settings", gid="recommended-run")
        e = adv.expected
        for key, ls, name in (("t50_s", "--", "50 %"), ("t90_s", "-.", "90 %")):
            if e.get(key) is not None:
                axt.axvline(e[key], color="#555555", linestyle=ls, linewidth=0.9, gid=key,
                            label=f"{name} of the final saving from {e[key]:.0f} s")
        axt.axhline(e["unmerge_headroom_mib"], color="#d62728", linestyle=":", linewidth=1.0, gid="headroom",
                    label=f"unmerge headroom {e['unmerge_headroom_mib']:,.1f} MiB")
        top = max(float(np.nanmax(oracle)) if oracle.size else 0.0, float(np.nanmax(saved)) if saved.size else 0.0)
        axt.set_ylim(0, (top if top > 0 else 1.0) * 1.08)
        axt.set_xlabel("time since the first snapshot (s)")
        axt.set_ylabel("memory saved (MiB)")
        axt.set_title("the recommended settings over the trace", loc="left")
        legend_outside(axt, where="below", ncol=2)
        sub = (f"trace {adv.trace_name} · scope {adv.scope} · budget {adv.cpu_budget_pct:g} % of a core"
               + (f" · p90 merge latency ≤ {adv.target_latency_s:g} s" if adv.target_latency_s else "")
               + f" · verdict {adv.verdict.upper()} · " + " ".join(f"{k}={v}" for k, v in adv.settings.items()
                                                                    if k in ("pages_to_scan", "sleep_millisecs", "advisor_mode")))
        titles(fig, "advise: the ksm settings for this trace", sub)
        if rec.height:
            r = rec.row(0, named=True)
            place_labels(ax, [r["cpu_pct"]], [r["pct_of_oracle"]], [r["settings"]], gids=["recommended-label"],
                         others=(s["cpu_pct"].to_numpy(), s["pct_of_oracle"].to_numpy()),
                         lines=[([adv.cpu_budget_pct] * 2, [0, 105]), ([lo, hi], [100.0, 100.0])])
    return fig
