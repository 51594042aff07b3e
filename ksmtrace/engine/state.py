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

from ksmtrace.jitutil import prefetch_row
from ksmtrace.trace.prepared import EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE

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
N_COUNTERS = 12
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
)
# engine bookkeeping after the counters (not reported)
C_NFREE = N_COUNTERS  # free frame slots (top of the free stack)
C_PDIRTY = N_COUNTERS + 1  # 1 = the per-process merged counts need a recount (see stabilize)
C_OPROC = N_COUNTERS + 2  # offset in ec of the per-process counts
C_ODOM = N_COUNTERS + 3  # offset in ec of each process's security domain
C_OTIME = N_COUNTERS + 4  # offset in ec of each snapshot's time (ns)
C_OTHP = N_COUNTERS + 5  # offset in ec of the per-huge-page "already split" flags
N_BOOK = 6

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
# Page and frame rows are int32 (20 and 32 bytes): what the trace needs (ids below 2^31, times
# as snapshot numbers) in half the memory and cache traffic of int64.
# page columns
P_CID = 0  # content now, -1 if not a candidate
P_FRAME = 1  # frame mapped, -1 if not a candidate (ZERO_FRAME = mapped to the zero page by the policy)
P_SINCE = 2  # time slot at which the page got its current content (its time: ec[C_OTIME + slot]; the
#             slots are the snapshots, then one per recorded write fault, see new_arrays)
P_THP = 3  # huge page id, -1
P_PROC = 4  # the page's process (dense index)
N_PCOLS = 5
# frame columns.  Frames live in recycled slots (a live frame has at least one candidate page,
# so there are never more than candidate pages, see n_frame_slots); slot 0 is the kernel's zero page.
F_REF = 0  # candidate pages mapping the frame
F_KSM = 1  # 1 = a KSM page (write-protected, copied on write)
F_GEN = 2  # bumped each time the slot becomes a KSM page (never reset: stale nodes fail the keyhole)
F_CID = 3  # content of the frame
F_GID = 4  # the trace's frame id (gid) held in this slot
F_SINCE = 5  # time slot (as P_SINCE) since which the frame's content has existed
F_FDOM = 6  # domain of the frame's pages (-2 = mixed)
F_FREEL = 7  # the free-slot stack (a column of its own)
N_FCOLS = 8
# gid columns (one row per trace frame id): its slot while alive, and the KSM frame (slot and
# generation) its pages were merged into, so that a fork child of a merged page maps that page
G_SLOT = 0
G_ASLOT = 1
G_AGEN = 2
# ec (int64) = counters [N_COUNTERS], bookkeeping [N_BOOK], the merge-latency histogram
# [N_LAT_BINS], then at the offsets its bookkeeping slots hold: per process its candidate and
# merged pages (kept up to date by every primitive, so the per-process table costs no pass over
# the pages) and its security domain; every snapshot's time; one "already split" flag per huge page
LAT0 = N_COUNTERS + N_BOOK
TS0 = LAT0 + N_LAT_BINS

# first (int64, one per page): the virtual time (ns) of the page's first merge, -1 before it (fidelity's
# time to merge; 8 bytes a page, kept apart from the int32 rows because it is a time in ns)
EngineArrays = namedtuple("EngineArrays", ["pg", "fr", "gm", "ec", "first"])


def n_frame_slots(prep) -> int:
    """Frame slots the fast engine needs: never more live frames than candidate pages (+ the zero
    page's slot), and never more candidates than at the end of some snapshot (a snapshot's
    removals come before its arrivals) -- fewer than pages ever seen, which grow with churn."""
    most = int(prep.base_pages.max()) if len(prep.base_pages) else 0
    return max(2, min(prep.n_pages, most) + 2)


