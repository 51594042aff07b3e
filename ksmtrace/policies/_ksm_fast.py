"""The fast runtime of the ``ksm`` policy: the same algorithm as :class:`~ksmtrace.policies.ksm.KsmReference`,
on numpy arrays inside one jitted loop per snapshot interval.

Layout: rmap items are indexed by page id; stable nodes (plain, dup, chain) live in arrays with a
free list; a node's hlist and a chain's dups are doubly linked lists threaded through the item and
node arrays; the stable and unstable trees are content-indexed arrays (the unstable entries are
valid only for the current full scan).  Every function mirrors one of the reference's methods and
is kept in the same order; the differential tests hold them equal on every counter.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.clock import next_wake, work_ns
from ksmtrace.engine.cost import N_UNITS, UNIT_INDEX
from ksmtrace.errors import PolicyContractError

# unit indices (compile-time constants)
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

# scalar state slots
S_TWAKE, S_BUSY, S_CUR, S_CURPG, S_SEQNR, S_SHARED, S_SHARING, S_UNSHARED = range(8)
S_SCANNED, S_SKIPPED, S_CHAINS, S_DUPS, S_PTS, S_ADV_START, S_ADV_CHANGE, S_ADV_SCANTIME = range(8, 16)
S_ADV_CPU, S_IDLE, S_UNCOUNT, S_STCOUNT, S_NFREE, S_RMAP, S_NOW, S_ERR = range(16, 24)
N_SCALARS = 24

# parameter slots
P_PTS, P_SLEEP, P_SMART, P_ZERO, P_MAXSHARE, P_PRUNE, P_ADVISOR, P_TARGET = range(8)
P_MAXCPU, P_MINPAGES, P_MAXPAGES, P_NEWORDER, P_V318, P_REMAP, P_HZ = range(8, 15)
N_PARAMS = 15

K_FREE, K_PLAIN, K_DUP, K_CHAIN = 0, 1, 2, 3
F_NONE, F_UNSTABLE, F_STABLE = 0, 1, 2

KsmState = namedtuple(
    "KsmState",
    [
        "it_alloc", "it_old", "it_age", "it_skips", "it_flag", "it_seq", "it_ukey", "it_node",
        "it_next", "it_prev",
        "nd_kind", "nd_cid", "nd_frame", "nd_gen", "nd_first", "nd_len", "nd_chain",
        "nd_dfirst", "nd_dnext", "nd_dprev", "nd_ndups", "nd_prune", "nd_freelist",
        "st_root", "fnode", "un_item", "un_scan",
        "mm_next", "mm_prev", "mm_in", "mm_exited", "proc_items",
        "page_proc", "pg_lo", "pg_hi",
        "sc", "units", "bunits", "timing", "P",
    ],
)


def new_state(prep, params_arr: np.ndarray, timing: np.ndarray, start_ns: int) -> KsmState:
    n, c, f, np_ = prep.n_pages, prep.n_cids, prep.n_gids, prep.n_procs
    cap = 2 * n + 16
    sc = np.zeros(N_SCALARS, np.int64)
    sc[S_TWAKE] = start_ns
    sc[S_CUR] = np_  # the head
    sc[S_PTS] = params_arr[P_MINPAGES] if params_arr[P_ADVISOR] else params_arr[P_PTS]
    sc[S_IDLE] = 1
    sc[S_NFREE] = cap
    mm_next = np.full(np_ + 1, np_, np.int64)
    mm_prev = np.full(np_ + 1, np_, np.int64)
    return KsmState(
        it_alloc=np.zeros(n, np.uint8), it_old=np.full(n, -1, np.int64), it_age=np.zeros(n, np.int64),
        it_skips=np.zeros(n, np.int64), it_flag=np.zeros(n, np.uint8), it_seq=np.zeros(n, np.int64),
        it_ukey=np.full(n, -1, np.int64), it_node=np.full(n, -1, np.int64),
        it_next=np.full(n, -1, np.int64), it_prev=np.full(n, -1, np.int64),
        nd_kind=np.zeros(cap, np.uint8), nd_cid=np.full(cap, -1, np.int64), nd_frame=np.zeros(cap, np.int64),
        nd_gen=np.zeros(cap, np.int64), nd_first=np.full(cap, -1, np.int64), nd_len=np.zeros(cap, np.int64),
        nd_chain=np.full(cap, -1, np.int64), nd_dfirst=np.full(cap, -1, np.int64),
        nd_dnext=np.full(cap, -1, np.int64), nd_dprev=np.full(cap, -1, np.int64),
        nd_ndups=np.zeros(cap, np.int64), nd_prune=np.zeros(cap, np.int64),
        nd_freelist=np.arange(cap - 1, -1, -1, dtype=np.int64),
        st_root=np.full(c, -1, np.int64), fnode=np.full(f, -1, np.int64),
        un_item=np.full(c, -1, np.int64), un_scan=np.full(c, -1, np.int64),
        mm_next=mm_next, mm_prev=mm_prev, mm_in=np.zeros(max(np_, 1), np.uint8),
        mm_exited=np.zeros(max(np_, 1), np.uint8), proc_items=np.zeros(max(np_, 1), np.int64),
        page_proc=prep.page_proc.astype(np.int64), pg_lo=prep.proc_pg_lo.astype(np.int64),
        pg_hi=prep.proc_pg_hi.astype(np.int64),
        sc=sc, units=np.zeros(N_UNITS, np.int64), bunits=np.zeros(N_UNITS, np.int64),
        timing=timing.astype(np.int64), P=params_arr,
    )


# --- small helpers --------------------------------------------------------------------------------
@njit(cache=True)
def _bitlen(n):
    b = 0
    while n > 0:
        b += 1
        n >>= 1
    return b


@njit(cache=True)
def _scannable(E, pg):
    return E.cid[pg] >= 0 and E.frame[pg] != 0


@njit(cache=True)
def _node_alive(E, K, nd):
    return st.frame_alive(E, K.nd_frame[nd], K.nd_gen[nd])


@njit(cache=True)
def _alloc_node(K):
    if K.sc[S_NFREE] == 0:
        K.sc[S_ERR] = 1
        return -1
    K.sc[S_NFREE] -= 1
    nd = K.nd_freelist[K.sc[S_NFREE]]
    K.nd_first[nd] = -1
    K.nd_len[nd] = 0
    K.nd_chain[nd] = -1
    K.nd_dfirst[nd] = -1
    K.nd_dnext[nd] = -1
    K.nd_dprev[nd] = -1
    K.nd_ndups[nd] = 0
    return nd


@njit(cache=True)
def _free_node(K, nd):
    K.nd_kind[nd] = K_FREE
    K.nd_freelist[K.sc[S_NFREE]] = nd
    K.sc[S_NFREE] += 1


# --- mm list --------------------------------------------------------------------------------------
@njit(cache=True)
def _list_insert_before(K, proc, before):
    prev = K.mm_prev[before]
    K.mm_next[prev] = proc
    K.mm_prev[proc] = prev
    K.mm_next[proc] = before
    K.mm_prev[before] = proc


@njit(cache=True)
def _list_remove(K, proc):
    p = K.mm_prev[proc]
    n = K.mm_next[proc]
    K.mm_next[p] = n
    K.mm_prev[n] = p


@njit(cache=True)
def ksm_enter(K, proc, now):
    head = len(K.mm_next) - 1
    _list_insert_before(K, proc, K.sc[S_CUR])  # behind the cursor (the tail when at head)
    K.mm_in[proc] = 1
    if K.sc[S_IDLE] == 1:
        K.sc[S_IDLE] = 0
        if K.sc[S_TWAKE] < now:
            K.sc[S_TWAKE] = now
    return head


@njit(cache=True)
def ksm_exit(K, proc):
    K.mm_exited[proc] = 1
    if K.sc[S_CUR] == proc:
        return
    _list_remove(K, proc)
    if K.proc_items[proc] == 0:
        K.mm_in[proc] = 0
        return
    cur = K.sc[S_CUR]
    _list_insert_before(K, proc, K.mm_next[cur])  # just after the cursor


# --- trees ----------------------------------------------------------------------------------------
@njit(cache=True)
def _hlist_del(K, pg):
    nd = K.it_node[pg]
    p = K.it_prev[pg]
    n = K.it_next[pg]
    if p >= 0:
        K.it_next[p] = n
    else:
        K.nd_first[nd] = n
    if n >= 0:
        K.it_prev[n] = p
    K.it_next[pg] = -1
    K.it_prev[pg] = -1
    K.nd_len[nd] -= 1


@njit(cache=True)
def remove_node_from_stable_tree(E, K, nd):
    it = K.nd_first[nd]
    while it >= 0:
        nxt = K.it_next[it]
        if nxt >= 0:
            K.sc[S_SHARING] -= 1
        else:
            K.sc[S_SHARED] -= 1
        K.it_flag[it] = F_NONE
        K.it_node[it] = -1
        K.it_next[it] = -1
        K.it_prev[it] = -1
        it = nxt
    K.nd_first[nd] = -1
    K.nd_len[nd] = 0
    K.units[U_PRUNE] += 1
    f = K.nd_frame[nd]
    if f >= 0 and K.fnode[f] == nd:
        K.fnode[f] = -1
    if K.nd_kind[nd] == K_DUP:
        ch = K.nd_chain[nd]
        p = K.nd_dprev[nd]
        n = K.nd_dnext[nd]
        if p >= 0:
            K.nd_dnext[p] = n
        else:
            K.nd_dfirst[ch] = n
        if n >= 0:
            K.nd_dprev[n] = p
        K.nd_ndups[ch] -= 1
        K.sc[S_DUPS] -= 1
    else:
        c = K.nd_cid[nd]
        if K.st_root[c] == nd:
            K.st_root[c] = -1
            K.sc[S_STCOUNT] -= 1
    _free_node(K, nd)


@njit(cache=True)
def remove_rmap_item_from_tree(E, K, pg):
    fl = K.it_flag[pg]
    if fl == F_STABLE:
        nd = K.it_node[pg]
        if not _node_alive(E, K, nd):
            remove_node_from_stable_tree(E, K, nd)
            return
        _hlist_del(K, pg)
        if K.nd_len[nd] > 0:
            K.sc[S_SHARING] -= 1
        else:
            K.sc[S_SHARED] -= 1
        K.it_flag[pg] = F_NONE
        K.it_node[pg] = -1
    elif fl == F_UNSTABLE:
        age = (K.sc[S_SEQNR] - K.it_seq[pg]) & 0xFF
        if age > 1:
            K.sc[S_ERR] = 2
        if age == 0:
            u = K.it_ukey[pg]
            if K.un_item[u] == pg and K.un_scan[u] == K.sc[S_SEQNR]:
                K.un_item[u] = -1
            K.sc[S_UNCOUNT] -= 1
        K.sc[S_UNSHARED] -= 1
        K.it_flag[pg] = F_NONE


@njit(cache=True)
def _candidate(K, nd, offset):
    if K.P[P_V318] == 1:
        return True
    return K.nd_len[nd] > 0 and K.nd_len[nd] + offset < K.P[P_MAXSHARE]


@njit(cache=True)
def stable_node_dup(E, K, ch, prune):
    now = K.sc[S_NOW]
    if prune == 0 or now < K.nd_prune[ch] + K.P[P_PRUNE] * 1000000:
        prune = 0
    else:
        K.nd_prune[ch] = now
    found = -1
    found_len = 0
    d = K.nd_dfirst[ch]
    while d >= 0:
        nxt = K.nd_dnext[d]
        K.units[U_SNODE] += 1
        if not _node_alive(E, K, d):
            remove_node_from_stable_tree(E, K, d)
            d = nxt
            continue
        if found < 0 or (_candidate(K, d, 0) and ((not _candidate(K, found, 0)) or K.nd_len[d] > found_len)):
            found = d
            found_len = K.nd_len[d]
            if prune == 0 and _candidate(K, found, 0):
                break
        d = nxt
    c = K.nd_cid[ch]
    if found >= 0:
        if K.nd_ndups[ch] == 1:  # collapse
            K.st_root[c] = found
            K.nd_kind[found] = K_PLAIN
            K.nd_chain[found] = -1
            K.nd_dnext[found] = -1
            K.nd_dprev[found] = -1
            _free_node(K, ch)
            K.sc[S_CHAINS] -= 1
            K.sc[S_DUPS] -= 1
        elif K.nd_dfirst[ch] != found and _candidate(K, found, 1):
            p = K.nd_dprev[found]
            n = K.nd_dnext[found]
            K.nd_dnext[p] = n
            if n >= 0:
                K.nd_dprev[n] = p
            first = K.nd_dfirst[ch]
            K.nd_dnext[found] = first
            K.nd_dprev[found] = -1
            K.nd_dprev[first] = found
            K.nd_dfirst[ch] = found
    else:
        if K.st_root[c] == ch:
            K.st_root[c] = -1
            K.sc[S_STCOUNT] -= 1
        K.sc[S_CHAINS] -= 1
        _free_node(K, ch)
    return found


@njit(cache=True)
def _stable_lookup(E, K, c, prune):
    while True:
        root = K.st_root[c]
        if root < 0:
            return -1
        if K.nd_kind[root] == K_CHAIN:
            d = stable_node_dup(E, K, root, prune)
            if d < 0:
                if K.P[P_V318] == 1:
                    return -1
                continue
            return d
        if not _node_alive(E, K, root):
            remove_node_from_stable_tree(E, K, root)
            if K.P[P_V318] == 1:
                return -1
            continue
        return root


@njit(cache=True)
def stable_tree_search(E, K, pg):
    c = E.cid[pg]
    K.units[U_SNODE] += _bitlen(K.sc[S_STCOUNT])
    d = _stable_lookup(E, K, c, 1)
    if d < 0 or not _candidate(K, d, 0):
        return -1
    return d


@njit(cache=True)
def stable_tree_insert(E, K, frame, gen, c):
    K.units[U_SNODE] += _bitlen(K.sc[S_STCOUNT])
    existing = _stable_lookup(E, K, c, 0)
    if existing >= 0 and K.P[P_V318] == 1:
        return -1
    new = _alloc_node(K)
    if new < 0:
        return -1
    K.nd_cid[new] = c
    K.nd_frame[new] = frame
    K.nd_gen[new] = gen
    if existing < 0:
        K.nd_kind[new] = K_PLAIN
        K.st_root[c] = new
        K.sc[S_STCOUNT] += 1
    else:
        root = K.st_root[c]
        if K.nd_kind[root] == K_PLAIN:  # alloc_stable_node_chain
            ch = _alloc_node(K)
            if ch < 0:
                return -1
            K.nd_kind[ch] = K_CHAIN
            K.nd_cid[ch] = c
            K.nd_prune[ch] = K.sc[S_NOW]
            K.nd_kind[root] = K_DUP
            K.nd_chain[root] = ch
            K.nd_dfirst[ch] = root
            K.nd_dnext[root] = -1
            K.nd_dprev[root] = -1
            K.nd_ndups[ch] = 1
            K.st_root[c] = ch
            K.sc[S_CHAINS] += 1
            K.sc[S_DUPS] += 1
            root = ch
        K.nd_kind[new] = K_DUP
        K.nd_chain[new] = root
        first = K.nd_dfirst[root]
        K.nd_dnext[new] = first
        K.nd_dprev[new] = -1
        if first >= 0:
            K.nd_dprev[first] = new
        K.nd_dfirst[root] = new
        K.nd_ndups[root] += 1
        K.sc[S_DUPS] += 1
    K.fnode[frame] = new
    return new


@njit(cache=True)
def stable_tree_append(K, pg, nd):
    first = K.nd_first[nd]
    K.it_next[pg] = first
    K.it_prev[pg] = -1
    if first >= 0:
        K.it_prev[first] = pg
    K.nd_first[nd] = pg
    K.nd_len[nd] += 1
    K.it_node[pg] = nd
    K.it_flag[pg] = F_STABLE
    if K.nd_len[nd] > 1:
        K.sc[S_SHARING] += 1
    else:
        K.sc[S_SHARED] += 1


@njit(cache=True)
def unstable_tree_search_insert(E, K, pg):
    c = E.cid[pg]
    K.units[U_UNODE] += _bitlen(K.sc[S_UNCOUNT])
    seq = K.sc[S_SEQNR]
    if K.un_scan[c] == seq and K.un_item[c] >= 0:
        tpg = K.un_item[c]
        if not _scannable(E, tpg):
            return -2  # get_mergeable_page failed: no insert
        if E.frame[tpg] == E.frame[pg]:
            return -2  # forked page
        if E.cid[tpg] == c:
            return tpg
    K.it_flag[pg] = F_UNSTABLE
    K.it_seq[pg] = seq & 0xFF
    K.it_ukey[pg] = c
    K.un_item[c] = pg
    K.un_scan[c] = seq
    K.sc[S_UNCOUNT] += 1
    K.sc[S_UNSHARED] += 1
    return -1


# --- merging ----------------------------------------------------------------------------------------
@njit(cache=True)
def _split(E, K, pg):
    pr = K.page_proc[pg]
    st.split_thp(E, pg, K.pg_lo[pr], K.pg_hi[pr], K.P[P_REMAP] == 1)
    return _scannable(E, pg)


@njit(cache=True)
def _merge_with_ksm_page(E, K, pg, nd):
    if not _split(E, K, pg):
        return False
    K.units[U_WP] += 1
    K.units[U_MEMCMP] += 1
    K.units[U_REMAP] += 1
    return st.merge(E, pg, K.nd_frame[nd], K.sc[S_NOW])


@njit(cache=True)
def _merge_with_zero_page(E, K, pg):
    if K.P[P_ZERO] == 0 or K.P[P_V318] == 1 or E.cid[pg] != 0:
        return False
    if not _split(E, K, pg):
        return True
    K.units[U_WP] += 1
    K.units[U_MEMCMP] += 1
    K.units[U_REMAP] += 1
    return st.merge_zero(E, pg, K.sc[S_NOW])


@njit(cache=True)
def _merge_two_pages(E, K, pg, tpg):
    if not _split(E, K, pg):
        return -1
    if not _split(E, K, tpg):
        return -1
    gen = st.stabilize(E, pg)
    K.units[U_WP] += 2
    K.units[U_MEMCMP] += 1
    K.units[U_REMAP] += 1
    if not st.merge(E, tpg, E.frame[pg], K.sc[S_NOW]):
        return -1
    return gen


@njit(cache=True)
def _checksum_gate(E, K, pg):
    if K.P[P_V318] == 1:
        K.units[U_JHASH] += 1
    else:
        K.units[U_CSUM] += 1
    c = E.cid[pg]
    if K.it_old[pg] != c:
        K.it_old[pg] = c
        return False
    return True


@njit(cache=True)
def cmp_and_merge_page(E, K, pg):
    page_node = -1
    if st.page_is_ksm(E, pg):
        page_node = K.fnode[E.frame[pg]]
    if page_node >= 0:
        if K.it_flag[pg] == F_STABLE and K.it_node[pg] == page_node:
            return
        remove_rmap_item_from_tree(E, K, pg)
        stable_tree_append(K, pg, page_node)
        return
    if K.P[P_NEWORDER] == 1:
        remove_rmap_item_from_tree(E, K, pg)
        if not _checksum_gate(E, K, pg):
            return
        if _merge_with_zero_page(E, K, pg):
            return
        if not _scannable(E, pg):
            return
        nd = stable_tree_search(E, K, pg)
        remove_rmap_item_from_tree(E, K, pg)
        if nd >= 0:
            if _merge_with_ksm_page(E, K, pg, nd):
                stable_tree_append(K, pg, nd)
            return
    else:
        nd = stable_tree_search(E, K, pg)
        remove_rmap_item_from_tree(E, K, pg)
        if nd >= 0:
            if _merge_with_ksm_page(E, K, pg, nd):
                stable_tree_append(K, pg, nd)
            return
        if not _checksum_gate(E, K, pg):
            return
        if _merge_with_zero_page(E, K, pg):
            return
        if not _scannable(E, pg):
            return
    tpg = unstable_tree_search_insert(E, K, pg)
    if tpg < 0:
        return
    remove_rmap_item_from_tree(E, K, tpg)
    gen = _merge_two_pages(E, K, pg, tpg)
    if gen < 0:
        return
    nd = stable_tree_insert(E, K, E.frame[pg], gen, E.cid[pg])
    if nd < 0:
        return
    stable_tree_append(K, tpg, nd)
    stable_tree_append(K, pg, nd)


# --- scanning ---------------------------------------------------------------------------------------
@njit(cache=True)
def _free_item(E, K, pg):
    remove_rmap_item_from_tree(E, K, pg)
    K.it_alloc[pg] = 0
    K.it_old[pg] = -1
    K.it_age[pg] = 0
    K.it_skips[pg] = 0
    K.it_flag[pg] = F_NONE
    K.it_node[pg] = -1
    K.proc_items[K.page_proc[pg]] -= 1
    K.sc[S_RMAP] -= 1
    K.units[U_FREE] += 1


@njit(cache=True)
def _should_skip(E, K, pg):
    if K.P[P_SMART] == 0 or K.P[P_V318] == 1:
        return False
    if st.page_is_ksm(E, pg):
        return False
    age = K.it_age[pg]
    if age != 255:
        K.it_age[pg] = age + 1
    if age < 3:
        return False
    if K.it_skips[pg] == 0:
        if age <= 3:
            K.it_skips[pg] = 1
        elif age <= 5:
            K.it_skips[pg] = 2
        elif age <= 8:
            K.it_skips[pg] = 4
        else:
            K.it_skips[pg] = 8
        return False
    K.sc[S_SKIPPED] += 1
    K.it_skips[pg] -= 1
    remove_rmap_item_from_tree(E, K, pg)
    return True


@njit(cache=True)
def _cpu_now(K):
    return K.sc[S_BUSY] + work_ns(K.bunits, K.units, K.timing)


@njit(cache=True)
def _advisor(K):
    now = K.sc[S_NOW] + work_ns(K.bunits, K.units, K.timing)
    scan_time = (now - K.sc[S_ADV_START]) // 1000000 // 1000
    if scan_time == 0:
        scan_time = 1
    cpu_time = _cpu_now(K)
    cpu_ms = (cpu_time - K.sc[S_ADV_CPU]) // 1000 // 1000
    cpu_percent = (cpu_ms * 100) // (scan_time * 1000)
    if cpu_percent == 0:
        cpu_percent = 1
    last = K.sc[S_ADV_SCANTIME] if K.sc[S_ADV_SCANTIME] != 0 else scan_time
    factor = K.P[P_TARGET] * 100 // scan_time
    if factor == 0:
        factor = 1
    change = scan_time * 100 // last
    if change == 0:
        change = 1
    change = (70 * K.sc[S_ADV_CHANGE] + 30 * change) // 100
    pts = K.sc[S_PTS]
    pages = pts * 100 // factor
    pages = pages * change // 100
    ppc = pts // cpu_percent
    if ppc == 0:
        ppc = 1
    pages = min(pages, ppc * K.P[P_MAXCPU])
    pages = max(pages, ppc * 10)
    pages = min(pages, K.P[P_MAXPAGES])
    K.sc[S_ADV_CHANGE] = change
    K.sc[S_ADV_SCANTIME] = scan_time
    K.sc[S_ADV_CPU] = cpu_time
    K.sc[S_PTS] = pages


@njit(cache=True)
def scan_get_next_rmap_item(E, K):
    head = len(K.mm_next) - 1
    if K.mm_next[head] == head:
        return -1
    if K.sc[S_CUR] == head:
        if K.P[P_ADVISOR] == 1:
            K.sc[S_ADV_START] = K.sc[S_NOW] + work_ns(K.bunits, K.units, K.timing)
        K.units[U_SCAN_STARTS] += 1
        K.sc[S_UNCOUNT] = 0  # the unstable root is reset (entries of older scans are invalid)
        K.sc[S_CUR] = K.mm_next[head]
        K.sc[S_CURPG] = K.pg_lo[K.sc[S_CUR]]
    while True:
        proc = K.sc[S_CUR]
        lo = K.pg_lo[proc]
        hi = K.pg_hi[proc]
        if K.mm_exited[proc] == 0:
            pg = K.sc[S_CURPG]
            if pg < lo:
                pg = lo
            while pg < hi:
                if _scannable(E, pg):
                    if K.it_alloc[pg] == 0:
                        K.it_alloc[pg] = 1
                        K.proc_items[proc] += 1
                        K.sc[S_RMAP] += 1
                        K.units[U_ALLOC] += 1
                    K.units[U_VISITED] += 1
                    if _should_skip(E, K, pg):
                        pg += 1
                        continue
                    K.sc[S_CURPG] = pg + 1
                    return pg
                K.units[U_WALKED] += 1
                if K.it_alloc[pg] == 1:
                    _free_item(E, K, pg)
                pg += 1
        else:
            for q in range(lo, hi):
                if K.it_alloc[q] == 1:
                    _free_item(E, K, q)
        nxt = K.mm_next[proc]
        if K.mm_exited[proc] == 1:
            _list_remove(K, proc)
            K.mm_in[proc] = 0
            K.mm_exited[proc] = 0
            K.proc_items[proc] = 0
        K.sc[S_CUR] = nxt
        if nxt == head:
            if K.P[P_ADVISOR] == 1:
                _advisor(K)
            K.sc[S_SEQNR] += 1
            return -1
        K.sc[S_CURPG] = K.pg_lo[nxt]


@njit(cache=True)
def run_until(E, K, t_end):
    head = len(K.mm_next) - 1
    while K.sc[S_TWAKE] < t_end:
        if K.mm_next[head] == head:
            K.sc[S_IDLE] = 1
            K.sc[S_TWAKE] = t_end
            return
        for i in range(len(K.units)):
            K.bunits[i] = K.units[i]
        K.sc[S_NOW] = K.sc[S_TWAKE]
        K.units[U_WAKEUPS] += 1
        n = K.sc[S_PTS]
        for _ in range(n):
            pg = scan_get_next_rmap_item(E, K)
            if pg < 0:
                break
            cmp_and_merge_page(E, K, pg)
            K.sc[S_SCANNED] += 1
        w = work_ns(K.bunits, K.units, K.timing)
        K.sc[S_BUSY] += w
        K.sc[S_TWAKE] = next_wake(K.sc[S_TWAKE] + w, K.P[P_SLEEP], K.P[P_HZ])


# --- the runtime object -------------------------------------------------------------------------------
def params_array(p, hz: int) -> np.ndarray:
    a = np.zeros(N_PARAMS, np.int64)
    v318 = p.profile == "3.18"
    a[P_PTS] = p.pages_to_scan
    a[P_SLEEP] = p.sleep_millisecs
    a[P_SMART] = int(p.smart_scan and not v318)
    a[P_ZERO] = int(p.use_zero_pages)
    a[P_MAXSHARE] = (1 << 62) if v318 else p.max_page_sharing
    a[P_PRUNE] = p.stable_node_chains_prune_millisecs
    a[P_ADVISOR] = int(p.advisor_mode == "scan-time")
    a[P_TARGET] = p.advisor_target_scan_time
    a[P_MAXCPU] = p.advisor_max_cpu
    a[P_MINPAGES] = p.advisor_min_pages_to_scan
    a[P_MAXPAGES] = p.advisor_max_pages_to_scan
    a[P_NEWORDER] = int(p.profile in ("6.11", "6.12"))
    a[P_V318] = int(v318)
    a[P_REMAP] = int(p.profile == "6.12")
    a[P_HZ] = hz
    return a


class KsmFast:
    def __init__(self, params, ctx) -> None:
        self.p = params
        self.ctx = ctx
        self.prep = ctx.prep
        self.E = ctx.engine.E
        self.K = new_state(ctx.prep, params_array(params, ctx.hz), ctx.timing_ps, ctx.start_ns)
        self.v318 = params.profile == "3.18"

    def on_snapshot(self, s: int, now: int) -> None:
        prep = self.prep
        exits = prep.proc_order[prep.proc_exit_snap[prep.proc_order] == s]
        for proc in exits.tolist():
            if self.K.mm_in[proc] and not self.K.mm_exited[proc]:
                ksm_exit(self.K, proc)
        regs = prep.proc_order[(prep.proc_reg_snap[prep.proc_order] == s) & (prep.proc_exit_snap[prep.proc_order] > s)]
        for proc in regs.tolist():
            ksm_enter(self.K, proc, now)

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.K, np.int64(t_end))
        if self.K.sc[S_ERR]:
            raise PolicyContractError(f"ksm fast runtime internal error {int(self.K.sc[S_ERR])} (node table full or unstable item too old)")

    def counters(self) -> dict:
        sc = self.K.sc
        rmap = int(sc[S_RMAP])
        shared, sharing, unshared = int(sc[S_SHARED]), int(sc[S_SHARING]), int(sc[S_UNSHARED])
        zero = int(self.E.cnt[st.C_KSM_ZERO])
        out = {
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": max(0, rmap - shared - sharing - unshared),
            "full_scans": int(sc[S_SEQNR]),
            "rmap_items": rmap,
            "stable_node_chains": int(sc[S_CHAINS]),
            "stable_node_dups": int(sc[S_DUPS]),
            "pages_to_scan": int(sc[S_PTS]),
        }
        if self.v318:
            out.update(pages_scanned=None, pages_skipped=None, ksm_zero_pages=None, general_profit=None)
        else:
            out.update(
                pages_scanned=int(sc[S_SCANNED]),
                pages_skipped=int(sc[S_SKIPPED]),
                ksm_zero_pages=zero,
                general_profit=(sharing + zero) * 4096 - rmap * 64,
            )
        return out

    def units(self) -> np.ndarray:
        return self.K.units

    def busy_ns(self) -> int:
        return int(self.K.sc[S_BUSY])

    def extras(self) -> dict:
        head = len(self.K.mm_next) - 1
        n = 0
        p = self.K.mm_next[head]
        while p != head:
            n += 1
            p = self.K.mm_next[p]
        return {"stable_tree_nodes": int(self.K.sc[S_STCOUNT]), "mm_slots": n}
