#!/usr/bin/env python3
"""Replay throughput, measured in one run on one generated trace (prints figures; no asserts).

    python bench/replay.py                 # 1 M pages x 100 snapshots (the issue's size)
    python bench/replay.py --pages 200000 --snapshots 20 --repeat 1

Figures:
  * fast vs reference engine: wall time of both on the same slice of the trace (the reference is
    too slow for the full trace) and the ratio                                  (goal >= 50x)
  * ksm page visits per second on one core, aggressive settings               (goal >= 10 M/s)
  * oracle replay time / a plain polars scan of the same Parquet files        (goal <= 3)
  * cold prepare (the trace to the engine's arrays, cache empty) / that scan   (goal <= 5)
  * simulated time / wall time at default KSM settings                        (goal >= 1000)
  * every other policy's visits per second on the same trace at the same scan rate, next to ksm's
    (goal: within 2x); also per second of replay time beyond the oracle's (the driver's work,
    the same for every policy), since a policy that visits few pages is dominated by it.
    bench/policies.py times the inside of each policy's runtime directly on a smaller trace.

The machine is shared: every timing but the reference's is the best of ``--repeat`` runs, taken
in the same run as the figure it is compared with.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KSMTRACE_PROGRESS", "0")

import polars as pl  # noqa: E402

from ksmtrace.replay import replay  # noqa: E402
from ksmtrace.testing.synth import synthetic_trace  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def best(fn, n: int, before=None):
    """(result, best wall time) of ``n`` runs of ``fn`` (``before()`` runs untimed before each)."""
    out, times = None, []
    for _ in range(max(1, n)):
        if before is not None:
            before()
        out, t = timed(fn)
        times.append(t)
    return out, min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1_000_000)
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between snapshots")
    ap.add_argument("--churn", type=float, default=0.05)
    ap.add_argument("--ref-pages", type=int, default=20_000, help="trace size for the fast/reference comparison")
    ap.add_argument("--ref-snapshots", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs for every timing but the reference's")
    ap.add_argument("--policies", action=argparse.BooleanOptionalAction, default=True, help="the other policies' visits/s")
    ap.add_argument("--keep", help="directory to keep the generated traces in")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ksmtrace-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    os.environ["KSMTRACE_CACHE_DIR"] = str(cache)
    r = args.repeat
    print(f"# ksmtrace replay benchmark ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}), work dir {work}; "
          f"best of {r} runs")
    try:
        # 0. warm the jit cache on a tiny trace so compile time is not measured
        tiny = work / "tiny"
        tiny = synthetic_trace(tiny, pages=2000, snapshots=3, processes=2) if not tiny.exists() else tiny
        for pol in ("oracle", "ksm"):
            for eng in ("fast", "reference"):
                replay(tiny, pol, {}, engine=eng)

        # 1. fast vs reference on the same slice
        small = work / "small"
        small = (synthetic_trace(small, pages=args.ref_pages, snapshots=args.ref_snapshots, processes=4,
                                 interval=args.interval, churn=args.churn, seed=1) if not small.exists() else small)
        p = {"pages_to_scan": 1000}
        rf, t_fast = best(lambda: replay(small, "ksm", p, engine="fast"), r)
        rr, t_ref = timed(lambda: replay(small, "ksm", p, engine="reference"))
        same = rf.table.equals(rr.table) and rf.procs.equals(rr.procs)
        print(f"fast vs reference: {args.ref_pages} pages x {args.ref_snapshots} snapshots, ksm pages_to_scan=1000: "
              f"fast {t_fast:.3f} s, reference {t_ref:.2f} s -> {t_ref / t_fast:.0f}x (identical tables: {same})")

        # 2. the big trace
        bigp = work / "big"
        t_gen = 0.0
        if not bigp.exists():
            _, t_gen = timed(lambda: synthetic_trace(bigp, pages=args.pages, snapshots=args.snapshots, processes=8,
                                                     interval=args.interval, churn=args.churn, seed=2))
        from ksmtrace.trace.reader import open_trace

        big = open_trace(bigp)
        rows = sum(e["files"]["pages"]["rows"] for e in big.snapshots)
        print(f"trace: {args.pages:,} pages x {args.snapshots} snapshots, {args.churn:.0%} churn, {rows:,} page rows "
              f"({sum(f.stat().st_size for f in (bigp / 'pages').iterdir()) / 1e6:.1f} MB), generated in {t_gen:.1f} s")
        scan = lambda: pl.scan_parquet(str(bigp / "pages" / "*.parquet")).collect()  # noqa: E731
        _, t_scan = best(scan, r)
        _, t_prep = best(lambda: open_trace(bigp).prepare("recorded"), r,
                         before=lambda: shutil.rmtree(cache, ignore_errors=True))
        print(f"plain polars scan of the pages Parquet: {t_scan:.2f} s; cold prepare (cache empty, then filled): "
              f"{t_prep:.2f} s -> {t_prep / t_scan:.2f}x the plain scan")
        ro, t_or = best(lambda: replay(open_trace(bigp), "oracle"), r)
        print(f"oracle replay (prepared trace cached): {t_or:.2f} s -> {t_or / t_scan:.2f}x the plain scan "
              f"(cold, with prepare: {(t_or + t_prep) / t_scan:.2f}x)")

        # 3. simulated / wall time at default settings
        rd, t_d = best(lambda: replay(open_trace(bigp), "ksm", {}), r)
        sim = rd.summary["duration_s"]
        vd = rd.units_total()["pages_visited"]
        print(f"ksm defaults (100 pages / 20 ms): {sim:.0f} s simulated in {t_d:.2f} s -> {sim / t_d:.0f}x real time "
              f"({vd:,} visits, {vd / t_d / 1e6:.1f} M visits/s)")

        # 4. visits per second, aggressive settings
        rk, t_k = timed(lambda: replay(big, "ksm", {"pages_to_scan": 5000, "sleep_millisecs": 20}))
        v = rk.units_total()["pages_visited"]
        print(f"ksm pages_to_scan=5000: {v:,} page visits in {t_k:.2f} s -> {v / t_k / 1e6:.1f} M visits/s "
              f"(merges {rk.summary['merges']:,}, {rk.summary['fraction_of_oracle_mean']:.0%} of oracle)")
        if not args.policies:
            return 0

        # 5. the other policies at the same scan rate (5000 pages per 20 ms wake-up)
        rate_k, net_k = v / t_k, v / max(t_k - t_or, 1e-9)
        print(f"{'policy':<11} {'visits':>12} {'wall s':>7} {'M visits/s':>10} {'vs ksm':>6} "
              f"{'M visits/s beyond oracle':>24} {'vs ksm':>6}")
        print(f"{'ksm':<11} {v:>12,} {t_k:>7.2f} {rate_k / 1e6:>10.1f} {1:>6.2f} {net_k / 1e6:>24.1f} {1:>6.2f}")
        for pol, params in (("pksm", {"pages_to_scan": 5000, "sleep_millisecs": 20}),
                            ("pksm-delay", {"pages_to_scan": 5000, "sleep_millisecs": 20}),
                            ("hashtable", {"pages_per_second": 250_000, "process_pages_per_second": 0,
                                           "sleep_millisecs": 20})):
            rp, t_p = timed(lambda: replay(big, pol, params))
            vp = rp.units_total()["pages_visited"]
            net = vp / max(t_p - t_or, 1e-9)
            print(f"{pol:<11} {vp:>12,} {t_p:>7.2f} {vp / t_p / 1e6:>10.1f} {vp / t_p / rate_k:>6.2f} "
                  f"{net / 1e6:>24.1f} {net / net_k:>6.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
