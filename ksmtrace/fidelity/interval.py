"""How fidelity degrades as the snapshot interval grows.

Capture once at a short interval (``ksmtrace validate --interval 0.1``), derive coarser traces that
keep every k-th snapshot (:func:`~ksmtrace.fidelity.subsample.subsample_trace`), replay each and
compare with the same ground truth.  Without soft-dirty, a write is visible only if the page's
content differs between two snapshots: a page rewritten and restored within one interval is
invisible, and every write is applied late (at the next snapshot), which shifts merges and COW
breaks.  :func:`recommend` names the largest interval that still meets the goals, relative to the
workload's rewrite period and the real full-scan period.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ksmtrace.fidelity import metrics as M


def interval_study(trace, every: Sequence[int] = (1, 2, 4, 8, 16, 32), *, workdir: str | Path | None = None,
                   cost=None, timing_cost=None, keep: bool = False) -> list[dict[str, Any]]:
    """One row per subsampling factor: the interval and the fidelity numbers of the coarser trace."""
    from ksmtrace.fidelity.compare import fidelity
    from ksmtrace.fidelity.subsample import subsample_trace
    from ksmtrace.trace.reader import as_trace

    tr = as_trace(trace)
    base = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ksmtrace-interval-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for k in every:
            if k > 1 and tr.n_snapshots // k < 3:
                break
            if k == 1:
                t = tr
            else:
                d = base / f"every-{k}.trace"
                if d.exists():
                    shutil.rmtree(d)
                t = subsample_trace(tr, d, k)
            rep = fidelity(t, cost=cost, timing_cost=timing_cost)
            rows.append(study_row(rep, k))
    finally:
        if not keep and workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def study_row(rep, every: int) -> dict[str, Any]:
    sh = rep.row("pages_sharing")
    cow = rep.row("cow_ksm")
    per = rep.full_scan_period_s
    t90d = sh.get("t90_diff")
    real_cow = cow.get("real_final") or 0
    return {
        "every": every,
        "interval_s": rep.interval_s,
        "snapshots": rep.n_snapshots,
        "sharing_real": sh["real_final"],
        "sharing_sim": sh["sim_final"],
        "sharing_final_err": M.relative_error(sh["sim_final"], sh["real_final"]),
        "sharing_nrmse": sh["nrmse"],
        "t90_real": sh.get("t90_real"),
        "t90_sim": sh.get("t90_sim"),
        "t90_err_s": t90d,
        "t90_err_scans": (abs(t90d) / per) if (t90d is not None and per) else None,
        "cow_real": real_cow,
        "cow_sim": cow.get("sim_final"),
        "cow_ratio": (cow["sim_final"] / real_cow) if real_cow else None,
        "full_scans_diff": rep.row("full_scans").get("diff"),
        "volatile_nrmse": rep.row("pages_volatile").get("nrmse"),
        "unshared_nrmse": rep.row("pages_unshared").get("nrmse"),
        "full_scan_period_s": per,
    }


def meets_goals(row: dict[str, Any], baseline: dict[str, Any] | None = None) -> bool:
    """The interval keeps: COW breaks within 5% of cow_ksm, t90 within one full scan, and final
    pages_sharing within 1% — or, when even the finest capture (``baseline``) misses that (the
    final value of a periodically rewritten workload depends on the scan's phase at the last
    instant), no more than one point worse than the finest capture."""
    err = abs(row.get("sharing_final_err") or 0.0)
    allowed = 0.01
    if baseline is not None and baseline.get("sharing_final_err") is not None:
        allowed = max(allowed, abs(baseline["sharing_final_err"]) + 0.01)
    ok = err <= allowed + 1e-12 or M.within(row["sharing_sim"], row["sharing_real"], 0.01, 1.0) is True
    if row.get("t90_err_scans") is not None:
        ok &= row["t90_err_scans"] <= 1.0
    if row.get("cow_ratio") is not None:
        ok &= abs(row["cow_ratio"] - 1.0) <= 0.05
    return bool(ok)


def recommend(rows: Sequence[dict[str, Any]], rewrite_period: float | None = None) -> str:
    """A one-paragraph recommendation: the largest interval meeting the goals (every shorter one
    meeting them too), relative to the rewrite period and the full-scan period."""
    if not rows:
        return "no interval could be evaluated"
    best = None
    ordered = sorted(rows, key=lambda r: r["interval_s"] or 0)
    base = ordered[0]
    for r in ordered:
        if meets_goals(r, base):
            best = r
        else:
            break
    per = next((r["full_scan_period_s"] for r in rows if r.get("full_scan_period_s")), None)
    if best is None:
        first = min(rows, key=lambda r: r["interval_s"] or 0)
        return (f"even the shortest interval ({first['interval_s']:.3g} s) misses a goal; capture faster, or use "
                "soft-dirty (CONFIG_MEM_SOFT_DIRTY) so that writes between snapshots are seen")
    iv = best["interval_s"]
    rel = []
    if rewrite_period:
        rel.append(f"{iv / rewrite_period:.2g} x the rewrite period ({rewrite_period:g} s)")
    if per:
        rel.append(f"{iv / per:.2g} full-scan periods ({per:.3g} s)")
    worse = [r for r in rows if (r["interval_s"] or 0) > iv]
    tail = ""
    if worse:
        w = min(worse, key=lambda r: r["interval_s"])
        why = []
        if not meets_goals(dict(w, t90_err_scans=None, cow_ratio=None), base):
            why.append(f"final pages_sharing off by {100 * (w['sharing_final_err'] or 0):+.1f}% "
                       f"(finest capture: {100 * (base['sharing_final_err'] or 0):+.1f}%)")
        if w.get("t90_err_scans") is not None and w["t90_err_scans"] > 1:
            why.append(f"t90 off by {w['t90_err_scans']:.2g} full scans")
        if w.get("cow_ratio") is not None and abs(w["cow_ratio"] - 1) > 0.05:
            why.append(f"COW breaks {100 * (w['cow_ratio'] - 1):+.0f}%")
        tail = f"; at {w['interval_s']:.3g} s: " + ", ".join(why)
    return (f"snapshot at most every {iv:.3g} s" + (f" ({'; '.join(rel)})" if rel else "")
            + " to keep COW breaks within 5% of cow_ksm, t90 within one full scan and final sharing within 1% "
            "(or within one point of the finest capture)" + tail)
