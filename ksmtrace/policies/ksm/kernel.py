"""The numba kernel of the ``ksm`` policy: the accelerator of :class:`~ksmtrace.policies.ksm.runtime.KsmRuntime`,
the same algorithm on numpy arrays inside one jitted loop per snapshot interval.  The differential
suite (tests/differential) holds the two equal on every counter of every snapshot.

Layout (packed: numba passes each array of a tuple separately, with reference counting, so the
state lives in a few wide arrays): ``it`` one row per page = its rmap item; ``nd`` one row per
stable node (plain, dup or chain) with a free list; a node's hlist and a chain's dups are doubly
linked lists threaded through ``it`` and ``nd``; ``ct`` one row per content = the stable tree root
and the unstable tree entry (valid only for the scan that set it); ``fn`` frame -> stable node;
``mm`` the ksm_mm_head list; ``sc`` the daemon's block (:mod:`ksmtrace.engine.daemon`: clock,
cost units), the policy's scalars and its parameters (slots named after ``KsmParams``' fields).  Every function mirrors a
method of the reference, in the same order; the per-visit path is inlined into ``run_until``.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.cost import UNIT_INDEX
from ksmtrace.engine.daemon import (D_BUSY, D_ERR, D_IDLE, D_NOW, D_TWAKE, DU, KernelRuntime, new_block,
                                    param_slots, params_array, scalar_slots, sleep, wake_up, work_so_far)
from ksmtrace.jitutil import bitlen as _bitlen
from ksmtrace.jitutil import prefetch_row
from ksmtrace.engine.state import F_KSM, P_CID, P_FRAME, P_PROC
from ksmtrace.policies.ksm import KsmParams
from ksmtrace.policies.lists import hlist_add_head, hlist_del
from ksmtrace.policies.ksm.runtime import Holes, fork_registrations, ksm_counters, sleep_written, sysfs_refusals
from ksmtrace.policies.sameaddr import SameAddress

# unit indices
U_WAKEUPS = UNIT_INDEX["wakeups"]
U_SCAN_STARTS = UNIT_INDEX["scan_starts"]
U_WALKED = UNIT_INDEX["addresses_walked"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_ALLOC = UNIT_INDEX["rmap_allocs"]
U_FREE = UNIT_INDEX["rmap_frees"]
U_CSUM = UNIT_INDEX["checksums"]
U_JHASH = UNIT_INDEX["jhash2_checksums"]
U_SNODE = UNIT_INDEX["stable_node_visits"]
U_UNODE = UNIT_INDEX["unstable_node_visits"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]
U_PRUNE = UNIT_INDEX["stale_prunes"]

# sc: the daemon's slots (D_*), then the policy's scalars, then its parameters (at OP)
(S_CUR, S_CURPG, S_SEQNR, S_SHARED, S_SHARING, S_UNSHARED, S_SCANNED, S_SKIPPED, S_CHAINS, S_DUPS, S_PTS,
 S_ADV_START, S_ADV_CHANGE, S_ADV_SCANTIME, S_ADV_CPU, S_UNCOUNT, S_STCOUNT, S_NFREE, S_RMAP, S_GROW) = scalar_slots(20)
N_SCALARS = 20
# parameter slots: KsmParams' fields by name, then values derived from them
P = param_slots(KsmParams, derived=("neworder", "v318", "remap", "hz", "oldchains"))
OP = scalar_slots(N_SCALARS).stop

# it: rmap item columns
# (int32; the small fields share I_BITS: _get/_put with a (shift, mask) field)
I_BITS, I_OLD, I_UKEY, I_NODE, I_NEXT, I_PREV = range(6)
B_ALLOC, B_FLAG, B_AGE, B_SKIPS, B_SEQ = (0, 1), (1, 3), (3, 255), (11, 15), (15, 255)
# nd: stable node columns
# (int32; a chain's last prune time, in ns, is split over N_PRUNE_HI and N_PRUNE_LO)
N_KIND, N_CID, N_FRAME, N_GEN, N_FIRST, N_LEN, N_CHAIN, N_DFIRST, N_DNEXT, N_DPREV, N_NDUPS, N_PRUNE_HI, N_PRUNE_LO, N_FREEL = range(14)
N_NCOLS = 14
# ct: content columns
C_ROOT, C_UITEM, C_USCAN = range(3)
# mm: list columns (row n_procs is ksm_mm_head)
M_NEXT, M_PREV, M_IN, M_EXITED, M_ITEMS, M_LO, M_HI = range(7)

K_FREE, K_PLAIN, K_DUP, K_CHAIN = 0, 1, 2, 3
PF_AHEAD = 12  # pages ahead whose frame and content rows are prefetched
F_NONE, F_UNSTABLE, F_STABLE = 0, 1, 2

KsmState = namedtuple("KsmState", ["it", "nd", "ct", "fn", "mm", "sc"])
NODES_START = 1024  # stable node rows to start with (plus one per 64 pages); grown on demand
# (the holes and the same-address classes are separate arguments of the calls that read them: every
# array of K is passed, and reference counted, at each non-inlined call that takes K)


def derived_params(params, hz: int) -> dict[str, int]:
    """The derived parameter slots (and the sharing limit 3.18 does not have)."""
    v318 = params.profile == "3.18"
    return {
        "max_page_sharing": (1 << 62) if v318 else params.max_page_sharing,
        "neworder": params.profile in ("6.11", "6.12"),
        "v318": v318,
        "remap": params.profile == "6.12",
        "hz": hz,
        "oldchains": params.profile == "6.10",
    }


def new_state(prep, params, ctx, n_frames: int) -> KsmState:
    n, c, f, np_ = prep.n_pages, prep.n_cids, n_frames, prep.n_procs
    it = np.full((n, 6), -1, np.int32)  # 24 bytes a page: the scan's memory traffic
    it[:, I_BITS] = 0
    ct = np.full((c, 3), -1, np.int32)
    mm = np.zeros((np_ + 1, 7), np.int64)
    mm[:, M_NEXT] = np_
    mm[:, M_PREV] = np_
    mm[:np_, M_LO] = prep.proc_pg_lo
    mm[:np_, M_HI] = prep.proc_pg_hi
    pa = params_array(params, P, derived_params(params, ctx.hz))
    sc = new_block(N_SCALARS, len(P), ctx)
    sc[OP : OP + len(P)] = pa
    sc[S_CUR] = np_  # the head
    sc[S_PTS] = params.advisor_min_pages_to_scan if params.advisor_mode == "scan-time" else params.pages_to_scan
    sc[D_IDLE] = 1
    K = KsmState(it=it, nd=np.zeros((0, N_NCOLS), np.int32), ct=ct, fn=np.full(f, -1, np.int32), mm=mm, sc=sc)
    return grow_nodes(K, NODES_START + n // 64)


def grow_nodes(K: KsmState, extra: int) -> KsmState:
    """Room for ``extra`` more stable nodes (from Python, between jitted calls: run_until returns
    with S_GROW set before a wake-up that could run out).  Stable nodes are few next to pages, so
    the node table grows with them instead of being sized for the worst case (two per page)."""
    old = len(K.nd)
    new = max(2 * old, old + extra)
    nd = np.zeros((new, N_NCOLS), np.int32)
    nd[:old] = K.nd
    nd[old:, [N_CID, N_FIRST, N_CHAIN, N_DFIRST, N_DNEXT, N_DPREV]] = -1
    nfree = int(K.sc[S_NFREE])
    # the free stack: today's free nodes, then the new ones (taken first)
    nd[nfree : nfree + new - old, N_FREEL] = np.arange(new - 1, old - 1, -1)
    K.sc[S_NFREE] = nfree + new - old
    K.sc[S_GROW] = 0
    return K._replace(nd=nd)


# --- small helpers --------------------------------------------------------------------------------
@njit(inline="always")
def _get(it, q, field):
    """A small field of rmap item ``q`` (allocated, tree flag, age, skips, seqnr & 0xff)."""
    shift, mask = field
    return (it[q, I_BITS] >> shift) & mask


@njit(inline="always")
def _put(it, q, field, v):
    shift, mask = field
    it[q, I_BITS] = (it[q, I_BITS] & ~(mask << shift)) | ((v & mask) << shift)



@njit(inline="always")
def _scannable(E, pg):
    return E.pg[pg, P_CID] >= 0 and E.pg[pg, P_FRAME] != 0


@njit(inline="always")
def _node_alive(E, K, nd):
    return st.frame_alive(E, K.nd[nd, N_FRAME], K.nd[nd, N_GEN])


@njit(inline="always")
def _candidate(K, nd, offset):
    if K.sc[OP + P.v318] == 1:
        return True
    return K.nd[nd, N_LEN] > 0 and K.nd[nd, N_LEN] + offset < K.sc[OP + P.max_page_sharing]


@njit(inline="always")
def _prune_time(K, ch):
    return (np.int64(K.nd[ch, N_PRUNE_HI]) << 32) | (np.int64(K.nd[ch, N_PRUNE_LO]) & 0xFFFFFFFF)


@njit(inline="always")
def _set_prune_time(K, ch, t):
    K.nd[ch, N_PRUNE_HI] = t >> 32
    K.nd[ch, N_PRUNE_LO] = t & 0xFFFFFFFF


@njit
def _alloc_node(K):
    if K.sc[S_NFREE] == 0:
        K.sc[D_ERR] = 1
        return -1
    K.sc[S_NFREE] -= 1
    nd = K.nd[K.sc[S_NFREE], N_FREEL]
    K.nd[nd, N_FIRST] = -1
    K.nd[nd, N_LEN] = 0
    K.nd[nd, N_CHAIN] = -1
    K.nd[nd, N_DFIRST] = -1
    K.nd[nd, N_DNEXT] = -1
    K.nd[nd, N_DPREV] = -1
    K.nd[nd, N_NDUPS] = 0
    return nd


@njit
def _free_node(K, nd):
    K.nd[nd, N_KIND] = K_FREE
    K.nd[K.sc[S_NFREE], N_FREEL] = nd
    K.sc[S_NFREE] += 1


# --- mm list (entry points, called from Python at snapshots) --------------------------------------
@njit
def _list_insert_before(K, proc, before):
    prev = K.mm[before, M_PREV]
    K.mm[prev, M_NEXT] = proc
    K.mm[proc, M_PREV] = prev
    K.mm[proc, M_NEXT] = before
    K.mm[before, M_PREV] = proc


@njit
def _list_remove(K, proc):
    p = K.mm[proc, M_PREV]
    n = K.mm[proc, M_NEXT]
    K.mm[p, M_NEXT] = n
    K.mm[n, M_PREV] = p


@njit(cache=True)
def ksm_enter(K, proc, now):
    """__ksm_enter: just behind the cursor (the tail when the cursor is at the head)."""
    _list_insert_before(K, proc, K.sc[S_CUR])
    K.mm[proc, M_IN] = 1
    if K.sc[D_IDLE] == 1:
        K.sc[D_IDLE] = 0
        if K.sc[D_TWAKE] < now:
            K.sc[D_TWAKE] = now


@njit(cache=True)
def ksm_exit(K, proc):
    """__ksm_exit: free the slot if it has no items, else move it just after the cursor."""
    K.mm[proc, M_EXITED] = 1
    if K.sc[S_CUR] == proc:
        return
    _list_remove(K, proc)
    if K.mm[proc, M_ITEMS] == 0:
        K.mm[proc, M_IN] = 0
        return
    cur = K.sc[S_CUR]
    _list_insert_before(K, proc, K.mm[cur, M_NEXT])


# --- trees ----------------------------------------------------------------------------------------
@njit
def _hlist_del(K, pg):
    nd = K.it[pg, I_NODE]
    hlist_del(K.it, I_PREV, I_NEXT, K.nd, (nd, N_FIRST), pg)
    K.nd[nd, N_LEN] -= 1


@njit
def remove_node_from_stable_tree(K, nd):
    it = K.nd[nd, N_FIRST]
    while it >= 0:
        nxt = K.it[it, I_NEXT]
        if nxt >= 0:
            K.sc[S_SHARING] -= 1
        else:
            K.sc[S_SHARED] -= 1
        _put(K.it, it, B_FLAG, F_NONE)
        K.it[it, I_NODE] = -1
        K.it[it, I_NEXT] = -1
        K.it[it, I_PREV] = -1
        it = nxt
    K.nd[nd, N_FIRST] = -1
    K.nd[nd, N_LEN] = 0
    K.sc[DU + U_PRUNE] += 1
    f = K.nd[nd, N_FRAME]
    if f >= 0 and K.fn[f] == nd:
        K.fn[f] = -1
    if K.nd[nd, N_KIND] == K_DUP:
        ch = K.nd[nd, N_CHAIN]
        hlist_del(K.nd, N_DPREV, N_DNEXT, K.nd, (ch, N_DFIRST), nd)
        K.nd[ch, N_NDUPS] -= 1
        K.sc[S_DUPS] -= 1
    else:
        c = K.nd[nd, N_CID]
        if K.ct[c, C_ROOT] == nd:
            K.ct[c, C_ROOT] = -1
            K.sc[S_STCOUNT] -= 1
    _free_node(K, nd)


@njit
def _remove_stable_item(E, K, pg):
    nd = K.it[pg, I_NODE]
    if not _node_alive(E, K, nd):
        remove_node_from_stable_tree(K, nd)
        return
    _hlist_del(K, pg)
    if K.nd[nd, N_LEN] > 0:
        K.sc[S_SHARING] -= 1
    else:
        K.sc[S_SHARED] -= 1
    _put(K.it, pg, B_FLAG, F_NONE)
    K.it[pg, I_NODE] = -1


@njit(inline="always")
def _rm_local(E, K, it, ct, sc, pg):
    """remove_rmap_item_from_tree on local arrays: the unstable case inline, the stable one a call."""
    fl = _get(it, pg, B_FLAG)
    if fl == F_UNSTABLE:
        seq = sc[S_SEQNR]
        age = (seq - _get(it, pg, B_SEQ)) & 0xFF
        if age > 1:
            sc[D_ERR] = 2
        if age == 0:
            u = it[pg, I_UKEY]
            if ct[u, C_UITEM] == pg and ct[u, C_USCAN] == seq:
                ct[u, C_UITEM] = -1
            sc[S_UNCOUNT] -= 1
        sc[S_UNSHARED] -= 1
        _put(it, pg, B_FLAG, F_NONE)
    elif fl == F_STABLE:
        _remove_stable_item(E, K, pg)


@njit
def remove_rmap_item_from_tree(E, K, pg):
    _rm_local(E, K, K.it, K.ct, K.sc, pg)


@njit
def stable_node_dup(E, K, ch, prune):
    """KsmRuntime.stable_node_dup (both rules: 6.11+, and up to 6.10 with ``oldchains``)."""
    now = K.sc[D_NOW]
    if prune == 0 or now < _prune_time(K, ch) + K.sc[OP + P.stable_node_chains_prune_millisecs] * 1000000:
        prune = 0
    else:
        _set_prune_time(K, ch, now)
    old = K.sc[OP + P.oldchains] == 1
    found = -1
    found_len = 0
    nr = 0
    d = K.nd[ch, N_DFIRST]
    while d >= 0:
        nxt = K.nd[d, N_DNEXT]
        K.sc[DU + U_SNODE] += 1
        if not _node_alive(E, K, d):
            remove_node_from_stable_tree(K, d)
            d = nxt
            continue
        nr += 1
        cand = _candidate(K, d, 0)
        if old:
            better = cand and (found < 0 or K.nd[d, N_LEN] > found_len)
        else:
            better = found < 0 or (cand and ((not _candidate(K, found, 0)) or K.nd[d, N_LEN] > found_len))
        if better:
            found = d
            found_len = K.nd[d, N_LEN]
            if prune == 0 and _candidate(K, found, 0):
                break
        d = nxt
    c = K.nd[ch, N_CID]
    if found >= 0:
        collapse = (prune != 0 and nr == 1) if old else K.nd[ch, N_NDUPS] == 1
        if collapse:  # the chain becomes the plain node
            K.ct[c, C_ROOT] = found
            K.nd[found, N_KIND] = K_PLAIN
            K.nd[found, N_CHAIN] = -1
            K.nd[found, N_DNEXT] = -1
            K.nd[found, N_DPREV] = -1
            _free_node(K, ch)
            K.sc[S_CHAINS] -= 1
            K.sc[S_DUPS] -= 1
        elif K.nd[ch, N_DFIRST] != found and _candidate(K, found, 1):  # move it to the head
            hlist_del(K.nd, N_DPREV, N_DNEXT, K.nd, (ch, N_DFIRST), found)
            hlist_add_head(K.nd, N_DPREV, N_DNEXT, K.nd, (ch, N_DFIRST), found)
        return found
    if old and K.nd[ch, N_DFIRST] >= 0:  # stable_node_dup_any: every dup is full
        return K.nd[ch, N_DFIRST]
    if K.ct[c, C_ROOT] == ch:  # free_stable_node_chain
        K.ct[c, C_ROOT] = -1
        K.sc[S_STCOUNT] -= 1
    K.sc[S_CHAINS] -= 1
    _free_node(K, ch)
    return -1


@njit(inline="always")
def _stable_lookup(E, K, c, prune):
    """The node of equal content after stale handling, or -1."""
    while True:
        root = K.ct[c, C_ROOT]
        if root < 0:
            return -1
        if K.nd[root, N_KIND] == K_CHAIN:
            d = stable_node_dup(E, K, root, prune)
            if d < 0:
                if K.sc[OP + P.v318] == 1:
                    return -1
                continue
            return d
        if not _node_alive(E, K, root):
            remove_node_from_stable_tree(K, root)
            if K.sc[OP + P.v318] == 1:
                return -1
            continue
        return root


@njit
def stable_tree_search(E, K, pg):
    c = E.pg[pg, P_CID]
    K.sc[DU + U_SNODE] += _bitlen(K.sc[S_STCOUNT])
    if K.ct[c, C_ROOT] < 0:
        return -1
    d = _stable_lookup(E, K, c, 1)
    if d < 0 or not _candidate(K, d, 0):
        return -1
    return d


@njit
def stable_tree_insert(E, K, frame, gen, c):
    K.sc[DU + U_SNODE] += _bitlen(K.sc[S_STCOUNT])
    existing = _stable_lookup(E, K, c, 0)
    if existing >= 0 and K.sc[OP + P.v318] == 1:
        return -1
    new = _alloc_node(K)
    if new < 0:
        return -1
    K.nd[new, N_CID] = c
    K.nd[new, N_FRAME] = frame
    K.nd[new, N_GEN] = gen
    if existing < 0:
        K.nd[new, N_KIND] = K_PLAIN
        K.ct[c, C_ROOT] = new
        K.sc[S_STCOUNT] += 1
    else:
        root = K.ct[c, C_ROOT]
        if K.nd[root, N_KIND] == K_PLAIN:  # alloc_stable_node_chain
            ch = _alloc_node(K)
            if ch < 0:
                return -1
            K.nd[ch, N_KIND] = K_CHAIN
            K.nd[ch, N_CID] = c
            _set_prune_time(K, ch, K.sc[D_NOW])
            K.nd[root, N_KIND] = K_DUP
            K.nd[root, N_CHAIN] = ch
            K.nd[ch, N_DFIRST] = root
            K.nd[root, N_DNEXT] = -1
            K.nd[root, N_DPREV] = -1
            K.nd[ch, N_NDUPS] = 1
            K.ct[c, C_ROOT] = ch
            K.sc[S_CHAINS] += 1
            K.sc[S_DUPS] += 1
            root = ch
        K.nd[new, N_KIND] = K_DUP
        K.nd[new, N_CHAIN] = root
        hlist_add_head(K.nd, N_DPREV, N_DNEXT, K.nd, (root, N_DFIRST), new)
        K.nd[root, N_NDUPS] += 1
        K.sc[S_DUPS] += 1
    K.fn[frame] = new
    return new


@njit
def stable_tree_append(K, pg, nd):
    hlist_add_head(K.it, I_PREV, I_NEXT, K.nd, (nd, N_FIRST), pg)
    K.nd[nd, N_LEN] += 1
    K.it[pg, I_NODE] = nd
    _put(K.it, pg, B_FLAG, F_STABLE)
    if K.nd[nd, N_LEN] > 1:
        K.sc[S_SHARING] += 1
    else:
        K.sc[S_SHARED] += 1


# --- merging ----------------------------------------------------------------------------------------
@njit
def _split(E, K, pg):
    pr = E.pg[pg, P_PROC]
    st.split_thp(E, pg, K.mm[pr, M_LO], K.mm[pr, M_HI], K.sc[OP + P.remap] == 1)
    return _scannable(E, pg)


@njit
def _merge_with_ksm_page(E, K, pg, nd):
    if not _split(E, K, pg):
        return False
    K.sc[DU + U_WP] += 1
    K.sc[DU + U_MEMCMP] += 1
    K.sc[DU + U_REMAP] += 1
    return st.merge(E, pg, K.nd[nd, N_FRAME], K.sc[D_NOW])


@njit
def _merge_with_zero_page(E, K, pg):
    if K.sc[OP + P.use_zero_pages] == 0 or K.sc[OP + P.v318] == 1 or E.pg[pg, P_CID] != 0:
        return False
    if not _split(E, K, pg):
        return True
    K.sc[DU + U_WP] += 1
    K.sc[DU + U_MEMCMP] += 1
    K.sc[DU + U_REMAP] += 1
    return st.merge_zero(E, pg, K.sc[D_NOW])


@njit
def _merge_two_pages(E, K, pg, tpg):
    if not _split(E, K, pg):
        return -1
    if not _split(E, K, tpg):
        return -1
    gen = st.stabilize(E, pg)
    K.sc[DU + U_WP] += 2
    K.sc[DU + U_MEMCMP] += 1
    K.sc[DU + U_REMAP] += 1
    if not st.merge(E, tpg, E.pg[pg, P_FRAME], K.sc[D_NOW]):
        return -1
    return gen


@njit
def _stable_merge(E, K, pg):
    """Stable-tree search and merge; True if the visit ends here (found a node)."""
    nd = stable_tree_search(E, K, pg)
    remove_rmap_item_from_tree(E, K, pg)
    if nd >= 0:
        if _merge_with_ksm_page(E, K, pg, nd):
            stable_tree_append(K, pg, nd)
        return True
    return False


@njit
def _unstable_merge(E, K, pg, tpg):
    remove_rmap_item_from_tree(E, K, tpg)
    _merge_two(E, K, pg, tpg, True)


@njit
def _merge_two(E, K, pg, tpg, tpg_item):
    """try_to_merge_two_pages and the new KSM page into the stable tree (KsmRuntime._merge_two)."""
    gen = _merge_two_pages(E, K, pg, tpg)
    if gen < 0:
        return
    nd = stable_tree_insert(E, K, E.pg[pg, P_FRAME], gen, E.pg[pg, P_CID])
    if nd < 0:
        return
    if tpg_item:
        stable_tree_append(K, tpg, nd)
    stable_tree_append(K, pg, nd)


@njit
def _same_address_merge(E, K, sa_cls, sa_off, sa_mem, pg):
    """same_address_first (KsmRuntime.same_address_merge): True if the visit ends here."""
    epg = E.pg
    c = epg[pg, P_CID]
    f = epg[pg, P_FRAME]
    proc = epg[pg, P_PROC]
    cls = sa_cls[pg]
    if cls < 0:
        return False
    for j in range(sa_off[cls], sa_off[cls + 1]):
        q = sa_mem[j]
        if q == pg or epg[q, P_PROC] == proc:
            continue
        if not _scannable(E, q):
            K.sc[DU + U_WALKED] += 1
            continue
        K.sc[DU + U_UNODE] += 1
        fq = epg[q, P_FRAME]
        if epg[q, P_CID] != c or fq == f:
            continue
        if E.fr[fq, F_KSM] == 1:
            nd = K.fn[fq]
            if nd < 0 or not _node_alive(E, K, nd) or not _candidate(K, nd, 0):
                continue
            if _merge_with_ksm_page(E, K, pg, nd):
                stable_tree_append(K, pg, nd)
            return True
        has_item = _get(K.it, q, B_ALLOC) == 1
        if has_item:
            remove_rmap_item_from_tree(E, K, q)
        _merge_two(E, K, pg, q, has_item)
        return True
    return False


# --- scanning ---------------------------------------------------------------------------------------
@njit
def _free_item(E, K, pg):
    remove_rmap_item_from_tree(E, K, pg)
    _put(K.it, pg, B_ALLOC, 0)
    K.it[pg, I_OLD] = -1
    _put(K.it, pg, B_AGE, 0)
    _put(K.it, pg, B_SKIPS, 0)
    _put(K.it, pg, B_FLAG, F_NONE)
    K.it[pg, I_NODE] = -1
    K.mm[E.pg[pg, P_PROC], M_ITEMS] -= 1
    K.sc[S_RMAP] -= 1
    K.sc[DU + U_FREE] += 1


@njit
def _advisor(K):
    sc = K.sc
    now = sc[D_NOW] + work_so_far(K.sc)
    scan_time = (now - sc[S_ADV_START]) // 1000000 // 1000
    if scan_time == 0:
        scan_time = 1
    cpu_time = sc[D_BUSY] + work_so_far(K.sc)
    cpu_ms = (cpu_time - sc[S_ADV_CPU]) // 1000 // 1000
    cpu_percent = (cpu_ms * 100) // (scan_time * 1000)
    if cpu_percent == 0:
        cpu_percent = 1
    last = sc[S_ADV_SCANTIME] if sc[S_ADV_SCANTIME] != 0 else scan_time
    factor = sc[OP + P.advisor_target_scan_time] * 100 // scan_time
    if factor == 0:
        factor = 1
    change = scan_time * 100 // last
    if change == 0:
        change = 1
    change = (70 * sc[S_ADV_CHANGE] + 30 * change) // 100
    pts = sc[S_PTS]
    pages = pts * 100 // factor
    pages = pages * change // 100
    ppc = pts // cpu_percent
    if ppc == 0:
        ppc = 1
    pages = min(pages, ppc * sc[OP + P.advisor_max_cpu])
    pages = max(pages, ppc * 10)
    pages = min(pages, sc[OP + P.advisor_max_pages_to_scan])
    sc[S_ADV_CHANGE] = change
    sc[S_ADV_SCANTIME] = scan_time
    sc[S_ADV_CPU] = cpu_time
    sc[S_PTS] = pages


@njit
def _end_of_mm(E, K, ht, proc, head):
    """Free an exited mm's items and slot, move the cursor on; True at the end of a full scan."""
    mm = K.mm
    it = K.it
    sc = K.sc
    if mm[proc, M_EXITED] == 0:
        sc[DU + U_WALKED] += ht[proc]  # holes after the mm's last page (no range walk)
    if mm[proc, M_EXITED] == 1:
        for q in range(mm[proc, M_LO], mm[proc, M_HI]):
            if _get(it, q, B_ALLOC) == 1:
                _free_item(E, K, q)
    nxt = mm[proc, M_NEXT]
    if mm[proc, M_EXITED] == 1:
        _list_remove(K, proc)
        mm[proc, M_IN] = 0
        mm[proc, M_EXITED] = 0
        mm[proc, M_ITEMS] = 0
    sc[S_CUR] = nxt
    if nxt == head:
        if sc[OP + P.advisor_mode] == 1:
            _advisor(K)
        sc[S_SEQNR] += 1
        return True
    sc[S_CURPG] = mm[nxt, M_LO]
    return False


