"""Address spaces from the processes and vmas tables: fork families, VMA lineage (the anon_vma
approximation), holes in mergeable VMAs and same-address classes."""
import numpy as np

from ksmtrace.testing import make_trace
from ksmtrace.trace.addrspace import NO_TIME, address_spaces, class_members


def _asp(tmp_path, snaps, **kw):
    tr = make_trace(tmp_path / "t", snaps, **kw)
    prep = tr.prepare("anon", cache=False)
    return tr, prep, address_spaces(tr, prep)


def test_fork_families_and_start_times(tmp_path):
    snaps = [{(0, 1): "a"}, {(0, 1): "a", (1, 1): "a", (2, 1): "b"}, {(0, 1): "a", (1, 1): "a", (2, 1): "b", (3, 1): "c"}]
    procs = {1: {"ppid": 1000, "start": 5}, 3: {"ppid": 1001}}  # 1 forked by 0 at 50 ms; 3 by 1
    _, prep, asp = _asp(tmp_path, snaps, procs=procs, interval=0.1)
    assert asp.proc_parent.tolist() == [-1, 0, -1, 1]
    assert asp.proc_family.tolist() == [0, 0, 2, 0]
    assert asp.proc_start_ns[1] == 50_000_000
    assert asp.proc_start_ns[2] == 100_000_000  # default: its first snapshot (10 ms ticks, rounded up)
    assert asp.proc_start_ns[0] == NO_TIME  # start tick 0 is read as unknown
    assert asp.proc_rank[0] < asp.proc_rank[1] < asp.proc_rank[3]


def test_lineage_follows_splits_and_fork_clones(tmp_path):
    par = {(0, v): "p" for v in range(4, 12)}
    snaps = [par, {**par, (1, 4): "p"}, {**par, (1, 4): "p"}]
    vmas = [
        {0: [(0, 32), (100, 110)]},
        {0: [(0, 32), (100, 110)], 1: [(0, 32)]},  # the child (forked at 0.05 s) clones [0, 32)
        {0: [(0, 16), (16, 32), (100, 110)], 1: [(0, 32)]},  # the parent splits it
    ]
    tr, prep, asp = _asp(tmp_path, snaps, vmas=vmas, procs={1: {"ppid": 1000, "start": 5}}, interval=0.1)
    g = asp.group_at(0, 0, 5)
    assert g >= 0 and asp.group_at(2, 0, 5) == g and asp.group_at(2, 0, 20) == g  # both halves
    assert asp.group_at(0, 0, 105) not in (g, -1)  # another VMA
    gc = asp.group_at(1, 1, 5)
    assert gc != g and asp.group_parent[gc] == g  # the child's VMA is a clone of the parent's
    rows = asp.tree_rows(2, g)
    assert [(int(asp.proc[r]), int(asp.start[r])) for r in rows] == [(0, 0), (1, 0), (0, 16)]
    assert [(int(asp.proc[r]), int(asp.start[r])) for r in asp.tree_rows(2, gc)] == [(1, 0)]  # its own tree


def test_holes_between_pages_of_mergeable_vmas(tmp_path):
    snap = {(0, 10): "a", (0, 11): "b", (0, 50): "c", (0, 205): "d"}
    vmas = {0: [(0, 100), {"start": 200, "end": 210, "mergeable": False}, (300, 400)]}
    tr, prep, asp = _asp(tmp_path, [snap], vmas=vmas)
    gap = np.zeros(prep.n_pages, np.int64)
    tail = np.zeros(prep.n_procs, np.int64)
    asp.hole_gaps(0, prep, gap, tail)
    # [300, 400) has no anonymous page: no anon_vma, never walked; [200, 210) is not mergeable
    assert gap.tolist() == [10, 0, 38, 49] and tail.tolist() == [0]
    assert asp.changed[0].all()


def test_same_address_classes(tmp_path):
    snap = {(0, 5): "a", (1, 5): "a", (2, 5): "a", (0, 6): "b", (2, 9): "z"}
    vmas = {0: [(0, 10)], 1: [(0, 10)], 2: [{"start": 4, "end": 14, "path": "/x"}]}
    tr, prep, asp = _asp(tmp_path, [snap], vmas=vmas, procs={1: {"ppid": 1000}})
    page = {(int(prep.page_proc[i]), int(prep.page_vpn[i])): i for i in range(prep.n_pages)}
    fam = asp.page_classes(prep, "family")
    anyk = asp.page_classes(prep, "any")
    vma = asp.page_classes(prep, "vma")
    assert fam[page[0, 5]] == fam[page[1, 5]] != fam[page[2, 5]]
    assert anyk[page[0, 5]] == anyk[page[1, 5]] == anyk[page[2, 5]] != anyk[page[0, 6]]
    # same path and length and offset: (0, 5) and (1, 5); proc 2's /x VMA at offset 5 is vpn 9
    assert vma[page[0, 5]] == vma[page[1, 5]] != vma[page[2, 5]]
    assert vma[page[2, 9]] not in (vma[page[0, 5]],)
    off, members = class_members(anyk, asp.proc_rank[prep.page_proc])
    c = anyk[page[0, 5]]
    assert sorted(members[off[c]:off[c + 1]].tolist()) == sorted([page[0, 5], page[1, 5], page[2, 5]])


def test_a_trace_without_vmas(tmp_path):
    tr, prep, asp = _asp(tmp_path, [{(0, 1): "a"}])
    assert not asp.has_vmas
    assert asp.page_classes(prep, "vma").tolist() == [-1]
    gap = np.ones(prep.n_pages, np.int64)
    tail = np.ones(prep.n_procs, np.int64)
    asp.hole_gaps(0, prep, gap, tail)
    assert gap.tolist() == [0] and tail.tolist() == [0]
