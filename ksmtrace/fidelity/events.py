"""Fidelity event by event: the simulated ksmd against the real one's own tracepoints.

A trace captured with kernel events holds the ``ksm:*`` tracepoints (``ksm_events``,
``docs/trace-format.md``).  Where the counters say *how much*, the events say *when*, and
:func:`event_fidelity` compares the replay of :func:`ksmtrace.fidelity.compare.fidelity` with them:

* **full scans**: the real ``ksm_start_scan``/``ksm_stop_scan`` times against the simulated
  daemon's (the time its ``full_scans`` counter reaches each value on the refined grid: resolution
  ``sim_step``); the gap between the end of one scan and the start of the next is one sleep of
  ksmd, so the real gaps minus ``sleep_millisecs`` are the **timer's measured lateness**, shown
  beside what the replay's clock models for the same instants (:func:`ksmtrace.engine.clock.next_wake`
  at the traced HZ);
* **merges per snapshot interval**: the real merges (``ksm_merge_with_ksm_page`` with a KSM page
  and ``err`` 0: a page that joined a KSM page; the first half of a two-page merge, which only
  write-protects the tree page, is not one) against the simulated ``merges`` in the same intervals
  (between the compare times of the snapshots);
* **time to merge, per page**: from KSM's start to each page's first merge — real: the first merge
  event of each rmap item; simulated: the engine's first merge of each page (``first_merge_ns``).

Every time is in seconds since the first snapshot (the snapshots' monotonic clock).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

QUANTILES = (0.1, 0.5, 0.9)


def _quant(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {f"p{int(q * 100)}": None for q in QUANTILES} | {"max": None}
    return {f"p{int(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES} | {"max": float(np.max(x))}


def _mean_period(ends: np.ndarray) -> float | None:
    """Mean time between the ends of successive full scans (first to last: immune to the
    resolution of the simulated crossings)."""
    e = ends[~np.isnan(ends)] if len(ends) else ends
    return float((e[-1] - e[0]) / (len(e) - 1)) if len(e) > 1 else None


def _sim_crossings(t: np.ndarray, cum: np.ndarray, n: int) -> np.ndarray:
    """Times at which a non-decreasing cumulative counter sampled at ``t`` first reaches 1..n."""
    idx = np.searchsorted(cum, np.arange(1, n + 1), side="left")
    ok = idx < len(t)
    out = np.full(n, np.nan)
    out[ok] = t[idx[ok]]
    return out


def event_fidelity(trace, report) -> dict[str, Any] | None:
    """The event-level comparison of a :class:`~ksmtrace.fidelity.compare.FidelityReport` of
    ``trace``; None when the trace holds no ``ksm_events`` (captured without kernel events)."""
    from ksmtrace.engine.clock import next_wake

    if not trace.has_table("ksm_events"):
        return None
    ev = trace.read_table("ksm_events", columns=["t_ns", "event", "rmap_item", "err", "ksm_page", "seq"])
    t0 = int(trace.t0_ns)
    start = float(report.start_s)
    res = report.result
    table = res.table
    st = table["t_s"].to_numpy().astype(float)
    sleep_ms = int(report.params.get("sleep_millisecs", 20))
    hz = int(report.hz or 0)
    out: dict[str, Any] = {"events": ev.height}

    # --- full scans --------------------------------------------------------------------------------
    def times(name: str) -> np.ndarray:
        x = ev.filter(pl.col("event") == name).sort("t_ns")["t_ns"].to_numpy()
        return (x - t0) / 1e9

    starts, stops = times("ksm_start_scan"), times("ksm_stop_scan")
    starts, stops = starts[starts >= start - 1e-3], stops[stops >= start - 1e-3]
    gaps = []
    model = []
    for s_ in stops.tolist():
        j = int(np.searchsorted(starts, s_, side="right"))
        if j < len(starts):
            gaps.append(starts[j] - s_)
            t_ns = int(round(s_ * 1e9))
            model.append((int(next_wake(t_ns, sleep_ms, hz)) - t_ns) / 1e9)
    gaps_a, model_a = np.asarray(gaps), np.asarray(model)
    done_real = stops
    n_sim = int(table["full_scans"].max() or 0) if "full_scans" in table.columns and table.height else 0
    done_sim = _sim_crossings(st, table["full_scans"].fill_null(0).to_numpy(), n_sim) if n_sim else np.zeros(0)
    k = min(len(done_real), len(done_sim))
    d = done_sim[:k] - done_real[:k]
    step = float(np.median(np.diff(st))) if len(st) > 1 else None
    out["full_scans"] = {
        "real": int(len(done_real)),
        "simulated": n_sim,
        "real_end_s": done_real.tolist(),
        "sim_end_s": [None if np.isnan(x) else float(x) for x in done_sim.tolist()],
        "end_diff_s": {"mean": float(np.nanmean(d)) if k else None, "max_abs": float(np.nanmax(np.abs(d))) if k else None},
        "resolution_s": step,
        "real_period_s": _mean_period(done_real),
        "sim_period_s": _mean_period(done_sim),
        "sleep_millisecs": sleep_ms,
        "lateness_real_ms": _quant((gaps_a - sleep_ms / 1e3) * 1e3),
        "lateness_model_ms": _quant((model_a - sleep_ms / 1e3) * 1e3),
    }

    # --- merges per snapshot interval --------------------------------------------------------------
    mev = ev.filter((pl.col("event") == "ksm_merge_with_ksm_page") & (pl.col("err") == 0) & pl.col("ksm_page"))
    mt = (mev["t_ns"].to_numpy() - t0) / 1e9
    at = np.asarray(report.snapshot_times, dtype=float)
    real_cum = np.searchsorted(np.sort(mt), at, side="right")
    sim_cum_rows = np.cumsum(table["merges"].to_numpy())
    r = np.searchsorted(st, at + 1e-9, side="right") - 1
    sim_cum = np.where(r >= 0, sim_cum_rows[np.maximum(r, 0)], 0)
    real_iv, sim_iv = np.diff(real_cum), np.diff(sim_cum)
    mean_real = float(np.mean(real_iv)) if len(real_iv) else 0.0
    out["merges"] = {
        "real": int(len(mt)),
        "simulated": int(sim_cum_rows[-1]) if len(sim_cum_rows) else 0,
        "interval_edges_s": at.tolist(),
        "real_per_interval": real_iv.astype(int).tolist(),
        "sim_per_interval": sim_iv.astype(int).tolist(),
        "mean_abs_diff_per_interval": float(np.mean(np.abs(sim_iv - real_iv))) if len(real_iv) else None,
        "nrmse": (float(np.sqrt(np.mean((sim_iv - real_iv) ** 2))) / mean_real) if mean_real > 0 else None,
    }

    # --- time to merge, per page ---------------------------------------------------------------------
    first_real = mev.group_by("rmap_item").agg(pl.col("t_ns").min())["t_ns"].to_numpy()
    ttm_real = (first_real - t0) / 1e9 - start
    fm = res.first_merge_ns if res.first_merge_ns is not None else np.zeros(0, np.int64)
    ttm_sim = fm[fm >= 0] / 1e9 - start
    out["time_to_merge"] = {
        "real_pages": int(len(ttm_real)),
        "sim_pages": int(len(ttm_sim)),
        "real_s": _quant(ttm_real),
        "sim_s": _quant(ttm_sim),
    }
    out["_arrays"] = {"ttm_real": np.sort(ttm_real), "ttm_sim": np.sort(ttm_sim)}
    return out


def event_text(e: dict[str, Any]) -> str:
    """The event-level comparison as a few lines and a table."""
    from ksmtrace.textfmt import table

    fs, m, t = e["full_scans"], e["merges"], e["time_to_merge"]

    def f(x, unit="", nd=3):
        return "-" if x is None else f"{x:.{nd}g}{unit}"

    lines = [f"kernel events: {e['events']:,} ksm tracepoint hits"]
    lines.append(f"full scans: real {fs['real']}, simulated {fs['simulated']}; mean period real {f(fs['real_period_s'], ' s')}, "
                 f"simulated {f(fs['sim_period_s'], ' s')}; end of the i-th scan, simulated - real: mean "
                 f"{f(fs['end_diff_s']['mean'], ' s')}, at most {f(fs['end_diff_s']['max_abs'], ' s')} apart "
                 f"(resolution {f(fs['resolution_s'], ' s')})")
    lr, lm = fs["lateness_real_ms"], fs["lateness_model_ms"]
    lines.append(f"ksmd's timer after a scan (gap to the next scan minus sleep_millisecs={fs['sleep_millisecs']}): measured "
                 f"p50 {f(lr['p50'], ' ms')}, p90 {f(lr['p90'], ' ms')}, max {f(lr['max'], ' ms')}; modelled p50 "
                 f"{f(lm['p50'], ' ms')}, p90 {f(lm['p90'], ' ms')}")
    lines.append(f"merges: real {m['real']:,}, simulated {m['simulated']:,}; per snapshot interval mean |difference| "
                 f"{f(m['mean_abs_diff_per_interval'])}, NRMSE {f(None if m['nrmse'] is None else 100 * m['nrmse'], ' %')}")
    rows = [{"time to merge (s)": k, "real": f(t["real_s"][k]), "simulated": f(t["sim_s"][k])} for k in ("p10", "p50", "p90", "max")]
    rows.append({"time to merge (s)": "pages", "real": f"{t['real_pages']:,}", "simulated": f"{t['sim_pages']:,}"})
    return "\n".join(lines) + "\n" + table(rows)


def event_plot(report):
    """Three panels: merges per snapshot interval (real and simulated), the distribution of the
    per-page time to merge, and the gap after each full scan against the modelled sleep."""
    from ksmtrace.plot._common import color, legend_outside, new_figure, style, titles

    e = report.events
    m, fs = e["merges"], e["full_scans"]
    with style():
        fig = new_figure(11.0, 10.5)
        a1, a2, a3 = fig.subplots(3, 1)
        x = np.asarray(m["interval_edges_s"])
        if len(x) > 1:
            a1.stairs(m["real_per_interval"], x, color=color(0), label="real (ksm_merge_with_ksm_page)", gid="real:merges")
            a1.stairs(m["sim_per_interval"], x, color=color(0), linestyle="--", label="simulated", gid="sim:merges")
        a1.set_title("merges per snapshot interval", loc="left")
        a1.set_xlabel("time since the first snapshot (s)")
        a1.set_ylabel("merges")
        a1.set_ylim(bottom=0)
        legend_outside(a1, fontsize=6.5)
        for arr, ls, lab in ((e["_arrays"]["ttm_real"], "-", "real (first merge per rmap item)"),
                             (e["_arrays"]["ttm_sim"], "--", "simulated (first merge per page)")):
            if len(arr):
                a2.plot(arr, np.arange(1, len(arr) + 1) / len(arr), color=color(1), linestyle=ls, label=lab)
        lo = min([float(a[0]) for a in e["_arrays"].values() if len(a)] or [0.0])
        if lo > 0:
            a2.set_xscale("log")
        a2.set_title("time to merge, per page", loc="left")
        a2.set_xlabel("time from KSM's start to the page's first merge (s)")
        a2.set_ylabel("fraction of the merged pages")
        a2.set_ylim(0, 1.02)
        legend_outside(a2, fontsize=6.5)
        ends = np.asarray(fs["real_end_s"])
        sims = np.asarray([np.nan if v is None else v for v in fs["sim_end_s"]], dtype=float)
        k = min(len(ends), len(sims))
        if k:
            a3.plot(np.arange(1, k + 1), (sims[:k] - ends[:k]) * 1e3, color=color(2), marker=".", label="simulated - real")
        a3.axhline(0, color="#000000", linewidth=0.7)
        a3.set_title("end of the i-th full scan, simulated - real", loc="left")
        a3.set_xlabel("full scan")
        a3.set_ylabel("difference (ms)")
        legend_outside(a3, fontsize=6.5)
        titles(fig, "Fidelity event by event: the replay vs ksmd's tracepoints",
               f"trace {report.trace_name} · kernel {report.kernel_release or '?'} · resolution of the simulated scan "
               f"ends {fs['resolution_s']:.3g} s (fidelity --sim-step)" if fs["resolution_s"] else f"trace {report.trace_name}")
    return fig
