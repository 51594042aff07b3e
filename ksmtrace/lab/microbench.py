"""Microbenchmarks on this host (live-host code): the cost model's base per-unit nanoseconds, and
ksmd's real wake-up cycle.

* :func:`microbenchmark` (``ksmtrace calibrate``): times user-space proxies of the kernel's work
  units — xxhash64 of 4 KiB (``checksums``), jhash2 (``jhash2_checksums``), PKSM's 64-word sampled
  hash, memcmp of equal pages, an all-zero check, a page copy, ``mprotect`` of one page (a PTE
  write-protect with its TLB flush), a copy-on-write fault — and keeps the built-in values for
  units without a faithful user-space proxy (rmap-item bookkeeping, tree node visits, wake-ups).
* :func:`ksmd_wakeup_cycle`: the real timer behind ``sleep_millisecs`` (root, KSM).

The offline fit against ground-truth runs is :mod:`ksmtrace.calibrate`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import platform
import time
from typing import Any, Callable

import numpy as np

from ksmtrace.calibrate import cpu_model as _cpu_model
from ksmtrace.engine.cost import DEFAULT_NS, CostModel
from ksmtrace.progress import ProgressFn, make as make_progress

PAGE = 4096


# =============================================================================================
# microbenchmarks
# =============================================================================================
def _best_ns(fn: Callable[[int], None], n: int, repeat: int = 5) -> float:
    """Best per-iteration time of ``fn(n)`` over ``repeat`` tries, in ns."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t) / n)
    return best


def _numba_kernels():
    from numba import njit

    @njit(cache=True)
    def jhash2_pages(words, n):  # words: uint32[1024]; the kernel's jhash2 over a page, n times
        acc = np.uint32(0)
        for _ in range(n):
            a = np.uint32(0xDEADBEEF + (1024 << 2) + 17)
            b = a
            c = a
            i = 0
            while i + 3 < 1024:
                a += words[i]
                b += words[i + 1]
                c += words[i + 2]
                a -= c; a ^= (c << np.uint32(4)) | (c >> np.uint32(28)); c += b
                b -= a; b ^= (a << np.uint32(6)) | (a >> np.uint32(26)); a += c
                c -= b; c ^= (b << np.uint32(8)) | (b >> np.uint32(24)); b += a
                a -= c; a ^= (c << np.uint32(16)) | (c >> np.uint32(16)); c += b
                b -= a; b ^= (a << np.uint32(19)) | (a >> np.uint32(13)); a += c
                c -= b; c ^= (b << np.uint32(4)) | (b >> np.uint32(28)); b += a
                i += 3
            acc ^= a ^ b ^ c
        return acc

    @njit(cache=True)
    def sampled_pages(words, offs, n):  # PKSM's sampled hash: 64 words at scattered offsets
        acc = np.uint32(0)
        for _ in range(n):
            h = np.uint32(0xDEADBEEF)
            for j in range(64):
                h += words[offs[j]]
                h += h << np.uint32(8)
                h ^= h >> np.uint32(12)
            acc ^= h
        return acc

    @njit(cache=True)
    def zero_pages(buf, n):  # memchr_inv-style all-zero check of a page, n times
        z = 0
        for _ in range(n):
            for i in range(512):
                if buf[i] != 0:
                    z += 1
                    break
        return z

    return jhash2_pages, sampled_pages, zero_pages


