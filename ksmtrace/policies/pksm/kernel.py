"""The numba kernel of ``pksm`` and ``pksm-delay``: the accelerator of
:class:`~ksmtrace.policies.pksm.runtime.PksmRuntime`, the same algorithm on numpy arrays, one jitted
call per snapshot (the hooks) and one per interval (pksmd).

Layout: the policy's rmap (frame -> its pages, in mapping order) is a doubly linked list threaded
through the page rows; rmap items live in item rows with a free list (grown from Python between
snapshots when a snapshot could register more items than are free); the new and rescan lists, the
unstable checksum list and the del list are linked lists through the item rows; the two trees are
key-indexed rows (key = dense sampled hash or content id).  Every function mirrors a method of the
reference, in the same order; the differential tests hold them equal on every column.

Packed state (numba passes each array of a tuple to a non-inlined function separately, with
reference counting, and reads tuple fields inside loops with reference counting it cannot prune):
one wide int64 array per kind of object (``IT`` items, ``PG`` pages, ``FR`` frames, ``KY`` tree
keys), the free list ``fl``, and ``sc``: the daemon's block (:mod:`ksmtrace.engine.daemon`), the
policy's scalars, its parameters (slots named after ``PksmParams``' fields), the local list of a
wake-up, and each process's page range.  Every jitted entry point
binds the arrays to locals; the per-visit path (list moves, probation, cmp_and_merge_page up to the
trees, the unstable recheck) is written out on them with small inlined helpers that take arrays;
merges (rmap walks) are ordinary calls.  The hooks prefetch the rows of the events a few iterations
ahead (``prefetch_row``: a cache hint, no effect on results).  The recheck's rotate mode keeps the
checksum list's length in ``S_CK_N`` instead of walking the list every wake-up.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.api import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE
from ksmtrace.engine.cost import UNIT_INDEX
from ksmtrace.engine.daemon import (D_ERR, D_NOW, DU, KernelRuntime, new_block, param_slots, params_array,
                                    scalar_slots, sleep, wake_up)
from ksmtrace.jitutil import bitlen as _bitlen
from ksmtrace.jitutil import prefetch_row
from ksmtrace.engine.state import P_CID, P_FRAME, P_PROC
from ksmtrace.policies import hashkeys
from ksmtrace.policies.pksm import PksmParams
from ksmtrace.policies.pksm.runtime import (DROP, SUCCESS, TRY, AnonVmaWalk, Probation, event_keys, pksm_counters,
                                            pksm_extras)
from ksmtrace.policies.sameaddr import SameAddress
from ksmtrace.trace.addrspace import _row_at, tree_rows

U_WAKEUPS = UNIT_INDEX["wakeups"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_FREE = UNIT_INDEX["rmap_frees"]
U_HCMP = UNIT_INDEX["hash_compares"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_ZCHECK = UNIT_INDEX["zero_checks"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]
U_PRUNE = UNIT_INDEX["stale_prunes"]
U_MOVES = UNIT_INDEX["list_moves"]
U_WALKED = UNIT_INDEX["addresses_walked"]
U_UNODE = UNIT_INDEX["unstable_node_visits"]

# sc: the daemon's slots (D_*), then the policy's scalars
(S_WAKE, S_RMAP, S_SHARED, S_SHARING, S_ZSHARING, S_SNODES, S_COLL,
 S_PEND, S_PCHG, S_PDIED, S_STCOUNT, S_UNCOUNT, S_NFREE,
 S_NEW_H, S_NEW_T, S_NEW_N, S_RES_H, S_RES_T, S_RES_N, S_CK_H, S_CK_T, S_DEL_H, S_DEL_T,
 S_CK_N, S_OLOC, S_OPROC, S_NPROC, S_SNAP) = scalar_slots(28)
N_SCALARS = 28
# then the parameters (at OP): PksmParams' fields by name, then values derived from them; then the
# local list (at sc[S_OLOC], 2 * pages_to_scan + 8 slots) and each process's first and end page
# (at sc[S_OPROC], n_procs + n_procs)
P = param_slots(PksmParams, derived=("delay", "probation_passes", "probation_ns", "restart", "hz", "zero_key", "walk_on",
                                     "hash_unit", "hash_n"))
OP = scalar_slots(N_SCALARS).stop

W_NONE, W_NEW, W_RESCAN, W_LOCAL = 0, 1, 2, 3
T_NONE, T_UNSTABLE, T_STABLE = 0, 1, 2

ITEM_FIELDS = [
    "it_frame", "it_where", "it_tree", "it_dell", "it_inksm", "it_init", "it_sum", "it_map", "it_nanon",
    "it_next", "it_prev", "ck_next", "ck_prev", "del_next", "it_cnt", "it_t0", "it_seen", "it_wake",
    "it_changed", "it_origin", "it_group",
]
PAGE_FIELDS = ["pg_frame", "pg_key", "pg_next", "pg_prev", "mv_item"]
FRAME_FIELDS = ["fr_head", "fr_tail", "fr_cnt", "fr_item", "fr_ksm"]
KEY_FIELDS = ["st_item", "un_item"]
# column indices: one wide int64 array per kind of object (items, pages, frames, tree keys), one
# row per object, so that the fields of one object share a cache line and numba passes few arrays
(I_IT_FRAME, I_IT_WHERE, I_IT_TREE, I_IT_DELL, I_IT_INKSM, I_IT_INIT, I_IT_SUM, I_IT_MAP, I_IT_NANON,
 I_IT_NEXT, I_IT_PREV, I_CK_NEXT, I_CK_PREV, I_DEL_NEXT, I_IT_CNT, I_IT_T0, I_IT_SEEN, I_IT_WAKE,
 I_IT_CHANGED, I_IT_ORIGIN, I_IT_GROUP) = range(len(ITEM_FIELDS))
N_ICOLS = len(ITEM_FIELDS)
G_PG_FRAME, G_PG_KEY, G_PG_NEXT, G_PG_PREV, G_MV_ITEM = range(len(PAGE_FIELDS))
R_FR_HEAD, R_FR_TAIL, R_FR_CNT, R_FR_ITEM, R_FR_KSM = range(len(FRAME_FIELDS))
K_ST_ITEM, K_UN_ITEM = range(len(KEY_FIELDS))
ITEM_FILL = {"it_frame": -1, "it_sum": -1, "it_next": -1, "it_prev": -1, "ck_next": -1, "ck_prev": -1, "del_next": -1, "it_seen": -1, "it_wake": -1,
             "it_origin": -1, "it_group": -1}
ITEM_ROW = np.array([ITEM_FILL.get(n, 0) for n in ITEM_FIELDS], np.int64)

# prefetch distances (iterations ahead) in loops over random rows
PF_FAR = 16
PF_NEAR = 8

PksmState = namedtuple("PksmState", ["IT", "PG", "FR", "KY", "fl", "sc", "VR", "VI", "VB", "SA"])
# The anon_vma walk's view of the trace (AnonVmaWalk, ksmtrace.trace.addrspace) packed into three
# arrays — every array of S is passed, and reference counted, at each merge call: ``VR`` one row
# per VMA row (start, end, snapshot, process, lineage group, blocked); ``VI`` a header of 9 section
# offsets, then the (snapshot, process) row offsets, the groups' tree CSR, the groups' rows CSR,
# process ranks, the prepared snapshots' trace snapshots and every page's vpn; ``VB`` scratch: the
# walk's pages, then the tree's rows (VB[0]: where those start).  ``SA``: SameAddress.buf.
V_START, V_END, V_SNAP, V_PROC, V_GROUP, V_BLOCKED = range(6)


def _anon_vma(walk: AnonVmaWalk, prep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vpn = prep.page_vpn.astype(np.int64)
    if walk.on:
        a = walk.asp
        vr = np.stack([a.start, a.end, a.snap, a.proc, a.group, walk.blocked], axis=1).astype(np.int64)
        parts = [a.off, a.desc_off, a.desc, a.grow_off, a.grow, a.proc_rank, walk.snap, vpn]
        n_rows = int(np.bincount(a.snap, minlength=1).max())
    else:
        vr = np.zeros((1, 6), np.int64)
        z = np.zeros(1, np.int64)
        parts = [z, z, z, z, z, z, z, vpn]
        n_rows = 0
    head = np.cumsum([9] + [len(x) for x in parts])
    vi = np.concatenate([head, *[np.asarray(x, np.int64) for x in parts]])
    n_pages = prep.n_pages + 8
    vb = np.zeros(1 + n_pages + n_rows + 8, np.int64)
    vb[0] = 1 + n_pages
    return vr, vi, vb


def _items(cap: int) -> np.ndarray:
    return np.tile(ITEM_ROW, (cap, 1))


def new_state(prep, params, ctx, probation, n_keys: int, zero_key: int, walk: AnonVmaWalk, same) -> PksmState:
    n, f, np_ = prep.n_pages, st.n_frame_slots(prep), prep.n_procs
    cap = max(64, n // 4)
    rule = probation or Probation(0, 0, False)
    hash_unit, hash_n = hashkeys.hash_cost(params.hash_strength)
    pa = params_array(params, P, {"delay": probation is not None, "probation_passes": rule.passes,
                                  "probation_ns": rule.ns, "restart": rule.restart, "hz": ctx.hz,
                                  "zero_key": zero_key, "walk_on": walk.on, "hash_unit": UNIT_INDEX[hash_unit],
                                  "hash_n": hash_n})
    vr, vi, vb = _anon_vma(walk, prep)
    n_loc = 2 * int(params.pages_to_scan) + 8
    sc = new_block(N_SCALARS, len(P), ctx, extra=n_loc + 2 * np_)
    o_loc = OP + len(P)
    o_proc = o_loc + n_loc
    sc[OP : OP + len(P)] = pa
    sc[S_NFREE] = cap
    for h in (S_NEW_H, S_NEW_T, S_RES_H, S_RES_T, S_CK_H, S_CK_T, S_DEL_H, S_DEL_T):
        sc[h] = -1
    sc[S_OLOC] = o_loc
    sc[S_OPROC] = o_proc
    sc[S_NPROC] = np_
    sc[o_proc : o_proc + np_] = prep.proc_pg_lo
    sc[o_proc + np_ : o_proc + 2 * np_] = prep.proc_pg_hi
    PG = np.full((n, len(PAGE_FIELDS)), -1, np.int64)
    PG[:, G_MV_ITEM] = -2
    FR = np.full((f, len(FRAME_FIELDS)), -1, np.int64)
    FR[:, R_FR_CNT] = 0
    FR[:, R_FR_KSM] = 0
    return PksmState(
        IT=_items(cap), PG=PG, FR=FR, KY=np.full((n_keys, len(KEY_FIELDS)), -1, np.int64),
        fl=np.arange(cap - 1, -1, -1, dtype=np.int64), sc=sc, VR=vr, VI=vi, VB=vb, SA=same.buf,
    )


def grow(S: PksmState, extra: int) -> PksmState:
    """More item slots (from Python, between jitted calls)."""
    old = len(S.IT)
    new = max(2 * old, old + extra + 64)
    IT = np.empty((new, N_ICOLS), np.int64)  # (one pass over the new memory, not tile + concatenate)
    IT[:old] = S.IT
    IT[old:] = ITEM_ROW
    nfree = int(S.sc[S_NFREE])
    # the free list must hold every slot (all may be freed at once), not just today's free ones
    fl = np.concatenate([S.fl[:nfree], np.arange(new - 1, old - 1, -1, dtype=np.int64),
                         np.zeros(old - nfree, dtype=np.int64)])
    S.sc[S_NFREE] = nfree + (new - old)
    return S._replace(IT=IT, fl=fl)


# --- the rmap ----------------------------------------------------------------------------------------
@njit(inline="always")
def _map(PG, FR, pg, f):
    PG[pg, G_PG_FRAME] = f
    if f <= 0:
        return False
    was_empty = FR[f, R_FR_CNT] == 0
    t = FR[f, R_FR_TAIL]
    PG[pg, G_PG_PREV] = t
    PG[pg, G_PG_NEXT] = -1
    if t >= 0:
        PG[t, G_PG_NEXT] = pg
    else:
        FR[f, R_FR_HEAD] = pg
    FR[f, R_FR_TAIL] = pg
    FR[f, R_FR_CNT] += 1
    return was_empty


@njit(inline="always")
def _unmap(PG, FR, pg):
    f = PG[pg, G_PG_FRAME]
    PG[pg, G_PG_FRAME] = -1
    if f <= 0:
        return -1
    p = PG[pg, G_PG_PREV]
    n = PG[pg, G_PG_NEXT]
    if p >= 0:
        PG[p, G_PG_NEXT] = n
    else:
        FR[f, R_FR_HEAD] = n
    if n >= 0:
        PG[n, G_PG_PREV] = p
    else:
        FR[f, R_FR_TAIL] = p
    PG[pg, G_PG_NEXT] = -1
    PG[pg, G_PG_PREV] = -1
    FR[f, R_FR_CNT] -= 1
    return FR[f, R_FR_CNT]


# --- lists -------------------------------------------------------------------------------------------
@njit(inline="always")
def _list_append(IT, sc, it, w):
    hi = S_NEW_H if w == W_NEW else S_RES_H
    t = sc[hi + 1]
    IT[it, I_IT_PREV] = t
    IT[it, I_IT_NEXT] = -1
    if t >= 0:
        IT[t, I_IT_NEXT] = it
    else:
        sc[hi] = it
    sc[hi + 1] = it
    sc[hi + 2] += 1
    IT[it, I_IT_WHERE] = w


@njit(inline="always")
def _list_remove(IT, sc, it):
    w = IT[it, I_IT_WHERE]
    hi = S_NEW_H if w == W_NEW else S_RES_H
    p = IT[it, I_IT_PREV]
    n = IT[it, I_IT_NEXT]
    if p >= 0:
        IT[p, I_IT_NEXT] = n
    else:
        sc[hi] = n
    if n >= 0:
        IT[n, I_IT_PREV] = p
    else:
        sc[hi + 1] = p
    sc[hi + 2] -= 1
    IT[it, I_IT_NEXT] = -1
    IT[it, I_IT_PREV] = -1
    IT[it, I_IT_WHERE] = W_NONE


@njit(inline="always")
def _ck_append(IT, sc, it):
    t = sc[S_CK_T]
    IT[it, I_CK_PREV] = t
    IT[it, I_CK_NEXT] = -1
    if t >= 0:
        IT[t, I_CK_NEXT] = it
    else:
        sc[S_CK_H] = it
    sc[S_CK_T] = it
    sc[S_CK_N] += 1


@njit(inline="always")
def _ck_remove(IT, sc, it):
    p = IT[it, I_CK_PREV]
    n = IT[it, I_CK_NEXT]
    if p >= 0:
        IT[p, I_CK_NEXT] = n
    else:
        sc[S_CK_H] = n
    if n >= 0:
        IT[n, I_CK_PREV] = p
    else:
        sc[S_CK_T] = p
    IT[it, I_CK_NEXT] = -1
    IT[it, I_CK_PREV] = -1
    sc[S_CK_N] -= 1


@njit(inline="always")
def _free_slot(IT, fl, sc, it):
    IT[it, I_IT_FRAME] = -1
    fl[sc[S_NFREE]] = it
    sc[S_NFREE] += 1


# --- hooks ---------------------------------------------------------------------------------------------
@njit
def _item_page_freed(IT, fl, sc, it):
    if IT[it, I_IT_MAP] > 0:
        sc[S_SHARING] -= IT[it, I_IT_MAP]
        IT[it, I_IT_MAP] = 0
    IT[it, I_IT_FRAME] = -1
    w = IT[it, I_IT_WHERE]
    if w == W_NEW or w == W_RESCAN:
        if w == W_NEW and IT[it, I_IT_CNT] > 0:
            sc[S_PDIED] += 1
        _list_remove(IT, sc, it)
        sc[S_RMAP] -= 1
        _free_slot(IT, fl, sc, it)
    else:
        IT[it, I_IT_DELL] = 1
        IT[it, I_DEL_NEXT] = -1
        t = sc[S_DEL_T]
        if t >= 0:
            IT[t, I_DEL_NEXT] = it
        else:
            sc[S_DEL_H] = it
        sc[S_DEL_T] = it


@njit(inline="always")
def _page_freed(IT, FR, fl, sc, f):
    """pksm_del_anon_page for the physical page f (its last mapping went)."""
    FR[f, R_FR_KSM] = 0
    it = FR[f, R_FR_ITEM]
    if it >= 0:
        FR[f, R_FR_ITEM] = -1
        _item_page_freed(IT, fl, sc, it)


@njit(inline="always")
def _register(IT, FR, fl, sc, f, now):
    if sc[S_NFREE] == 0:
        sc[D_ERR] = 1
        return
    sc[S_NFREE] -= 1
    it = fl[sc[S_NFREE]]
    for k in range(N_ICOLS):
        IT[it, k] = ITEM_ROW[k]
    IT[it, I_IT_FRAME] = f
    IT[it, I_IT_INIT] = 1
    IT[it, I_IT_T0] = now
    FR[f, R_FR_ITEM] = it
    _list_append(IT, sc, it, W_NEW)
    sc[S_RMAP] += 1


@njit(inline="always")
def _unmap_sharing_page(IT, FR, sc, f):
    it = FR[f, R_FR_ITEM]
    if it < 0 or IT[it, I_IT_INKSM] == 0 or IT[it, I_IT_FRAME] < 0:
        return
    if FR[f, R_FR_CNT] > IT[it, I_IT_MAP]:
        return
    if IT[it, I_IT_MAP] > 0:
        sc[S_SHARING] -= 1
        IT[it, I_IT_MAP] -= 1


@njit(cache=True)
def on_snapshot(E, S, pgs, kinds, keys, now):
    epg = E.pg
    IT = S.IT
    PG = S.PG
    FR = S.FR
    fl = S.fl
    sc = S.sc
    trackcow = sc[OP + P.track_cow_pages] == 1
    n = len(pgs)
    for i in range(n):  # removals first
        if i + PF_FAR < n:  # (prefetch the rows of the events ahead: pages, then their frames)
            prefetch_row(PG, pgs[i + PF_FAR])
        if i + PF_NEAR < n:
            fa = PG[pgs[i + PF_NEAR], G_PG_FRAME]
            if fa > 0:
                prefetch_row(FR, fa)
        k = kinds[i]
        pg = pgs[i]
        if not (k == EV_GONE or k == EV_UNMERGE or k == EV_WRITE):
            continue
        f = PG[pg, G_PG_FRAME]
        if f < 0:
            continue
        if f > 0 and k == EV_WRITE and FR[f, R_FR_KSM] == 1:
            _unmap_sharing_page(IT, FR, sc, f)
        left = _unmap(PG, FR, pg)
        if left != 0:
            continue
        if k == EV_WRITE and FR[f, R_FR_KSM] == 0:  # written in place: the item follows the page
            PG[pg, G_MV_ITEM] = FR[f, R_FR_ITEM]
            FR[f, R_FR_ITEM] = -1
        else:
            _page_freed(IT, FR, fl, sc, f)
    for i in range(n):  # then arrivals
        if i + PF_FAR < n:
            prefetch_row(epg, pgs[i + PF_FAR])
        if i + PF_NEAR < n:
            fa = epg[pgs[i + PF_NEAR], P_FRAME]
            if fa > 0:
                prefetch_row(FR, fa)
            mva = PG[pgs[i + PF_NEAR], G_MV_ITEM]
            if mva >= 0:
                prefetch_row(IT, mva)
        k = kinds[i]
        pg = pgs[i]
        if not (k == EV_APPEAR or k == EV_WRITE) or epg[pg, P_CID] < 0:
            continue
        f = epg[pg, P_FRAME]
        PG[pg, G_PG_KEY] = keys[i]
        new_page = _map(PG, FR, pg, f)
        mv = PG[pg, G_MV_ITEM]
        if mv != -2:
            PG[pg, G_MV_ITEM] = -2
            if mv >= 0:
                if new_page:
                    IT[mv, I_IT_FRAME] = f
                    FR[f, R_FR_ITEM] = mv
                else:
                    _item_page_freed(IT, fl, sc, mv)
            continue
        if not new_page:
            continue
        if k == EV_APPEAR or trackcow:
            _register(IT, FR, fl, sc, f, now)
    for i in range(n):  # (defensive) a page written in place that vanished
        pg = pgs[i]
        mv = PG[pg, G_MV_ITEM]
        if mv != -2:
            PG[pg, G_MV_ITEM] = -2
            if mv >= 0:
                _item_page_freed(IT, fl, sc, mv)
    if sc[OP + P.walk_on] == 1:  # the origin of the items registered now (PksmRuntime._set_origin)
        VR = S.VR
        VI = S.VI
        rank = VI[VI[5]:VI[6]]
        smap = VI[VI[6]:VI[7]]
        vpn = VI[VI[7]:VI[8]]
        for i in range(n):
            k = kinds[i]
            pg = pgs[i]
            if not (k == EV_APPEAR or k == EV_WRITE) or epg[pg, P_CID] < 0:
                continue
            f = PG[pg, G_PG_FRAME]
            it = FR[f, R_FR_ITEM] if f > 0 else -1
            if it < 0 or IT[it, I_IT_ORIGIN] != -1:
                continue
            best = -1
            q = FR[f, R_FR_HEAD]
            while q >= 0:
                if best < 0 or rank[epg[q, P_PROC]] < rank[epg[best, P_PROC]] or (
                        rank[epg[q, P_PROC]] == rank[epg[best, P_PROC]] and q < best):
                    best = q
                q = PG[q, G_PG_NEXT]
            IT[it, I_IT_ORIGIN] = best
            r = _row_at(VI[VI[0]:VI[1]], VR[:, V_START], VR[:, V_END], sc[S_NPROC], smap[sc[S_SNAP]], epg[best, P_PROC],
                        vpn[best])
            IT[it, I_IT_GROUP] = VR[r, V_GROUP] if r >= 0 else -1


# --- trees ---------------------------------------------------------------------------------------------
@njit(inline="always")
def _rm_tree(IT, KY, sc, it, free_anon):
    """remove_rmap_item_from_tree."""
    t = IT[it, I_IT_TREE]
    if t == T_STABLE:
        c = IT[it, I_IT_SUM]
        if KY[c, K_ST_ITEM] == it:
            KY[c, K_ST_ITEM] = -1
            sc[S_STCOUNT] -= 1
        sc[S_SHARED] -= 1
    elif t == T_UNSTABLE:
        c = IT[it, I_IT_SUM]
        if KY[c, K_UN_ITEM] == it:
            KY[c, K_UN_ITEM] = -1
            sc[S_UNCOUNT] -= 1
        _ck_remove(IT, sc, it)
    IT[it, I_IT_TREE] = T_NONE
    if free_anon:
        sc[S_SNODES] -= IT[it, I_IT_NANON]
        IT[it, I_IT_NANON] = 0


@njit
def _prune(IT, KY, sc, t):
    """A stale item met in a tree descent leaves the tree."""
    _rm_tree(IT, KY, sc, t, False)
    sc[DU + U_PRUNE] += 1


@njit(inline="always")
def _search(IT, KY, sc, key, col, count):
    """The live item of tree ``col`` (K_ST_ITEM / K_UN_ITEM) under ``key``, or -1; stale items met
    are pruned.  The loop of stable_tree_search, unstable_tree_search_insert and stable_tree_insert."""
    while True:
        sc[DU + U_HCMP] += _bitlen(sc[count])
        t = KY[key, col]
        if t < 0:
            return -1
        if IT[t, I_IT_DELL] == 1 or IT[t, I_IT_FRAME] < 0:
            _prune(IT, KY, sc, t)
            continue
        return t


@njit(inline="always")
def _stable_tree_append(IT, sc, head):
    IT[head, I_IT_NANON] += 1
    sc[S_SNODES] += 1
    if IT[head, I_IT_NANON] == 1:
        sc[S_SHARED] += 1


@njit(inline="always")
def _key(IT, PG, FR, it):
    return PG[FR[IT[it, I_IT_FRAME], R_FR_HEAD], G_PG_KEY]


@njit
def _rmap_walk(IT, PG, FR, sc, VR, VI, VB, f):
    """pksm_rmap_walk over physical page f (PksmRuntime._rmap_walk): the mappings it visits go to
    the scratch ``VB``; returns (how many, whether the walk ends in success)."""
    out = VB[1: VB[0]]
    n = 0
    it = FR[f, R_FR_ITEM]
    g = IT[it, I_IT_GROUP] if it >= 0 else -1
    if sc[OP + P.walk_on] == 1 and g >= 0:
        vpn = VI[VI[7]:VI[8]]
        v = vpn[IT[it, I_IT_ORIGIN]]
        rows = VB[VB[0]:]
        m = tree_rows(VI[VI[1]:VI[2]], VI[VI[2]:VI[3]], VI[VI[3]:VI[4]], VI[VI[4]:VI[5]], VR[:, V_START], VR[:, V_SNAP],
                      VR[:, V_PROC], VI[VI[5]:VI[6]], VI[VI[6] + sc[S_SNAP]], g, rows)
        op = sc[S_OPROC]
        npr = sc[S_NPROC]
        for k in range(m):
            r = rows[k]
            if VR[r, V_BLOCKED] == 1:  # vma_can_enter fails
                return n, n > 0
            q = -1
            if VR[r, V_START] <= v and v < VR[r, V_END]:
                pr = VR[r, V_PROC]
                lo = sc[op + pr]
                hi = sc[op + npr + pr]
                while lo < hi:  # the page id of (pr, v)
                    mid = (lo + hi) // 2
                    if vpn[mid] < v:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < sc[op + npr + pr] and vpn[lo] == v:
                    q = lo
            if q < 0 or PG[q, G_PG_FRAME] != f:
                return n, False
            out[n] = q
            n += 1
    m = n
    q = FR[f, R_FR_HEAD]
    while q >= 0:  # the mappings the walk did not visit (all of them without the anon_vma walk)
        seen = False
        for k in range(m):
            if out[k] == q:
                seen = True
                break
        if not seen:
            out[n] = q
            n += 1
        q = PG[q, G_PG_NEXT]
    return n, True


@njit(inline="always")
def _remap_all(E, IT, PG, FR, fl, sc, S, f, target):
    """rmap walk of page f onto KSM page target (0: the zero page): (PTEs replaced, equal, walk ok).
    Inlined into the three merges below, so that a merge is one call from ksm_do_scan."""
    epg = E.pg
    nw, ok = _rmap_walk(IT, PG, FR, sc, S.VR, S.VI, S.VB, f)
    pages = S.VB[1: S.VB[0]]
    first = FR[f, R_FR_HEAD]
    pr = epg[first, P_PROC]
    op = sc[S_OPROC]
    st.split_thp(E, first, sc[op + pr], sc[op + sc[S_NPROC] + pr], False)
    cid = epg[first, P_CID]
    if target == 0:
        equal = cid == 0
    else:
        equal = cid == epg[FR[target, R_FR_HEAD], P_CID]
    done = 0
    now = sc[D_NOW]
    for j in range(nw):
        q = pages[j]
        sc[DU + U_WP] += 1
        if target == 0:
            sc[DU + U_ZCHECK] += 1
        else:
            sc[DU + U_MEMCMP] += 1
        if equal:
            sc[DU + U_REMAP] += 1
            if target == 0:
                merged = st.merge_zero(E, q, now)
            else:
                merged = st.merge(E, q, target, now)
            if merged:
                _unmap(PG, FR, q)
                _map(PG, FR, q, target)
                done += 1
    if FR[f, R_FR_CNT] == 0:
        _page_freed(IT, FR, fl, sc, f)
    return done, equal, ok


# --- cmp_and_merge_page: the rare parts (the common part is in ksm_do_scan) -------------------------------
@njit
def _merge_zero(E, S, f):
    """The sampled hash is the zero page's: SUCCESS, or -1 to go on to the trees."""
    sc = S.sc
    nz, equal, ok = _remap_all(E, S.IT, S.PG, S.FR, S.fl, sc, S, f, 0)
    sc[S_ZSHARING] += nz
    if ok and equal:
        return SUCCESS
    if ok and sc[OP + P.collision_counts_as_merge] == 1:
        sc[S_COLL] += 1
        return SUCCESS
    if S.FR[f, R_FR_CNT] == 0:  # every mapping went to the zero page before the DROP
        return SUCCESS
    return -1


