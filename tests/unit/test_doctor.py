"""doctor (ksmtrace.analysis.doctor): every class found from the page flags, and each unlock checked
against a count by hand on a trace built so that each class holds known duplicates."""
from __future__ import annotations

import json

import pytest

from ksmtrace.analysis.doctor import doctor
from ksmtrace.samples import open_sample
from ksmtrace.testing import make_trace
from ksmtrace.testing.scenarios import plain_processes_trace
from ksmtrace.textfmt import dumps
from ksmtrace.trace import schema as S

MIB = 4096 / 2**20


def _classes_trace(path):
    """Two processes, two snapshots 1 s apart, every page class with known duplicates:

    * mergeable candidates: 4 pages of "m" (3 frames saved) + 2 unique;
    * not mergeable: 3 pages of "m" (3 more frames saved once mergeable: they join the "m" group),
      2 pages of "n" (1 frame), 1 unique;
    * file pages (anon=False): 2 pages of "f" (1 frame saved if they were anonymous);
    * zero-page mappings: 2; swapped: 1 (not priced);
    * THP: 2 candidate pages of "t" in one huge page (1 frame saved, inside a THP);
    * fork-shared: one frame shared by both processes (nothing to save).
    """
    snap = {}
    for v in range(4):
        snap[(0, v)] = {"c": "m"}
    snap[(0, 4)] = {"c": "u0"}
    snap[(1, 4)] = {"c": "u1"}
    for v in range(10, 13):
        snap[(1, v)] = {"c": "m", "mergeable": False}
    snap[(1, 13)] = {"c": "n", "mergeable": False}
    snap[(1, 14)] = {"c": "n", "mergeable": False}
    snap[(1, 15)] = {"c": "u2", "mergeable": False}
    snap[(0, 20)] = {"c": "f", "anon": False, "mergeable": False}
    snap[(1, 20)] = {"c": "f", "anon": False, "mergeable": False}
    snap[(0, 30)] = {"c": 0, "zero_page": True}
    snap[(1, 30)] = {"c": 0, "zero_page": True}
    snap[(1, 31)] = {"c": "s", "swapped": True}
    snap[(0, 40)] = {"c": "t", "thp": "H"}
    snap[(0, 41)] = {"c": "t", "thp": "H"}
    snap[(0, 50)] = {"c": "k", "frame": "F"}
    snap[(1, 50)] = {"c": "k", "frame": "F"}
    return make_trace(path, [snap, snap], interval=1.0)


@pytest.fixture(scope="module")
def dx(tmp_path_factory):
    return doctor(_classes_trace(tmp_path_factory.mktemp("doc") / "t"))


def test_candidates_agree_with_the_replay(dx, tmp_path_factory):
    # m x4 (3 saved) + t x2 (1 saved) + u0, u1, k (fork-shared, one frame)
    assert dx.candidates["pages_final"] == 4 + 2 + 2 + 2
    assert dx.candidates["oracle_saved_final"] == 3 + 1


def test_each_class_and_its_unlock(dx):
    f = {x["class"]: x for x in dx.findings}
    nm = f["not_mergeable"]
    assert nm["pages_final"] == 6 and nm["unlock_frames_final"] == 3 + 1  # 3 more "m", one "n" frame
    assert f["file"]["pages_final"] == 2 and f["file"]["unlock_frames_final"] == 1
    assert f["zero_page"]["pages_final"] == 2 and f["zero_page"]["unlock_frames_final"] is None
    assert f["swapped"]["pages_final"] == 1
    assert f["thp"]["pages_final"] == 2 and f["thp"]["unlock_frames_final"] == 1  # the saving inside the THP
    assert f["fork_shared"]["pages_final"] == 2
    assert "shared_anon" not in f and "hugetlb" not in f
    # pages present since the first snapshot have no known age: nothing is too young
    assert "too_young" not in f
    for cls in ("not_mergeable", "file"):
        assert f[cls]["unlockable"] and f[cls]["fix"]
    assert "PR_SET_MEMORY_MERGE" in nm["fix"] and "mem-merge=on" in nm["fix"]
    # ordered: what a fix would unlock first, largest first
    assert [x["class"] for x in dx.findings][:2] == ["not_mergeable", "file"]


