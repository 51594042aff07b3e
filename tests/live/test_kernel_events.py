"""Kernel events in the trace (issue 10 items 3 and 4, capture half): the targets' write faults and
the ksm:* tracepoints, recorded in private tracefs instances on the snapshots' clock; the instances
are removed on every exit path, a killed capture's are removed by the next one, and without tracefs
or the events the capture goes on and says so."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from ksmtrace.lab import kernelksm as K
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers import procinfo, tracefs
from ksmtrace_tracers.capture import Capture, CaptureOptions
from ksmtrace_tracers.targets import TargetSpec

from tests._capture_util import (Target, TracefsView, committed, needs_ksm, needs_root, popen_cli, run_cli,
                                 wait_until)

pytestmark = [pytest.mark.live, needs_root]

HAVE_EVENTS = os.geteuid() == 0 and (tracefs.find_tracefs() is not None or tracefs.TRACEFS.is_dir())
needs_events = pytest.mark.skipif(not HAVE_EVENTS, reason="needs root and tracefs")


@pytest.fixture
def view():
    v = TracefsView()
    if tracefs.read_format(v.path, "exceptions", "page_fault_user") is None:
        v.close()
        pytest.skip("this kernel has no exceptions:page_fault_user (x86 only)")
    yield v
    v.close()


# A target that, on "go": forks a child that writes the first half of region A (COW of fork-shared
# pages) and maps region B and writes each page once (faults on pages not present), printing the
# monotonic time around the first write of B.
_FORKER = textwrap.dedent(
    """
    import mmap, os, sys, time, ctypes
    P = 4096
    a = mmap.mmap(-1, 1000 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(1000):
        a[i * P] = 1
    print("READY", ctypes.addressof(ctypes.c_char.from_buffer(a)) // P, flush=True)
    sys.stdin.readline()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for i in range(500):
            a[i * P] = 2
        os.write(w, b"x")
        time.sleep(0.5)
        os._exit(0)
    os.read(r, 1)
    b = mmap.mmap(-1, 300 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    b.madvise(mmap.MADV_NOHUGEPAGE)
    t0 = time.monotonic_ns()
    b[0] = 3
    t1 = time.monotonic_ns()
    for i in range(1, 300):
        b[i * P] = 3
    print("done", pid, ctypes.addressof(ctypes.c_char.from_buffer(b)) // P, t0, t1, flush=True)
    os.waitpid(pid, 0)
    sys.stdin.readline()
    """
)


@needs_events
def test_write_faults_of_the_targets_and_their_children(tmp_path, view):
    p = subprocess.Popen([sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        a0 = int(p.stdout.readline().split()[1])
        with Capture(tmp_path / "t", TargetSpec(pids=(p.pid,)), CaptureOptions()) as cap:
            cap.snapshot()
            assert len(view.instances()) == 2  # private instances, not the global buffer
            p.stdin.write("go\n")
            p.stdin.flush()
            done = p.stdout.readline().split()
            child, b0, t0, t1 = (int(x) for x in done[1:])
            st = cap.snapshot()
        assert view.instances() == []  # removed when the capture closed
    finally:
        p.kill()
        p.wait()
    assert st["kernel_events"]["lost"] == 0
    tr = open_trace(tmp_path / "t")
    assert tr.capture["kernel_events"]["enabled"] and tr.capture["kernel_events"]["clock"] == "mono"
    f = tr.read_table("faults")
    assert (f["snap"] == 1).all() and f["write"].all()  # only writes, in the interval they happened
    # the child, forked between snapshots and never captured, is followed from its first write:
    # 500 COW breaks of fork-shared pages
    cf = f.filter((pl.col("pid") == child) & pl.col("vpn").is_between(a0, a0 + 999))
    assert set(cf.filter(pl.col("present"))["vpn"].to_list()) == set(range(a0, a0 + 500))
    assert cf["proc"].null_count() == cf.height  # not a captured process
    # the parent: region B's first writes fault on pages that were not present
    pf = f.filter((pl.col("pid") == p.pid) & pl.col("vpn").is_between(b0, b0 + 299))
    assert pf.height == 300 and not pf["present"].any() and (pf["tid"] == p.pid).all()
    assert (pf["proc"] == 0).all() and pf["prev_flags"].null_count() == 300  # new pages: not rows before
    # its timestamps are the snapshots' clock: the first write of B happened between t0 and t1
    first = pf.filter(pl.col("vpn") == b0)["t_ns"][0]
    assert t0 <= first <= t1
    assert tr.snapshots[0]["t_end_ns"] < f["t_ns"].min() and f["t_ns"].max() <= tr.snapshots[1]["t_end_ns"]


@needs_events
@needs_ksm
@pytest.mark.kernel_ksm
def test_ksm_events_and_cow_breaks_of_merged_pages(tmp_path, view):
    from tests.live.test_capture_nonperturbing import Region

    r = Region(2048, mergeable=True)
    try:
        with Capture(tmp_path / "t", r.pid, CaptureOptions(scope="mergeable")) as cap:
            cap.snapshot()  # nothing merged yet
            with K.ksm_settings(pages_to_scan=1000, sleep_millisecs=10, use_zero_pages=0, run=1):
                assert K.wait_for(lambda: (procinfo.read_ksm_stat(r.pid) or {}).get("ksm_merging_pages", 0) == r.pages, 120)
                cap.snapshot()  # everything merged: the pages are KSM pages in this snapshot
                cow0 = K.cow_ksm()
                r.p.stdin.write("write 0 40\n")
                r.p.stdin.flush()
                assert r.p.stdout.readline().startswith("wrote")
                cow = K.cow_ksm() - cow0
                cap.snapshot()
    finally:
        r.close()
    tr = open_trace(tmp_path / "t")
    ev = tr.read_table("ksm_events")
    counts = dict(ev.group_by("event").len().iter_rows())
    assert counts.get("ksm_start_scan", 0) >= 2 and counts.get("ksm_stop_scan", 0) >= 1
    seqs = ev.filter(pl.col("event") == "ksm_start_scan")["seq"].to_list()
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    merges = ev.filter(pl.col("event").is_in(["ksm_merge_one_page", "ksm_merge_with_ksm_page"]) & (pl.col("err") == 0))
    assert merges.height >= r.pages - 16  # a merge event for every page merged into another
    assert ev["mm"].max() < 1000 and ev.filter(pl.col("event") == "ksm_merge_one_page")["pfn"].null_count() == 0
    assert ev.filter(pl.col("event") == "ksm_start_scan")["mm"].null_count() > 0  # no mm field: null
    # the 40 writes to merged pages: 40 COW breaks, counted by the kernel and in the faults table
    f = tr.read_table("faults").filter((pl.col("pid") == r.pid) & pl.col("vpn").is_between(r.vpn0, r.vpn0 + r.pages - 1))
    assert cow == 40
    assert f.height == 40 and f["present"].all() and set(f["vpn"].to_list()) == set(range(r.vpn0, r.vpn0 + 40))
    assert ((f["prev_flags"].to_numpy() & S.F_KSM) != 0).all()  # KSM pages at the previous snapshot


_LIB_TERM = textwrap.dedent(
    """
    import sys, time
    from ksmtrace_tracers.capture import Capture, CaptureOptions
    with Capture(sys.argv[1], int(sys.argv[2]), CaptureOptions()) as cap:
        cap.snapshot()
        print("ready", flush=True)
        time.sleep(60)
    """
)


@needs_events
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL", "library SIGTERM", "exception"])
def test_instances_are_removed_on_every_exit_path(tmp_path, view, how):
    with Target(random_pages=16, zero_pages=0) as t:
        out = tmp_path / "t"
        if how == "exception":
            with pytest.raises(RuntimeError):
                with Capture(out, t.pid, CaptureOptions()) as cap:
                    cap.snapshot()
                    assert len(view.instances()) == 2
                    raise RuntimeError("boom")
            assert view.instances() == []
            assert open_trace(out).manifest["end_reason"].startswith("error: RuntimeError")
            return
        if how == "library SIGTERM":
            root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
            p = subprocess.Popen([sys.executable, "-c", _LIB_TERM, str(out), str(t.pid)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=root)
            assert p.stdout.readline().strip() == "ready"
        else:
            p = popen_cli(["capture", "-p", str(t.pid), "--interval", "0.1", "-o", str(out)])
            assert wait_until(lambda: committed(out) >= 2, 60)
        assert len(view.instances(p.pid)) == 2
        sig = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}.get(how, signal.SIGTERM)
        p.send_signal(sig)
        p.communicate(timeout=60)
        if how == "SIGKILL":
            assert len(view.instances(p.pid)) == 2
            # the next capture removes them, and says so (with any other killed capture's) — unless a
            # capture of another test run on the host got there first: then they are gone all the same
            res = run_cli(["capture", "-p", str(t.pid), "--count", "1", "-o", str(tmp_path / "next")])
            assert res.returncode == 0, res.stderr
            said = re.search(r"removed \d+ trace instance\(s\) left by a killed capture", res.stderr)
            assert said or not view.instances(p.pid), res.stderr
        assert view.instances(p.pid) == []
        if how != "SIGKILL":
            assert open_trace(out).manifest["complete"]


def test_without_tracefs_the_capture_goes_on_and_says_so(tmp_path):
    fake = tmp_path / "no-tracefs"
    with Target(random_pages=16, zero_pages=0) as t:
        res = run_cli(["capture", "-p", str(t.pid), "--count", "2", "--interval", "0.05", "-o", str(tmp_path / "t")],
                      env={"KSMTRACE_TRACEFS": str(fake)})
        assert res.returncode == 0, res.stderr
        assert f"ksmtrace: note: kernel events are not recorded: no tracefs at {fake}" in res.stderr
        # a tracefs without the events (a kernel without the tracepoints)
        (fake / "instances").mkdir(parents=True)
        (fake / "events").mkdir()
        notes = []
        with Capture(tmp_path / "u", t.pid, CaptureOptions(tracefs=fake, notify=notes.append)) as cap:
            cap.snapshot()
        assert any("has none of the events" in n for n in notes)
        assert os.listdir(fake / "instances") == []
    for name, why in (("t", "no tracefs"), ("u", "none of the events")):
        tr = open_trace(tmp_path / name)
        ke = tr.capture["kernel_events"]
        assert ke["enabled"] is False and why in ke["reason"]
        assert any(why in n for n in tr.manifest["notes"])
        assert not tr.has_table("faults") and tr.read_table("faults").height == 0
        assert tr.n_snapshots >= 1


def test_no_kernel_events_is_quiet(tmp_path):
    with Target(random_pages=16, zero_pages=0) as t:
        res = run_cli(["capture", "-p", str(t.pid), "--count", "1", "--no-kernel-events", "-o", str(tmp_path / "t")])
    assert res.returncode == 0 and "note" not in res.stderr
    assert open_trace(tmp_path / "t").capture["kernel_events"] == {"enabled": False, "reason": "off (--no-kernel-events)"}


@pytest.mark.skipif(not (HAVE_EVENTS and tracefs.find_tracefs() is None), reason="needs tracefs unmounted at the start")
def test_a_killed_captures_tracefs_mount_is_undone_by_the_next_capture(tmp_path):
    """tracefs mounted by a capture that was then SIGKILLed: the next capture removes the killed
    one's instances and, at its end, the mount too; a tracefs mounted by anything else stays."""
    if tracefs.find_tracefs() is not None:  # since collection: another test run on the host mounted one
        pytest.skip("another test run on this host has tracefs mounted now (the test needs none)")
    with Target(random_pages=16, zero_pages=0) as t:
        p = popen_cli(["capture", "-p", str(t.pid), "--interval", "0.1", "-o", str(tmp_path / "t")])
        try:
            assert wait_until(lambda: committed(tmp_path / "t") >= 2, 60)
            assert tracefs.find_tracefs() == tracefs.TRACEFS
            assert tracefs.MOUNT_MARKER.read_text().split()[0] == str(p.pid)
        finally:
            p.kill()
            p.communicate(timeout=60)
        assert tracefs.find_tracefs() == tracefs.TRACEFS  # left behind by the kill
        left = [n for n in os.listdir(tracefs.TRACEFS / "instances") if n.startswith(f"ksmtrace-{p.pid}-")]
        assert len(left) == 2
        res = run_cli(["capture", "-p", str(t.pid), "--count", "1", "-o", str(tmp_path / "next")])
        assert res.returncode == 0, res.stderr
        assert "left by a killed capture" in res.stderr
        assert tracefs.find_tracefs() is None and not tracefs.MOUNT_MARKER.exists()
        # a tracefs somebody else mounted (no marker of a capture) is left alone
        tracefs.mount(tracefs.TRACEFS)
        try:
            res = run_cli(["capture", "-p", str(t.pid), "--count", "1", "-o", str(tmp_path / "third")])
            assert res.returncode == 0, res.stderr
            assert tracefs.find_tracefs() == tracefs.TRACEFS
        finally:
            tracefs.unmount(tracefs.TRACEFS)