@njit
def _merge_stable(E, S, f, t):
    """A stable tree item ``t`` has the key: map the page onto it."""
    IT = S.IT
    sc = S.sc
    nm, equal, ok = _remap_all(E, IT, S.PG, S.FR, S.fl, sc, S, f, IT[t, I_IT_FRAME])
    if not ok:  # the walk failed: PTEs replaced so far stay, the page is dropped
        sc[S_SHARING] += nm
        IT[t, I_IT_MAP] += nm
        return DROP
    if not equal and sc[OP + P.collision_counts_as_merge] == 0:
        return TRY
    if not equal:
        sc[S_COLL] += 1
    sc[S_SHARING] += nm
    IT[t, I_IT_MAP] += nm
    _stable_tree_append(IT, sc, t)
    return SUCCESS


@njit
def _same_address_merge(E, S, it, f, key):
    """same_address_first (PksmRuntime.same_address_merge): a result code, or -1 (no partner)."""
    epg = E.pg
    IT = S.IT
    FR = S.FR
    sc = S.sc
    n_pg = S.PG.shape[0]
    sa_cls = S.SA[:n_pg]
    sa_off = S.SA[n_pg: 2 * n_pg + 2]
    sa_mem = S.SA[2 * n_pg + 2:]
    pg = FR[f, R_FR_HEAD]
    c = epg[pg, P_CID]
    proc = epg[pg, P_PROC]
    cls = sa_cls[pg]
    if cls < 0:
        return -1
    for j in range(sa_off[cls], sa_off[cls + 1]):
        q = sa_mem[j]
        if q == pg or epg[q, P_PROC] == proc:
            continue
        if epg[q, P_CID] < 0 or epg[q, P_FRAME] == 0:
            sc[DU + U_WALKED] += 1
            continue
        sc[DU + U_UNODE] += 1
        fq = epg[q, P_FRAME]
        if fq == f or epg[q, P_CID] != c:
            continue
        t = FR[fq, R_FR_ITEM]
        if t < 0 or IT[t, I_IT_DELL] == 1 or IT[t, I_IT_FRAME] < 0:
            continue
        if IT[t, I_IT_TREE] == T_STABLE:
            return _merge_stable(E, S, f, t)
        if FR[fq, R_FR_KSM] == 1:
            continue
        return _merge_unstable(E, S, it, f, t, key)
    return -1