@njit
def _start_scan(K, head):
    sc = K.sc
    if sc[OP + P.advisor_mode] == 1:
        sc[S_ADV_START] = sc[D_NOW] + work_so_far(K.sc)
    sc[DU + U_SCAN_STARTS] += 1
    sc[S_UNCOUNT] = 0  # the unstable root is reset: entries of older scans are invalid
    sc[S_CUR] = K.mm[head, M_NEXT]
    sc[S_CURPG] = K.mm[sc[S_CUR], M_LO]


@njit
def _zero_then_scannable(E, K, pg):
    """6.11: the zero page after the gate.  True if the visit ends here (merged, or the split took
    the page)."""
    if _merge_with_zero_page(E, K, pg):
        return True
    return not _scannable(E, pg)


@njit(cache=True)
def run_until(E, K, hg, ht, sa_cls, sa_off, sa_mem, t_end):
    """ksmd's loop from the next wake-up until ``t_end``.

    The per-visit path (scan_get_next_rmap_item, should_skip_rmap_item, cmp_and_merge_page up to
    the unstable tree) is written out here on local arrays; everything rarer is a call.
    """
    epg = E.pg
    efr = E.fr
    it = K.it
    ct = K.ct
    fn = K.fn
    mm = K.mm
    sc = K.sc
    head = mm.shape[0] - 1
    smart = sc[OP + P.smart_scan] == 1 and sc[OP + P.v318] == 0
    neworder = sc[OP + P.neworder] == 1
    v318 = sc[OP + P.v318] == 1
    use_zero = sc[OP + P.use_zero_pages] == 1 and not v318
    same = sc[OP + P.same_address_first] == 1
    u_csum = DU + (U_JHASH if v318 else U_CSUM)
    while sc[D_TWAKE] < t_end:
        if mm[head, M_NEXT] == head:  # ksmd_should_run() is false: wait for an mm
            sc[D_IDLE] = 1
            sc[D_TWAKE] = t_end
            return
        if sc[S_NFREE] < 2 * sc[S_PTS] + 4:  # a batch allocates at most two stable nodes a visit
            sc[S_GROW] = 1
            return
        wake_up(sc, t_end)
        n = sc[S_PTS]
        for _ in range(n):
            # ---- scan_get_next_rmap_item ----
            if mm[head, M_NEXT] == head:
                break
            if sc[S_CUR] == head:
                _start_scan(K, head)
            pg = -1
            while True:
                proc = sc[S_CUR]
                hi = mm[proc, M_HI]
                if mm[proc, M_EXITED] == 0:
                    q = sc[S_CURPG]
                    lo = mm[proc, M_LO]
                    if q < lo:
                        q = lo
                    while q < hi:
                        sc[DU + U_WALKED] += hg[q]  # holes of mergeable VMAs before q (no range walk)
                        # cache hints for the page PF_AHEAD visits ahead: its frame and content rows
                        # are random accesses (no effect on results)
                        qa = q + PF_AHEAD
                        if qa < hi:
                            fa = epg[qa, P_FRAME]
                            ca = epg[qa, P_CID]
                            if fa > 0:
                                prefetch_row(efr, fa)
                            if ca >= 0:
                                prefetch_row(ct, ca)
                        fq = epg[q, P_FRAME]
                        if epg[q, P_CID] >= 0 and fq != 0:
                            if _get(it, q, B_ALLOC) == 0:
                                _put(it, q, B_ALLOC, 1)
                                mm[proc, M_ITEMS] += 1
                                sc[S_RMAP] += 1
                                sc[DU + U_ALLOC] += 1
                            sc[DU + U_VISITED] += 1
                            # ---- should_skip_rmap_item ----
                            if smart and not (fq > 0 and efr[fq, F_KSM] == 1):
                                age = _get(it, q, B_AGE)
                                if age != 255:
                                    _put(it, q, B_AGE, age + 1)
                                if age >= 3:
                                    if _get(it, q, B_SKIPS) == 0:
                                        if age <= 3:
                                            _put(it, q, B_SKIPS, 1)
                                        elif age <= 5:
                                            _put(it, q, B_SKIPS, 2)
                                        elif age <= 8:
                                            _put(it, q, B_SKIPS, 4)
                                        else:
                                            _put(it, q, B_SKIPS, 8)
                                    else:
                                        sc[S_SKIPPED] += 1
                                        _put(it, q, B_SKIPS, _get(it, q, B_SKIPS) - 1)
                                        _rm_local(E, K, it, ct, sc, q)
                                        q += 1
                                        continue
                            sc[S_CURPG] = q + 1
                            pg = q
                            break
                        sc[DU + U_WALKED] += 1
                        if _get(it, q, B_ALLOC) == 1:
                            _free_item(E, K, q)
                        q += 1
                if pg >= 0:
                    break
                if _end_of_mm(E, K, ht, proc, head):
                    break
            if pg < 0:
                break
            sc[S_SCANNED] += 1
            # ---- cmp_and_merge_page ----
            f = epg[pg, P_FRAME]
            if f > 0 and efr[f, F_KSM] == 1:
                page_node = fn[f]
                if page_node >= 0:
                    if _get(it, pg, B_FLAG) == F_STABLE and it[pg, I_NODE] == page_node:
                        continue
                    _rm_local(E, K, it, ct, sc, pg)
                    stable_tree_append(K, pg, page_node)
                    continue
            c = epg[pg, P_CID]
            if neworder:
                _rm_local(E, K, it, ct, sc, pg)
                sc[u_csum] += 1
                if it[pg, I_OLD] != c:
                    it[pg, I_OLD] = c
                    continue
                if use_zero and c == 0 and _zero_then_scannable(E, K, pg):
                    continue
                if same and _same_address_merge(E, K, sa_cls, sa_off, sa_mem, pg):
                    continue
                if ct[c, C_ROOT] >= 0:
                    if _stable_merge(E, K, pg):
                        continue
                else:
                    sc[DU + U_SNODE] += _bitlen(sc[S_STCOUNT])  # a descent that finds nothing
            else:
                if ct[c, C_ROOT] >= 0:
                    if _stable_merge(E, K, pg):
                        continue
                else:
                    sc[DU + U_SNODE] += _bitlen(sc[S_STCOUNT])
                    _rm_local(E, K, it, ct, sc, pg)
                sc[u_csum] += 1
                if it[pg, I_OLD] != c:
                    it[pg, I_OLD] = c
                    continue
                if use_zero and c == 0 and _zero_then_scannable(E, K, pg):
                    continue
                if same and _same_address_merge(E, K, sa_cls, sa_off, sa_mem, pg):
                    continue
            # ---- unstable_tree_search_insert ----
            sc[DU + U_UNODE] += _bitlen(sc[S_UNCOUNT])
            seq = sc[S_SEQNR]
            tpg = -1
            if ct[c, C_USCAN] == seq and ct[c, C_UITEM] >= 0:
                t = ct[c, C_UITEM]
                if not (epg[t, P_CID] >= 0 and epg[t, P_FRAME] != 0):
                    continue  # get_mergeable_page failed: give up, no insert
                if epg[t, P_FRAME] == epg[pg, P_FRAME]:
                    continue  # a forked page
                if epg[t, P_CID] == c:
                    tpg = t
            if tpg >= 0:
                _unstable_merge(E, K, pg, tpg)
                continue
            _put(it, pg, B_FLAG, F_UNSTABLE)
            _put(it, pg, B_SEQ, seq & 0xFF)
            it[pg, I_UKEY] = c
            ct[c, C_UITEM] = pg
            ct[c, C_USCAN] = seq
            sc[S_UNCOUNT] += 1
            sc[S_UNSHARED] += 1
        sleep(sc, sc[OP + P.sleep_millisecs], sc[OP + P.hz])


