"""The fast runtime of ``pksm`` and ``pksm-delay``: the same algorithm as
:class:`~ksmtrace.policies.pksm.PksmReference`, on numpy arrays, one jitted call per snapshot (the
hooks) and one per interval (pksmd).

Layout: the policy's rmap (frame -> its pages, in mapping order) is a doubly linked list threaded
through page-indexed arrays; rmap items live in item-indexed arrays with a free list (grown from
Python between snapshots when a snapshot could register more items than are free); the new and
rescan lists, the unstable checksum list and the del list are linked lists through the item
arrays; the two trees are key-indexed arrays (key = dense sampled hash or content id).  Every
function mirrors a method of the reference, in the same order; the differential tests hold them
equal on every column.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.clock import next_wake, work_ns
from ksmtrace.engine.cost import N_UNITS, UNIT_INDEX
from ksmtrace.errors import PolicyContractError
from ksmtrace.policies.pksm import DROP, SUCCESS, TRY, event_keys

U_WAKEUPS = UNIT_INDEX["wakeups"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_FREE = UNIT_INDEX["rmap_frees"]
U_SAMPLED = UNIT_INDEX["sampled_hashes"]
U_HCMP = UNIT_INDEX["hash_compares"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_ZCHECK = UNIT_INDEX["zero_checks"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]
U_PRUNE = UNIT_INDEX["stale_prunes"]
U_MOVES = UNIT_INDEX["list_moves"]

# scalar slots
(S_TWAKE, S_BUSY, S_NOW, S_WAKE, S_RMAP, S_SHARED, S_SHARING, S_ZSHARING, S_SNODES, S_COLL,
 S_PEND, S_PCHG, S_PDIED, S_STCOUNT, S_UNCOUNT, S_NFREE,
 S_NEW_H, S_NEW_T, S_NEW_N, S_RES_H, S_RES_T, S_RES_N, S_CK_H, S_CK_T, S_DEL_H, S_DEL_T, S_ERR) = range(27)
N_SCALARS = 27

# parameter slots
P_PTS, P_SLEEP, P_PERIOD, P_ROTATE, P_COLL, P_TRACKCOW, P_DELAY, P_PROBN, P_PROBNS, P_RESTART, P_HZ, P_ZEROKEY = range(12)
N_PARAMS = 12

W_NONE, W_NEW, W_RESCAN, W_LOCAL = 0, 1, 2, 3
T_NONE, T_UNSTABLE, T_STABLE = 0, 1, 2

EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE = 1, 2, 3, 4

ITEM_FIELDS = [
    "it_frame", "it_where", "it_tree", "it_dell", "it_inksm", "it_init", "it_sum", "it_map", "it_nanon",
    "it_next", "it_prev", "ck_next", "ck_prev", "del_next", "it_cnt", "it_t0", "it_seen", "it_wake",
    "it_changed",
]
PAGE_FIELDS = ["pg_frame", "pg_key", "pg_next", "pg_prev", "mv_item"]
FRAME_FIELDS = ["fr_head", "fr_tail", "fr_cnt", "fr_item", "fr_ksm"]
KEY_FIELDS = ["st_item", "un_item"]
# column indices: one wide int64 array per kind of object (items, pages, frames, tree keys), one
# row per object, so that the fields of one object share a cache line and numba passes few arrays
(I_IT_FRAME, I_IT_WHERE, I_IT_TREE, I_IT_DELL, I_IT_INKSM, I_IT_INIT, I_IT_SUM, I_IT_MAP, I_IT_NANON,
 I_IT_NEXT, I_IT_PREV, I_CK_NEXT, I_CK_PREV, I_DEL_NEXT, I_IT_CNT, I_IT_T0, I_IT_SEEN, I_IT_WAKE,
 I_IT_CHANGED) = range(len(ITEM_FIELDS))
G_PG_FRAME, G_PG_KEY, G_PG_NEXT, G_PG_PREV, G_MV_ITEM = range(len(PAGE_FIELDS))
R_FR_HEAD, R_FR_TAIL, R_FR_CNT, R_FR_ITEM, R_FR_KSM = range(len(FRAME_FIELDS))
K_ST_ITEM, K_UN_ITEM = range(len(KEY_FIELDS))
ITEM_FILL = {"it_frame": -1, "it_sum": -1, "it_next": -1, "it_prev": -1, "ck_next": -1, "ck_prev": -1, "del_next": -1, "it_seen": -1, "it_wake": -1}
ITEM_ROW = np.array([ITEM_FILL.get(n, 0) for n in ITEM_FIELDS], np.int64)

PksmState = namedtuple(
    "PksmState",
    ["IT", "PG", "FR", "KY", "itrow", "freelist", "loc", "page_proc", "pg_lo", "pg_hi",
     "sc", "units", "bunits", "timing", "P"],
)


def _items(cap: int) -> np.ndarray:
    return np.tile(ITEM_ROW, (cap, 1))


def new_state(prep, params_arr, n_keys: int, timing, start_ns: int) -> PksmState:
    n, f = prep.n_pages, prep.n_gids
    cap = max(64, n // 4)
    sc = np.zeros(N_SCALARS, np.int64)
    sc[S_TWAKE] = start_ns
    sc[S_NFREE] = cap
    for h in (S_NEW_H, S_NEW_T, S_RES_H, S_RES_T, S_CK_H, S_CK_T, S_DEL_H, S_DEL_T):
        sc[h] = -1
    PG = np.full((n, len(PAGE_FIELDS)), -1, np.int64)
    PG[:, G_MV_ITEM] = -2
    FR = np.full((f, len(FRAME_FIELDS)), -1, np.int64)
    FR[:, R_FR_CNT] = 0
    FR[:, R_FR_KSM] = 0
    return PksmState(
        IT=_items(cap), PG=PG, FR=FR, KY=np.full((n_keys, len(KEY_FIELDS)), -1, np.int64), itrow=ITEM_ROW.copy(),
        freelist=np.arange(cap - 1, -1, -1, dtype=np.int64),
        loc=np.zeros(2 * int(params_arr[P_PTS]) + 8, np.int64),
        page_proc=prep.page_proc.astype(np.int64), pg_lo=prep.proc_pg_lo.astype(np.int64),
        pg_hi=prep.proc_pg_hi.astype(np.int64),
        sc=sc, units=np.zeros(N_UNITS, np.int64), bunits=np.zeros(N_UNITS, np.int64),
        timing=timing.astype(np.int64), P=params_arr,
    )


def grow(S: PksmState, extra: int) -> PksmState:
    """More item slots (from Python, between jitted calls)."""
    old = len(S.IT)
    new = max(2 * old, old + extra + 64)
    IT = np.concatenate([S.IT, _items(new - old)])
    nfree = int(S.sc[S_NFREE])
    freelist = np.concatenate([S.freelist[:nfree], np.arange(new - 1, old - 1, -1, dtype=np.int64)])
    S.sc[S_NFREE] = len(freelist)
    return S._replace(IT=IT, freelist=freelist)


# --- the rmap ----------------------------------------------------------------------------------------
@njit(cache=True)
def _map(S, pg, f):
    S.PG[pg, G_PG_FRAME] = f
    if f <= 0:
        return False
    was_empty = S.FR[f, R_FR_CNT] == 0
    t = S.FR[f, R_FR_TAIL]
    S.PG[pg, G_PG_PREV] = t
    S.PG[pg, G_PG_NEXT] = -1
    if t >= 0:
        S.PG[t, G_PG_NEXT] = pg
    else:
        S.FR[f, R_FR_HEAD] = pg
    S.FR[f, R_FR_TAIL] = pg
    S.FR[f, R_FR_CNT] += 1
    return was_empty


@njit(cache=True)
def _unmap(S, pg):
    f = S.PG[pg, G_PG_FRAME]
    S.PG[pg, G_PG_FRAME] = -1
    if f <= 0:
        return -1
    p = S.PG[pg, G_PG_PREV]
    n = S.PG[pg, G_PG_NEXT]
    if p >= 0:
        S.PG[p, G_PG_NEXT] = n
    else:
        S.FR[f, R_FR_HEAD] = n
    if n >= 0:
        S.PG[n, G_PG_PREV] = p
    else:
        S.FR[f, R_FR_TAIL] = p
    S.PG[pg, G_PG_NEXT] = -1
    S.PG[pg, G_PG_PREV] = -1
    S.FR[f, R_FR_CNT] -= 1
    return S.FR[f, R_FR_CNT]


# --- lists -------------------------------------------------------------------------------------------
@njit(cache=True)
def _list_append(S, it, w):
    hi = S_NEW_H if w == W_NEW else S_RES_H
    t = S.sc[hi + 1]
    S.IT[it, I_IT_PREV] = t
    S.IT[it, I_IT_NEXT] = -1
    if t >= 0:
        S.IT[t, I_IT_NEXT] = it
    else:
        S.sc[hi] = it
    S.sc[hi + 1] = it
    S.sc[hi + 2] += 1
    S.IT[it, I_IT_WHERE] = w


@njit(cache=True)
def _list_remove(S, it):
    w = S.IT[it, I_IT_WHERE]
    hi = S_NEW_H if w == W_NEW else S_RES_H
    p = S.IT[it, I_IT_PREV]
    n = S.IT[it, I_IT_NEXT]
    if p >= 0:
        S.IT[p, I_IT_NEXT] = n
    else:
        S.sc[hi] = n
    if n >= 0:
        S.IT[n, I_IT_PREV] = p
    else:
        S.sc[hi + 1] = p
    S.sc[hi + 2] -= 1
    S.IT[it, I_IT_NEXT] = -1
    S.IT[it, I_IT_PREV] = -1
    S.IT[it, I_IT_WHERE] = W_NONE


@njit(cache=True)
def _ck_append(S, it):
    t = S.sc[S_CK_T]
    S.IT[it, I_CK_PREV] = t
    S.IT[it, I_CK_NEXT] = -1
    if t >= 0:
        S.IT[t, I_CK_NEXT] = it
    else:
        S.sc[S_CK_H] = it
    S.sc[S_CK_T] = it


@njit(cache=True)
def _ck_remove(S, it):
    p = S.IT[it, I_CK_PREV]
    n = S.IT[it, I_CK_NEXT]
    if p >= 0:
        S.IT[p, I_CK_NEXT] = n
    else:
        S.sc[S_CK_H] = n
    if n >= 0:
        S.IT[n, I_CK_PREV] = p
    else:
        S.sc[S_CK_T] = p
    S.IT[it, I_CK_NEXT] = -1
    S.IT[it, I_CK_PREV] = -1


@njit(cache=True)
def _free_slot(S, it):
    S.IT[it, I_IT_FRAME] = -1
    S.freelist[S.sc[S_NFREE]] = it
    S.sc[S_NFREE] += 1


@njit(cache=True)
def for_fields_reset(S, it):
    for k in range(len(S.itrow)):
        S.IT[it, k] = S.itrow[k]


# --- hooks ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _page_freed(S, f):
    """pksm_del_anon_page for the physical page f (its last mapping went)."""
    S.FR[f, R_FR_KSM] = 0
    it = S.FR[f, R_FR_ITEM]
    if it < 0:
        return
    S.FR[f, R_FR_ITEM] = -1
    _item_page_freed(S, it)


@njit(cache=True)
def _item_page_freed(S, it):
    if S.IT[it, I_IT_MAP] > 0:
        S.sc[S_SHARING] -= S.IT[it, I_IT_MAP]
        S.IT[it, I_IT_MAP] = 0
    S.IT[it, I_IT_FRAME] = -1
    w = S.IT[it, I_IT_WHERE]
    if w == W_NEW or w == W_RESCAN:
        if w == W_NEW and S.IT[it, I_IT_CNT] > 0:
            S.sc[S_PDIED] += 1
        _list_remove(S, it)
        S.sc[S_RMAP] -= 1
        _free_slot(S, it)
    else:
        S.IT[it, I_IT_DELL] = 1
        S.IT[it, I_DEL_NEXT] = -1
        t = S.sc[S_DEL_T]
        if t >= 0:
            S.IT[t, I_DEL_NEXT] = it
        else:
            S.sc[S_DEL_H] = it
        S.sc[S_DEL_T] = it


@njit(cache=True)
def _register(S, f, now):
    if S.sc[S_NFREE] == 0:
        S.sc[S_ERR] = 1
        return
    S.sc[S_NFREE] -= 1
    it = S.freelist[S.sc[S_NFREE]]
    for_fields_reset(S, it)
    S.IT[it, I_IT_FRAME] = f
    S.IT[it, I_IT_INIT] = 1
    S.IT[it, I_IT_T0] = now
    S.FR[f, R_FR_ITEM] = it
    _list_append(S, it, W_NEW)
    S.sc[S_RMAP] += 1


@njit(cache=True)
def _unmap_sharing_page(S, f):
    it = S.FR[f, R_FR_ITEM]
    if it < 0 or S.IT[it, I_IT_INKSM] == 0 or S.IT[it, I_IT_FRAME] < 0:
        return
    if S.FR[f, R_FR_CNT] > S.IT[it, I_IT_MAP]:
        return
    if S.IT[it, I_IT_MAP] > 0:
        S.sc[S_SHARING] -= 1
        S.IT[it, I_IT_MAP] -= 1


@njit(cache=True)
def on_snapshot(E, S, pgs, kinds, keys, now):
    n = len(pgs)
    for i in range(n):  # removals first
        k = kinds[i]
        pg = pgs[i]
        if not (k == EV_GONE or k == EV_UNMERGE or k == EV_WRITE) or S.PG[pg, G_PG_FRAME] < 0:
            continue
        f = S.PG[pg, G_PG_FRAME]
        if f > 0 and k == EV_WRITE and S.FR[f, R_FR_KSM] == 1:
            _unmap_sharing_page(S, f)
        left = _unmap(S, pg)
        if left != 0:
            continue
        if k == EV_WRITE and S.FR[f, R_FR_KSM] == 0:  # written in place: the item follows the page
            S.PG[pg, G_MV_ITEM] = S.FR[f, R_FR_ITEM]
            S.FR[f, R_FR_ITEM] = -1
        else:
            _page_freed(S, f)
    for i in range(n):  # then arrivals
        k = kinds[i]
        pg = pgs[i]
        if not (k == EV_APPEAR or k == EV_WRITE) or st.cid(E, pg) < 0:
            continue
        f = st.frame(E, pg)
        S.PG[pg, G_PG_KEY] = keys[i]
        new_page = _map(S, pg, f)
        mv = S.PG[pg, G_MV_ITEM]
        if mv != -2:
            S.PG[pg, G_MV_ITEM] = -2
            if mv >= 0:
                if new_page:
                    S.IT[mv, I_IT_FRAME] = f
                    S.FR[f, R_FR_ITEM] = mv
                else:
                    _item_page_freed(S, mv)
            continue
        if not new_page:
            continue
        if k == EV_APPEAR or S.P[P_TRACKCOW] == 1:
            _register(S, f, now)
    for i in range(n):  # (defensive) a page written in place that vanished
        pg = pgs[i]
        mv = S.PG[pg, G_MV_ITEM]
        if mv != -2:
            S.PG[pg, G_MV_ITEM] = -2
            if mv >= 0:
                _item_page_freed(S, mv)


# --- trees ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _bitlen(x):
    b = 0
    while x > 0:
        b += 1
        x >>= 1
    return b


@njit(cache=True)
def remove_rmap_item_from_tree(S, it, free_anon):
    t = S.IT[it, I_IT_TREE]
    if t == T_STABLE:
        c = S.IT[it, I_IT_SUM]
        if S.KY[c, K_ST_ITEM] == it:
            S.KY[c, K_ST_ITEM] = -1
            S.sc[S_STCOUNT] -= 1
        S.sc[S_SHARED] -= 1
    elif t == T_UNSTABLE:
        c = S.IT[it, I_IT_SUM]
        if S.KY[c, K_UN_ITEM] == it:
            S.KY[c, K_UN_ITEM] = -1
            S.sc[S_UNCOUNT] -= 1
        _ck_remove(S, it)
    S.IT[it, I_IT_TREE] = T_NONE
    if free_anon:
        S.sc[S_SNODES] -= S.IT[it, I_IT_NANON]
        S.IT[it, I_IT_NANON] = 0


@njit(cache=True)
def _stale(S, t):
    return S.IT[t, I_IT_DELL] == 1 or S.IT[t, I_IT_FRAME] < 0


@njit(cache=True)
def stable_tree_search(S, key):
    while True:
        S.units[U_HCMP] += _bitlen(S.sc[S_STCOUNT])
        t = S.KY[key, K_ST_ITEM]
        if t < 0:
            return -1
        if _stale(S, t):
            remove_rmap_item_from_tree(S, t, False)
            S.units[U_PRUNE] += 1
            continue
        return t


@njit(cache=True)
def unstable_tree_search_insert(S, it, key):
    while True:
        S.units[U_HCMP] += _bitlen(S.sc[S_UNCOUNT])
        t = S.KY[key, K_UN_ITEM]
        if t < 0:
            break
        if _stale(S, t):
            remove_rmap_item_from_tree(S, t, False)
            S.units[U_PRUNE] += 1
            continue
        return t
    S.IT[it, I_IT_TREE] = T_UNSTABLE
    S.KY[key, K_UN_ITEM] = it
    S.sc[S_UNCOUNT] += 1
    _ck_append(S, it)
    return -1


@njit(cache=True)
def stable_tree_insert(S, it, key):
    while True:
        S.units[U_HCMP] += _bitlen(S.sc[S_STCOUNT])
        t = S.KY[key, K_ST_ITEM]
        if t < 0:
            break
        if _stale(S, t):
            remove_rmap_item_from_tree(S, t, False)
            S.units[U_PRUNE] += 1
            continue
        return TRY
    S.IT[it, I_IT_TREE] = T_STABLE
    S.KY[key, K_ST_ITEM] = it
    S.sc[S_STCOUNT] += 1
    return SUCCESS


@njit(cache=True)
def stable_tree_append(S, head):
    S.IT[head, I_IT_NANON] += 1
    S.sc[S_SNODES] += 1
    if S.IT[head, I_IT_NANON] == 1:
        S.sc[S_SHARED] += 1


@njit(cache=True)
def _split(E, S, pg):
    pr = S.page_proc[pg]
    st.split_thp(E, pg, S.pg_lo[pr], S.pg_hi[pr], False)


@njit(cache=True)
def _remap_all(E, S, f, target):
    """rmap walk of page f onto KSM page target (0: the zero page): (PTEs replaced, equal)."""
    first = S.FR[f, R_FR_HEAD]
    _split(E, S, first)
    cid = st.cid(E, first)
    if target == 0:
        equal = cid == 0
    else:
        equal = cid == st.cid(E, S.FR[target, R_FR_HEAD])
    done = 0
    now = S.sc[S_NOW]
    q = first
    while q >= 0:
        nxt = S.PG[q, G_PG_NEXT]
        S.units[U_WP] += 1
        if target == 0:
            S.units[U_ZCHECK] += 1
        else:
            S.units[U_MEMCMP] += 1
        if equal:
            S.units[U_REMAP] += 1
            if target == 0:
                ok = st.merge_zero(E, q, now)
            else:
                ok = st.merge(E, q, target, now)
            if ok:
                _unmap(S, q)
                _map(S, q, target)
                done += 1
        q = nxt
    if S.FR[f, R_FR_CNT] == 0:
        _page_freed(S, f)
    return done, equal


@njit(cache=True)
def _key(S, it):
    return S.PG[S.FR[S.IT[it, I_IT_FRAME], R_FR_HEAD], G_PG_KEY]


@njit(cache=True)
def cmp_and_merge_page(E, S, it, init):
    f = S.IT[it, I_IT_FRAME]
    if S.FR[f, R_FR_KSM] == 1 or S.IT[it, I_IT_TREE] == T_STABLE:
        return DROP
    remove_rmap_item_from_tree(S, it, False)
    if init:
        S.IT[it, I_IT_SUM] = _key(S, it)
        S.units[U_SAMPLED] += 1
    key = S.IT[it, I_IT_SUM]
    if key == S.P[P_ZEROKEY]:
        nz, equal = _remap_all(E, S, f, 0)
        S.sc[S_ZSHARING] += nz
        if equal:
            return SUCCESS
        if S.P[P_COLL] == 1:
            S.sc[S_COLL] += 1
            return SUCCESS
    t = stable_tree_search(S, key)
    if t >= 0:
        nm, equal = _remap_all(E, S, f, S.IT[t, I_IT_FRAME])
        if not equal and S.P[P_COLL] == 0:
            return TRY
        if not equal:
            S.sc[S_COLL] += 1
        S.sc[S_SHARING] += nm
        S.IT[t, I_IT_MAP] += nm
        stable_tree_append(S, t)
        return SUCCESS
    t = unstable_tree_search_insert(S, it, key)
    if t < 0:
        return SUCCESS
    tf = S.IT[t, I_IT_FRAME]
    equal = st.cid(E, S.FR[f, R_FR_HEAD]) == st.cid(E, S.FR[tf, R_FR_HEAD])
    if not equal and S.P[P_COLL] == 0:
        return TRY
    _split(E, S, S.FR[f, R_FR_HEAD])
    S.units[U_WP] += S.FR[f, R_FR_CNT]
    st.stabilize(E, S.FR[f, R_FR_HEAD])
    S.FR[f, R_FR_KSM] = 1
    nm, equal = _remap_all(E, S, tf, f)
    if not equal:
        S.sc[S_COLL] += 1
    S.sc[S_SHARING] += nm
    S.IT[it, I_IT_MAP] += nm
    remove_rmap_item_from_tree(S, t, False)
    if stable_tree_insert(S, it, key) == TRY:
        return TRY
    stable_tree_append(S, it)
    stable_tree_append(S, it)
    return SUCCESS


# --- pksmd ----------------------------------------------------------------------------------------------
@njit(cache=True)
def _probation_over(S, it):
    S.IT[it, I_IT_CNT] += 1
    if S.IT[it, I_IT_CNT] > S.P[P_PROBN] and S.sc[S_NOW] - S.IT[it, I_IT_T0] >= S.P[P_PROBNS]:
        return True
    S.IT[it, I_IT_WAKE] = S.sc[S_WAKE]
    S.units[U_VISITED] += 1
    S.units[U_SAMPLED] += 1
    h = _key(S, it)
    if S.IT[it, I_IT_SEEN] >= 0 and h != S.IT[it, I_IT_SEEN]:
        if S.IT[it, I_IT_CHANGED] == 0:
            S.IT[it, I_IT_CHANGED] = 1
            S.sc[S_PCHG] += 1
        if S.P[P_RESTART] == 1:
            S.IT[it, I_IT_CNT] = 0
            S.IT[it, I_IT_T0] = S.sc[S_NOW]
    S.IT[it, I_IT_SEEN] = h
    return False


@njit(cache=True)
def _drop(S, it):
    S.sc[S_SNODES] -= S.IT[it, I_IT_NANON]
    S.IT[it, I_IT_NANON] = 0
    f = S.IT[it, I_IT_FRAME]
    if f >= 0 and S.FR[f, R_FR_ITEM] == it:
        S.FR[f, R_FR_ITEM] = -1
    S.IT[it, I_IT_FRAME] = -1
    S.sc[S_RMAP] -= 1
    S.units[U_FREE] += 1
    if S.IT[it, I_IT_TREE] == T_NONE:
        _free_slot(S, it)
    # (an item dropped while in a tree stays there, stale, as in PKSM; its slot is not reused)


@njit(cache=True)
def ksm_do_scan(E, S, n):
    loc = S.loc
    probation = S.P[P_PROBN] > 0 or S.P[P_PROBNS] > 0
    delay = S.P[P_DELAY] == 1
    # the local list is built in loc[lo:hi): new items are pushed at the front
    mid = len(loc) // 2
    lo = mid
    hi = mid
    scan = 0
    while S.sc[S_NEW_H] >= 0:
        it = S.sc[S_NEW_H]
        if delay and S.IT[it, I_IT_WAKE] == S.sc[S_WAKE]:
            break
        _list_remove(S, it)
        S.units[U_MOVES] += 1
        if probation and not _probation_over(S, it):
            _list_append(S, it, W_NEW)
        else:
            if probation:
                S.sc[S_PEND] += 1
            S.IT[it, I_IT_WHERE] = W_LOCAL
            S.IT[it, I_IT_INKSM] = 1
            lo -= 1
            loc[lo] = it
        if scan > n:
            break
        scan += 1
    scan = 0
    while S.sc[S_RES_H] >= 0:
        it = S.sc[S_RES_H]
        _list_remove(S, it)
        if S.IT[it, I_IT_DELL] == 1:
            continue
        S.units[U_MOVES] += 1
        S.IT[it, I_IT_WHERE] = W_LOCAL
        loc[hi] = it
        hi += 1
        if scan > n:
            break
        scan += 1
    for j in range(lo, hi):
        it = loc[j]
        S.IT[it, I_IT_WHERE] = W_NONE
        if S.IT[it, I_IT_DELL] == 1:
            continue
        init = S.IT[it, I_IT_INIT] == 1
        S.IT[it, I_IT_INIT] = 0
        if S.IT[it, I_IT_FRAME] < 0 or S.IT[it, I_IT_INKSM] == 0:
            continue
        S.units[U_VISITED] += 1
        r = cmp_and_merge_page(E, S, it, init)
        if r == DROP:
            _drop(S, it)
        elif r == TRY:
            S.IT[it, I_IT_INIT] = 1
            _list_append(S, it, W_RESCAN)
            S.units[U_MOVES] += 1
    # drain the del list
    it = S.sc[S_DEL_H]
    S.sc[S_DEL_H] = -1
    S.sc[S_DEL_T] = -1
    while it >= 0:
        nxt = S.IT[it, I_DEL_NEXT]
        remove_rmap_item_from_tree(S, it, True)
        S.sc[S_RMAP] -= 1
        S.units[U_FREE] += 1
        _free_slot(S, it)
        it = nxt
    update_unstable_page_checksum(S)


@njit(cache=True)
def update_unstable_page_checksum(S):
    n = S.P[P_PTS]
    U = S.sc[S_UNCOUNT]
    if U < n:
        need = U
    else:
        need = (U * S.P[P_SLEEP]) // (S.P[P_PERIOD] * 1000)
    if need <= 0:
        return
    if need > n:
        need = n
    rotate = S.P[P_ROTATE] == 1
    limit = -1
    if rotate:  # the number of entries on the list now
        limit = 0
        x = S.sc[S_CK_H]
        while x >= 0:
            limit += 1
            x = S.IT[x, I_CK_NEXT]
    scan = 0
    it = S.sc[S_CK_H]
    while it >= 0:
        if limit >= 0 and scan >= limit:
            break
        nxt = S.IT[it, I_CK_NEXT]
        if S.IT[it, I_IT_FRAME] >= 0 and S.IT[it, I_IT_TREE] == T_UNSTABLE:
            S.units[U_VISITED] += 1
            S.units[U_SAMPLED] += 1
            c = _key(S, it)
            if c != S.IT[it, I_IT_SUM]:
                remove_rmap_item_from_tree(S, it, False)
                S.IT[it, I_IT_SUM] = c
                S.IT[it, I_IT_INIT] = 0
                _list_append(S, it, W_RESCAN)
                S.units[U_MOVES] += 1
            elif rotate:
                _ck_remove(S, it)
                _ck_append(S, it)
                S.units[U_MOVES] += 1
                if nxt < 0:  # it was the last one: the walk would meet it again
                    nxt = -1
        if scan > need:
            break
        scan += 1
        it = nxt


@njit(cache=True)
def run_until(E, S, t_end):
    while S.sc[S_TWAKE] < t_end:
        for i in range(len(S.units)):
            S.bunits[i] = S.units[i]
        S.sc[S_NOW] = S.sc[S_TWAKE]
        S.sc[S_WAKE] += 1
        S.units[U_WAKEUPS] += 1
        ksm_do_scan(E, S, S.P[P_PTS])
        w = work_ns(S.bunits, S.units, S.timing)
        S.sc[S_BUSY] += w
        S.sc[S_TWAKE] = next_wake(S.sc[S_TWAKE] + w, S.P[P_SLEEP], S.P[P_HZ])


# --- the runtime object ------------------------------------------------------------------------------------
def params_array(p, hz: int, delay: bool, zero_key: int) -> np.ndarray:
    a = np.zeros(N_PARAMS, np.int64)
    a[P_PTS] = p.pages_to_scan
    a[P_SLEEP] = p.sleep_millisecs
    a[P_PERIOD] = p.period_seconds
    a[P_ROTATE] = int(p.recheck_rotate)
    a[P_COLL] = int(p.collision_counts_as_merge)
    a[P_TRACKCOW] = int(p.track_cow_pages)
    a[P_DELAY] = int(delay)
    a[P_PROBN] = int(getattr(p, "probation_passes", 0)) if delay else 0
    a[P_PROBNS] = int(round(float(getattr(p, "probation_seconds", 0.0)) * 1e9)) if delay else 0
    a[P_RESTART] = int(delay and getattr(p, "on_change", "restart") == "restart")
    a[P_HZ] = hz
    a[P_ZEROKEY] = zero_key
    return a


class PksmFast:
    def __init__(self, params, ctx, delay: bool = False) -> None:
        self.p = params
        self.ctx = ctx
        self.prep = ctx.prep
        self.E = ctx.engine.E
        self.delay = delay
        self.ev_key, n_keys, zero_key, self.hash_desc = event_keys(ctx.prep)
        self.S = new_state(ctx.prep, params_array(params, ctx.hz, delay, zero_key), n_keys, ctx.timing_ps, ctx.start_ns)
        kinds = self.prep.ev_kind
        arr = ((kinds == EV_APPEAR) | (kinds == EV_WRITE)).astype(np.int64)
        self._arrivals = np.concatenate([[0], np.cumsum(arr)])

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.prep
        sl = p.events(s)
        need = int(self._arrivals[sl.stop] - self._arrivals[sl.start])
        if self.S.sc[S_NFREE] < need:
            self.S = grow(self.S, need)
        on_snapshot(self.E, self.S, p.ev_pg[sl], p.ev_kind[sl], self.ev_key[sl], np.int64(now))
        self._check()

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.S, np.int64(t_end))
        self._check()

    def _check(self) -> None:
        if self.S.sc[S_ERR]:
            raise PolicyContractError(f"pksm fast runtime internal error {int(self.S.sc[S_ERR])}")

    def counters(self) -> dict:
        sc = self.S.sc
        out = {
            "pages_shared": int(sc[S_SHARED]),
            "pages_sharing": int(sc[S_SHARING] + sc[S_ZSHARING]),
            "pages_zero_sharing": int(sc[S_ZSHARING]),
            "pages_unshared": int(sc[S_UNCOUNT]),
            "full_scans": 0,
            "stable_nodes": int(sc[S_SNODES]),
            "rmap_items": int(sc[S_RMAP]),
            "new_list": int(sc[S_NEW_N]),
            "rescan_list": int(sc[S_RES_N]),
            "collision_merges": int(sc[S_COLL]),
        }
        if self.delay:
            out.update(probation_ended=int(sc[S_PEND]), probation_changed=int(sc[S_PCHG]), probation_died=int(sc[S_PDIED]))
        return out

    def units(self) -> np.ndarray:
        return self.S.units

    def busy_ns(self) -> int:
        return int(self.S.sc[S_BUSY])

    def extras(self) -> dict:
        sc = self.S.sc
        out = {
            "sampled_hash": self.hash_desc,
            "stable_tree_nodes": int(sc[S_STCOUNT]),
            "unstable_tree_nodes": int(sc[S_UNCOUNT]),
            "collision_merges": int(sc[S_COLL]),
        }
        if self.delay:
            out.update(probation_ended=int(sc[S_PEND]), probation_changed=int(sc[S_PCHG]), probation_died=int(sc[S_PDIED]))
        return out