@njit
def _merge_unstable(E, S, it, f, t, key):
    """An unstable tree item ``t`` has the key: try_to_merge_two_pages, then the stable tree."""
    epg = E.pg
    IT = S.IT
    PG = S.PG
    FR = S.FR
    KY = S.KY
    sc = S.sc
    tf = IT[t, I_IT_FRAME]
    equal = epg[FR[f, R_FR_HEAD], P_CID] == epg[FR[tf, R_FR_HEAD], P_CID]
    if not equal and sc[OP + P.collision_counts_as_merge] == 0:
        return TRY
    head = FR[f, R_FR_HEAD]
    pr = epg[head, P_PROC]
    op = sc[S_OPROC]
    st.split_thp(E, head, sc[op + pr], sc[op + sc[S_NPROC] + pr], False)
    nw, ok = _rmap_walk(IT, PG, FR, sc, S.VR, S.VI, S.VB, f)
    sc[DU + U_WP] += nw
    if nw > 0:
        st.stabilize(E, FR[f, R_FR_HEAD])
        FR[f, R_FR_KSM] = 1
    if not ok:
        return DROP
    nm, equal, ok = _remap_all(E, IT, PG, FR, S.fl, sc, S, tf, f)
    if not equal:
        sc[S_COLL] += 1
    sc[S_SHARING] += nm
    IT[it, I_IT_MAP] += nm
    if not ok:  # the tree item stays in the unstable tree; the scanned page is dropped
        return DROP
    _rm_tree(IT, KY, sc, t, False)
    if _search(IT, KY, sc, key, K_ST_ITEM, S_STCOUNT) >= 0:  # stable_tree_insert
        return TRY
    IT[it, I_IT_TREE] = T_STABLE
    KY[key, K_ST_ITEM] = it
    sc[S_STCOUNT] += 1
    _stable_tree_append(IT, sc, it)
    _stable_tree_append(IT, sc, it)
    return SUCCESS


