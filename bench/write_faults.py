"""Writes the snapshots cannot see, replayed from the recorded write faults: prints figures, asserts
nothing.  Run as root on a host with KSM and tracefs:

    .venv/bin/python bench/write_faults.py [--runs 2] [--intervals 0.5 1.0] [--duration 8]

For every snapshot interval, ``--runs`` ground-truth runs (``ksmtrace validate``'s: the workload
under real KSM with the ``fast`` settings, captured with kernel events) of ``samewrite`` — merged
pages rewritten with the bytes they already hold, so no snapshot shows a change — and, for each,
the kernel's ``cow_ksm`` over the run against the replay's with ``--writes faults`` (the recorded
write faults at their time) and ``--writes snapshots`` (content changes only: what the replay did
before the faults table existed).  The load average is printed with each run: the figures are
meant to hold beside other work.

KSM settings are restored and the workload is killed by ``validate``'s own guards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ksmtrace.fidelity.compare import fidelity
from ksmtrace.lab.validate import ValidateOptions, ground_truth_run
from ksmtrace.trace.reader import open_trace

WORKLOAD = "samewrite"
PARAMS = {"processes": 2, "pages": 2048, "period": 0.3, "rewrite_fraction": 0.1}


def cow_row(rep) -> tuple[int, int]:
    r = rep.row("cow_ksm")
    return int(r["real_final"]), int(r["sim_final"])


def one_run(out: Path, interval: float, duration: float, index: int) -> dict:
    """One ground-truth run and its two replays: kernel cow_ksm, simulated with and without faults."""
    opts = ValidateOptions(workload=WORKLOAD, workload_params=dict(PARAMS), settings="fast", duration=duration,
                           interval=interval, plot=False)
    tdir = out / f"i{interval:g}-r{index}.trace"
    rec = ground_truth_run(opts, tdir, index)
    tr = open_trace(tdir)
    real, sim_f = cow_row(fidelity(tr, writes="faults"))
    _, sim_s = cow_row(fidelity(tr, writes="snapshots"))
    faults = tr.read_table("faults").height if tr.has_table("faults") else 0
    return {"interval": interval, "run": index + 1, "real": real, "faults": sim_f, "snapshots": sim_s,
            "recorded_faults": faults, "load": (rec.get("loadavg_start") or [0.0])[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--keep", action="store_true", help="keep the traces (printed directory)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/write_faults.py: needs root (real KSM, tracefs)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="ksmtrace-write-faults-"))
    try:
        print(f"workload {WORKLOAD} {PARAMS}, settings fast, {a.duration:g} s per run")
        print(f"{'interval':>8} {'run':>3} {'load':>5} {'faults':>7} {'kernel cow_ksm':>14} {'sim (faults)':>12} "
              f"{'err':>7} {'sim (snapshots)':>15}")
        for interval in a.intervals:
            for i in range(a.runs):
                r = one_run(out, interval, a.duration, i)
                err = (r["faults"] - r["real"]) / r["real"] if r["real"] else float("nan")
                print(f"{r['interval']:>8g} {r['run']:>3} {r['load']:>5.2f} {r['recorded_faults']:>7} {r['real']:>14} "
                      f"{r['faults']:>12} {100 * err:>+6.1f}% {r['snapshots']:>15}", flush=True)
    finally:
        if a.keep:
            print(f"traces kept in {out}")
        else:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
