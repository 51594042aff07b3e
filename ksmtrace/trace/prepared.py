"""The prepared form of a trace: the dense, engine-ready arrays (:class:`Prepared`), the event
kinds, the VMA table, and the helpers every preparation shares (dense ids, the baselines).

:mod:`ksmtrace.trace.prepare` builds a :class:`Prepared` from a trace's anonymous pages,
:mod:`ksmtrace.trace.pagecache` from its page cache, :mod:`ksmtrace.trace.restrict` restricts one;
the engine and the policies read it.  (It imports neither of them.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.trace.events import Events, EventStore

SCOPES = ("recorded", "anon", "file")  # file: the page cache (ksmtrace.trace.pagecache)

EV_APPEAR = 1
EV_GONE = 2
EV_UNMERGE = 3
EV_WRITE = 4
EV_THP = 5
EVENT_NAMES = {EV_APPEAR: "appear", EV_GONE: "gone", EV_UNMERGE: "unmerge", EV_WRITE: "write", EV_THP: "thp"}

#: smaps VmFlags mnemonics (fs/proc/task_mmu.c show_smap_vma_flags) -> bit of ``VmaTable.vmflags``
VMFLAG_BITS = {name: i for i, name in enumerate(
    "rd wr ex sh mr mw me ms gd pf dw lo io sr rr dc de ac nr ht sf nl ar wf dd sd mm hg nh mg bt mt um uw ss sl".split())}


def vmflag_mask(names: str) -> int:
    """The bit set of a space-separated list of VmFlags mnemonics (unknown ones are ignored)."""
    m = 0
    for n in names.split():
        b = VMFLAG_BITS.get(n)
        if b is not None:
            m |= 1 << b
    return m


@dataclass
class VmaTable:
    """The VMAs of every snapshot: rows of snapshot ``s`` are ``[off[s], off[s+1])``, sorted by
    (process, start); addresses in pages; ``proc`` is the dense process index of ``Prepared``."""

    off: np.ndarray  # int64 [n_snaps + 1]
    proc: np.ndarray  # int32
    start: np.ndarray  # int64 (vpn)
    end: np.ndarray  # int64 (vpn, exclusive)
    flags: np.ndarray  # uint32 (schema V_* bits)
    vmflags: np.ndarray  # int64 (VMFLAG_BITS bit set)


@dataclass
class Prepared:
    """Dense, engine-ready view of one trace under one scope."""

    scope: str
    trace_fingerprint: str
    times_ns: np.ndarray  # int64 [n_snaps], ns since the first snapshot
    n_pages: int
    page_proc: np.ndarray  # int32 [n_pages]
    n_procs: int
    proc_pid: np.ndarray  # int64 [n_procs]
    proc_id: np.ndarray  # int64 [n_procs]: the trace's process id (``proc`` column of its tables)
    proc_comm: list[str]
    proc_domain: np.ndarray  # int32 [n_procs] security domain id (uid+cgroup)
    proc_first_snap: np.ndarray  # int32: first snapshot the process is seen in
    proc_reg_snap: np.ndarray  # int32: first snapshot at which the mm is registered (-1 never)
    proc_exit_snap: np.ndarray  # int32: first snapshot at which it is gone (n_snaps: never)
    proc_order: np.ndarray  # int32: processes sorted by registration (ksm_mm_head order)
    proc_pg_lo: np.ndarray  # int64 [n_procs]
    proc_pg_hi: np.ndarray  # int64 [n_procs]
    n_cids: int
    n_gids: int  # frame ids shared by several arrivals (fork); other arrivals get frames of their own
    n_thp: int
    off: np.ndarray  # int64 [n_snaps + 1]: events of snapshot s are [off[s], off[s+1])
    store: EventStore  # the events (in memory, or spilled to a file for large traces)
    base_pages: np.ndarray  # int64 [n_snaps] candidate pages
    base_frames: np.ndarray  # int64 [n_snaps] frames they use with no dedup
    oracle_frames: np.ndarray  # int64 [n_snaps] frames with perfect dedup
    zero_filled: np.ndarray  # int64 [n_snaps] candidate pages that are all zero
    zero_page_mapped: np.ndarray  # int64 [n_snaps] pages in scope mapping the shared zero page
    hash_dup_pages: np.ndarray  # int64 [n_snaps] present pages minus distinct hashes (naive count)
    extras: dict[str, Any] = field(default_factory=dict)
    ev_strength: np.ndarray | None = None  # uint32 [n_events, len(SAMPLE_STRENGTHS)] when captured
    vmas: VmaTable | None = None  # the vmas table, when the trace has one
    trace_identity: str = ""  # Trace.identity of the files it was built from (the cache checks it)

    @property
    def n_snaps(self) -> int:
        return len(self.times_ns)

    @property
    def page_vpn(self) -> np.ndarray:
        """int64 [n_pages]: each page's virtual page number (kept with the events: a replay has no
        use for it)."""
        return self.store.get("page_vpn")

    @property
    def oracle_saved(self) -> np.ndarray:
        return self.base_frames - self.oracle_frames

    def events(self, s: int) -> slice:
        return slice(int(self.off[s]), int(self.off[s + 1]))

    def batch(self, s: int) -> Events:
        """Snapshot ``s``'s events (read from the spill file when the store is spilled)."""
        return self.store.read(int(self.off[s]), int(self.off[s + 1]))

    # whole columns over every snapshot (a spilled store reads them from its file: use batch())
    @property
    def ev_pg(self) -> np.ndarray:  # int32 page
        return self.store.column("pg")

    @property
    def ev_kind(self) -> np.ndarray:  # uint8 EV_*
        return self.store.column("kind")

    @property
    def ev_cid(self) -> np.ndarray:  # int32 new content; -1 for GONE/UNMERGE
        return self.store.column("cid")

    @property
    def ev_gid(self) -> np.ndarray:  # int32 frame with no dedup, when another arrival shares it; -1 = its own
        return self.store.column("gid")

    @property
    def ev_thp(self) -> np.ndarray:  # int32 huge page id, -1 if not in a THP
        return self.store.column("thp")

    @property
    def ev_sample(self) -> np.ndarray | None:  # uint32 sampled hash (PKSM/UKSM style) when captured
        return self.store.column("sample") if self.store.has("sample") else None

    def event_frames(self, sl: slice) -> np.ndarray:
        """Frame ids of a slice of events, unique across the trace: an arrival whose frame no
        other arrival shares (``ev_gid == -1``) gets an id of its own (n_gids + event index)."""
        g = self.store.column_range("gid", sl.start, sl.stop).astype(np.int64)
        own = np.arange(sl.start, sl.stop, dtype=np.int64) + self.n_gids
        return np.where(g >= 0, g, own)


