"""Kernel-events benchmark: prints figures, asserts nothing.  Run as root:

    .venv/bin/python bench/kernel_events.py [--seconds 5] [--pages 20000]

1. the decoder alone: trace_pipe_raw pages full of page-fault events decoded into columns
   (events/s, numba ring-buffer walk plus the numpy field gathers);
2. a fault storm: a target that maps ``--pages`` fresh pages, writes each once (one write fault per
   page), unmaps them and starts again for ``--seconds``, captured at 0.5 s intervals with kernel
   events on: the write faults the target made, the ones recorded, the ones lost (per-CPU
   overrun/dropped counts), the events per second the recorder sustained, and the capture's CPU per
   recorded event; once with the default 4 MiB buffer per CPU and once with 256 KiB.

Every process it starts is killed in a ``finally`` block; the capture removes its trace instances.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from ksmtrace_tracers import ringbuf
from ksmtrace_tracers.capture import Capture, CaptureOptions

STORM = textwrap.dedent(
    """
    import mmap, sys, time
    pages, seconds = int(sys.argv[1]), float(sys.argv[2])
    print("READY", flush=True)
    sys.stdin.readline()
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        for off in range(0, pages * 4096, 4096):
            m[off] = 1  # one write fault per page
        m.close()
        n += pages
    print("done", n, time.monotonic() - t0, flush=True)
    sys.stdin.readline()
    """
)


def decoder_rate(n_pages: int = 2048) -> float:
    """Events/s of decode_pages + gather on synthetic pages of 36-byte page_fault_user events."""
    page = 4096
    per_page = (page - 16) // 36
    buf = np.zeros(n_pages * page, np.uint8)
    for p in range(n_pages):
        base = p * page
        buf[base:base + 8] = np.frombuffer(np.int64(10**9 + p).tobytes(), np.uint8)
        buf[base + 8:base + 16] = np.frombuffer(np.uint64(per_page * 36).tobytes(), np.uint8)
        hdr = np.uint32(8 | (100 << 5)).tobytes()  # type_len 8 (32 data bytes), delta 100 ns
        for e in range(per_page):
            o = base + 16 + e * 36
            buf[o:o + 4] = np.frombuffer(hdr, np.uint8)
            buf[o + 4:o + 6] = np.frombuffer(np.uint16(190).tobytes(), np.uint8)
    lengths = np.full(n_pages, page, np.int64)
    cap = n_pages * page // 8
    outs = ringbuf.empty_outputs(cap)
    missed = np.zeros(n_pages, np.int64)
    ringbuf.decode_pages(buf, page, lengths, *outs, missed)  # compile
    best = None
    for _ in range(5):
        t = time.perf_counter()
        n = ringbuf.decode_pages(buf, page, lengths, *outs, missed)
        off = outs[1][:n]
        for fo, size in ((0, 2), (4, 4), (8, 8), (24, 8)):
            ringbuf.gather(buf, off, fo, size, False)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return n / best


def storm(tmp: Path, pages: int, seconds: float, buffer_kb: int) -> dict:
    p = subprocess.Popen([sys.executable, "-c", STORM, str(pages), str(seconds)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("READY")
        out = tmp / f"storm-{buffer_kb}"
        with Capture(out, p.pid, CaptureOptions(kernel_events=True, kernel_events_buffer_kb=buffer_kb, key=1)) as cap:
            cap.snapshot()
            t0 = time.monotonic()
            p.stdin.write("go\n")
            p.stdin.flush()
            stats = []
            while p.poll() is None:
                line = None
                stats.append(cap.snapshot())
                time.sleep(0.5)
                if time.monotonic() - t0 > seconds + 0.5:
                    line = p.stdout.readline().split()
                    break
            stats.append(cap.snapshot())
            summary = cap.close()
        made, took = int(line[1]), float(line[2])
    finally:
        p.kill()
        p.wait()
    ke = summary["kernel_events"]
    cpu = sum(s.get("cpu_ns", 0) for s in stats[1:])
    return {"made": made, "rate": made / took, "recorded": ke["faults"], "lost": ke["lost"],
            "cpu_ns_per_event": cpu / max(1, ke["faults"]), "seconds": took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pages", type=int, default=20000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/kernel_events.py needs root (tracefs)")
    print(f"decoder: {decoder_rate() / 1e6:.1f} M events/s (ring-buffer walk + four field gathers, one core)")
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-ke-"))
    try:
        for kb in (4096, 256):
            r = storm(tmp, args.pages, args.seconds, kb)
            print(f"fault storm, {kb} KiB per CPU: the target made {r['made']:,} write faults in {r['seconds']:.1f} s "
                  f"({r['rate'] / 1e3:,.0f} k/s); recorded {r['recorded']:,} ({r['recorded'] / r['seconds'] / 1e3:,.0f} k/s), "
                  f"lost {r['lost']:,} ({100 * r['lost'] / max(1, r['made']):.2f} %); "
                  f"capture CPU {r['cpu_ns_per_event']:.0f} ns per recorded event (pages read and hashed included)")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
