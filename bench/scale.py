#!/usr/bin/env python3
"""Big hosts on one machine: peak RAM and time of each step, per host size (prints figures; no asserts).

    python bench/scale.py                          # 1, 4 and 16 M pages x 100 snapshots
    python bench/scale.py --sizes 1,4 --snapshots 20

For every size a synthetic trace (ksmtrace.testing.synth: 8 processes, 5% of the pages rewritten per
snapshot, written snapshot by snapshot) is generated, then each step runs in a child process of its
own, whose peak resident set is read from the kernel when it exits (``os.wait4`` rusage
``ru_maxrss``: every page the process ever had mapped at once, file-backed ones included):

* ``prepare``  — cold: the trace to the engine's arrays (``Trace.prepare``), cache empty;
* ``ksm``      — a replay of ``ksm`` at default settings from the prepared cache;
* ``oracle``   — a replay of the oracle from the prepared cache.

``bytes/page`` is the peak over the host's pages; ``beyond base`` subtracts the peak of a child
that imports everything and replays a 2,000-page trace (the interpreter, numpy, polars, numba and
its compiled code: what no host size changes).  ``seconds`` is the step's wall time, ``CPU s``
its CPU time over every thread (on a shared, busy machine the wall time grows, the CPU time much
less).  The numba cache is warmed first, so no step compiles.  Goal (issue 13): a 16 M-page (64 GiB) host x 100 snapshots replays ``ksm`` on this
24 GiB machine, at <= 200 bytes of RAM per page.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KSMTRACE_PROGRESS", "0")


def child(step: str, trace: str) -> None:
    """Run one step in this process and print its wall time as JSON."""
    from ksmtrace.replay import replay
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace)
    t, c = time.perf_counter(), time.process_time()
    out: dict = {}
    if step == "prepare":
        p = tr.prepare("recorded")
        out.update(pages=p.n_pages, events=p.store.n, contents=p.n_cids, spilled=p.store.spilled)
    elif step == "base":
        replay(tr, "ksm")
        replay(tr, "oracle")
    else:
        r = replay(tr, step)
        out.update(simulated_s=r.summary["duration_s"], merges=r.summary["merges"])
    out["seconds"] = time.perf_counter() - t
    out["cpu"] = time.process_time() - c  # every thread's: what a busy shared machine does not inflate
    print(json.dumps(out))


def run(step: str, trace: Path, env: dict) -> dict:
    """``step`` in a child process: its output and its peak RSS (MiB)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, str(trace)], stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"step {step} on {trace} failed ({proc.returncode})")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["rss_mib"] = ru.ru_maxrss / 1024  # Linux: kilobytes
    res["wall"] = time.perf_counter() - t
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="host sizes in millions of pages")
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--steps", default="prepare,ksm,oracle")
    ap.add_argument("--keep", help="directory to keep the traces and caches in")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    from ksmtrace.testing.synth import synthetic_trace

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="ksmtrace-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    try:
        tiny = work / "tiny"
        if not tiny.exists():
            synthetic_trace(tiny, pages=2000, snapshots=3, processes=2)
        env["KSMTRACE_CACHE_DIR"] = str(work / "cache-tiny")
        run("base", tiny, env)  # warms the numba cache
        base = run("base", tiny, env)["rss_mib"]
        print(f"# ksmtrace scale benchmark ({os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB), "
              f"work dir {work}")
        print(f"# base: a child that imports everything and replays a 2,000-page trace peaks at {base:.0f} MiB")
        print(f"# load average {os.getloadavg()[0]:.1f} at the start")
        print(f"{'pages':>11} {'snaps':>5} {'page rows':>12} {'step':<9} {'seconds':>8} {'CPU s':>7} {'peak RSS':>10} "
              f"{'bytes/page':>10} {'beyond base':>11}")
        for size in [float(x) for x in a.sizes.split(",")]:
            pages = int(size * 1_000_000)
            path = work / f"host-{size:g}M-{a.snapshots}"
            t = time.perf_counter()
            if not path.exists():
                synthetic_trace(path, pages=pages, snapshots=a.snapshots, processes=8, seed=2)
            from ksmtrace.trace.reader import open_trace

            rows = sum(e["files"]["pages"]["rows"] for e in open_trace(path).snapshots)
            print(f"{pages:>11,} {a.snapshots:>5} {rows:>12,} {'generate':<9} {time.perf_counter() - t:>8.1f}")
            cache = work / f"cache-{size:g}M-{a.snapshots}"
            shutil.rmtree(cache, ignore_errors=True)  # prepare runs cold
            env["KSMTRACE_CACHE_DIR"] = str(cache)
            for step in a.steps.split(","):
                r = run(step, path, env)
                per = r["rss_mib"] * 2**20 / pages
                beyond = (r["rss_mib"] - base) * 2**20 / pages
                extra = ""
                if step == "prepare":
                    extra = f"  ({r['events']:,} events{', spilled to a file' if r['spilled'] else ''}, {r['contents']:,} contents)"
                elif "simulated_s" in r:
                    extra = (f"  ({r['simulated_s']:.0f} s simulated: {r['simulated_s'] / r['seconds']:.0f}x real time, "
                             f"{r['simulated_s'] / r['cpu']:.0f}x per CPU second)")
                print(f"{'':>11} {'':>5} {'':>12} {step:<9} {r['seconds']:>8.1f} {r['cpu']:>7.1f} {r['rss_mib']:>6.0f} MiB "
                      f"{per:>10.0f} {beyond:>11.0f}{extra}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