def microbenchmark(seconds: float = 2.0, progress: ProgressFn | None = None) -> CostModel:
    """Per-unit costs measured on this host (user-space proxies; see the module docstring)."""
    import xxhash

    prog = make_progress(progress)
    scale = max(0.05, float(seconds) / 2.0)
    n_hash = max(200, int(20000 * scale))
    rng = np.random.default_rng(1)
    page = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    page2 = bytes(bytearray(page))  # equal content, a different object (bytes(page) would be page itself)
    assert page2 is not page
    measured: dict[str, float] = {}
    notes: dict[str, str] = {}

    # loop/call overhead of a Python call on a tiny input, subtracted from the per-page numbers
    tiny = b"x" * 8
    h64 = xxhash.xxh64_intdigest
    over = _best_ns(lambda n: [h64(tiny) for _ in range(n)], n_hash)
    measured["checksums"] = max(1.0, _best_ns(lambda n: [h64(page) for _ in range(n)], n_hash) - over)
    notes["checksums"] = "xxh64 of 4 KiB (mm/ksm.c calc_checksum), Python call overhead subtracted"
    measured["full_hashes"] = measured["checksums"]
    notes["full_hashes"] = "as checksums"
    prog(1, 8, "xxhash")

    eq_over = _best_ns(lambda n: [tiny == b"x" * 8 for _ in range(n)], n_hash)
    measured["memcmp_pages"] = max(1.0, _best_ns(lambda n: [page == page2 for _ in range(n)], n_hash) - eq_over)
    notes["memcmp_pages"] = "memcmp of two equal 4 KiB pages (bytes ==)"
    # a tree node visit compares a page with a different one: it stops at the first differing
    # cache line (random pages: the first bytes), plus the lookup of the node's page
    other = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    diff_ns = max(1.0, _best_ns(lambda n: [page == other for _ in range(n)], n_hash) - eq_over)
    notes["stable_node_visits"] = "built-in (no user-space proxy for the page lookup; memcmp part measured: %.0f ns)" % diff_ns
    prog(2, 8, "memcmp")

    words = np.frombuffer(page, dtype=np.uint32).copy()
    zbuf = np.zeros(512, np.uint64)
    offs = rng.permutation(1024)[:64].astype(np.int64)
    jh, sh, zc = _numba_kernels()
    jh(words, 1), sh(words, offs, 1), zc(zbuf, 1)  # compile (cached on disk)
    n_nb = max(2000, int(200000 * scale))
    measured["jhash2_checksums"] = _best_ns(lambda n: jh(words, n), n_nb)
    notes["jhash2_checksums"] = "jhash2 over 1024 words (numba)"
    measured["sampled_hashes"] = _best_ns(lambda n: sh(words, offs, n), n_nb)
    notes["sampled_hashes"] = "PKSM random_sample_hash, 64 words (numba)"
    measured["sampled_words"] = measured["sampled_hashes"] / 64
    notes["sampled_words"] = "sampled_hashes / 64 (the same hash, per word)"
    measured["zero_checks"] = _best_ns(lambda n: zc(zbuf, n), n_nb)
    notes["zero_checks"] = "scan of an all-zero 4 KiB page (numba)"
    prog(3, 8, "hashes")

    src = ctypes.create_string_buffer(page, PAGE)
    dst = ctypes.create_string_buffer(PAGE)
    mm = ctypes.memmove
    mv_over = _best_ns(lambda n: [mm(dst, src, 8) for _ in range(n)], n_hash)
    measured["page_copies"] = max(1.0, _best_ns(lambda n: [mm(dst, src, PAGE) for _ in range(n)], n_hash) - mv_over)
    notes["page_copies"] = "memmove of 4 KiB"
    prog(4, 8, "copy")

    wp = _mprotect_ns(max(200, int(5000 * scale)))
    if wp is not None:
        measured["write_protects"] = wp
        measured["remaps"] = wp
        notes["write_protects"] = notes["remaps"] = "mprotect() of one page (PTE change + TLB flush), syscall included"
    prog(5, 8, "mprotect")
    cow = _cow_fault_ns(max(256, int(4096 * scale)))
    if cow is not None:
        measured["cow_copies"] = cow
        notes["cow_copies"] = "write fault on a MAP_PRIVATE page of a memfd (fault + 4 KiB copy)"
    prog(6, 8, "cow")
    # hash-table operations: a Python dict is a poor proxy; a numba typed-dict op is closer
    measured["hashtable_ops"] = _dict_op_ns(max(10000, int(200000 * scale)))
    notes["hashtable_ops"] = "insert+lookup+delete in a numba typed dict, per op"
    measured["fault_table_ops"] = measured["hashtable_ops"]
    prog(8, 8, "done")

    ns = dict(DEFAULT_NS)
    ns.update({k: float(max(1, round(float(v)))) for k, v in measured.items()})
    src_text = (
        f"ksmtrace calibrate microbenchmarks on {platform.node()} ({_cpu_model()}, Linux {platform.release()}), "
        f"{time.strftime('%Y-%m-%d')}: measured {', '.join(sorted(measured))}; the other units keep the built-in values"
    )
    model = CostModel(ns=ns, name=f"microbench-{platform.node()}", source=src_text)
    object.__setattr__(model, "notes", notes)  # informational, not saved
    return model