def new_arrays(prep, n_faults: int = 0) -> EngineArrays:
    """The engine's arrays for ``prep``; ``n_faults``: the recorded write faults the run will apply
    (``--writes faults``), each of which gets a time slot of its own after the snapshots'."""
    n = prep.n_pages
    f = n_frame_slots(prep)
    if max(f, prep.n_cids, prep.n_gids, prep.n_thp, prep.n_snaps + n_faults) >= 2**31:
        raise ValueError("trace too large for the fast engine's 32-bit ids")
    pg = np.empty((n, N_PCOLS), np.int32)
    pg[:, P_CID] = -1
    pg[:, P_FRAME] = -1
    pg[:, P_SINCE] = 0
    pg[:, P_THP] = -1
    pg[:, P_PROC] = prep.page_proc
    fr = np.zeros((f, N_FCOLS), np.int32)
    fr[:, F_CID] = -1
    fr[:, F_GID] = -1
    fr[:, F_FDOM] = -1
    fr[: f - 1, F_FREEL] = np.arange(f - 1, 0, -1, dtype=np.int32)  # slots 1..f-1 free; slot 0 is the zero page
    gm = np.full((max(prep.n_gids, 1), 3), -1, np.int32)
    n_procs, n_snaps = prep.n_procs, prep.n_snaps
    o_proc = TS0
    o_dom = o_proc + 2 * n_procs
    o_time = o_dom + n_procs
    o_thp = o_time + n_snaps + n_faults
    ec = np.zeros(o_thp + prep.n_thp, np.int64)
    ec[C_NFREE] = f - 1
    ec[C_OPROC] = o_proc
    ec[C_ODOM] = o_dom
    ec[C_OTIME] = o_time
    ec[C_OTHP] = o_thp
    ec[o_dom : o_dom + n_procs] = prep.proc_domain
    return EngineArrays(pg=pg, fr=fr, gm=gm, ec=ec, first=np.full(n, -1, np.int64))


# ---------------------------------------------------------------------------------------------
# primitives (called from policies' jitted loops; the small ones are inlined)
@njit(inline="always")
def is_removal(k):
    """Event kind ``k`` takes the page's mapping away (gone, unmerged, or written: the written page
    leaves its frame); :func:`apply_removals` applies these."""
    return k == EV_GONE or k == EV_UNMERGE or k == EV_WRITE


@njit(inline="always")
def is_arrival(k):
    """Event kind ``k`` gives the page new content to map (appeared, or written: its new copy);
    :func:`apply_arrivals` applies these."""
    return k == EV_APPEAR or k == EV_WRITE


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
def _merged_a(P, F, pg):
    """The candidate page ``pg`` is merged: it maps a KSM page, or the zero page through the policy."""
    f = P[pg, P_FRAME]
    return f == ZERO_FRAME or F[f, F_KSM] == 1


@njit(inline="always")
def _dom(ec, proc):
    return ec[ec[C_ODOM] + proc]


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
        # its pages are merged now: pg alone (the usual case), or fork-shared pages of any process,
        # which this frame does not list -- then the per-process counts are recounted once
        if E.fr[f, F_REF] == 1:
            E.ec[E.ec[C_OPROC] + 2 * E.pg[pg, P_PROC] + 1] += 1
        else:
            E.ec[C_PDIRTY] = 1
    return E.fr[f, F_GEN]


@njit
def _account_merge(E, pg, partner_since, partner_dom, now):
    """A merge of ``pg`` (whose partner's content exists since time slot ``partner_since``)."""
    ec = E.ec
    ec[C_MERGES] += 1
    if E.first[pg] < 0:
        E.first[pg] = now
    # since slots are snapshots and fault times (see new_arrays): compare their times, not the slots
    ot = ec[C_OTIME]
    t = ec[ot + E.pg[pg, P_SINCE]]
    tp = ec[ot + partner_since]
    if tp > t:
        t = tp
    lat = now - t
    if lat < 0:
        lat = 0
    ec[C_LAT_SUM] += lat
    ec[LAT0 + lat_bin(lat)] += 1
    if partner_dom != _dom(ec, E.pg[pg, P_PROC]):
        ec[C_EXPOSED] += 1
    if not _merged_a(E.pg, E.fr, pg):
        ec[ec[C_OPROC] + 2 * E.pg[pg, P_PROC] + 1] += 1


