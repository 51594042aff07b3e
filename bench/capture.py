"""Capture benchmark: prints figures, asserts nothing.  Run as root:

    .venv/bin/python bench/capture.py [--gib 2] [--snapshots 10]

In one run, on one target process of ``--gib`` GiB of private anonymous memory (20 % zero-filled
pages, 25 % copies of 256 random templates, 5 % "same 4088-byte zero prefix, random last 8
bytes", 50 % random, like /work/shared/reference/limits.md):

1. the raw read rates of the target's present pages (reused buffer, no hashing): process_vm_readv
   (4 MiB chunks, one remote iovec per run) — the ceiling, which the capture no longer uses because
   it pins pages — and /proc/PID/mem (one preadv per run of consecutive pages, 1 MiB batches), what
   the capture reads through;
2. capture throughput (GiB/s, pages/s) of a keyframe and of steady-state delta snapshots, in one
   process and with --workers 2, and the ratios to (1) (goal: >= 0.5 x raw in one process);
3. the keyed page hash: ns per page of the format-1 hash (seeded xxh3_64), of the xxh3_128 digest
   and of the PRF (SipHash-2-4 of that digest), and what making the hash a PRF costs as a share of
   the capture's time per page (goal: <= 10 %);
4. --fingerprints: the capture rate with them (every strength of the sampled hash in one pass)
   against without, and ns per page of the 64-word sample, of all eight strengths and of the
   prefix hashes; --files: files and resident page-cache pages read per second under numpy's
   install directory, and how many files' resident page sets changed (goal: none);
5. the target's pause per snapshot with --freeze (ms);
6. trace bytes per page-snapshot over ``--snapshots`` snapshots for a static target (goal <= 0.05)
   and for a target that rewrites 5 % of its pages between snapshots (goal <= 1.0).

Every process it starts is killed in a ``finally`` block.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from ksmtrace_tracers.capture import Capture, CaptureOptions

PAGE = 4096

TARGET = textwrap.dedent(
    """
    import mmap, sys
    import numpy as np
    gib = float(sys.argv[1])
    n = int(gib * (1 << 30)) // 4096
    m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):
        pass
    a = np.frombuffer(m, dtype=np.uint8).reshape(n, 4096)
    rng = np.random.default_rng(1)
    kind = rng.permutation(n)
    nz, nt, npfx = n * 20 // 100, n * 25 // 100, n * 5 // 100
    zero, tmpl, pfx, rnd = kind[:nz], kind[nz:nz + nt], kind[nz + nt:nz + nt + npfx], kind[nz + nt + npfx:]
    templates = rng.integers(0, 256, size=(256, 4096), dtype=np.uint8)
    B = 16384
    for lo in range(0, len(rnd), B):
        idx = np.sort(rnd[lo:lo + B])
        a[idx] = rng.integers(0, 256, size=(len(idx), 4096), dtype=np.uint8)
    for lo in range(0, len(tmpl), B):
        idx = np.sort(tmpl[lo:lo + B])
        a[idx] = templates[rng.integers(0, 256, len(idx))]
    for i in np.sort(zero):
        a[i, 0] = 0                      # written: a real zero-filled page
    for lo in range(0, len(pfx), B):
        idx = np.sort(pfx[lo:lo + B])
        a[idx, :4088] = 0
        a[idx, 4088:] = rng.integers(0, 256, size=(len(idx), 8), dtype=np.uint8)
    print("READY", n, flush=True)
    for line in sys.stdin:
        if line.startswith("churn"):
            idx = np.sort(rng.choice(n, n // 20, replace=False))
            for lo in range(0, len(idx), B):
                j = idx[lo:lo + B]
                a[j, :8] = rng.integers(0, 256, size=(len(j), 8), dtype=np.uint8)
            print("ok", len(idx), flush=True)
    """
)


class Target:
    def __init__(self, gib: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", TARGET, str(gib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"target failed: {line!r}")
        self.pages = int(line.split()[1])
        self.pid = self.proc.pid

    def churn(self) -> int:
        self.proc.stdin.write("churn\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def present_vpns(pid: int) -> np.ndarray:
    """Present pages of the target's private anonymous VMAs (pagemap)."""
    from ksmtrace_tracers import pagemap as PM
    from ksmtrace_tracers.procmaps import classify, read_smaps

    vmas = read_smaps(pid)
    classify(vmas, "anon")
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    parts = []
    try:
        for v in vmas:
            if v.in_scope:
                pm = PM.read_pagemap(fd, v.start_vpn, v.pages)
                keep = np.flatnonzero(pm & PM.PM_PRESENT)
                parts.append(keep.astype(np.uint64) + np.uint64(v.start_vpn))
    finally:
        os.close(fd)
    return np.concatenate(parts)


def _runs(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    brk = np.flatnonzero(np.diff(sub.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], brk))
    return starts, np.diff(np.concatenate((starts, [len(sub)])))


def raw_pvr_rate(pid: int, vpns: np.ndarray, repeat: int = 3) -> float:
    """GiB/s of process_vm_readv over the present pages: runs coalesced, 4 MiB chunks, one buffer."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.process_vm_readv
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    buf = np.zeros(1024 * PAGE, np.uint8)
    liov = np.zeros((1, 2), np.uint64)
    riov = np.zeros((1024, 2), np.uint64)
    liov[0, 0] = buf.ctypes.data
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        total = 0
        for lo in range(0, len(vpns), 1024):
            sub = vpns[lo:lo + 1024]
            starts, lens = _runs(sub)
            k = len(starts)
            riov[:k, 0] = sub[starts] * np.uint64(PAGE)
            riov[:k, 1] = lens.astype(np.uint64) * np.uint64(PAGE)
            liov[0, 1] = len(sub) * PAGE
            r = fn(pid, liov.ctypes.data, 1, riov.ctypes.data, k, 0)
            total += max(r, 0)
        times.append(time.perf_counter() - t)
    return total / 2**30 / statistics.median(times[1:])


def raw_mem_rate(pid: int, vpns: np.ndarray, repeat: int = 3, batch: int = 256) -> float:
    """GiB/s of /proc/PID/mem over the present pages: one preadv per run, 1 MiB batches, one buffer."""
    buf = np.zeros(batch * PAGE, np.uint8)
    mv = memoryview(buf)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    times = []
    try:
        for _ in range(repeat + 1):
            t = time.perf_counter()
            total = 0
            for lo in range(0, len(vpns), batch):
                sub = vpns[lo:lo + batch]
                starts, lens = _runs(sub)
                for a, n in zip(starts.tolist(), lens.tolist()):
                    total += os.preadv(fd, [mv[a * PAGE:(a + n) * PAGE]], int(sub[a]) * PAGE)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return total / 2**30 / statistics.median(times[1:])


def hash_costs(repeat: int = 200) -> dict[str, float]:
    """ns per page, on 256 random pages in a reused buffer: the format-1 hash (seeded xxh3_64), the
    xxh3_128 digest alone, and the keyed PRF (SipHash-2-4 of that digest) the capture uses."""
    import itertools

    import xxhash

    from ksmtrace_tracers.hashing import PageHasher

    n = 256
    buf = np.random.default_rng(1).integers(0, 256, size=n * PAGE, dtype=np.uint8)
    h = PageHasher(0x1234)
    sl = h.slices(memoryview(buf), n)
    key = 0x1234

    def seeded():
        return np.fromiter(map(xxhash.xxh3_64_intdigest, sl, itertools.repeat(key)), np.uint64, count=n)

    def digest():
        return np.frombuffer(b"".join(map(xxhash.xxh3_128_digest, sl)), "<u8")

    def prf():
        return h.hash(sl, n)

    return _ns_per_page((("xxh3_64 seeded (format 1)", seeded), ("xxh3_128 digest", digest),
                         ("PRF: siphash24(xxh3_128)", prf)), repeat, n)


def fingerprint_costs(repeat: int = 50) -> dict[str, float]:
    """ns per page, on 256 random pages: the 64-word sampled hash alone (numpy, what --fingerprints
    computed before the strength columns) and every strength 8..1024 in one pass (numba), plus the
    prefix hashes."""
    from ksmtrace_tracers.hashing import PageHasher, sample_hashes, strength_hashes

    n = 256
    buf = np.random.default_rng(2).integers(0, 256, size=n * PAGE, dtype=np.uint8)
    h = PageHasher(0x1234, fingerprints=True)
    pages = buf.reshape(n, PAGE)
    psl = h.prefix_slices(memoryview(buf), n)
    fns = (("sample (64 words)", lambda: sample_hashes(pages, h.perm)),
           ("sample8..sample1024 (one pass)", lambda: strength_hashes(pages, h.perm)),
           ("pfx64/256/1024", lambda: h.prefixes(psl, n)))
    return _ns_per_page(fns, repeat, n)


def _ns_per_page(fns, repeat: int, n: int) -> dict[str, float]:
    """Best of 5 (after one warm-up call) of each ``(name, f)``: ns per page, ``f`` hashing ``n`` pages."""
    out = {}
    for name, f in fns:
        f()
        best = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeat):
                f()
            best.append((time.perf_counter() - t) / repeat / n * 1e9)
        out[name] = min(best)
    return out


def page_cache_cost(root: Path) -> dict[str, float]:
    """``--files``: read every resident page of the files under ``root`` (PageCacheReader, as a
    snapshot does), and check that the resident page sets are unchanged afterwards."""
    from ksmtrace_tracers import pagemap as PM
    from ksmtrace_tracers.hashing import PageHasher
    from ksmtrace_tracers.pagecache import PageCacheReader, file_residency, walk_files

    paths = list(walk_files((str(root),)))
    before = {p: file_residency(p).tobytes() for p in paths}
    kpf = PM.KpageflagsReader()
    reader = PageCacheReader(PageHasher(0x1234), kpf, PM.pfn_readable())
    try:
        t = time.perf_counter()
        c0 = time.process_time()
        reads = [reader.read(p) for p in walk_files((str(root),))]
        secs, cpu = time.perf_counter() - t, time.process_time() - c0
    finally:
        reader.close()
        kpf.close()
    changed = sum(file_residency(p).tobytes() != before[p] for p in paths)
    pages = sum(len(r.state["vpn"]) for r in reads if r is not None)
    return {"files": len(paths), "resident_files": sum(r is not None for r in reads), "pages": pages,
            "seconds": secs, "cpu_seconds": cpu, "changed_files": changed}


def capture_run(out: Path, pid: int, snapshots: int, key: int, churn=None, **opts) -> tuple[list[dict], dict]:
    stats = []
    with Capture(out, pid, CaptureOptions(key=key, **opts)) as cap:
        for i in range(snapshots):
            if churn is not None and i > 0:
                churn()
            stats.append(cap.snapshot())
        summary = cap.close("count reached")
    return stats, summary


def trace_bytes(path: Path, snaps: range | None = None) -> int:
    import json

    total = 0
    for line in (path / "snapshots.jsonl").read_text().splitlines():
        e = json.loads(line)
        if snaps is None or e["snap"] in snaps:
            total += sum(f["bytes"] for f in e["files"].values())
    return total


class Load:
    """Busy CPU time of the whole machine vs this benchmark's own (itself, its workers, the target)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + f[4]
        return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own(extra_pid: int | None = None) -> float:
        r = os.times()
        own = r.user + r.system + r.children_user + r.children_system
        if extra_pid is not None:
            try:
                st = Path(f"/proc/{extra_pid}/stat").read_text().rsplit(")", 1)[1].split()
                own += (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
        return own

    def stop(self, target_pid: int) -> tuple[float, float, float]:
        return self._busy() - self.busy0, self._own(target_pid) - self.own0, time.monotonic() - self.t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--snapshots", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/capture.py needs root (PFNs, kpageflags, reading another process)")
    key = 0x0BE4C4_0000_1234
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-"))
    t = None
    load = Load()
    try:
        t0 = time.perf_counter()
        t = Target(args.gib)
        print(f"target: pid {t.pid}, {t.pages:,} pages ({t.pages * PAGE / 2**30:.2f} GiB) written in {time.perf_counter() - t0:.1f} s")
        vpns = present_vpns(t.pid)
        raw = raw_pvr_rate(t.pid, vpns)
        mem = raw_mem_rate(t.pid, vpns)
        print(f"raw read of its {len(vpns):,} present private pages: process_vm_readv {raw:.2f} GiB/s "
              f"({raw * 2**30 / PAGE / 1e6:.2f} M pages/s; pins pages, not used by the capture), "
              f"/proc/PID/mem {mem:.2f} GiB/s ({mem / raw:.2f} x process_vm_readv)")
        print()
        print(f"{'capture':<16}{'keyframe GiB/s':>16}{'delta GiB/s':>13}{'delta Mpages/s':>16}"
              f"{'x raw pvr':>11}{'x raw mem':>11}")
        results = {}
        variants = (("1 process", {}), ("--workers 2", {"workers": 2}), ("--fingerprints", {"fingerprints": True}))
        for name, kw in variants:
            stats, _ = capture_run(tmp / f"cap-{len(results)}", t.pid, 4, key, **kw)
            gib = [s["present"] * PAGE / 2**30 for s in stats]
            secs = [s["seconds"] for s in stats]
            key_rate = gib[0] / secs[0]
            delta_rate = statistics.median(g / s for g, s in zip(gib[1:], secs[1:]))
            results[name] = delta_rate
            mp = statistics.median(s["present"] / s["seconds"] for s in stats[1:]) / 1e6
            print(f"{name:<16}{key_rate:>16.2f}{delta_rate:>13.2f}{mp:>16.2f}{delta_rate / raw:>11.2f}{delta_rate / mem:>11.2f}")
        st = stats[-1]
        print(f"  (per snapshot: {st['present']:,} present pages, {st['read_pages']:,} read, {st['zero_page']:,} zero-page mapped;"
              f" the keyframe also writes ~{stats[0]['rows']:,} Parquet rows)")
        print()
        costs = hash_costs()
        per_page_ns = 1e9 / (results["1 process"] * 2**30 / PAGE)
        prf_cost = costs["PRF: siphash24(xxh3_128)"] - costs["xxh3_128 digest"]
        print("page hash, ns per page: " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
        print(f"  making the hash a PRF costs {prf_cost:.0f} ns per page over the bare digest: "
              f"{100 * prf_cost / per_page_ns:.1f} % of the capture's {per_page_ns:.0f} ns per page (goal <= 10 %); "
              f"the whole keyed hash is {100 * costs['PRF: siphash24(xxh3_128)'] / per_page_ns:.1f} % of it "
              f"(the format-1 hash was {100 * costs['xxh3_64 seeded (format 1)'] / per_page_ns:.1f} %)")
        fc = fingerprint_costs()
        print("fingerprints, ns per page: " + ", ".join(f"{k} {v:.0f}" for k, v in fc.items()))
        print(f"  --fingerprints captures at {results['--fingerprints'] / results['1 process']:.2f} x the rate without "
              f"(delta snapshots, one process); all eight strengths cost "
              f"{fc['sample8..sample1024 (one pass)'] / fc['sample (64 words)']:.2f} x the 64-word sample alone, "
              f"{100 * fc['sample8..sample1024 (one pass)'] / per_page_ns:.1f} % of the capture's {per_page_ns:.0f} ns per page")
        print()
        import numpy as _np

        pc = page_cache_cost(Path(_np.__file__).resolve().parent)
        print(f"--files {Path(_np.__file__).resolve().parent}: {pc['files']:,} files ({pc['resident_files']:,} with resident "
              f"pages), {pc['pages']:,} resident pages read in {pc['seconds']:.2f} s ({pc['cpu_seconds']:.2f} s CPU): "
              f"{pc['pages'] / pc['seconds'] / 1e3:.0f} k pages/s, {1e6 * pc['seconds'] / max(pc['files'], 1):.0f} us per file; "
              f"files whose resident page set changed: {pc['changed_files']}")
        print()
        stats, _ = capture_run(tmp / "freeze", t.pid, 4, key, freeze=True)
        pauses = [s["pause_ns"] / 1e6 for s in stats]
        print(f"--freeze: target paused {statistics.median(pauses[1:]):.0f} ms per snapshot (median of delta snapshots; "
              f"keyframe {pauses[0]:.0f} ms; the pause covers reading every target, not writing the trace)")
        print()
        n = args.snapshots
        for name, churn in (("static", None), ("5% churn", t.churn)):
            out = tmp / name.replace("%", "").replace(" ", "-")
            stats, summary = capture_run(out, t.pid, n, key, churn=churn)
            pages = sum(s["pages"] for s in stats)
            total = trace_bytes(out)
            delta = trace_bytes(out, range(1, n))
            dpages = sum(s["pages"] for s in stats[1:])
            changed = statistics.median(s["changed"] for s in stats[1:])
            print(f"{name:>9}: {n} snapshots, {stats[-1]['pages']:,} pages each, median {changed:,.0f} changed rows per delta:"
                  f" {total / pages:.3f} B per page-snapshot overall (keyframe included),"
                  f" {delta / dpages:.4f} B per page-snapshot for the delta snapshots;"
                  f" keyframe {trace_bytes(out, range(0, 1)) / stats[0]['pages']:.2f} B per page")
        print()
        print("goals: capture >= 0.5 x raw read in one process; the PRF <= 10 % of capture time; "
              "static <= 0.05 and 5% churn <= 1.0 B per page-snapshot")
        busy, own, wall = load.stop(t.pid)
        print(f"machine: {os.cpu_count()} CPUs; during the run {busy / wall:.2f} cores were busy, "
              f"{max(0.0, busy - own) / wall:.2f} of them by other processes; load average {os.getloadavg()[0]:.2f}")
    finally:
        if t is not None:
            t.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
