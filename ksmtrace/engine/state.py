"""The fast engine's ground truth, as numpy arrays, and the primitives policies call to change it.

The engine owns the truth: which content every candidate page holds, which frame it maps, which
frames are KSM pages, and when a write to a merged page is a COW break.  Policies *propose*
merges through the primitives below (``stabilize``, ``merge``, ``merge_zero``, ``split_thp``); the
engine checks each one (merging unequal content is a contract violation that fails the run) and
does all the accounting.  Everything here is ``numba.njit`` so a policy's jitted scan loop can
call it without leaving compiled code.

Frames: frame ids are the trace's no-dedup frame ids (``gid``, see ``trace/prepare.py``); frame 0
is the kernel's shared zero page and is never counted as memory.  A frame that becomes a KSM page
bumps its generation, so a policy holding ``(frame, generation)`` can tell a live KSM page from a
freed one (the kernel's keyhole check in ``ksm_get_folio``).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine.jitutil import prefetch_row
from ksmtrace.trace.prepare import EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE

ZERO_FRAME = 0

# indices into the engine counter array
C_FRAMES = 0  # frames in use by candidate pages (zero page excluded)
C_COW = 1  # cumulative COW breaks of KSM pages (cow_ksm)
C_MERGES = 2  # cumulative merges (a page stops using a frame of its own)
C_EXPOSED = 3  # cumulative merges across security domains
C_KSM_ZERO = 4  # pages currently mapped to the zero page by the policy (ksm_zero_pages)
C_ZERO_REMAP = 5  # cumulative pages freed by a THP split mapping zero subpages to the zero page
C_VIOLATIONS = 6  # contract violations (merges of unequal content...)
C_LAT_SUM = 7  # cumulative merge latency, ns
C_CAND = 8  # candidate pages now
C_UNMERGED = 9  # cumulative COW breaks caused by a VMA becoming unmergeable (part of C_COW)
C_SPLITS = 10  # cumulative THP splits
C_COW_ZERO = 11  # cumulative writes (and unmerges) of pages the policy mapped to the zero page (not cow_ksm)
C_NFREE = 12  # free frame slots (top of the free stack)
N_COUNTERS = 13
COUNTER_NAMES = (
    "frames_in_use",
    "cow_ksm",
    "merges",
    "exposed_merges",
    "ksm_zero_pages_engine",
    "thp_zero_remapped",
    "contract_violations",
    "merge_latency_sum_ns",
    "candidate_pages",
    "unmerge_cows",
    "thp_splits",
    "cow_zero",
)  # (C_NFREE is engine bookkeeping, not reported)

N_LAT_BINS = 168
PF_EVENTS = 16  # events ahead whose rows are prefetched


@njit
def lat_bin(lat_ns):
    """Log-spaced merge-latency bin: 0 = under 1 ms, then 4 bins per octave of milliseconds."""
    x = lat_ns // 1000000
    if x <= 0:
        return 0
    b = 0
    y = x
    while y > 0:
        b += 1
        y >>= 1
    if b >= 3:
        sub = (x >> (b - 3)) & 3
    else:
        sub = (x << (3 - b)) & 3
    i = 1 + (b - 1) * 4 + sub
    if i >= N_LAT_BINS:
        i = N_LAT_BINS - 1
    return i


def lat_bin_edges_ms() -> np.ndarray:
    """Lower edge (ms) of every latency bin (bin 0 starts at 0)."""
    edges = np.zeros(N_LAT_BINS)
    for i in range(1, N_LAT_BINS):
        b = (i - 1) // 4 + 1
        sub = (i - 1) % 4
        edges[i] = (2 ** (b - 1)) * (1 + sub / 4.0)
    return edges


# Packed layout: numba passes every array of a tuple to a non-inlined function separately, with
# reference counting, so the engine keeps few, wide arrays (one row per page, one per frame).
# page columns
P_CID = 0  # content now, -1 if not a candidate
P_FRAME = 1  # frame mapped, -1 if not a candidate (ZERO_FRAME = mapped to the zero page)
P_SINCE = 2  # virtual time (ns) the page got its current content
P_ZKSM = 3  # 1 = mapped to the zero page by the policy (use_zero_pages)
P_THP = 4  # huge page id, -1
P_DOM = 5  # security domain of the page's process
P_PROC = 6  # the page's process (dense index)
P_FIRST = 7  # virtual time (ns) of the page's first merge, -1 before it (fidelity's time to merge)
N_PCOLS = 8
# frame columns.  Frames live in recycled slots (a live frame has at least one candidate page,
# so there are never more than n_pages + 1 of them); slot 0 is the kernel's zero page.
F_REF = 0  # candidate pages mapping the frame
F_KSM = 1  # 1 = a KSM page (write-protected, copied on write)
F_GEN = 2  # bumped each time the slot becomes a KSM page (never reset: stale nodes fail the keyhole)
F_CID = 3  # content of the frame
F_GID = 4  # the trace's frame id (gid) held in this slot
F_SINCE = 5  # since when the frame's content has existed
F_FDOM = 6  # domain of the frame's pages (-2 = mixed)
F_FREEL = 7  # the free-slot stack (a column of its own)
N_FCOLS = 8
# gid columns (one row per trace frame id): its slot while alive, and the KSM frame (slot and
# generation) its pages were merged into, so that a fork child of a merged page maps that page
G_SLOT = 0
G_ASLOT = 1
G_AGEN = 2
# ec = counters [N_COUNTERS], the merge-latency histogram [N_LAT_BINS], then one "already
# split" flag per huge page
LAT0 = N_COUNTERS
TS0 = N_COUNTERS + N_LAT_BINS

EngineArrays = namedtuple("EngineArrays", ["pg", "fr", "gm", "ec"])


def n_frame_slots(prep) -> int:
    """Frame slots the fast engine needs: never more live frames than candidate pages (+ zero page)."""
    return max(2, prep.n_pages + 1)


def new_arrays(prep) -> EngineArrays:
    n = prep.n_pages
    f = n_frame_slots(prep)
    pg = np.zeros((n, N_PCOLS), np.int64)
    pg[:, P_CID] = -1
    pg[:, P_FRAME] = -1
    pg[:, P_THP] = -1
    pg[:, P_FIRST] = -1
    pg[:, P_DOM] = prep.proc_domain[prep.page_proc]
    pg[:, P_PROC] = prep.page_proc
    fr = np.zeros((f, N_FCOLS), np.int64)
    fr[:, F_CID] = -1
    fr[:, F_GID] = -1
    fr[:, F_FDOM] = -1
    fr[: f - 1, F_FREEL] = np.arange(f - 1, 0, -1)  # slots 1..f-1 free; slot 0 is the zero page
    gm = np.full((max(prep.n_gids, 1), 3), -1, np.int64)
    ec = np.zeros(TS0 + prep.n_thp, np.int64)
    ec[C_NFREE] = f - 1
    return EngineArrays(pg=pg, fr=fr, gm=gm, ec=ec)


# ---------------------------------------------------------------------------------------------
# primitives (called from policies' jitted loops; the small ones are inlined)
@njit(inline="always")
def cid(E, pg):
    return E.pg[pg, P_CID]


@njit(inline="always")
def frame(E, pg):
    return E.pg[pg, P_FRAME]


@njit(inline="always")
def is_candidate(E, pg):
    return E.pg[pg, P_CID] >= 0


@njit(inline="always")
def page_is_ksm(E, pg):
    """The page maps a KSM page (not the zero page)."""
    f = E.pg[pg, P_FRAME]
    return f > 0 and E.fr[f, F_KSM] == 1


@njit(inline="always")
def frame_alive(E, f, gen):
    """Keyhole check: frame ``f`` is still the KSM page of generation ``gen``."""
    return f > 0 and E.fr[f, F_REF] > 0 and E.fr[f, F_KSM] == 1 and E.fr[f, F_GEN] == gen


@njit(inline="always")
def _release_a(P, F, G, ec, pg):
    """The page stops mapping its frame; a frame left with no page is freed (its slot recycled)."""
    f = P[pg, P_FRAME]
    if f > 0:
        F[f, F_REF] -= 1
        if F[f, F_REF] == 0:
            ec[C_FRAMES] -= 1
            g = F[f, F_GID]
            if g >= 0 and G[g, G_SLOT] == f:
                G[g, G_SLOT] = -1
            F[ec[C_NFREE], F_FREEL] = f
            ec[C_NFREE] += 1


@njit
def _release(E, pg):
    _release_a(E.pg, E.fr, E.gm, E.ec, pg)


@njit(cache=True)
def stabilize(E, pg):
    """Make the frame ``pg`` maps a KSM page (write-protect it).  Returns its generation."""
    f = E.pg[pg, P_FRAME]
    if f <= 0 or E.pg[pg, P_CID] < 0:
        E.ec[C_VIOLATIONS] += 1
        return -1
    if E.fr[f, F_KSM] == 0:
        E.fr[f, F_KSM] = 1
        E.fr[f, F_GEN] += 1
    return E.fr[f, F_GEN]


@njit
def _account_merge(E, pg, partner_since, partner_dom, now):
    E.ec[C_MERGES] += 1
    if E.pg[pg, P_FIRST] < 0:
        E.pg[pg, P_FIRST] = now
    s = E.pg[pg, P_SINCE]
    if partner_since > s:
        s = partner_since
    lat = now - s
    if lat < 0:
        lat = 0
    E.ec[C_LAT_SUM] += lat
    E.ec[LAT0 + lat_bin(lat)] += 1
    if partner_dom != E.pg[pg, P_DOM]:
        E.ec[C_EXPOSED] += 1


@njit(cache=True)
def merge(E, pg, f, now):
    """Map ``pg`` onto KSM page ``f`` (replace_page).  Returns True on success."""
    if E.pg[pg, P_CID] < 0 or f <= 0 or E.fr[f, F_REF] <= 0 or E.fr[f, F_KSM] == 0 or E.fr[f, F_CID] != E.pg[pg, P_CID]:
        E.ec[C_VIOLATIONS] += 1
        return False
    old = E.pg[pg, P_FRAME]
    if old == f:
        return True
    _account_merge(E, pg, E.fr[f, F_SINCE], E.fr[f, F_FDOM], now)
    if E.fr[f, F_FDOM] != E.pg[pg, P_DOM]:
        E.fr[f, F_FDOM] = -2
    if old > 0:
        g = E.fr[old, F_GID]
        if g >= 0:
            E.gm[g, G_ASLOT] = f
            E.gm[g, G_AGEN] = E.fr[f, F_GEN]
    _release(E, pg)
    E.pg[pg, P_FRAME] = f
    E.fr[f, F_REF] += 1
    return True


@njit(cache=True)
def merge_zero(E, pg, now):
    """Map ``pg`` (all zero) onto the kernel zero page, as use_zero_pages does."""
    if E.pg[pg, P_CID] != 0 or E.pg[pg, P_FRAME] <= 0:
        E.ec[C_VIOLATIONS] += 1
        return False
    _account_merge(E, pg, 0, E.pg[pg, P_DOM], now)
    _release(E, pg)
    E.pg[pg, P_FRAME] = ZERO_FRAME
    E.pg[pg, P_ZKSM] = 1
    E.ec[C_KSM_ZERO] += 1
    return True


@njit(cache=True)
def split_thp(E, pg, lo, hi, remap_zero):
    """Split the huge page ``pg`` belongs to (KSM does before merging a subpage).

    With ``remap_zero`` (Linux 6.12+) every all-zero subpage is mapped to the shared zero page:
    its frame is freed and it stops being a candidate, with no KSM counter change.
    ``lo``/``hi`` bound the page ids of ``pg``'s process.  Returns the number of pages remapped.
    """
    t = E.pg[pg, P_THP]
    if t < 0 or E.ec[TS0 + t] == 1:
        return 0
    E.ec[TS0 + t] = 1
    E.ec[C_SPLITS] += 1
    a = pg - 511
    if a < lo:
        a = lo
    b = pg + 512
    if b > hi:
        b = hi
    n = 0
    for q in range(a, b):
        if E.pg[q, P_THP] == t:
            E.pg[q, P_THP] = -1
            fq = E.pg[q, P_FRAME]
            if remap_zero and E.pg[q, P_CID] == 0 and fq > 0 and E.fr[fq, F_KSM] == 0:
                _release(E, q)
                E.pg[q, P_FRAME] = -1
                E.pg[q, P_CID] = -1
                E.ec[C_CAND] -= 1
                n += 1
    E.ec[C_ZERO_REMAP] += n
    return n


# ---------------------------------------------------------------------------------------------
# snapshot application (the engine's own job, once per snapshot)
@njit(cache=True)
def apply_events(E, pgs, kinds, cids, gids, thps, proc_new, now):
    """Apply one snapshot's events at virtual time ``now``: removals first, then arrivals.

    Returns the number of COW breaks of KSM pages this snapshot caused (``cow_ksm``: the kernel
    counts ``COW_KSM`` only when the written PTE maps a KSM folio; a write to a page the policy
    mapped to the zero page allocates a fresh page and is counted in ``cow_zero``).
    """
    P = E.pg  # local bindings: numba handles them far better than tuple fields in loops
    F = E.fr
    G = E.gm
    ec = E.ec
    cows = 0
    n = len(pgs)
    # 1. pages that stop being candidates or are written leave their frame
    for i in range(n):
        if i + PF_EVENTS < n:  # cache hint: the frame row of an event ahead is a random access
            fa = P[pgs[i + PF_EVENTS], P_FRAME]
            if fa > 0:
                prefetch_row(F, fa)
        pg = pgs[i]
        k = kinds[i]
        if P[pg, P_CID] < 0:
            continue
        if k == EV_GONE or k == EV_UNMERGE or k == EV_WRITE:
            f = P[pg, P_FRAME]
            if k == EV_WRITE or k == EV_UNMERGE:
                if f > 0 and F[f, F_KSM] == 1:  # do_wp_page copies a KSM folio: COW_KSM
                    cows += 1
                    if k == EV_UNMERGE:
                        ec[C_UNMERGED] += 1
                elif P[pg, P_ZKSM] == 1:  # the zero page has no folio: no COW_KSM
                    ec[C_COW_ZERO] += 1
            if P[pg, P_ZKSM] == 1:
                P[pg, P_ZKSM] = 0
                ec[C_KSM_ZERO] -= 1
            _release_a(P, F, G, ec, pg)
            P[pg, P_FRAME] = -1
            P[pg, P_CID] = -1
            ec[C_CAND] -= 1
        elif k == EV_THP:
            P[pg, P_THP] = thps[i]
    # 2. arrivals: new candidates and the new content of written pages
    for i in range(n):
        if i + PF_EVENTS < n:
            ga = gids[i + PF_EVENTS]
            if ga >= 0:
                prefetch_row(G, ga)
        pg = pgs[i]
        k = kinds[i]
        if not (k == EV_APPEAR or k == EV_WRITE):
            continue
        if P[pg, P_CID] >= 0:  # already a candidate (cannot happen after step 1)
            continue
        g = gids[i]
        c = cids[i]
        dom = P[pg, P_DOM]
        f = G[g, G_SLOT] if g >= 0 else -1
        if f < 0:
            a = G[g, G_ASLOT] if g >= 0 else -1
            # a fork child of a page that was merged away maps the KSM page its parent maps
            if (k == EV_APPEAR and a > 0 and proc_new[P[pg, P_PROC]] and F[a, F_REF] > 0 and F[a, F_KSM] == 1
                    and F[a, F_GEN] == G[g, G_AGEN] and F[a, F_CID] == c):
                f = a
            else:
                if ec[C_NFREE] == 0:
                    ec[C_VIOLATIONS] += 1
                    continue
                ec[C_NFREE] -= 1
                f = F[ec[C_NFREE], F_FREEL]
                F[f, F_KSM] = 0
                F[f, F_CID] = c
                F[f, F_GID] = g
                F[f, F_SINCE] = now
                F[f, F_FDOM] = dom
                if g >= 0:
                    G[g, G_SLOT] = f
                    G[g, G_ASLOT] = -1
        elif F[f, F_FDOM] != dom:
            F[f, F_FDOM] = -2
        if F[f, F_REF] == 0:
            ec[C_FRAMES] += 1
        F[f, F_REF] += 1
        P[pg, P_FRAME] = f
        P[pg, P_CID] = c
        P[pg, P_SINCE] = now
        P[pg, P_THP] = thps[i]
        ec[C_CAND] += 1
    ec[C_COW] += cows
    return cows


def faulted_kinds(ev_pg: np.ndarray, ev_kind: np.ndarray, faulted: dict[int, int], now: int) -> np.ndarray:
    """A snapshot's event kinds for the engine, at ``now``, when the pages of ``faulted`` (page ->
    the time of the snapshot whose write it carries) were written by a recorded fault: an
    ``EV_WRITE`` at that snapshot is already applied (the fault carried the content it shows), so
    it only sets the page's huge page (``EV_THP``) -- one COW break per fault, never a second one
    at the snapshot.  Marks of snapshots up to ``now`` are dropped from ``faulted``."""
    if not faulted:
        return ev_kind
    due = [pg for pg, t in faulted.items() if t == now]
    for pg in [pg for pg, t in faulted.items() if t <= now]:
        del faulted[pg]
    if not due or len(ev_pg) == 0:
        return ev_kind
    m = np.zeros(int(max(due)) + 1, np.bool_)
    m[np.asarray(due, np.int64)] = True
    hit = (ev_kind == EV_WRITE) & (ev_pg < len(m))
    hit[hit] = m[ev_pg[hit]]
    if not hit.any():
        return ev_kind
    out = ev_kind.copy()
    out[hit] = EV_THP
    return out


@njit(cache=True)
def write_fault(E, pg, c, now):
    """A recorded write fault on ``pg`` at ``now`` (``--writes faults``); ``c`` is the content after
    it (-1: the same bytes).  As ``do_wp_page``: a write to a KSM page copies it (``COW_KSM``), to
    the policy's zero page allocates a page (``cow_zero``), to a frame another page maps (fork)
    copies it; the page ends with a frame of its own either way (an exclusive frame is reused in
    the kernel: the frame count is the same).  Returns the KSM COW breaks (0 or 1), -1 when the
    page is not a candidate now (nothing to write)."""
    P = E.pg
    F = E.fr
    ec = E.ec
    if P[pg, P_CID] < 0:
        return -1
    f = P[pg, P_FRAME]
    cow = 0
    if f > 0 and F[f, F_KSM] == 1:
        cow = 1
        ec[C_COW] += 1
    elif P[pg, P_ZKSM] == 1:
        ec[C_COW_ZERO] += 1
    if c < 0:
        c = P[pg, P_CID]
    if P[pg, P_ZKSM] == 1:
        P[pg, P_ZKSM] = 0
        ec[C_KSM_ZERO] -= 1
    _release_a(P, F, E.gm, ec, pg)
    P[pg, P_FRAME] = -1
    if ec[C_NFREE] == 0:  # (cannot happen: a slot was just freed or the page had none)
        P[pg, P_CID] = -1
        ec[C_CAND] -= 1
        ec[C_VIOLATIONS] += 1
        return cow
    ec[C_NFREE] -= 1
    nf = F[ec[C_NFREE], F_FREEL]
    F[nf, F_KSM] = 0
    F[nf, F_CID] = c
    F[nf, F_GID] = -1
    F[nf, F_SINCE] = now
    F[nf, F_FDOM] = P[pg, P_DOM]
    F[nf, F_REF] = 1
    ec[C_FRAMES] += 1
    P[pg, P_FRAME] = nf
    P[pg, P_CID] = c
    P[pg, P_SINCE] = now
    return cow


@njit(cache=True)
def _per_process_counts(P, fksm, n_procs):
    cand = np.zeros(n_procs, np.int64)
    merged = np.zeros(n_procs, np.int64)
    for pg in range(P.shape[0]):
        if P[pg, P_CID] < 0:
            continue
        pr = P[pg, P_PROC]
        cand[pr] += 1
        f = P[pg, P_FRAME]
        if (f > 0 and fksm[f] == 1) or P[pg, P_ZKSM] == 1:
            merged[pr] += 1
    return cand, merged


def per_process_counts(E, n_procs):
    """Candidate pages and merged pages (on a KSM page or the policy's zero page) per process.

    The frames' KSM flags are copied into a compact byte array first: one random byte read per
    page instead of a 56-byte frame row keeps this pass in the cache."""
    fksm = E.fr[:, F_KSM].astype(np.uint8)
    return _per_process_counts(E.pg, fksm, n_procs)
