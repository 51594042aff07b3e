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
from numba import njit

ZERO_FRAME = 0

# indices into the engine counter array
C_FRAMES = 0  # frames in use by candidate pages (zero page excluded)
C_COW = 1  # cumulative COW breaks of merged pages (cow_ksm)
C_MERGES = 2  # cumulative merges (a page stops using a frame of its own)
C_EXPOSED = 3  # cumulative merges across security domains
C_KSM_ZERO = 4  # pages currently mapped to the zero page by the policy (ksm_zero_pages)
C_ZERO_REMAP = 5  # cumulative pages freed by a THP split mapping zero subpages to the zero page
C_VIOLATIONS = 6  # contract violations (merges of unequal content...)
C_LAT_SUM = 7  # cumulative merge latency, ns
C_CAND = 8  # candidate pages now
C_UNMERGED = 9  # cumulative COW breaks caused by a VMA becoming unmergeable (part of C_COW)
C_SPLITS = 10  # cumulative THP splits
N_COUNTERS = 11
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
)

N_LAT_BINS = 168


@njit(cache=True)
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


EngineArrays = namedtuple(
    "EngineArrays",
    [
        "cid",  # int32 [pages]  content now, -1 if not a candidate
        "frame",  # int64 [pages]  frame mapped, -1 if not a candidate
        "since",  # int64 [pages]  virtual time (ns) the page got its current content
        "zksm",  # uint8 [pages]  1 = mapped to the zero page by the policy (use_zero_pages)
        "thp",  # int64 [pages]  huge page id, -1
        "dom",  # int32 [pages]  security domain of the page's process
        "fref",  # int32 [frames] candidate pages mapping the frame
        "fksm",  # uint8 [frames] 1 = a KSM page (write-protected, copied on write)
        "fgen",  # int32 [frames] bumped each time the frame becomes a KSM page
        "fcid",  # int32 [frames] content of the frame
        "falias",  # int64 [frames] frame its pages were merged into (for fork children), -1
        "fsince",  # int64 [frames] since when the frame's content has existed
        "fdom",  # int32 [frames] domain of the frame's pages (-2 = mixed)
        "tsplit",  # uint8 [thp]   1 = huge page already split
        "cnt",  # int64 [N_COUNTERS]
        "lat",  # int64 [N_LAT_BINS] merge-latency histogram (cumulative)
    ],
)


def new_arrays(prep) -> EngineArrays:
    n, f = prep.n_pages, prep.n_gids
    return EngineArrays(
        cid=np.full(n, -1, np.int32),
        frame=np.full(n, -1, np.int64),
        since=np.zeros(n, np.int64),
        zksm=np.zeros(n, np.uint8),
        thp=np.full(n, -1, np.int64),
        dom=prep.proc_domain[prep.page_proc].astype(np.int32),
        fref=np.zeros(f, np.int32),
        fksm=np.zeros(f, np.uint8),
        fgen=np.zeros(f, np.int32),
        fcid=np.full(f, -1, np.int32),
        falias=np.full(f, -1, np.int64),
        fsince=np.zeros(f, np.int64),
        fdom=np.full(f, -1, np.int32),
        tsplit=np.zeros(max(prep.n_thp, 1), np.uint8),
        cnt=np.zeros(N_COUNTERS, np.int64),
        lat=np.zeros(N_LAT_BINS, np.int64),
    )


# ---------------------------------------------------------------------------------------------
# primitives (called from policies' jitted loops)
@njit(cache=True)
def is_candidate(E, pg):
    return E.cid[pg] >= 0


@njit(cache=True)
def page_is_ksm(E, pg):
    """The page maps a KSM page (not the zero page)."""
    f = E.frame[pg]
    return f > 0 and E.fksm[f] == 1


@njit(cache=True)
def frame_alive(E, f, gen):
    """Keyhole check: frame ``f`` is still the KSM page of generation ``gen``."""
    return f > 0 and E.fref[f] > 0 and E.fksm[f] == 1 and E.fgen[f] == gen


@njit(cache=True)
def _release(E, pg):
    f = E.frame[pg]
    if f > 0:
        E.fref[f] -= 1
        if E.fref[f] == 0:
            E.cnt[C_FRAMES] -= 1


@njit(cache=True)
def stabilize(E, pg):
    """Make the frame ``pg`` maps a KSM page (write-protect it).  Returns its generation."""
    f = E.frame[pg]
    if f <= 0 or E.cid[pg] < 0:
        E.cnt[C_VIOLATIONS] += 1
        return -1
    if E.fksm[f] == 0:
        E.fksm[f] = 1
        E.fgen[f] += 1
    return E.fgen[f]


@njit(cache=True)
def _account_merge(E, pg, partner_since, partner_dom, now):
    E.cnt[C_MERGES] += 1
    s = E.since[pg]
    if partner_since > s:
        s = partner_since
    lat = now - s
    if lat < 0:
        lat = 0
    E.cnt[C_LAT_SUM] += lat
    E.lat[lat_bin(lat)] += 1
    if partner_dom != E.dom[pg]:
        E.cnt[C_EXPOSED] += 1