# --- pksmd ----------------------------------------------------------------------------------------------
@njit(inline="always")
def _probation_over(IT, PG, FR, sc, it):
    IT[it, I_IT_CNT] += 1
    if IT[it, I_IT_CNT] > sc[OP + P.probation_passes] and sc[D_NOW] - IT[it, I_IT_T0] >= sc[OP + P.probation_ns]:
        return True
    IT[it, I_IT_WAKE] = sc[S_WAKE]
    sc[DU + U_VISITED] += 1
    sc[DU + sc[OP + P.hash_unit]] += sc[OP + P.hash_n]
    h = _key(IT, PG, FR, it)
    if IT[it, I_IT_SEEN] >= 0 and h != IT[it, I_IT_SEEN]:
        if IT[it, I_IT_CHANGED] == 0:
            IT[it, I_IT_CHANGED] = 1
            sc[S_PCHG] += 1
        if sc[OP + P.restart] == 1:
            IT[it, I_IT_CNT] = 0
            IT[it, I_IT_T0] = sc[D_NOW]
    IT[it, I_IT_SEEN] = h
    return False


@njit(inline="always")
def _drop(IT, FR, fl, sc, it):
    if IT[it, I_IT_DELL] == 1:  # already on the del list (PksmRuntime._drop)
        return
    sc[S_SNODES] -= IT[it, I_IT_NANON]
    IT[it, I_IT_NANON] = 0
    f = IT[it, I_IT_FRAME]
    if f >= 0 and FR[f, R_FR_ITEM] == it:
        FR[f, R_FR_ITEM] = -1
    IT[it, I_IT_FRAME] = -1
    sc[S_RMAP] -= 1
    sc[DU + U_FREE] += 1
    if IT[it, I_IT_TREE] == T_NONE:
        _free_slot(IT, fl, sc, it)
    # (an item dropped while in a tree stays there, stale, as in PKSM; its slot is not reused)


