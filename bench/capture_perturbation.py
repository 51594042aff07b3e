"""Does the capture disturb what it measures?  Prints figures, asserts nothing.  Run as root:

    .venv/bin/python bench/capture_perturbation.py [--duration 8] [--runs 2] [--cases rewrite,forkdiverge]

Each case is a workload of ``ksmtrace.lab.workloads`` under the real KSM with the given settings,
run ``--runs`` times in each mode: without a capture, and with a capture (the procfs tracer's
defaults: --tree of the workload, scope mergeable, kernel events on) snapshotting every 1 s and
every 0.1 s, at normal priority and with ``--sched-idle`` ("idle": the capture only gets CPU time
ksmd and the workload do not want).  Every run starts from the same kernel state (run=2, then
run=0) and the same workload phase: KSM starts (run=1) ``--lead`` s after the workload is ready in
every mode — the capture is set up and takes its first snapshot in that time — because the
workloads' rounds are timed from their start, and a KSM start that comes later in one mode than in
another changes how many rounds meet merged pages.  A run lasts ``--duration`` s from run=1; at its end, with ksmd still running, it reads

* ``cow_ksm``: /proc/vmstat COW copies of KSM pages since run=1 (a capture that pins pages would
  add its own);
* ``merging``: the workload's own merged pages (the sum of ``ksm_merging_pages`` in its processes'
  /proc/PID/ksm_stat) and the host's ``pages_sharing`` (which also counts other processes with
  mergeable memory: ``others`` says how many there were — other people's tests on a shared host
  — and a run with others is less comparable);
* the workload's frames: pages its processes map (present, anonymous), the distinct frames behind
  them, and the frames mapped by two or more of its processes (fork sharing and KSM; a capture
  that unshares fork-shared pages lowers it);

and prints them side by side: the goal is that the capture columns equal the no-capture ones
within the no-capture runs' own spread.  KSM settings are restored and every process is stopped
on every path (ksmtrace.lab.kernelksm.ksm_settings).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ksmtrace.fidelity.settings import resolve_settings
from ksmtrace.lab import kernelksm as K
from ksmtrace.lab.programs import other_mergeable, start_source
from ksmtrace.lab.workloads import procs
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers import procinfo
from ksmtrace_tracers.capture import Capture, CaptureOptions
from ksmtrace_tracers.procmaps import classify, read_smaps
from ksmtrace_tracers.targets import TargetSpec

# name: (workload, parameters, settings preset)
CASES = {
    "rewrite": ("rewrite", {"processes": 3, "pages": 8192, "period": 1.0, "rewrite_fraction": 0.1}, "fast"),
    "rewrite-defaults": ("rewrite", {"processes": 3, "pages": 4096, "period": 1.0, "rewrite_fraction": 0.1}, "defaults"),
    "churn": ("churn", {"processes": 2, "region_pages": 2048, "lifetime": 2.0}, "fast"),
    "zero": ("zero", {"processes": 2, "pages": 8192, "rezero_period": 1.0, "rezero_pages": 256}, "zero"),
    # the fork comes 1.5 s after run=1 (fork_delay counts from the workload's start; --lead 5)
    "forkdiverge": ("forkdiverge", {"pages": 16384, "children": 3, "fork_delay": 6.5, "period": 0.5}, "fast"),
}
MODES = (("no capture", None, False), ("capture 1 s", 1.0, False), ("capture 0.1 s", 0.1, False),
         ("1 s idle", 1.0, True), ("0.1 s idle", 0.1, True))


def workload_frames(pids: list[int]) -> tuple[int, int, int]:
    """(pages mapped, distinct frames, frames mapped by >= 2 of ``pids``) over their anonymous pages."""
    pfns = []
    for pid in pids:
        try:
            vmas = read_smaps(pid)
        except OSError:
            continue
        classify(vmas, "anon")
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except OSError:
            continue
        try:
            for v in vmas:
                if v.in_scope:
                    pm = PM.read_pagemap(fd, v.start_vpn, v.pages)
                    d = PM.decode(pm)
                    pfns.append(np.unique(d["pfn"][d["present"] & ~d["file"]]))  # a frame once per process
        finally:
            os.close(fd)
    if not pfns:
        return 0, 0, 0
    allp = np.concatenate(pfns)
    allp = allp[allp != 0]
    uniq, counts = np.unique(allp, return_counts=True)
    return len(allp), len(uniq), int((counts >= 2).sum())


def one_run(case: str, interval: float | None, idle: bool, duration: float, lead: float, tmp: Path) -> dict:
    workload, params, preset = CASES[case]
    settings = resolve_settings(preset)
    with K.ksm_settings(run=0, **settings):
        K.unmerge_all()
        K.write("run", 0)
        with start_source(workload, params) as wl:
            t_ready = time.monotonic()
            roots = wl.roots()
            others = set(other_mergeable(set(roots)))
            cap = None
            stop = threading.Event()
            th = None
            if interval is not None:
                out = tmp / f"{case}-{interval}-{time.monotonic_ns()}"
                cap = Capture(out, TargetSpec(trees=tuple(roots)),
                              CaptureOptions(scope="mergeable", sched_idle=idle, notify=lambda m: None))
                cap.snapshot()
                if idle:
                    # --sched-idle made every thread of this process SCHED_IDLE; the bench's own
                    # thread must not be: on a busy host it then started KSM seconds late and read
                    # the end state late (churn: 123 merged pages, read mid-replacement)
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

                def loop():
                    if idle:
                        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # the capture's thread
                    t0 = time.monotonic()
                    k = 1
                    while not stop.wait(max(0.0, t0 + k * interval - time.monotonic())):
                        cap.snapshot()
                        k += 1

                th = threading.Thread(target=loop, daemon=True)
            try:
                late = time.monotonic() - (t_ready + lead)
                if late > 0:
                    # a SCHED_IDLE capture on a busy host may not get the CPU for its first snapshot
                    # in time: this run would not start KSM at the same workload phase as the others
                    return {"late": late + lead}
                time.sleep(-late)
                cow0 = K.cow_ksm()
                K.write("run", 1)
                if th is not None:
                    th.start()
                time.sleep(duration)
                wl.check()
                cow = K.cow_ksm() - cow0
                allv = K.read_all()
                pids = sorted(set(roots) | set(procs.descendants(roots)))
                merging = sum((procinfo.read_ksm_stat(pid) or {}).get("ksm_merging_pages", 0) for pid in pids)
                mapped, frames, shared = workload_frames(pids)
                others |= set(other_mergeable(set(pids)))
            finally:
                stop.set()
                if th is not None and th.is_alive():
                    th.join(60)
                if cap is not None:
                    snaps = cap.n_snapshots
                    cap.close("bench run ended")
    return {"cow_ksm": cow, "merging": merging, "pages_sharing": allv["pages_sharing"], "others": len(others),
            "mapped": mapped, "frames": frames, "shared_frames": shared,
            "snapshots": snaps if interval is not None else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--lead", type=float, default=5.0, help="seconds from workload ready to run=1, in every mode")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    if os.geteuid() != 0 or not K.available():
        sys.exit("bench/capture_perturbation.py needs root and /sys/kernel/mm/ksm")
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-perturb-"))
    keys = ("cow_ksm", "merging", "pages_sharing", "frames", "shared_frames", "others")
    try:
        print(f"{'case':<17}{'mode':<14}" + "".join(f"{k:>15}" for k in keys) + f"{'snapshots':>10}")
        for case in args.cases.split(","):
            for mode, interval, idle in MODES:
                runs = [one_run(case, interval, idle, args.duration, args.lead, tmp) for _ in range(args.runs)]
                cells = "".join(f"{' / '.join(str(r.get(k, '-')) for r in runs):>15}" for k in keys)
                print(f"{case:<17}{mode:<14}{cells}{' / '.join(str(r.get('snapshots', '-')) for r in runs):>10}", flush=True)
                for i, r in enumerate(runs):
                    if "late" in r:
                        print(f"  run {i + 1}: not measured: the capture took {r['late']:.1f} s to start (--lead {args.lead:g})")
        print(f"(each cell: run 1 / run 2; {args.duration:g} s of KSM per run; machine: {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