@njit(cache=True)
def merge(E, pg, f, now):
    """Map ``pg`` onto KSM page ``f`` (replace_page).  Returns True on success."""
    if (E.pg[pg, P_CID] < 0 or f <= 0 or E.fr[f, F_REF] <= 0 or E.fr[f, F_KSM] == 0 or E.fr[f, F_CID] != E.pg[pg, P_CID]
            or E.pg[pg, P_FRAME] == ZERO_FRAME):
        E.ec[C_VIOLATIONS] += 1
        return False
    old = E.pg[pg, P_FRAME]
    if old == f:
        return True
    _account_merge(E, pg, E.fr[f, F_SINCE], E.fr[f, F_FDOM], now)
    if E.fr[f, F_FDOM] != _dom(E.ec, E.pg[pg, P_PROC]):
        E.fr[f, F_FDOM] = -2
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
    _account_merge(E, pg, 0, _dom(E.ec, E.pg[pg, P_PROC]), now)
    _release(E, pg)
    E.pg[pg, P_FRAME] = ZERO_FRAME
    E.ec[C_KSM_ZERO] += 1
    return True


@njit(cache=True)
def split_thp(E, pg, lo, hi, remap_zero):
    """Split the huge page ``pg`` belongs to (KSM does before merging a subpage).

    With ``remap_zero`` (Linux 6.12+) every all-zero subpage is mapped to the shared zero page:
    its frame is freed and it stops being a candidate, with no KSM counter change.
    ``lo``/``hi`` bound the page ids of ``pg``'s process.  Returns the number of pages remapped.
    """
    ec = E.ec
    t = E.pg[pg, P_THP]
    if t < 0 or ec[ec[C_OTHP] + t] == 1:
        return 0
    ec[ec[C_OTHP] + t] = 1
    ec[C_SPLITS] += 1
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
                ec[C_CAND] -= 1
                ec[ec[C_OPROC] + 2 * E.pg[q, P_PROC]] -= 1
                n += 1
    ec[C_ZERO_REMAP] += n
    return n


# ---------------------------------------------------------------------------------------------
# snapshot application (the engine's own job, once per snapshot)
@njit(inline="always")
def apply_removals(P, F, G, ec, pgs, kinds, thps):
    """Step 1 of a snapshot: pages that stop being candidates or are written leave their frame
    (a COW break when they were merged); huge-page membership changes.  Returns the COW breaks of
    KSM pages (``cow_ksm``: the kernel counts ``COW_KSM`` only when the written PTE maps a KSM
    folio; a write to a page the policy mapped to the zero page allocates a fresh page and is
    counted in ``cow_zero``)."""
    opc = ec[C_OPROC]
    cows = 0
    n = len(pgs)
    for i in range(n):
        # cache hints: the page row of an event far ahead, the frame row (a random access) of
        # one nearer
        if i + 2 * PF_EVENTS < n:
            prefetch_row(P, pgs[i + 2 * PF_EVENTS])
        if i + PF_EVENTS < n:
            fa = P[pgs[i + PF_EVENTS], P_FRAME]
            if fa > 0:
                prefetch_row(F, fa)
        pg = pgs[i]
        k = kinds[i]
        if P[pg, P_CID] < 0:
            continue
        if is_removal(k):
            f = P[pg, P_FRAME]
            merged = f == ZERO_FRAME or F[f, F_KSM] == 1
            if merged:
                if k == EV_WRITE or k == EV_UNMERGE:
                    if f != ZERO_FRAME:  # do_wp_page copies a KSM folio: COW_KSM
                        cows += 1
                        if k == EV_UNMERGE:
                            ec[C_UNMERGED] += 1
                    else:  # the zero page has no folio: no COW_KSM
                        ec[C_COW_ZERO] += 1
                if f == ZERO_FRAME:
                    ec[C_KSM_ZERO] -= 1
                ec[opc + 2 * P[pg, P_PROC] + 1] -= 1
            _release_a(P, F, G, ec, pg)
            P[pg, P_FRAME] = -1
            P[pg, P_CID] = -1
            ec[C_CAND] -= 1
            ec[opc + 2 * P[pg, P_PROC]] -= 1
        elif k == EV_THP:
            P[pg, P_THP] = thps[i]
    ec[C_COW] += cows
    return cows