@njit
def ksm_do_scan(E, S, n):
    IT = S.IT
    PG = S.PG
    FR = S.FR
    KY = S.KY
    fl = S.fl
    sc = S.sc
    probation = sc[OP + P.probation_passes] > 0 or sc[OP + P.probation_ns] > 0
    delay = sc[OP + P.delay] == 1
    zero_key = sc[OP + P.zero_key]
    same = sc[OP + P.same_address_first] == 1
    wake = sc[S_WAKE]
    # the local list is built in sc[lo:hi) (the local-list slots): new items are pushed at the front
    mid = sc[S_OLOC] + (2 * sc[OP + P.pages_to_scan] + 8) // 2
    lo = mid
    hi = mid
    scan = 0
    while sc[S_NEW_H] >= 0:
        it = sc[S_NEW_H]
        if delay and IT[it, I_IT_WAKE] == wake:
            break
        _list_remove(IT, sc, it)
        sc[DU + U_MOVES] += 1
        if probation and not _probation_over(IT, PG, FR, sc, it):
            _list_append(IT, sc, it, W_NEW)
        else:
            if probation:
                sc[S_PEND] += 1
            IT[it, I_IT_WHERE] = W_LOCAL
            IT[it, I_IT_INKSM] = 1
            lo -= 1
            sc[lo] = it
        if scan > n:
            break
        scan += 1
    scan = 0
    while sc[S_RES_H] >= 0:
        it = sc[S_RES_H]
        _list_remove(IT, sc, it)
        if IT[it, I_IT_DELL] == 1:
            continue
        sc[DU + U_MOVES] += 1
        IT[it, I_IT_WHERE] = W_LOCAL
        sc[hi] = it
        hi += 1
        if scan > n:
            break
        scan += 1
    for j in range(lo, hi):
        it = sc[j]
        IT[it, I_IT_WHERE] = W_NONE
        if IT[it, I_IT_DELL] == 1:
            continue
        init = IT[it, I_IT_INIT] == 1
        IT[it, I_IT_INIT] = 0
        f = IT[it, I_IT_FRAME]
        if f < 0 or IT[it, I_IT_INKSM] == 0:
            continue
        sc[DU + U_VISITED] += 1
        # ---- cmp_and_merge_page ----
        if FR[f, R_FR_KSM] == 1 or IT[it, I_IT_TREE] == T_STABLE:
            r = DROP
        else:
            _rm_tree(IT, KY, sc, it, False)
            if init:
                IT[it, I_IT_SUM] = PG[FR[f, R_FR_HEAD], G_PG_KEY]
                sc[DU + sc[OP + P.hash_unit]] += sc[OP + P.hash_n]
            key = IT[it, I_IT_SUM]
            r = -1
            if key == zero_key:  # the zero page first
                r = _merge_zero(E, S, f)
            if r < 0 and same:  # what-if: the pages at the same virtual address
                r = _same_address_merge(E, S, it, f, key)
            if r < 0:
                t = _search(IT, KY, sc, key, K_ST_ITEM, S_STCOUNT)  # stable_tree_search
                if t >= 0:
                    r = _merge_stable(E, S, f, t)
                else:
                    t = _search(IT, KY, sc, key, K_UN_ITEM, S_UNCOUNT)  # unstable_tree_search_insert
                    if t < 0:
                        IT[it, I_IT_TREE] = T_UNSTABLE
                        KY[key, K_UN_ITEM] = it
                        sc[S_UNCOUNT] += 1
                        _ck_append(IT, sc, it)
                        r = SUCCESS
                    else:
                        r = _merge_unstable(E, S, it, f, t, key)
        if r == DROP:
            _drop(IT, FR, fl, sc, it)
        elif r == TRY:
            IT[it, I_IT_INIT] = 1
            _list_append(IT, sc, it, W_RESCAN)
            sc[DU + U_MOVES] += 1
    # drain the del list
    it = sc[S_DEL_H]
    sc[S_DEL_H] = -1
    sc[S_DEL_T] = -1
    while it >= 0:
        nxt = IT[it, I_DEL_NEXT]
        _rm_tree(IT, KY, sc, it, True)
        sc[S_RMAP] -= 1
        sc[DU + U_FREE] += 1
        _free_slot(IT, fl, sc, it)
        it = nxt
    update_unstable_page_checksum(S)