def test_young_duplicates_are_too_young_for_a_slow_scan(tmp_path):
    old = {(0, v): {"c": f"o{v}"} for v in range(50)}
    pair = {**old, (0, 100): {"c": "d"}, (0, 101): {"c": "d"}}
    snaps = [dict(old), pair, pair]  # a new pair of duplicates at 1 s, still there at 2 s
    tr = make_trace(tmp_path / "t", snaps, interval=1.0)
    slow = doctor(tr, pages_to_scan=1, sleep_millisecs=1000)  # 52 pages at 1 page/s: a full scan takes 52 s
    yg = slow.finding("too_young")
    assert yg["pages_final"] == 2 and yg["unlock_frames_final"] == 1
    # 0.05 s per full scan: at 2 s the pair is a second old, old enough; at 1 s (replay time: written then) not yet
    fast = doctor(tr, pages_to_scan=1000, sleep_millisecs=10).finding("too_young")
    assert fast["pages_final"] == 0 and fast["unlock_frames_final"] == 0 and fast["unlock_frames_mean"] == pytest.approx(1 / 3)
    assert slow.scan["source"] == "as given"


def test_shared_anonymous_mappings_are_told_from_files(tmp_path):
    """A page flagged F_FILE in a shared anonymous VMA is shmem, not a file: the vmas table says so."""
    import pyarrow as pa
    from ksmtrace.trace.writer import TraceWriter

    w = TraceWriter(tmp_path / "t", host={"kernel_release": "6.18.1", "hz": 250, "pfn_readable": True},
                    capture={"scope": "all", "interval_s": 1.0, "soft_dirty": False}, tracer={"name": "t", "version": "1"})
    flags = S.F_PRESENT | S.F_FILE | S.F_PFN | S.F_KPF
    pages = pa.table({"snap": pa.array([0, 0], pa.uint32()), "proc": pa.array([0, 0], pa.uint32()),
                      "pid": pa.array([7, 7], pa.uint32()), "vpn": pa.array([0x100, 0x101], pa.uint64()),
                      "op": pa.array([0, 0], pa.uint8()), "hash": pa.array([42, 42], pa.uint64()),
                      "flags": pa.array([flags, flags], pa.uint32()), "pfn": pa.array([900, 901], pa.uint64())},
                     schema=S.PAGES_SCHEMA)
    vmas = pa.Table.from_pylist([{"snap": 0, "proc": 0, "pid": 7, "start": 0x100 << 12, "end": 0x102 << 12,
                                  "perms": "rw-s", "flags": S.V_SHARED | S.V_ANON | S.V_IN_SCOPE, "vmflags": "rd wr sh",
                                  "path": "/dev/zero (deleted)", "rss_pages": 2, "anon_pages": 0, "captured_pages": 2}],
                                schema=S.VMAS_SCHEMA)
    procs = pa.Table.from_pylist([{"snap": 0, "proc": 0, "pid": 7, "ppid": 1, "start_ticks": 1, "comm": "qemu",
                                   "cmdline": "qemu", "cgroup": "/", "uid": 0, "state": "ok", "rss_pages": 2,
                                   "anon_pages": 0, "captured_pages": 2, "mergeable": False, "merge_any": False,
                                   "t_read_ns": 0}], schema=S.PROCESSES_SCHEMA)
    w.commit_snapshot(0, 0, 0, {"pages": pages, "vmas": vmas, "processes": procs}, keyframe=True, stats={"pages": 2})
    w.close("complete")
    d = doctor(tmp_path / "t")
    sa = d.finding("shared_anon")
    assert sa is not None and sa["pages_final"] == 2 and sa["unlock_frames_final"] == 1
    assert d.finding("file") is None and "share=off" in sa["fix"]


def test_the_vm_sample(tmp_path):
    """Captured with scope mergeable: the candidates are exactly the replay's, the rest is resident
    memory the capture did not record, and the report says what it cannot tell."""
    tr = open_sample("vm")
    d = doctor(tr)
    prep = tr.prepare("recorded")
    assert d.candidates["oracle_saved_mean"] == pytest.approx(prep.oracle_saved.mean())
    assert d.candidates["pages_final"] == prep.base_pages[-1]
    assert d.scan["source"] == "the real KSM's settings during the capture" and d.scan["pages_to_scan"] == 1000
    kinds = {o["kind"] for o in d.outside_scope}
    assert "private anonymous, not mergeable" in kinds
    assert any("pinned" in x for x in d.cannot_tell) and any("scope 'mergeable'" in x for x in d.cannot_tell)
    text = d.text()
    assert "None" not in text and " nan" not in text.lower()
    json.loads(dumps(d.to_json()), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_plain_processes(tmp_path):
    d = doctor(plain_processes_trace(tmp_path / "t"))
    nm = d.finding("not_mergeable")
    assert d.candidates["pages_final"] == 0
    assert nm["unlock_frames_final"] == 180  # 120 library-like frames + 60 zero-filled frames
    assert d.findings[0]["class"] == "not_mergeable"
    assert d.finding("fork_shared")["pages_final"] == 60
    assert "2 of 2 traced processes have no mergeable memory" in d.text()