@njit(cache=True)
def merge(E, pg, f, now):
    """Map ``pg`` onto KSM page ``f`` (replace_page).  Returns True on success."""
    if E.cid[pg] < 0 or f <= 0 or E.fref[f] <= 0 or E.fksm[f] == 0 or E.fcid[f] != E.cid[pg]:
        E.cnt[C_VIOLATIONS] += 1
        return False
    old = E.frame[pg]
    if old == f:
        return True
    _account_merge(E, pg, E.fsince[f], E.fdom[f], now)
    if E.fdom[f] != E.dom[pg]:
        E.fdom[f] = -2
    _release(E, pg)
    if old > 0:
        E.falias[old] = f
    E.frame[pg] = f
    E.fref[f] += 1
    return True


@njit(cache=True)
def merge_zero(E, pg, now):
    """Map ``pg`` (all zero) onto the kernel zero page, as use_zero_pages does."""
    if E.cid[pg] != 0 or E.frame[pg] <= 0:
        E.cnt[C_VIOLATIONS] += 1
        return False
    _account_merge(E, pg, 0, E.dom[pg], now)
    _release(E, pg)
    E.frame[pg] = ZERO_FRAME
    E.zksm[pg] = 1
    E.cnt[C_KSM_ZERO] += 1
    return True


@njit(cache=True)
def split_thp(E, pg, lo, hi, remap_zero):
    """Split the huge page ``pg`` belongs to (KSM does before merging a subpage).

    With ``remap_zero`` (Linux 6.12+) every all-zero subpage is mapped to the shared zero page:
    its frame is freed and it stops being a candidate, with no KSM counter change.
    ``lo``/``hi`` bound the page ids of ``pg``'s process.  Returns the number of pages remapped.
    """
    t = E.thp[pg]
    if t < 0 or E.tsplit[t] == 1:
        return 0
    E.tsplit[t] = 1
    E.cnt[C_SPLITS] += 1
    a = pg - 511
    if a < lo:
        a = lo
    b = pg + 512
    if b > hi:
        b = hi
    n = 0
    for q in range(a, b):
        if E.thp[q] == t:
            E.thp[q] = -1
            if remap_zero and E.cid[q] == 0 and E.frame[q] > 0 and E.fksm[E.frame[q]] == 0:
                _release(E, q)
                E.frame[q] = -1
                E.cid[q] = -1
                E.cnt[C_CAND] -= 1
                n += 1
    E.cnt[C_ZERO_REMAP] += n
    return n


# ---------------------------------------------------------------------------------------------
# snapshot application (the engine's own job, once per snapshot)
@njit(cache=True)
def apply_events(E, pgs, kinds, cids, gids, thps, proc_new, page_proc, now):
    """Apply one snapshot's events at virtual time ``now``: removals first, then arrivals.

    Returns the number of COW breaks of merged pages this snapshot caused.
    """
    cows = 0
    n = len(pgs)
    # 1. pages that stop being candidates or are written leave their frame
    for i in range(n):
        pg = pgs[i]
        k = kinds[i]
        if E.cid[pg] < 0:
            continue
        if k == 2 or k == 3 or k == 4:  # gone, unmerge, write
            f = E.frame[pg]
            merged = (f > 0 and E.fksm[f] == 1) or E.zksm[pg] == 1
            if merged and (k == 4 or k == 3):
                cows += 1
                if k == 3:
                    E.cnt[C_UNMERGED] += 1
            if E.zksm[pg] == 1:
                E.zksm[pg] = 0
                E.cnt[C_KSM_ZERO] -= 1
            _release(E, pg)
            E.frame[pg] = -1
            E.cid[pg] = -1
            E.cnt[C_CAND] -= 1
        elif k == 5:
            E.thp[pg] = thps[i]
    # 2. arrivals: new candidates and the new content of written pages
    for i in range(n):
        pg = pgs[i]
        k = kinds[i]
        if not (k == 1 or k == 4):
            continue
        if E.cid[pg] >= 0:  # already a candidate (cannot happen after step 1)
            continue
        g = gids[i]
        c = cids[i]
        f = g
        if E.fref[g] == 0:
            a = E.falias[g]
            # a fork child of a page that was merged away maps the KSM page its parent maps
            if k == 1 and proc_new[page_proc[pg]] and a > 0 and E.fref[a] > 0 and E.fcid[a] == c:
                f = a
            else:
                E.fksm[g] = 0
                E.fcid[g] = c
                E.falias[g] = -1
                E.fsince[g] = now
                E.fdom[g] = E.dom[pg]
        if f != g:
            pass
        elif E.fdom[g] != E.dom[pg]:
            E.fdom[g] = -2
        if E.fref[f] == 0:
            E.cnt[C_FRAMES] += 1
        E.fref[f] += 1
        E.frame[pg] = f
        E.cid[pg] = c
        E.since[pg] = now
        E.thp[pg] = thps[i]
        E.cnt[C_CAND] += 1
    E.cnt[C_COW] += cows
    return cows