@njit
def update_unstable_page_checksum(S):
    IT = S.IT
    PG = S.PG
    FR = S.FR
    KY = S.KY
    sc = S.sc
    n = sc[OP + P.pages_to_scan]
    U = sc[S_UNCOUNT]
    if U < n:
        need = U
    else:
        need = (U * sc[OP + P.sleep_millisecs]) // (sc[OP + P.period_seconds] * 1000)
    if need <= 0:
        return
    if need > n:
        need = n
    rotate = sc[OP + P.recheck_rotate] == 1
    limit = sc[S_CK_N] if rotate else -1  # the number of entries on the list now
    scan = 0
    it = sc[S_CK_H]
    while it >= 0:
        if limit >= 0 and scan >= limit:
            break
        nxt = IT[it, I_CK_NEXT]
        if IT[it, I_IT_FRAME] >= 0 and IT[it, I_IT_TREE] == T_UNSTABLE:
            sc[DU + U_VISITED] += 1
            sc[DU + sc[OP + P.hash_unit]] += sc[OP + P.hash_n]
            c = _key(IT, PG, FR, it)
            if c != IT[it, I_IT_SUM]:
                _rm_tree(IT, KY, sc, it, False)
                IT[it, I_IT_SUM] = c
                IT[it, I_IT_INIT] = 0
                _list_append(IT, sc, it, W_RESCAN)
                sc[DU + U_MOVES] += 1
            elif rotate:
                _ck_remove(IT, sc, it)
                _ck_append(IT, sc, it)
                sc[DU + U_MOVES] += 1
                if nxt < 0:  # it was the last one: the walk would meet it again
                    nxt = -1
        if scan > need:
            break
        scan += 1
        it = nxt


