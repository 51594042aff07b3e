"""The capture reads without disturbing what it measures (issue 10 item 1): while ksmd merges from
scratch and while the target forks mid-snapshot, the kernel's ``cow_ksm`` does not move because of
the capture and fork-shared frames stay shared.  These hold with a CPU-bound neighbour: nothing
here depends on timing, only on the capture never pinning a page.

The first test shows that the measurement can fail: one process_vm_readv of a KSM page (a FOLL_PIN
read) is a COW break the kernel counts in cow_ksm."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from ksmtrace.lab import kernelksm as K
from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers import procinfo
from ksmtrace_tracers.capture import Capture, CaptureOptions
from ksmtrace_tracers.targets import TargetSpec

from tests._capture_util import needs_ksm, wait_until

pytestmark = [pytest.mark.live, pytest.mark.kernel_ksm, needs_ksm]

# A process with ``pages`` private pages, 16 distinct contents (so KSM can merge all but 16), in a
# region it marks MADV_MERGEABLE (or not); it never writes them again.  "fork N" forks N children
# spaced ``gap`` s apart; the children sleep without touching memory until stdin closes.
_TARGET = textwrap.dedent(
    r"""
    import mmap, os, struct, sys, time
    pages, mergeable = int(sys.argv[1]), sys.argv[2] == "1"
    P = 4096
    m = mmap.mmap(-1, pages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    if mergeable:
        m.madvise(mmap.MADV_MERGEABLE)
    tmpl = [bytes([i + 1]) * P for i in range(16)]
    for i in range(pages):
        m[i * P:(i + 1) * P] = tmpl[i % 16]
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))

    def pfns(pid):
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            f.seek(addr // P * 8)
            raw = f.read(pages * 8)
        return [e & ((1 << 55) - 1) for e in struct.unpack(f"<{pages}Q", raw)]

    print("READY", addr, flush=True)
    kids = []
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "fork":  # fork N children that stay until stdin closes
            for _ in range(int(cmd[1])):
                pid = os.fork()
                if pid == 0:
                    os.read(0, 1)
                    os._exit(0)
                kids.append(pid)
                time.sleep(float(cmd[2]))
            print("forked", *kids, flush=True)
        elif cmd[0] == "write":  # write a byte of pages START .. START+N-1
            for i in range(int(cmd[1]), int(cmd[1]) + int(cmd[2])):
                m[i * P] = 0xFF
            print("wrote", flush=True)
        elif cmd[0] == "cycle":  # N children, one after the other, each living LIFE s: how many
            lost = 0             # pages did the parent stop sharing with each before it exited?
            for _ in range(int(cmd[1])):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    time.sleep(float(cmd[2]))
                    mine, parent = pfns(os.getpid()), pfns(os.getppid())
                    os.write(w, str(sum(a != b for a, b in zip(mine, parent))).encode())
                    os._exit(0)
                os.close(w)
                lost += int(os.read(r, 64))
                os.close(r)
                os.waitpid(pid, 0)
            print("lost", lost, flush=True)
    for k in kids:
        os.waitpid(k, 0)
    """
)


class Region:
    def __init__(self, pages: int, mergeable: bool) -> None:
        self.pages = pages
        self.p = subprocess.Popen([sys.executable, "-c", _TARGET, str(pages), "1" if mergeable else "0"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().split()
        assert line and line[0] == "READY", line
        self.vpn0 = int(line[1]) // 4096
        self.pid = self.p.pid

    def fork(self, n: int, gap: float) -> list[int]:
        self.p.stdin.write(f"fork {n} {gap}\n")
        self.p.stdin.flush()
        return [int(x) for x in self.p.stdout.readline().split()[1:]]

    def cycle(self, n: int, life: float) -> int:
        self.p.stdin.write(f"cycle {n} {life}\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline().split()[1])

    def pfns(self, pid: int) -> np.ndarray:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        try:
            pm = PM.read_pagemap(fd, self.vpn0, self.pages)
        finally:
            os.close(fd)
        return PM.decode(pm)["pfn"]

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.p.stdin.close()
        self.p.stdout.close()


def _merging(pid: int) -> int:
    return (procinfo.read_ksm_stat(pid) or {}).get("ksm_merging_pages", 0)


def _pvr_read(pid: int, addr: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(4096)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 4096)
    remote = (ctypes.c_void_p * 2)(addr, 4096)
    assert libc.process_vm_readv(pid, local, 1, remote, 1, 0) == 4096


def test_capture_while_ksmd_merges_from_scratch_causes_no_cow(tmp_path):
    r = Region(16384, mergeable=True)
    try:
        # capture back to back while ksmd merges the region page by page, from nothing: pages
        # turn into KSM pages between a snapshot's pagemap read and its content read
        with Capture(tmp_path / "t", r.pid, CaptureOptions(scope="mergeable")) as cap:
            cap.snapshot()  # before KSM runs
            with K.ksm_settings(pages_to_scan=1000, sleep_millisecs=10, use_zero_pages=0, run=1):
                cow0 = K.cow_ksm()
                snaps = 1
                deadline = time.monotonic() + 120
                while _merging(r.pid) < r.pages and time.monotonic() < deadline:
                    cap.snapshot()
                    snaps += 1
                cap.snapshot()
                assert _merging(r.pid) == r.pages, "ksmd did not merge the region within 120 s"
                assert snaps >= 3  # the capture ran while merging went on
                assert K.cow_ksm() - cow0 == 0  # the capture caused no COW break
                pfns = r.pfns(r.pid)
                per_content = -(-(r.pages // 16) // int(K.read("max_page_sharing")))  # KSM pages per content
                assert len(np.unique(pfns)) == 16 * per_content  # everything merged into the 16 contents
                # the measurement can fail: a pinning read of a KSM page is a counted COW break
                _pvr_read(r.pid, r.vpn0 * 4096)
                assert K.cow_ksm() - cow0 == 1
                assert r.pfns(r.pid)[0] != pfns[0]
        tr = open_trace(tmp_path / "t")
        assert tr.n_snapshots == snaps + 1
    finally:
        r.close()


def test_capture_while_the_target_forks_keeps_fork_sharing(tmp_path):
    """Children forked while snapshots are being read (back to back): every page stays shared with
    every child (the parent and the children never write the region)."""
    r = Region(32768, mergeable=False)
    kids: list[int] = []
    try:
        with Capture(tmp_path / "t", TargetSpec(trees=(r.pid,)), CaptureOptions()) as cap:
            stop = threading.Event()
            errors: list[BaseException] = []

            def loop():
                try:
                    while not stop.is_set():
                        cap.snapshot()
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            th = threading.Thread(target=loop)
            th.start()
            try:
                assert wait_until(lambda: cap.n_snapshots >= 2, 60)
                # 12 short-lived children, one after the other: each fork lands somewhere in a
                # snapshot (one takes ~50-300 ms here); each child counts, before it exits, the
                # pages its parent no longer shares with it
                lost = r.cycle(12, 0.17)
                kids = r.fork(3, 0.05)  # and three that stay, for the trace
                n = cap.n_snapshots
                assert wait_until(lambda: cap.n_snapshots >= n + 2, 60)
            finally:
                stop.set()
                th.join(60)
            assert not errors, errors
            assert lost == 0, f"the parent stopped sharing {lost} pages with its short-lived children"
            st = cap.snapshot()
            assert st["processes"] == 4
        parent = r.pfns(r.pid)
        assert (parent != 0).all()
        for k in kids:
            lost = int((r.pfns(k) != parent).sum())
            assert lost == 0, f"child {k} lost sharing with its parent on {lost} of {r.pages} pages"
        tr = open_trace(tmp_path / "t")
        last = tr.snapshot(tr.n_snapshots - 1)
        per_frame = last.filter(last["vpn"].is_between(r.vpn0, r.vpn0 + r.pages - 1)).group_by("pfn").len()
        assert len(per_frame) == r.pages and (per_frame["len"] == 4).all()  # 4 sharers per frame
    finally:
        r.close()