# --- shared by every preparation ---------------------------------------------------------------
def dense_ids(key: np.ndarray, ordered: bool = False) -> tuple[np.ndarray, int]:
    """Dense ids (0..k-1) of int64 keys: in key order if ``ordered``, else in order of appearance."""
    key = np.asarray(key, np.int64)
    return dense_pair_ids(key, np.zeros(len(key), np.int64), ordered=ordered)


def add_baselines(prep: Prepared) -> None:
    """Frames with no dedup, frames with perfect dedup, zero-filled and hash-duplicate pages, from
    a prepared trace's events (for preparations that do not count them as they go: the file scope)."""
    bf, of, zf = baseline_counts(prep.off, prep.ev_pg, prep.ev_kind, prep.ev_cid, prep.ev_gid, prep.n_pages, prep.n_cids, prep.n_gids)
    prep.base_frames = bf
    prep.oracle_frames = of
    prep.zero_filled = zf
    # naive: every present page in scope (zero-page mapped ones read as zeros) minus distinct hashes
    distinct = of + (zf > 0)
    naive_distinct = distinct + ((prep.zero_page_mapped > 0) & (zf == 0))
    prep.hash_dup_pages = prep.base_pages + prep.zero_page_mapped - naive_distinct


@njit(cache=True)
def baseline_counts(off, ev_pg, ev_kind, ev_cid, ev_gid, n_pages, n_cids, n_gids):
    n_snaps = len(off) - 1
    cur_cid = np.full(n_pages, -1, np.int64)
    cur_gid = np.full(n_pages, -1, np.int64)  # -1: a frame of its own
    cnt_cid = np.zeros(n_cids, np.int64)
    cnt_gid = np.zeros(max(n_gids, 1), np.int64)
    dc = 0
    dg = 0
    bf = np.zeros(n_snaps, np.int64)
    of = np.zeros(n_snaps, np.int64)
    zf = np.zeros(n_snaps, np.int64)
    for s in range(n_snaps):
        for i in range(off[s], off[s + 1]):  # removals first
            k = ev_kind[i]
            if k == 2 or k == 3 or k == 4:
                p = ev_pg[i]
                c = cur_cid[p]
                if c < 0:
                    continue
                g = cur_gid[p]
                cnt_cid[c] -= 1
                if cnt_cid[c] == 0:
                    dc -= 1
                if g < 0:
                    dg -= 1
                else:
                    cnt_gid[g] -= 1
                    if cnt_gid[g] == 0:
                        dg -= 1
                cur_cid[p] = -1
                cur_gid[p] = -1
        for i in range(off[s], off[s + 1]):
            k = ev_kind[i]
            if k == 1 or k == 4:
                p = ev_pg[i]
                c = ev_cid[i]
                g = ev_gid[i]
                if cnt_cid[c] == 0:
                    dc += 1
                cnt_cid[c] += 1
                if g < 0:
                    dg += 1
                else:
                    if cnt_gid[g] == 0:
                        dg += 1
                    cnt_gid[g] += 1
                cur_cid[p] = c
                cur_gid[p] = g
        zero = cnt_cid[0]
        bf[s] = dg
        of[s] = dc - (1 if zero > 0 else 0)
        zf[s] = zero
    return bf, of, zf



def dense_pair_ids(a: np.ndarray, b: np.ndarray, ordered: bool = False) -> tuple[np.ndarray, int]:
    """Dense ids of pairs (a, b): in (a, b) order if ``ordered``, else in order of first appearance
    (for callers that hold every row: ``analysis/doctor``)."""
    if len(a) == 0:
        return np.zeros(0, np.int64), 0
    order = np.lexsort((b, a))
    sa, sb = a[order], b[order]
    new = np.ones(len(a), dtype=bool)
    new[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    ids_sorted = np.cumsum(new) - 1
    ids = np.empty(len(a), np.int64)
    ids[order] = ids_sorted
    k = int(ids_sorted[-1]) + 1
    if ordered:
        return ids, k
    first = np.full(k, len(a), np.int64)
    np.minimum.at(first, ids, np.arange(len(a)))
    rank = np.empty(k, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(k)
    return rank[ids], k
