"""UKSM's ``vma_slot`` instances over a trace: which VMA is scanned as which slot, when.

UKSM gives every eligible VMA a slot when the VMA is created and frees it when the VMA goes; any
change of the VMA's bounds (split, merge, expand, shrink, mremap) deletes the slot and creates a
new one, which starts over in rung 0 with no rmap items (``uksm_vma_add_new`` /
``uksm_remove_vma``, notes/uksm-spec.md §3.2).  A trace sees VMAs at snapshots, so a slot
instance here is a maximal run of snapshots in which one process has an eligible VMA with the
same ``(start, end)``: it is created at the first snapshot of the run and removed at the snapshot
after its last.

Eligible (``uksm_flags_can_scan``, uksm.h:85-95): none of the VmFlags ``pf io de ht mm sh ms gd``
(PFN/IO/DONTEXPAND/HUGETLB/MIXEDMAP/SHARED/MAYSHARE/GROWSDOWN -- so private file mappings are
slots, ``[stack]`` is not), and captured (``V_IN_SCOPE``: a VMA the trace has no page rows for
cannot be replayed).  A trace without a vmas table (e.g. one built in code) gets synthesised VMAs:
per process, its page addresses grouped into runs split at gaps of more than 1024 pages, each run
one VMA for the process's lifetime.

Everything a runtime needs per instance is precomputed here once: its process, first page
(vpn), size in pages, its page ids (a page id for each page index that ever held a page, or -1),
a 62-bit random key (the kernel orders ``node_vma`` lists by slot address: quirk Q8), and per
snapshot the instances created (in creation order: process start order, then address) and removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ksmtrace.errors import KsmtraceError
from ksmtrace.policies.uksm.rules import RNG_KEYS, rand32_call
from ksmtrace.trace import schema as S
from ksmtrace.trace.prepared import vmflag_mask

INELIGIBLE = vmflag_mask("pf io de ht mm sh ms gd")
SYNTH_GAP = S.SYNTH_VMA_GAP  # pages: a wider gap between two pages of a process splits a synthesised VMA
MAX_ENTRIES = 1 << 27  # page indices over all slot instances (12 bytes each in the kernel)


@dataclass
class SlotTable:
    n: int  # slot instances
    proc: np.ndarray  # int64 dense process
    start: np.ndarray  # int64 first vpn
    pages: np.ndarray  # int64 size in pages (vma_pages)
    base: np.ndarray  # int64 offset of the instance's page indices in entry_pg
    first: np.ndarray  # int64 snapshot it is created at
    removed: np.ndarray  # int64 snapshot it is removed at (n_snaps: never)
    pglo: np.ndarray  # int64 page ids of the instance's range: [pglo, pghi)
    pghi: np.ndarray
    key: np.ndarray  # int64 random key (node_vma order)
    entry_pg: np.ndarray  # int64 [sum of pages]: page id of each page index, -1 = never a page there
    add_off: np.ndarray  # int64 [n_snaps + 1]: instances created at snapshot s are add_ids[add_off[s]:add_off[s+1]]
    add_ids: np.ndarray
    rem_off: np.ndarray  # the same for instances removed at s
    rem_ids: np.ndarray
    inh_off: np.ndarray  # int64 [n + 1]: removed instances that overlap instance i (same process, same snapshot)
    inh_ids: np.ndarray
    source: str  # "vmas table" or "synthesised from page addresses"


def _synth_rows(prep) -> list[tuple[int, int, int, int]]:
    rows = []
    for p in range(prep.n_procs):
        lo, hi = int(prep.proc_pg_lo[p]), int(prep.proc_pg_hi[p])
        if hi <= lo:
            continue
        v = prep.page_vpn[lo:hi]
        cuts = np.flatnonzero(np.diff(v) > SYNTH_GAP) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(v)]])
        first, gone = int(prep.proc_first_snap[p]), int(prep.proc_exit_snap[p])
        for a, b in zip(starts.tolist(), ends.tolist()):
            for s in range(first, gone):
                rows.append((s, p, int(v[a]), int(v[b - 1]) + 1))
    return rows


def build_slots(prep, rng: np.ndarray) -> SlotTable:
    """The slot instances of ``prep`` (see the module docstring); draws the keys from ``rng``."""
    n_snaps = prep.n_snaps
    V = prep.vmas
    if V is None:
        rows = _synth_rows(prep)
        source = "synthesised from page addresses"
    else:
        ok = ((V.vmflags & INELIGIBLE) == 0) & ((V.flags & S.V_IN_SCOPE) != 0) & (V.end > V.start)
        rows = []
        for s in range(n_snaps):
            a, b = int(V.off[s]), int(V.off[s + 1])
            sel = np.flatnonzero(ok[a:b]) + a
            rows.extend(zip([s] * len(sel), V.proc[sel].tolist(), V.start[sel].tolist(), V.end[sel].tolist()))
        source = "vmas table"
    rank = np.empty(max(prep.n_procs, 1), np.int64)
    rank[np.asarray(prep.proc_order, dtype=np.int64)] = np.arange(len(prep.proc_order))
    by_snap: list[list[tuple[int, int, int]]] = [[] for _ in range(n_snaps)]
    for s, p, a, b in rows:
        by_snap[s].append((int(p), int(a), int(b)))
    live: dict[tuple[int, int, int], int] = {}
    proc, start, end, first, removed = [], [], [], [], []
    add_ids: list[list[int]] = []
    rem_ids: list[list[int]] = []
    inherit: dict[int, list[int]] = {}
    for s in range(n_snaps):
        keys = sorted(set(by_snap[s]), key=lambda k: (rank[k[0]], k[1], k[2]))
        kset = set(keys)
        gone = sorted((k for k in live if k not in kset), key=lambda k: (rank[k[0]], k[1], k[2]))
        rem = []
        for k in gone:
            i = live.pop(k)
            removed[i] = s
            rem.append(i)
        add = []
        for k in keys:
            if k in live:
                continue
            i = len(proc)
            live[k] = i
            proc.append(k[0])
            start.append(k[1])
            end.append(k[2])
            first.append(s)
            removed.append(n_snaps)
            add.append(i)
            inherit[i] = [j for j in rem if proc[j] == k[0] and start[j] < k[2] and k[1] < end[j]]
        add_ids.append(add)
        rem_ids.append(rem)
    n = len(proc)
    proc_a = np.array(proc, np.int64)
    start_a = np.array(start, np.int64)
    pages = np.array(end, np.int64) - start_a
    total = int(pages.sum())
    if total > MAX_ENTRIES:
        raise KsmtraceError(f"uksm: the trace's VMAs span {total:,} pages over all slots (at most {MAX_ENTRIES:,} supported)")
    base = np.concatenate([[0], np.cumsum(pages)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    pglo = np.zeros(n, np.int64)
    pghi = np.zeros(n, np.int64)
    entry_pg = np.full(total, -1, np.int64)
    for i in range(n):
        lo, hi = int(prep.proc_pg_lo[proc[i]]), int(prep.proc_pg_hi[proc[i]])
        v = prep.page_vpn[lo:hi]
        a = lo + int(np.searchsorted(v, start[i]))
        b = lo + int(np.searchsorted(v, end[i]))
        pglo[i], pghi[i] = a, b
        entry_pg[base[i] + (prep.page_vpn[a:b] - start[i])] = np.arange(a, b)
    key = np.array([(rand32_call(rng, RNG_KEYS) << 30) ^ rand32_call(rng, RNG_KEYS) for _ in range(n)], np.int64)

    def packed(lists):
        off = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        ids = np.array([i for x in lists for i in x], np.int64)
        return off, ids

    add_off, add_a = packed(add_ids)
    rem_off, rem_a = packed(rem_ids)
    inh_off, inh_a = packed([inherit.get(i, []) for i in range(n)])
    return SlotTable(n=n, proc=proc_a, start=start_a, pages=pages, base=base, first=np.array(first, np.int64),
                     removed=np.array(removed, np.int64), pglo=pglo, pghi=pghi, key=key, entry_pg=entry_pg,
                     add_off=add_off, add_ids=add_a, rem_off=rem_off, rem_ids=rem_a, inh_off=inh_off, inh_ids=inh_a,
                     source=source)
