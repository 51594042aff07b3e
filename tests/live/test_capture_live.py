"""Live captures of real processes (root): exact counts on the known-layout helper, fork-shared
frames, fingerprints and contents, --freeze, targets that exit, target selection, workers."""
from __future__ import annotations

import os
import signal
import struct
import threading
from pathlib import Path

import polars as pl
import pytest
import xxhash

from ksmtrace.trace import schema as S
from ksmtrace.trace.sampled import random_sample_hash, zero_sample
from ksmtrace.trace.info import trace_info
from ksmtrace.trace.reader import open_trace
from ksmtrace.lab.workloads import KnownLayout
from ksmtrace_tracers import procfs_reader as C
from ksmtrace_tracers import hashing as H
from ksmtrace_tracers.capture import Capture, CaptureOptions, run_capture
from ksmtrace_tracers.targets import TargetSpec

from tests._capture_util import (MARK, Target, committed, needs_root, popen_cli, proc_state, read_every_table, wait_until,
                           watchdogs)

pytestmark = [pytest.mark.live, needs_root]

KEY = 0x5EED_1234_ABCD_0001
PAGE_FLAGS = S.F_PRESENT | S.F_ANON | S.F_MERGEABLE | S.F_PFN | S.F_KPF


def _region_vpns(layout: dict, name: str) -> set[int]:
    for r in layout["regions"]:
        if r["name"] == name:
            return set(range(r["start"] // 4096, r["start"] // 4096 + r["pages"]))
    raise KeyError(name)


def _rows(tr, snap: int) -> pl.DataFrame:
    return tr.read_table("pages", [snap])


def _pagemap_pfns(pid: int, vpns) -> list[int]:
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for v in vpns:
            f.seek(int(v) * 8)
            out.append(struct.unpack("<Q", f.read(8))[0] & ((1 << 55) - 1))
    return out


@pytest.fixture
def ksm_off():
    """KSM stopped for the whole test, under the settings lock: the known layout's regions are
    mergeable, and another test run on this host may otherwise start ksmd and merge them (its
    KSM pages would change the exact flags, frames and counts these tests expect)."""
    from ksmtrace.lab import kernelksm as K

    if not K.available():
        yield
        return
    with K.ksm_settings(run=0):
        yield


def test_known_layout_phase_by_phase(tmp_path, ksm_off):
    """Exact pages, duplicates, zero pages, changed and vanished rows after every phase."""
    out = tmp_path / "layout.trace"
    with KnownLayout(peer=True) as kl:
        lay = kl.layout()
        main, peer = kl.pid, kl.peer_pid
        A, B, Cz, R, X = (_region_vpns(lay, n) for n in "ABCRX")
        peer_B = _region_vpns(lay["peer"], "B")
        spec = TargetSpec(pids=(peer,), trees=(main,))  # --tree: the forked child joins by itself
        with Capture(out, spec, CaptureOptions(scope="mergeable", key=KEY)) as cap:
            exp0 = kl.expected()
            st0 = cap.snapshot()
            kl.rewrite()
            st1 = cap.snapshot()
            kl.unmap()
            st2 = cap.snapshot()
            child = kl.fork()
            exp3 = kl.expected()
            st3 = cap.snapshot()
            # the capture must not have unshared the fork-shared pages (process_vm_readv would)
            some = sorted(A)[:8] + sorted(Cz)[:8]
            assert _pagemap_pfns(main, some) == _pagemap_pfns(child, some)
            kl.write_child(16)
            exp4 = kl.expected()
            st4 = cap.snapshot()
            kl.command("quit")  # main and its child exit; the peer stays
            assert wait_until(lambda: proc_state(main) in (None, "Z") and proc_state(child) in (None, "Z"), 10)
            st5 = cap.snapshot()
            assert not cap.all_targets_gone()

    tr = open_trace(out)
    assert tr.n_snapshots == 6 and tr.manifest["complete"] and tr.manifest["end_reason"] == "closed"
    procs = tr.read_table("processes")
    pid_proc = {r["pid"]: r["proc"] for r in procs.iter_rows(named=True)}

    # --- snapshot 0: everything new, exact layout ------------------------------------------
    s0 = tr.snapshot(0)
    assert st0["new"] == len(s0) == exp0["pages_total"] == 704 + 192
    assert set(s0.filter(pl.col("pid") == main)["vpn"].to_list()) == A | B | Cz | R | X
    assert set(s0.filter(pl.col("pid") == peer)["vpn"].to_list()) == peer_B
    flags = s0["flags"].to_numpy()
    assert ((flags & PAGE_FLAGS) == PAGE_FLAGS).all()
    assert ((flags & S.F_EXCLUSIVE) != 0).all()
    assert ((flags & (S.F_KSM | S.F_ZERO_PAGE | S.F_READ_FAILED | S.F_SOFT_DIRTY | S.F_SWAPPED)) == 0).all()
    assert int(((flags & S.F_ZERO_FILLED) != 0).sum()) == exp0["zero_pages"] == 128
    zero_rows = s0.filter((pl.col("flags") & S.F_ZERO_FILLED) != 0)
    assert set(zero_rows["vpn"].to_list()) == Cz
    assert s0["hash"].n_unique() == exp0["distinct"] == 401
    assert len(s0) - s0["hash"].n_unique() == exp0["duplicate_pages"]
    assert (s0["pfn"].to_numpy() != 0).all() and s0["pfn"].n_unique() == len(s0)
    assert (_rows(tr, 0)["op"] == S.OP_NEW).all()

    # --- snapshot 1: region R rewritten -> exactly its pages changed -------------------------
    r1 = _rows(tr, 1)
    assert st1["changed"] == len(r1) == 64 and st1["new"] == st1["gone"] == 0
    assert (r1["op"] == S.OP_CHANGED).all() and set(r1["vpn"].to_list()) == R
    old = dict(zip(s0["vpn"].to_list(), s0["hash"].to_list()))
    assert all(old[v] != h for v, h in zip(r1["vpn"].to_list(), r1["hash"].to_list()))

    # --- snapshot 2: region X unmapped -> exactly its pages gone ------------------------------
    r2 = _rows(tr, 2)
    assert st2["gone"] == len(r2) == 64 and st2["changed"] == st2["new"] == 0
    assert (r2["op"] == S.OP_GONE).all() and set(r2["vpn"].to_list()) == X

    # --- snapshot 3: fork -> the child (found through --tree) shares every frame ---------------
    r3 = _rows(tr, 3)
    assert child in pid_proc
    cnew = r3.filter((pl.col("pid") == child) & (pl.col("op") == S.OP_NEW))
    mchg = r3.filter((pl.col("pid") == main) & (pl.col("op") == S.OP_CHANGED))
    assert len(cnew) == 640 and len(mchg) == 640 and len(r3) == 1280  # peer unchanged
    s3 = tr.snapshot(3)
    m3 = s3.filter(pl.col("pid") == main).sort("vpn")
    c3 = s3.filter(pl.col("pid") == child).sort("vpn")
    assert m3["vpn"].to_list() == c3["vpn"].to_list()
    assert m3["pfn"].to_list() == c3["pfn"].to_list()  # fork-shared: equal PFNs
    assert m3["hash"].to_list() == c3["hash"].to_list()
    assert ((m3["flags"].to_numpy() & S.F_EXCLUSIVE) == 0).all()  # no longer exclusive
    assert len(s3) == exp3["pages_total"] == 640 + 640 + 192
    assert s3["hash"].n_unique() == exp3["distinct"] == 337
    assert len(s3) - s3["hash"].n_unique() == exp3["duplicate_pages"]

    # --- snapshot 4: the child wrote 16 pages: new content and frame for it, the parent's 16
    # pages are exclusive again (flags only) -------------------------------------------------------
    r4 = _rows(tr, 4)
    c4 = r4.filter(pl.col("pid") == child).sort("vpn")
    m4 = r4.filter(pl.col("pid") == main).sort("vpn")
    first16 = set(sorted(A)[:16])
    assert len(c4) == 16 and set(c4["vpn"].to_list()) == first16
    assert len(m4) == 16 and set(m4["vpn"].to_list()) == first16
    assert (c4["hash"].to_numpy() != m4["hash"].to_numpy()).all()
    assert (c4["pfn"].to_numpy() != m4["pfn"].to_numpy()).all()
    assert ((m4["flags"].to_numpy() & S.F_EXCLUSIVE) != 0).all()
    assert m4["hash"].to_list() == m3.filter(pl.col("vpn").is_in(sorted(first16)))["hash"].to_list()
    s4 = tr.snapshot(4)
    assert s4["hash"].n_unique() == exp4["distinct"] and len(s4) == exp4["pages_total"]

    # --- snapshot 5: main and child exited -> recorded, all their pages gone --------------------
    r5 = _rows(tr, 5)
    assert (r5["op"] == S.OP_GONE).all() and len(r5) == 640 + 640 == st5["gone"]
    p5 = procs.filter(pl.col("snap") == 5)
    states = dict(zip(p5["pid"].to_list(), p5["state"].to_list()))
    assert states == {main: "exited", child: "exited", peer: "ok"}
    assert sorted(st5["exited"]) == sorted([main, child])
    s5 = tr.snapshot(5)
    assert set(s5["pid"].to_list()) == {peer}

    # --- info: frame-based vs hash-only duplicates --------------------------------------------------
    info = trace_info(out, cache=False)
    per = info["per_snapshot"]
    assert [r["pages"] for r in per] == [896, 896, 832, 1472, 1472, 192]
    assert [r["changed"] for r in per] == [0, 64, 0, 640, 32, 0]
    assert [r["gone"] for r in per] == [0, 0, 64, 0, 0, 1280]
    # s0: 896 pages in 896 frames, 401 contents (one of them zero: a perfect dedup maps those to
    # the zero page) -> 896 - 400 frames saved; hash-only: 896 - 401
    assert (per[0]["frames"], per[0]["saved_frames"], per[0]["saved_hash_only"]) == (896, 496, 495)
    # s3: the child's 640 pages share the parent's frames: 832 frames, 337 contents
    assert (per[3]["frames"], per[3]["saved_frames"], per[3]["saved_hash_only"]) == (832, 496, 1135)
    assert per[0]["zero_filled"] == 128 and info["has"]["pfns"] and info["has"]["kpageflags"]
    assert not info["has"]["soft_dirty"]
    read_every_table(out)


def test_fingerprints_and_contents(tmp_path, ksm_off):
    out = tmp_path / "fp.trace"
    with KnownLayout(unique=32, dup=32, templates=4, zero=16, rewrite=8, unmap=8) as kl:
        lay = kl.layout()
        opts = CaptureOptions(scope="mergeable", key=KEY, fingerprints=True, contents=True)
        with Capture(out, kl.pid, opts) as cap:
            cap.snapshot()
            kl.rewrite()
            cap.snapshot()
            cap.snapshot()  # nothing new: no new contents
    tr = open_trace(out)
    assert tr.has_sample_hash and tr.has_prefix_hashes
    assert tr.capture["hash"]["key_fingerprint"] == H.key_fingerprint(KEY)
    assert "key" not in tr.capture["hash"] and str(KEY) not in Path(out, "manifest.json").read_text()
    contents = tr.read_table("contents")
    per_snap = contents.group_by("snap").len().sort("snap")["len"].to_list()
    assert per_snap == [32 + 4 + 1 + 8 + 8, 8]  # distinct at s0; the 8 rewritten pages at s1
    assert contents["hash"].n_unique() == len(contents)
    full_perm = H.pksm_permutation(KEY)
    perm = full_perm[:64]
    strength_cols = [S.strength_column(x) for x in S.SAMPLE_STRENGTHS]
    assert tr.has_sample_strengths and tr.capture["sample_strengths"] == list(S.SAMPLE_STRENGTHS)
    pages = tr.snapshot(1).join(tr.read_table("pages").select("proc", "vpn", "snap", "pfx64", "pfx256", "pfx1024",
                                                              *strength_cols),
                                on=["proc", "vpn"]).sort("snap").group_by("proc", "vpn").last()
    data = dict(zip(contents["hash"].to_list(), contents["data"].to_list()))
    for row in pages.iter_rows(named=True):
        d = data[row["hash"]]
        assert len(d) == 4096 and H.siphash24_reference(H.subkey(KEY, b"page hash"), xxhash.xxh3_128_digest(d)) == row["hash"]
        assert row["sample"] == H.pksm_sample_reference(d, perm)
        # every strength, one pass, the same permutation as ``sample`` (the executable spec, word by word)
        assert [row[c] for c in strength_cols] == [random_sample_hash(d, full_perm, x) for x in S.SAMPLE_STRENGTHS]
        for n in (64, 256, 1024):
            pfx = H.siphash24_reference(H.subkey(KEY, b"prefix hash"), xxhash.xxh3_128_digest(d[:n]))
            assert row[f"pfx{n}"] == pfx & 0xFFFFFFFF
    zero = pages.filter((pl.col("flags") & S.F_ZERO_FILLED) != 0)
    assert len(zero) == 16 and (zero["sample"] == H.PKSM_ZERO_SAMPLE).all()
    assert all((zero[S.strength_column(x)] == zero_sample(x)).all() for x in S.SAMPLE_STRENGTHS)
    assert data[zero["hash"][0]] == bytes(4096)
    del lay


def test_contents_absent_without_the_flag(tmp_path):
    with Target(random_pages=16, zero_pages=4) as t:
        with Capture(tmp_path / "t", t.pid, CaptureOptions()) as cap:
            cap.snapshot()
    tr = open_trace(tmp_path / "t")
    assert not tr.has_table("contents") and not any(Path(tmp_path, "t", "contents").iterdir())


def test_freeze_stops_targets_only_while_reading(tmp_path):
    with Target(random_pages=512, zero_pages=0) as t:
        opts = CaptureOptions(freeze=True, hold_frozen_s=0.4)
        with Capture(tmp_path / "t", t.pid, opts) as cap:
            wd = cap.freezer.watchdog_pid
            assert wd and proc_state(wd) is not None
            result = {}
            th = threading.Thread(target=lambda: result.update(cap.snapshot()))
            th.start()
            seen_stopped = wait_until(lambda: proc_state(t.pid) == "T", 3, 0.002)
            th.join(10)
            assert seen_stopped
            assert proc_state(t.pid) in ("S", "R")  # resumed
            assert result["pause_ns"] >= 0.4e9
            cap.snapshot()
            assert proc_state(t.pid) in ("S", "R")
        assert wait_until(lambda: proc_state(wd) in (None, "Z"), 5)  # watchdog ends with the capture
        assert proc_state(t.pid) in ("S", "R")
        tr = open_trace(tmp_path / "t")
        assert tr.capture["freeze"] is True


def test_freeze_watchdog_resumes_target_after_sigkill(tmp_path):
    """ksmtrace SIGKILLed while its target is stopped: the watchdog sends SIGCONT."""
    with Target(random_pages=64, zero_pages=0) as t:
        p = popen_cli(["capture", "-p", str(t.pid), "--freeze", "--count", "1", "-o", str(tmp_path / "t")],
                      env={"KSMTRACE_TEST_HOLD_FROZEN": "30"})
        try:
            assert wait_until(lambda: proc_state(t.pid) == "T", 20, 0.005), p.stderr.read() if p.poll() is not None else ""
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            assert wait_until(lambda: proc_state(t.pid) in ("S", "R"), 5)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        assert wait_until(lambda: not watchdogs(), 5)


def _cgroup2_root() -> Path | None:
    from ksmtrace_tracers.targets import cgroup2_mount

    m = cgroup2_mount()
    return m if m is not None and os.access(m, os.W_OK) else None


@pytest.mark.skipif(_cgroup2_root() is None, reason="no writable cgroup v2 hierarchy")
def test_cgroup_targets_and_cgroup_freeze(tmp_path):
    root = _cgroup2_root()
    cg = root / f"ksmtrace-test-{os.getpid()}"
    cg.mkdir()
    try:
        with Target(random_pages=32, zero_pages=0) as t, Target(random_pages=8, zero_pages=0) as other:
            (cg / "cgroup.procs").write_text(str(t.pid))
            frozen_seen = []

            def watch():
                frozen_seen.append(wait_until(lambda: "frozen 1" in (cg / "cgroup.events").read_text(), 3, 0.002))

            opts = CaptureOptions(freeze=True, hold_frozen_s=0.3)
            with Capture(tmp_path / "t", TargetSpec(cgroups=(str(cg),)), opts) as cap:
                th = threading.Thread(target=watch)
                th.start()
                st = cap.snapshot()
                th.join()
                assert frozen_seen == [True]
                assert "frozen 0" in (cg / "cgroup.events").read_text()
                assert (cg / "cgroup.freeze").read_text().strip() == "0"
                assert st["processes"] == 1
                assert proc_state(t.pid) in ("S", "R") and proc_state(other.pid) in ("S", "R")
                # cgroup.procs is re-read at every snapshot: a process that joins is captured
                (cg / "cgroup.procs").write_text(str(other.pid))
                st = cap.snapshot()
                assert st["processes"] == 2 and st["new"] >= 8
                assert proc_state(other.pid) in ("S", "R")
            p = open_trace(tmp_path / "t").read_table("processes")
            assert p.filter(pl.col("snap") == 0)["pid"].to_list() == [t.pid]
            assert sorted(p.filter(pl.col("snap") == 1)["pid"].to_list()) == sorted([t.pid, other.pid])
    finally:
        try:
            (cg / "cgroup.freeze").write_text("0")
        except OSError:
            pass
        for pid in (cg / "cgroup.procs").read_text().split() if cg.exists() else []:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not (cg / "cgroup.procs").read_text().strip(), 5)
        cg.rmdir()


def test_target_exits_between_and_during_snapshots(tmp_path):
    with Target(random_pages=64, zero_pages=8) as t:
        with Capture(tmp_path / "a", t.pid, CaptureOptions()) as cap:
            st0 = cap.snapshot()
            t.proc.kill()
            t.proc.wait()
            st1 = cap.snapshot()
            assert st1["exited"] == [t.pid] and st1["gone"] == st0["pages"] and st1["pages"] == 0
            assert cap.all_targets_gone()
    tr = open_trace(tmp_path / "a")
    p = tr.read_table("processes")
    assert p["state"].to_list() == ["ok", "exited"]
    assert len(tr.snapshot(1)) == 0

    # killed while its pages are being read: recorded, never fatal
    with Target(random_pages=32768, zero_pages=0) as big:
        with Capture(tmp_path / "b", big.pid, CaptureOptions()) as cap:
            timer = threading.Timer(0.005, big.proc.kill)
            timer.start()
            st = cap.snapshot()
            timer.join()
            big.proc.wait()
            st2 = cap.snapshot()
            assert st2["pages"] == 0
            assert st["exited"] == [] or st["pages"] == 0
    read_every_table(tmp_path / "b")

    # run_capture: fixed targets all gone -> the capture ends and says so
    with Target(random_pages=16, zero_pages=0) as t2:
        def kill_after_the_second(st):  # not a timer: on a loaded host the setup alone may take longer
            if st["snap"] == 1:
                t2.proc.kill()

        summary = run_capture(CaptureOptions(output=tmp_path / "c", targets=t2.pid, interval=0.1, count=100),
                              on_snapshot=kill_after_the_second)
        t2.proc.wait()
    assert summary["end_reason"] == "all targets exited" and summary["all_targets_exited"]
    assert 2 <= summary["snapshots"] < 100 and summary["exit_status"] == 0
    assert open_trace(tmp_path / "c").manifest["end_reason"] == "all targets exited"


def test_name_all_and_tree_selection(tmp_path):
    tag = f"{MARK}-{os.getpid()}-name"
    with Target(random_pages=8, zero_pages=0, tag=tag) as t:
        from ksmtrace_tracers.targets import TargetSet

        assert [m.pid for m in TargetSet(TargetSpec(names=(tag,))).resolve()] == [t.pid]
        allm = {m.pid for m in TargetSet(TargetSpec(all=True)).resolve()}
        assert t.pid in allm and os.getpid() not in allm
        # --tree of our own process: the target is a child of ours
        tree = {m.pid for m in TargetSet(TargetSpec(trees=(os.getpid(),))).resolve()}
        assert t.pid in tree and os.getpid() not in tree  # ksmtrace itself is never a target
        # a pid that exited and whose number is not reused is gone for good
        ts = TargetSet(TargetSpec(pids=(t.pid,)))
        assert not ts.all_gone()
        t.stop()
        assert ts.all_gone() and ts.resolve() == []


def test_workers_give_identical_results(tmp_path):
    variants = (("serial", dict(workers=0)), ("w2", dict(workers=2)))
    with Target(random_pages=40000, zero_pages=2000) as t:
        for name, kw in variants:
            with Capture(tmp_path / name, t.pid, CaptureOptions(key=KEY, **kw)) as cap:
                st = cap.snapshot()
                if kw["workers"]:
                    assert cap.pool is not None and set(cap.pool.pids) <= cap.targets.helpers
                assert st["read_pages"] >= 42000
    a = open_trace(tmp_path / "serial").snapshot(0).select("vpn", "hash", "flags")
    for name, _ in variants[1:]:
        b = open_trace(tmp_path / name).snapshot(0).select("vpn", "hash", "flags")
        j = a.join(b, on="vpn", suffix="_b")
        assert len(j) > 42000
        # the target is idle: its pages read the same in every capture (the interpreter's own
        # few pages may differ between captures)
        assert (j["hash"] == j["hash_b"]).sum() >= 42000
    assert open_trace(tmp_path / "w2").capture["workers"] == 2


def test_scopes_anon_and_all(tmp_path):
    with Target(random_pages=16, zero_pages=0) as t:
        for scope in ("anon", "all"):
            with Capture(tmp_path / scope, t.pid, CaptureOptions(scope=scope)) as cap:
                cap.snapshot()
    anon = open_trace(tmp_path / "anon").snapshot(0)
    allp = open_trace(tmp_path / "all").snapshot(0)
    fa = anon["flags"].to_numpy()
    assert ((fa & S.F_ANON) != 0).all() and ((fa & S.F_FILE) == 0).all()
    assert ((allp["flags"].to_numpy() & S.F_FILE) != 0).sum() > 100  # the interpreter's file pages
    assert len(allp) > len(anon)
    vmas = open_trace(tmp_path / "anon").read_table("vmas")
    assert (vmas.filter(pl.col("path") == "[vvar]")["flags"] & S.V_IN_SCOPE == 0).all()


def test_soft_dirty_fallback_and_enabled_path(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(C, "clear_soft_dirty", lambda pid: calls.append(pid))
    with Target(random_pages=16, zero_pages=0) as t:
        real = C.PM.soft_dirty_available()
        with Capture(tmp_path / "fallback", t.pid, CaptureOptions()) as cap:
            cap.snapshot()
            cap.snapshot()
        tr = open_trace(tmp_path / "fallback")
        assert tr.capture["soft_dirty"] is real and tr.host["soft_dirty"] is real
        if not real:  # this host: changes come from hash comparison, nothing is cleared
            assert calls == []
            assert (tr.read_table("pages")["flags"] & S.F_SOFT_DIRTY == 0).all()
        # a kernel with soft-dirty: bits recorded and cleared after each snapshot (simulated probe)
        calls.clear()
        monkeypatch.setattr(C.PM, "soft_dirty_available", lambda: True)
        with Capture(tmp_path / "sd", t.pid, CaptureOptions()) as cap:
            cap.snapshot()
            cap.snapshot()
        assert calls == [t.pid, t.pid]
        assert open_trace(tmp_path / "sd").capture["soft_dirty"] is True
        calls.clear()
        with Capture(tmp_path / "nosd", t.pid, CaptureOptions(soft_dirty=False)) as cap:
            cap.snapshot()
        assert calls == [] and open_trace(tmp_path / "nosd").capture["soft_dirty"] is False


_NONROOT = r'''
import ctypes, json, mmap, os, sys, time
import numpy as np
from ksmtrace_tracers.capture import Capture, CaptureOptions
from ksmtrace.trace import schema as S
import gzip, socket, pyarrow.parquet, pyarrow.compute  # noqa: F401,E401  (import before dropping privileges)
from ksmtrace_tracers.hashing import PageHasher
PageHasher(1)  # compile the keyed hash now: this host's stdlib is not readable by nobody
NOBODY = 65534
libc = ctypes.CDLL(None, use_errno=True)
def drop():
    os.setgroups([]); os.setresgid(NOBODY, NOBODY, NOBODY); os.setresuid(NOBODY, NOBODY, NOBODY)
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: changing uid cleared it
r, w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w); os.close(ready_r)
    drop()
    m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(48):
        m[i * 4096:(i + 1) * 4096] = os.urandom(4096)
    for i in range(48, 64):
        m[i * 4096] = 0
    os.write(ready_w, b"x")
    os.read(r, 1)
    os._exit(0)
os.close(r); os.close(ready_w)
os.read(ready_r, 1)
out = {}
try:
    drop()
    out["euid"] = os.geteuid()
    with Capture(sys.argv[1], pid, CaptureOptions()) as cap:
        st = cap.snapshot()
    import pyarrow.parquet as pq
    man = json.load(open(os.path.join(sys.argv[1], "manifest.json")))
    t = pq.read_table(os.path.join(sys.argv[1], "pages", "snap-000000.parquet"))
    flags = t.column("flags").to_numpy()
    out.update(host={k: man["host"][k] for k in ("root", "pfn_readable", "kpageflags_readable")}, present=st["present"],
               pfn_flag=int((flags & S.F_PFN != 0).sum()), kpf_flag=int((flags & S.F_KPF != 0).sum()),
               nonzero_pfn=int((t.column("pfn").to_numpy() != 0).sum()),
               zero_filled=int((flags & S.F_ZERO_FILLED != 0).sum()), anon=int((flags & S.F_ANON != 0).sum()),
               failed=int((flags & S.F_READ_FAILED != 0).sum()), state=st["processes"])
finally:
    os.write(w, b"x"); os.waitpid(pid, 0)
print(json.dumps(out))
'''


def test_without_root_the_capture_degrades(tmp_path):
    """As an unprivileged user: no PFNs, no kpageflags; said in the manifest; pages still captured."""
    import json
    import subprocess
    import sys

    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ksmtrace-nobody-"))  # pytest's tmp_path is not reachable for nobody
    try:
        os.chown(d, 65534, 65534)
        res = subprocess.run([sys.executable, "-c", _NONROOT, str(d / "t")], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["euid"] == 65534
        assert out["host"] == {"root": False, "pfn_readable": False, "kpageflags_readable": False}
        assert out["present"] >= 64 and out["failed"] == 0 and out["state"] == 1
        assert out["pfn_flag"] == out["kpf_flag"] == out["nonzero_pfn"] == 0
        assert out["zero_filled"] >= 16 and out["anon"] == out["present"]
        info = trace_info(d / "t", cache=False)
        assert not info["has"]["pfns"] and not info["has"]["kpageflags"] and info["host"]["root"] is False
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_private_modes(tmp_path):
    with Target(random_pages=8, zero_pages=0) as t:
        with Capture(tmp_path / "t", t.pid, CaptureOptions(contents=True, fingerprints=True)) as cap:
            cap.snapshot()
            cap.snapshot()
    for dirpath, dirs, files in os.walk(tmp_path / "t"):
        assert (os.stat(dirpath).st_mode & 0o777) == 0o700, dirpath
        for f in files:
            assert (os.stat(os.path.join(dirpath, f)).st_mode & 0o777) == 0o600, f
    assert committed(tmp_path / "t") == 2


def test_duration_and_count(tmp_path):
    with Target(random_pages=8, zero_pages=0) as t:
        s = run_capture(CaptureOptions(output=tmp_path / "d", targets=t.pid, interval=0.2, duration=0.5))
        assert s["end_reason"] == "duration reached (0.5 s)" and 2 <= s["snapshots"] <= 3
        s = run_capture(CaptureOptions(output=tmp_path / "c", targets=t.pid, interval=0.05, count=4, duration=60))
        assert s["end_reason"] == "count reached (4 snapshots)" and s["snapshots"] == 4
    times = open_trace(tmp_path / "d").times_s
    assert times[1] == pytest.approx(0.2, abs=0.1)
