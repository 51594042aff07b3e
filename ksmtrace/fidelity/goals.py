"""The fidelity goals (issue 5), evaluated on the runs of one workload x parameter set.

Workloads without timing races (``static``, ``zero``, ``rewrite``), per run, all runs must pass:

* final ``pages_sharing``, ``pages_shared``, ``ksm_zero_pages`` within 1% (at least 1 page);
* time to 90% of the final ``pages_sharing`` (and ``ksm_zero_pages``) within one real full-scan period;
* ``full_scans`` within ±1 over the run;

racy workloads (``forkdiverge``, ``churn``, ``vms``, ``prefork``, ``command``) need at least two real
runs: every simulated value must lie within the real run-to-run spread widened by 10% of the real
mean (final ``pages_sharing``, ``pages_shared``, ``ksm_zero_pages``, mean ``pages_sharing`` over the
run, time to 90% of sharing, ``full_scans``, COW breaks);

every workload:

* simulated COW breaks within 5% of the real ``cow_ksm`` when the snapshot interval is shorter than
  the workload's rewrite period (``rewrite``: ``period``; ``zero``: ``rezero_period`` / 2);
* modelled ksmd CPU within 25% of the real one (meaningful after calibration, on held-out runs).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from ksmtrace.fidelity import metrics as M

CPU_TOLERANCE = 0.25
FINAL_TOLERANCE = 0.01
COW_TOLERANCE = 0.05
RACY_EXTRA = 0.10


def rewrite_period(workload: str, params: dict[str, Any] | None) -> float | None:
    """Seconds between writes to the same pages, for the workloads that have one."""
    p = params or {}
    if workload == "rewrite":
        return float(p.get("period", 2.0))
    if workload == "zero" and float(p.get("rezero_period", 0) or 0) > 0:
        return float(p["rezero_period"]) / 2
    if workload == "forkdiverge":
        return float(p.get("period", 0.5))
    return None


def _fmt(x, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if pct:
        return f"{100 * x:+.2f}%"
    if isinstance(x, float):
        return f"{x:.3g}"
    return f"{x:,}"


def evaluate_goals(reports: Sequence[Any], *, workload: str, settings: str, racy: bool,
                   params: dict[str, Any] | None = None, held_out: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """Goal rows for the runs (FidelityReports) of one workload x parameter set."""
    rows: list[dict[str, Any]] = []
    n = len(reports)
    base = {"workload": workload, "settings": settings, "racy": racy, "runs": n}

    def add(goal, measured, ok, value=None, threshold=None):
        rows.append(dict(base, goal=goal, measured=measured, value=value, threshold=threshold, ok=ok))

    def vals(counter, key):
        out = []
        for r in reports:
            try:
                out.append(r.value(counter, key))
            except KeyError:
                out.append(None)
        return out

    if not racy:
        for c in ("pages_sharing", "pages_shared", "ksm_zero_pages"):
            real, sim = vals(c, "real_final"), vals(c, "sim_final")
            errs = [M.relative_error(s, r) if r else (0.0 if s == r else None) for s, r in zip(sim, real)]
            oks = [M.within(s, r, FINAL_TOLERANCE, 1.0) for s, r in zip(sim, real)]
            worst = max((abs(e) for e in errs if e is not None), default=None)
            diffs = [None if s is None or r is None else s - r for s, r in zip(sim, real)]
            add(f"final {c} within 1%",
                "; ".join(f"{_fmt(r)}→{_fmt(s)} ({_fmt(e, True) if e is not None else _fmt(d)})" for r, s, e, d in zip(real, sim, errs, diffs)),
                all(o for o in oks if o is not None) if any(o is not None for o in oks) else None, worst, FINAL_TOLERANCE)
        for c in ("pages_sharing", "ksm_zero_pages"):
            tr, ts = vals(c, "t90_real"), vals(c, "t90_sim")
            if all(x is None for x in tr):
                continue
            per = [r.full_scan_period_s for r in reports]
            ratios = [abs(s - r) / p if (s is not None and r is not None and p) else None for r, s, p in zip(tr, ts, per)]
            ok = all(x is not None and x <= 1.0 for x in ratios)
            add(f"t90 of {c} within one full-scan period",
                "; ".join(f"{_fmt(r)} s vs {_fmt(s)} s (period {_fmt(p)} s)" for r, s, p in zip(tr, ts, per)),
                ok, max((x for x in ratios if x is not None), default=None), 1.0)
        real, sim = vals("full_scans", "real_final"), vals("full_scans", "sim_final")
        d = [None if s is None or r is None else s - r for s, r in zip(sim, real)]
        add("full_scans within ±1", "; ".join(f"{_fmt(r)} vs {_fmt(s)} ({'-' if x is None else f'{x:+d}'})" for r, s, x in zip(real, sim, d)),
            all(x is not None and abs(x) <= 1 for x in d), max((abs(x) for x in d if x is not None), default=None), 1)
    else:
        if n < 2:
            add("within the real run-to-run spread + 10%", "needs at least two real runs", None)
        else:
            for c, key, what in (("pages_sharing", "real_final", "final pages_sharing"),
                                 ("pages_shared", "real_final", "final pages_shared"),
                                 ("ksm_zero_pages", "real_final", "final ksm_zero_pages"),
                                 ("pages_sharing", "real_mean", "mean pages_sharing"),
                                 ("pages_sharing", "t90_real", "t90 of pages_sharing (s)"),
                                 ("full_scans", "real_final", "full_scans"),
                                 ("cow_ksm", "real_final", "COW breaks (cow_ksm)")):
                real = vals(c, key)
                sim = vals(c, key.replace("real", "sim"))
                if all(x is None for x in real):
                    continue
                band = M.spread_band(real, RACY_EXTRA)
                if band is None:
                    continue
                ok = all(s is not None and band[0] - 1e-9 <= s <= band[1] + 1e-9 for s in sim)
                width = max(band[1] - band[0], 1e-9)
                worst = max((max(band[0] - s, s - band[1], 0.0) / width for s in sim if s is not None), default=None)
                add(f"{what} within real spread + 10%",
                    f"real {', '.join(_fmt(x) for x in real)} → band [{_fmt(band[0])}, {_fmt(band[1])}]; sim {', '.join(_fmt(x) for x in sim)}",
                    ok, worst, 0.0)
    # COW breaks vs cow_ksm, when the capture can see every rewrite
    period = rewrite_period(workload, params)
    intervals = [r.interval_s for r in reports]
    real, sim = vals("cow_ksm", "real_final"), vals("cow_ksm", "sim_final")
    if period and any(x for x in real):
        if all(iv is not None and iv < period for iv in intervals):
            errs = [M.relative_error(s, r) for s, r in zip(sim, real)]
            ok = all(e is not None and abs(e) <= COW_TOLERANCE for e in errs)
            add("COW breaks within 5% of cow_ksm (interval < rewrite period)",
                "; ".join(f"{_fmt(r)} vs {_fmt(s)} ({_fmt(e, True)})" for r, s, e in zip(real, sim, errs)),
                ok, max((abs(e) for e in errs if e is not None), default=None), COW_TOLERANCE)
        else:
            add("COW breaks within 5% of cow_ksm (interval < rewrite period)",
                f"n/a: snapshot interval {_fmt(max(i for i in intervals if i))} s >= rewrite period {period:g} s", None)
    # ksmd CPU
    real, sim = vals("ksmd_cpu_s", "real_final"), vals("ksmd_cpu_s", "sim_final")
    errs = [M.relative_error(s, r) for s, r in zip(sim, real)]
    if any(e is not None for e in errs):
        tag = ""
        if held_out is not None:
            tag = " [" + ", ".join("held out" if h else "fit" for h in held_out) + "]"
        add("ksmd CPU within 25%" + (" (held-out runs)" if held_out is not None and all(held_out) else ""),
            "; ".join(f"{_fmt(r)} s vs {_fmt(s)} s ({_fmt(e, True)})" for r, s, e in zip(real, sim, errs)) + tag,
            all(e is not None and abs(e) <= CPU_TOLERANCE for e in errs),
            max((abs(e) for e in errs if e is not None), default=None), CPU_TOLERANCE)
    return rows


def goals_table(rows: Sequence[dict[str, Any]]) -> str:
    from ksmtrace.textfmt import table

    return table([{"workload": r["workload"], "settings": r["settings"], "goal": r["goal"],
                   "result": "n/a" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL"),
                   "measured": r["measured"]} for r in rows])