def _mprotect_ns(n: int) -> float | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    buf = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[0] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        def run(k):
            for _ in range(k):
                libc.mprotect(addr, PAGE, 1)  # PROT_READ
                libc.mprotect(addr, PAGE, 3)  # PROT_READ|PROT_WRITE

        return _best_ns(run, n) / 2
    finally:
        try:
            buf.close()
        except BufferError:
            pass


def _cow_fault_ns(pages: int) -> float | None:
    try:
        fd = os.memfd_create("ksmtrace-calibrate")
    except (AttributeError, OSError):
        return None
    try:
        os.ftruncate(fd, pages * PAGE)
        os.pwrite(fd, b"\x01" * (pages * PAGE), 0)
        best = math.inf
        for _ in range(3):
            m = mmap.mmap(fd, pages * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            view = np.frombuffer(m, dtype=np.uint8)
            _ = int(view[::PAGE].sum())  # map the page-cache pages first (read faults)
            t = time.perf_counter_ns()
            view[::PAGE] = 2  # one write fault + copy per page
            best = min(best, (time.perf_counter_ns() - t) / pages)
            del view
            m.close()
        return best
    finally:
        os.close(fd)


def _dict_op_ns(n: int) -> float:
    from numba import njit

    @njit(cache=True)
    def ops(n):
        d = {}
        s = 0
        for i in range(n):
            k = (i * 2654435761) & 0xFFFFFF
            d[k] = i
            s += d.get(k ^ 1, 0)
            if i & 1:
                d.pop(k, 0)
        return s

    ops(10)
    return _best_ns(lambda k: ops(k), n, repeat=3) / 3


# =============================================================================================
# ksmd's real wake-up cycle (root, KSM): the timer behind sleep_millisecs, measured
# =============================================================================================
def ksmd_wakeup_cycle(sleep_ms: int = 20, seconds: float = 3.0, pages: int = 16) -> dict[str, Any]:
    """Mean time between two ksmd wake-ups at ``sleep_millisecs=sleep_ms`` on this host.

    A tiny mergeable region of unique pages makes every wake-up one complete full scan (the batch
    ends at the end of the scan), so ``full_scans / elapsed`` is the wake-up rate.  The replay's
    clock (``ksmtrace.engine.clock.next_wake``) predicts ``ceil(sleep·HZ/1000) + 1`` jiffies per
    cycle for a short batch; the difference is the real timer's lateness.  Every KSM setting is
    restored afterwards.
    """
    from ksmtrace.lab import kernelksm as K
    from ksmtrace.trace.writer import kernel_hz

    hz = kernel_hz() or 250
    buf = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_MERGEABLE)
        rng = np.random.default_rng(7)
        buf[:] = rng.integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes()
        with K.ksm_settings(run=0, pages_to_scan=1000, sleep_millisecs=int(sleep_ms), smart_scan=0, use_zero_pages=0):
            K.unmerge_all()
            K.write("run", 0)
            K.write("run", 1)
            time.sleep(0.3)  # settle: the first scans allocate rmap items
            f1, t1 = K.read("full_scans"), time.monotonic()
            time.sleep(seconds)
            f2, t2 = K.read("full_scans"), time.monotonic()
    finally:
        buf.close()
    n = int(f2) - int(f1)
    jiffy_ms = 1000.0 / hz
    model_jiffies = -(-int(sleep_ms) * hz // 1000) + 1
    mean = (t2 - t1) * 1000.0 / n if n > 0 else float("nan")
    return {"sleep_ms": int(sleep_ms), "hz": hz, "wakeups": n, "seconds": t2 - t1, "mean_cycle_ms": mean,
            "model_cycle_ms": model_jiffies * jiffy_ms, "late_ms": mean - model_jiffies * jiffy_ms,
            "late_fraction_of_jiffy": (mean - model_jiffies * jiffy_ms) / jiffy_ms}