@njit(cache=True)
def run_until(E, S, t_end):
    sc = S.sc
    while wake_up(sc, t_end):
        sc[S_WAKE] += 1
        ksm_do_scan(E, S, sc[OP + P.pages_to_scan])
        sleep(sc, sc[OP + P.sleep_millisecs], sc[OP + P.hz])


# --- the runtime object ------------------------------------------------------------------------------------
class PksmKernel(KernelRuntime):
    """The kernel behind the driver's calls; counters as :class:`~ksmtrace.policies.pksm.runtime.PksmRuntime`."""

    name = "pksm"

    def __init__(self, params, ctx, probation: Probation | None = None) -> None:
        super().__init__(params, ctx)
        self.delay = probation is not None
        self.ev_key, n_keys, zero_key, self.hash_desc = event_keys(ctx.prep, strength=params.hash_strength)
        self.same = SameAddress(ctx, params.same_address_first, params.same_address_key)
        self.S = new_state(ctx.prep, params, ctx, probation, n_keys, zero_key, AnonVmaWalk(ctx, params.anon_vma_walk),
                           self.same)
        self.sc = self.S.sc
        kinds = self.prep.ev_kind
        arr = ((kinds == EV_APPEAR) | (kinds == EV_WRITE)).astype(np.int64)
        self._arrivals = np.concatenate([[0], np.cumsum(arr)])

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.prep
        sl = p.events(s)
        need = int(self._arrivals[sl.stop] - self._arrivals[sl.start])
        if self.S.sc[S_NFREE] < need:
            self.S = grow(self.S, need)
        self.S.sc[S_SNAP] = s
        self.same.update(s)
        ev = p.batch(s)
        on_snapshot(self.E, self.S, ev.pg, ev.kind, self.ev_key[sl], np.int64(now))
        self.check()

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.S, np.int64(t_end))
        self.check()

    def _probation_counts(self) -> dict:
        sc = self.sc
        return {"probation_ended": int(sc[S_PEND]), "probation_changed": int(sc[S_PCHG]),
                "probation_died": int(sc[S_PDIED])} if self.delay else {}

    def counters(self) -> dict:
        sc = self.sc
        return pksm_counters(
            shared=int(sc[S_SHARED]), sharing=int(sc[S_SHARING]), zero_sharing=int(sc[S_ZSHARING]),
            unstable=int(sc[S_UNCOUNT]), stable_nodes=int(sc[S_SNODES]), rmap_items=int(sc[S_RMAP]),
            new_list=int(sc[S_NEW_N]), rescan_list=int(sc[S_RES_N]), collisions=int(sc[S_COLL]),
            probation=self._probation_counts(),
        )

    def extras(self) -> dict:
        sc = self.sc
        return pksm_extras(self.hash_desc, int(sc[S_STCOUNT]), int(sc[S_UNCOUNT]), int(sc[S_COLL]),
                           self._probation_counts())