# --- the runtime object -------------------------------------------------------------------------------
class KsmKernel(KernelRuntime):
    """The kernel behind the driver's calls; counters as :class:`~ksmtrace.policies.ksm.runtime.KsmRuntime`."""

    name = "ksm"
    param_slots = P
    param_offset = OP

    def __init__(self, params, ctx) -> None:
        super().__init__(params, ctx)
        self.holes = Holes(ctx, not params.range_walk)
        self.forks = fork_registrations(ctx)
        self.same = SameAddress(ctx, params.same_address_first, params.same_address_key)
        self.K = new_state(ctx.prep, params, ctx, self.E.fr.shape[0])
        self.sc = self.K.sc
        self.v318 = params.profile == "3.18"

    def derived_params(self, params) -> dict[str, int]:
        return derived_params(params, self.ctx.hz)

    # sysfs writes between batches: as KsmRuntime's
    def refuse_params(self, changes) -> dict[str, str]:
        return sysfs_refusals(self.p, changes)

    def params_changed(self, old, changes, now: int) -> None:
        sc = self.sc
        if "pages_to_scan" in changes:
            sc[S_PTS] = self.p.pages_to_scan
        if self.p.sleep_millisecs != old.sleep_millisecs and sc[D_IDLE] == 0:
            sc[D_TWAKE] = sleep_written(int(sc[D_TWAKE]), self.batch_end(), now, self.p.sleep_millisecs, self.ctx.hz)

    def on_snapshot(self, s: int, now: int) -> None:
        prep, K = self.prep, self.K
        self.holes.update(s)
        self.same.update(s)
        order = prep.proc_order
        for proc in order[prep.proc_exit_snap[order] == s].tolist():
            if K.mm[proc, M_IN] and not K.mm[proc, M_EXITED]:
                ksm_exit(K, proc)
        for proc in order[(prep.proc_reg_snap[order] == s) & (prep.proc_exit_snap[order] > s)].tolist():
            if not K.mm[proc, M_IN]:
                ksm_enter(K, proc, now)

    def run_until(self, t_end: int) -> None:
        mm = self.K.mm
        while self.forks and self.forks[0][0] < t_end:  # ksm_fork: see KsmRuntime.run_until
            t, child, parent = self.forks.pop(0)
            self._run(t)
            if mm[parent, M_IN] and not mm[parent, M_EXITED] and not mm[child, M_IN]:
                ksm_enter(self.K, child, np.int64(t))
        self._run(t_end)
        self.check()

    def _run(self, t: int) -> None:
        h, sa = self.holes, self.same
        while True:
            run_until(self.E, self.K, h.gap, h.tail, sa.cls, sa.off, sa.mem, np.int64(t))
            if not self.sc[S_GROW]:
                break
            self.K = grow_nodes(self.K, 2 * int(self.sc[S_PTS]) + 4)

    def counters(self) -> dict:
        sc = self.sc
        return ksm_counters(
            shared=int(sc[S_SHARED]), sharing=int(sc[S_SHARING]), unshared=int(sc[S_UNSHARED]),
            rmap_items=int(sc[S_RMAP]), full_scans=int(sc[S_SEQNR]), chains=int(sc[S_CHAINS]), dups=int(sc[S_DUPS]),
            pages_to_scan=int(sc[S_PTS]), scanned=int(sc[S_SCANNED]), skipped=int(sc[S_SKIPPED]),
            ksm_zero_pages=int(self.E.ec[st.C_KSM_ZERO]), v318=self.v318,
        )

    def extras(self) -> dict:
        mm = self.K.mm
        head = mm.shape[0] - 1
        n = 0
        p = mm[head, M_NEXT]
        while p != head:
            n += 1
            p = mm[p, M_NEXT]
        return {"stable_tree_nodes": int(self.sc[S_STCOUNT]), "mm_slots": n}
