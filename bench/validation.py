#!/usr/bin/env python3
"""What validating a trace costs, next to what a replay costs (prints figures; no asserts).

    python bench/validation.py                          # the sample traces + a 200 k-page synthetic trace
    python bench/validation.py --pages 1000000 --snapshots 100      # bench/replay.py's trace
    python bench/validation.py --baseline /work/main    # also time open + prepare of another checkout

Per trace:
  * open      open_trace(): manifest and log model, every file lstat/open/fstat, every Parquet
              footer against the log and the schema (median of several opens)
  * checks    the page-row checks prepare() adds (values, delta encoding, the log's statistics)
  * unchanged Trace.unchanged(): the stat of every file prepare() does before using the cache
  * prepare   prepare("recorded") without the cache (includes the checks and the reads' checks)
  * replay    replay(trace, "ksm") with the prepared trace cached
  * overhead  (open + checks + unchanged) / (prepare + replay)
With --baseline, open + prepare of the same trace by the other checkout (its own code, in a
subprocess) and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KSMTRACE_PROGRESS", "0")

import numpy as np  # noqa: E402

from ksmtrace import samples  # noqa: E402
from ksmtrace.replay import replay  # noqa: E402
from ksmtrace.trace import prepare as P  # noqa: E402
from ksmtrace.trace import prepared as PD  # noqa: E402
from ksmtrace.trace.reader import open_trace  # noqa: E402

TIMED = r"""
import os, sys, time, json
os.environ["KSMTRACE_PROGRESS"] = "0"
from ksmtrace.trace.reader import open_trace
path = sys.argv[1]
open_trace(path).prepare("recorded", cache=False)  # numba's cache loaded, files in the page cache
best = []
for _ in range(int(sys.argv[2])):
    t = time.process_time(); tr = open_trace(path); tr.prepare("recorded", cache=False); best.append(time.process_time() - t)
print(json.dumps(sorted(best)[len(best) // 2]))
"""


def median(fn, n: int) -> float:
    out = []
    for _ in range(n):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return statistics.median(out)


def checks_time(tr) -> float:
    """The checks prepare() runs on the page rows, timed on their own."""
    cols = ["snap", "proc", "pid", "vpn", "op", "hash", "flags", "pfn"]
    rows = tr.read_table("pages", columns=cols)
    op = rows["op"].to_numpy()
    proc_ids = np.unique(rows["proc"].to_numpy().astype(np.int64))
    row_proc = np.searchsorted(proc_ids, rows["proc"].to_numpy().astype(np.int64))
    vpn = rows["vpn"].to_numpy().astype(np.int64)
    pg, n_pages = PD.dense_pair_ids(row_proc, vpn, ordered=True)
    snap = rows["snap"].to_numpy().astype(np.int64)

    def run():
        P._check_values(tr, rows, op)
        P._check_deltas(tr, snap, pg, op, n_pages, row_proc, vpn, proc_ids)

    run()  # compile
    return median(run, 5)


def bench(name: str, path: Path, baseline: str | None, reps: int) -> None:
    tr = open_trace(path)
    files = sum(len(e["files"]) for e in tr.snapshots)
    rows = sum(e["files"]["pages"]["rows"] for e in tr.snapshots)
    t_open = median(lambda: open_trace(path), reps)
    t_checks = checks_time(tr)
    t_unch = median(tr.unchanged, reps)
    t_prep = median(lambda: open_trace(path).prepare("recorded", cache=False), max(1, reps // 3))
    tr.prepare("recorded")
    t_rep = median(lambda: replay(tr, "ksm"), max(1, reps // 3))
    over = (t_open + t_checks + t_unch) / (t_prep + t_rep)
    print(f"{name:<12} {tr.n_snapshots:>5} {files:>6} {rows:>11,} {t_open * 1e3:>8.1f} {t_checks * 1e3:>8.1f} "
          f"{t_unch * 1e3:>9.2f} {t_prep * 1e3:>9.1f} {t_rep * 1e3:>9.1f} {over:>8.1%}")
    if baseline:
        def timed(root: str) -> float:
            env = dict(os.environ, PYTHONPATH=root, KSMTRACE_NO_CACHE="1")
            r = subprocess.run([sys.executable, "-c", TIMED, str(path), str(max(3, reps // 3))], env=env,
                               capture_output=True, text=True, cwd=tempfile.gettempdir())
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            return json.loads(r.stdout)

        ours = timed(str(Path(__file__).resolve().parents[1]))
        theirs = timed(baseline)
        print(f"{'':<12} open + prepare: this checkout {ours * 1e3:.1f} ms, {baseline} {theirs * 1e3:.1f} ms "
              f"-> {ours / theirs:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=200_000)
    ap.add_argument("--snapshots", type=int, default=50)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--baseline", help="another checkout's root (its ksmtrace is timed in a subprocess)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-validation-"))
    os.environ["KSMTRACE_CACHE_DIR"] = str(work / "cache")
    try:
        from ksmtrace.testing.synth import synthetic_trace

        print(f"# validation cost ({os.cpu_count()} CPUs); CPU times of the process in ms (medians: the machine is shared)")
        print(f"{'trace':<12} {'snaps':>5} {'files':>6} {'page rows':>11} {'open':>8} {'checks':>8} {'unchanged':>9} "
              f"{'prepare':>9} {'replay':>9} {'overhead':>8}")
        replay(samples.open_sample("prefork"), "ksm")  # compile once
        for name in samples.sample_names():
            bench(name, samples.sample_path(name), args.baseline, args.reps)
        synthetic_trace(work / "synth", pages=args.pages, snapshots=args.snapshots, processes=8, interval=10.0, seed=2)
        bench(f"synth-{args.pages // 1000}k", work / "synth", args.baseline, max(3, args.reps // 3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