@njit(inline="always")
def apply_arrivals(P, F, G, ec, first, pgs, kinds, cids, gids, thps, proc_new, s, now, kpage, pend):
    """Step 2 of a snapshot: new candidates and the new content of written pages map their frame
    (fork sharing: the frame of their trace frame id; a fork child of a page merged away: that KSM
    page; otherwise a fresh one).

    ``kpage`` (rows: content -> KSM frame, its generation; or an empty array) lets a policy that
    merges every arriving page at once (the oracle) skip the fresh frame it would free again: an
    arrival with no trace frame id whose content is zero or has a live KSM page in ``kpage`` is
    merged right here, with the accounting of ``merge_zero`` / ``merge`` -- valid only when no
    arrival of the snapshot has a trace frame id (nothing else could change those frames first).
    The indices of the other arrivals go to ``pend`` (unless it is empty); returns their number."""
    opc = ec[C_OPROC]
    odom = ec[C_ODOM]
    keep = len(pend) > 0
    m = 0
    short = len(kpage) > 0
    n = len(pgs)
    for i in range(n):
        # cache hints: the page row far ahead; the frame id or KSM page row of an event ahead;
        # the frame row of one nearer (or of a free slot)
        if i + 2 * PF_EVENTS < n:
            prefetch_row(P, pgs[i + 2 * PF_EVENTS])
        if i + PF_EVENTS < n:
            ga = gids[i + PF_EVENTS]
            if ga >= 0:
                prefetch_row(G, ga)
            elif short and cids[i + PF_EVENTS] >= 0:
                prefetch_row(kpage, cids[i + PF_EVENTS])
        if i + PF_EVENTS // 2 < n:
            ca = cids[i + PF_EVENTS // 2]
            if short and ca > 0 and kpage[ca, 0] > 0:
                prefetch_row(F, kpage[ca, 0])
            elif ca >= 0:
                j = ec[C_NFREE] - PF_EVENTS // 2
                if j >= 0:
                    prefetch_row(F, F[j, F_FREEL])
        pg = pgs[i]
        k = kinds[i]
        if not is_arrival(k):
            continue
        if P[pg, P_CID] >= 0:  # already a candidate (cannot happen after step 1)
            continue
        g = gids[i]
        c = cids[i]
        proc = P[pg, P_PROC]
        dom = ec[odom + proc]
        if short and g < 0:
            if c == 0:  # merge_zero, without the frame in between
                P[pg, P_FRAME] = ZERO_FRAME
                P[pg, P_CID] = 0
                P[pg, P_SINCE] = s
                P[pg, P_THP] = thps[i]
                ec[C_CAND] += 1
                ec[opc + 2 * proc] += 1
                ec[opc + 2 * proc + 1] += 1
                ec[C_MERGES] += 1
                ec[LAT0] += 1  # merged at once: latency 0
                if first[pg] < 0:
                    first[pg] = now
                ec[C_KSM_ZERO] += 1
                continue
            kf = kpage[c, 0]
            if kf > 0 and F[kf, F_REF] > 0 and F[kf, F_KSM] == 1 and F[kf, F_GEN] == kpage[c, 1]:
                # merge onto the live KSM page: its content exists since F_SINCE <= s, so latency 0
                P[pg, P_FRAME] = kf
                P[pg, P_CID] = c
                P[pg, P_SINCE] = s
                P[pg, P_THP] = thps[i]
                F[kf, F_REF] += 1
                ec[C_CAND] += 1
                ec[opc + 2 * proc] += 1
                ec[opc + 2 * proc + 1] += 1
                ec[C_MERGES] += 1
                ec[LAT0] += 1
                if first[pg] < 0:
                    first[pg] = now
                if F[kf, F_FDOM] != dom:
                    ec[C_EXPOSED] += 1
                    F[kf, F_FDOM] = -2
                continue
        f = G[g, G_SLOT] if g >= 0 else -1
        if f < 0:
            a = G[g, G_ASLOT] if g >= 0 else -1
            # a fork child of a page that was merged away maps the KSM page its parent maps
            if (k == EV_APPEAR and a > 0 and proc_new[proc] and F[a, F_REF] > 0 and F[a, F_KSM] == 1
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
                F[f, F_SINCE] = s
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
        P[pg, P_SINCE] = s
        P[pg, P_THP] = thps[i]
        ec[C_CAND] += 1
        ec[opc + 2 * proc] += 1
        if F[f, F_KSM] == 1:
            ec[opc + 2 * proc + 1] += 1
        if keep:
            pend[m] = i
        m += 1
    return m


@njit(cache=True)
def apply_events(E, pgs, kinds, cids, gids, thps, proc_new, s, now):
    """Apply snapshot ``s``'s events at virtual time ``now``: removals first, then arrivals.

    Returns the number of COW breaks of merged pages this snapshot caused.
    """
    ec = E.ec
    ec[ec[C_OTIME] + s] = now
    cows = apply_removals(E.pg, E.fr, E.gm, ec, pgs, kinds, thps)
    apply_arrivals(E.pg, E.fr, E.gm, ec, E.first, pgs, kinds, cids, gids, thps, proc_new, s, now,
                   np.zeros((0, 2), np.int32), np.zeros(0, np.int64))
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
def write_fault(E, pg, c, now, slot):
    """A recorded write fault on ``pg`` at ``now`` (``--writes faults``); ``c`` is the content after
    it (-1: the same bytes); ``slot``: the fault's time slot (after the snapshots', see new_arrays).
    As ``do_wp_page``: a write to a KSM page copies it (``COW_KSM``), to the policy's zero page
    allocates a page (``cow_zero``), to a frame another page maps (fork) copies it; the page ends
    with a frame of its own either way (an exclusive frame is reused in the kernel: the frame count
    is the same).  Returns the KSM COW breaks (0 or 1), -1 when the page is not a candidate now
    (nothing to write)."""
    P = E.pg
    F = E.fr
    ec = E.ec
    if P[pg, P_CID] < 0:
        return -1
    f = P[pg, P_FRAME]
    proc = P[pg, P_PROC]
    cow = 0
    if _merged_a(P, F, pg):
        if f != ZERO_FRAME:
            cow = 1
            ec[C_COW] += 1
        else:
            ec[C_COW_ZERO] += 1
            ec[C_KSM_ZERO] -= 1
        ec[ec[C_OPROC] + 2 * proc + 1] -= 1
    if c < 0:
        c = P[pg, P_CID]
    _release_a(P, F, E.gm, ec, pg)
    P[pg, P_FRAME] = -1
    if ec[C_NFREE] == 0:  # (cannot happen: a slot was just freed or the page had none)
        P[pg, P_CID] = -1
        ec[C_CAND] -= 1
        ec[ec[C_OPROC] + 2 * proc] -= 1
        ec[C_VIOLATIONS] += 1
        return cow
    ec[ec[C_OTIME] + slot] = now
    ec[C_NFREE] -= 1
    nf = F[ec[C_NFREE], F_FREEL]
    F[nf, F_KSM] = 0
    F[nf, F_CID] = c
    F[nf, F_GID] = -1
    F[nf, F_SINCE] = slot
    F[nf, F_FDOM] = _dom(ec, proc)
    F[nf, F_REF] = 1
    ec[C_FRAMES] += 1
    P[pg, P_FRAME] = nf
    P[pg, P_CID] = c
    P[pg, P_SINCE] = slot
    return cow


@njit(cache=True)
def _recount_merged(E):
    """Merged pages per process from scratch (after a fork-shared frame became a KSM page)."""
    P = E.pg
    F = E.fr
    ec = E.ec
    opc = ec[C_OPROC]
    n_procs = (ec[C_ODOM] - opc) // 2
    for i in range(n_procs):
        ec[opc + 2 * i + 1] = 0
    for pg in range(P.shape[0]):
        if P[pg, P_CID] >= 0 and _merged_a(P, F, pg):
            ec[opc + 2 * P[pg, P_PROC] + 1] += 1
    ec[C_PDIRTY] = 0


def per_process_counts(E, n_procs):
    """Candidate pages and merged pages (on a KSM page or the policy's zero page) per process.

    Kept up to date by every primitive; only after a frame several pages map without a merge
    (fork sharing) became a KSM page is there a pass over the pages, once."""
    ec = E.ec
    if ec[C_PDIRTY]:
        _recount_merged(E)
    o = int(ec[C_OPROC])
    pc = ec[o : o + 2 * n_procs]
    return pc[0::2].copy(), pc[1::2].copy()
