"""The numba kernel of ``uksm``: the accelerator of :class:`~ksmtrace.policies.uksm.runtime.UksmRuntime`,
the same algorithm on numpy arrays, one jitted call per snapshot (the hooks: COW accounting, VMA
changes, anon_vma) and one per interval (uksmd).  Every function mirrors a method of the readable
runtime, in the same order; the differential tests hold them equal on every column.

Layout (one wide int64 array per kind of object; the fields of an object share a row):

* ``SL`` one row per slot instance (static: process, size, page-index base, page-id range, key;
  dynamic: list membership, rung, sradix index, the per-pass statistics); the new list is doubly
  linked through it, the dedup list singly (the kernel adds at its head);
* ``RG`` one row per rung: the rules' columns (ratio, cover, pages, quota, step) then the cursor
  (current slot, offset), the pass flag, the slot count; ``RIDX`` the slots by sradix index;
* ``PERM`` and ``ITEM_OF`` one entry per page index of every slot instance (the rmap_list_pool:
  the permutation, the rmap item at each page index), ``ENTRY_PG`` the page id there;
* ``IT`` rmap items, ``SN`` stable nodes (the stable_node_list doubly linked, newest first),
  ``NV`` node_vmas (each node's list and each node_vma's items doubly linked), each with a free
  stack; ``NODEOF`` engine frame -> its stable node;
* the trees: ``STN``/``UTN`` one row per tree-node key (valid while its generation / hash round is
  current, so a re-key or a flush is O(1)), ``SBH``/``UBH`` content id -> the stable node / unstable
  item filed under that ``hash_max`` (the sub-trees: a ``hash_max`` names one tree node);
* ``PGA`` per page: merged into (KSM / zero page), mapping generation, covering slot;
* ``sc``: the daemon's block, the policy's scalars, its parameters (slots named after
  ``UksmParams``' fields); ``RS`` the strength walk and ``RNG`` the random streams (shared layouts
  of :mod:`ksmtrace.policies.uksm.rules`).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.api import EV_APPEAR, EV_GONE, EV_WRITE
from ksmtrace.engine.cost import UNIT_INDEX
from ksmtrace.engine.daemon import (D_ERR, D_NOW, DU, KernelRuntime, new_block, param_slots, params_array,
                                    scalar_slots, sleep, wake_up, work_so_far)
from ksmtrace.jitutil import bitlen
from ksmtrace.engine.state import P_PROC
from ksmtrace.policies.lists import hlist_add_head, hlist_del, list_add_tail, list_del
from ksmtrace.policies.uksm import UksmParams
from ksmtrace.policies.uksm import rules as R
from ksmtrace.policies.uksm.rules import (R_COVER, R_PAGES, R_QUOTA, R_RATIO, R_STEP, RNG_PERM, RNG_RUNG, RS_NEG, RS_POS,
                                          RS_S, RS_STATE, STRENGTH_FULL, STRENGTH_MAX)
from ksmtrace.policies.uksm.runtime import (ENTER_BATCH, M_KSM, M_ZERO, S_DEL, S_FREED, S_LADDER, S_NEW, SPIN_LOCK_PERIOD,
                                            setup, uksm_counters, uksm_extras)
from ksmtrace.trace.schema import SAMPLE_STRENGTHS

U_WALKED = UNIT_INDEX["addresses_walked"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_WORDS = UNIT_INDEX["sampled_words"]
U_ALLOC = UNIT_INDEX["rmap_allocs"]
U_FREE = UNIT_INDEX["rmap_frees"]
U_HCMP = UNIT_INDEX["hash_compares"]
U_SNV = UNIT_INDEX["stable_node_visits"]
U_UNV = UNIT_INDEX["unstable_node_visits"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_ZCHECK = UNIT_INDEX["zero_checks"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]
U_PRUNE = UNIT_INDEX["stale_prunes"]
U_MOVES = UNIT_INDEX["list_moves"]
U_STARTS = UNIT_INDEX["scan_starts"]

# sc: the daemon's slots, then the policy's scalars, then the parameters (at OP)
(S_EMA, S_SLEEP_J, S_SLEEP_SAVED, S_SLEEP_REAL, S_EVAL, S_HROUND, S_FSR, S_SVP, S_TOTAL, S_PSCANNED,
 S_SHARED, S_SHARING, S_UNSHARED, S_ZERO, S_BATCHES, S_LEVEL, S_COLLI_ST, S_COLLI_UN, S_COLLI_MAX, S_CHANGED,
 S_ZFALSE, S_PROMO, S_DEMO, S_NSTN, S_NUTN, S_SGEN, S_NEW_H, S_NEW_T, S_NEW_N, S_DEL_N, S_DEDUP_H,
 S_SN_HEAD, S_IT_NF, S_SN_NF, S_NV_NF, S_MEMCMP, S_MAXCPU, S_HZ) = scalar_slots(38)
N_SCALARS = 38
P = param_slots(UksmParams, derived=("ladder", "snap_i"))
OP = scalar_slots(N_SCALARS).stop

# slot columns
(C_PROC, C_PAGES, C_BASE, C_PGLO, C_PGHI, C_KEY, C_STATE, C_RUNG, C_INDEX, C_PSCAN, C_THIS, C_FSR, C_MERGED,
 C_COWED, C_BEMERGED, C_INDEDUP, C_INUKSM, C_ANON, C_NEXT, C_PREV, C_DNEXT) = range(21)
N_CCOLS = 21
# rung columns after the rules' five
G_NSLOTS, G_CUR, G_OFF, G_FIN, G_NIDX = range(R.N_RCOLS, R.N_RCOLS + 5)
N_GCOLS = R.N_RCOLS + 5
# item columns
(I_SLOT, I_IDX, I_PG, I_ST, I_UN, I_HM, I_HR, I_TN, I_UKEY, I_PGEN, I_NODE, I_NV, I_NNEXT, I_NPREV) = range(14)
N_ICOLS = 14
# stable node columns
N_FRAME, N_GEN, N_CID, N_HM, N_TN, N_NVHEAD, N_LNEXT, N_LPREV = range(8)
N_NCOLS = 8
# node_vma columns
V_SLOT, V_NODE, V_NEXT, V_PREV, V_IHEAD = range(5)
N_VCOLS = 5
# tree-node key columns (stable: generation; unstable: hash round)
T_GEN, T_COUNT, T_XOR, T_ZERO = range(4)
# per-page columns
A_MERGED, A_MAPGEN, A_PGSLOT = range(3)

ERR_NO_ITEM, ERR_NO_NODE, ERR_KSM_NO_NODE, ERR_HASH_MAX, ERR_NO_NV = 1, 2, 3, 4, 5

UState = namedtuple("UState", [
    "SL", "RG", "RIDX", "PERM", "ITEM_OF", "ENTRY_PG", "IT", "ITF", "SN", "SNF", "NV", "NVF", "NODEOF", "STN", "UTN",
    "SBH", "UBH", "PGA", "KEYS", "ZK", "RS", "RNG", "PLO", "PHI", "BUF", "ADD_OFF", "ADD_IDS", "REM_OFF", "REM_IDS",
    "INH_OFF", "INH_IDS", "sc",
])


def new_state(prep, params, ctx, su) -> UState:
    T = su.slots
    n_inst, n_pages, total = T.n, prep.n_pages, len(T.entry_pg)
    cap = n_pages + 2
    sc = new_block(N_SCALARS, len(P), ctx)
    sc[OP : OP + len(P)] = params_array(params, P, {"cpu_ratios": 0, "eval_intervals": 0, "ladder": su.ladder,
                                                     "snap_i": su.snap})
    sc[S_EMA] = R.PAGE_TIME_DEFAULT
    sc[S_SLEEP_J] = sc[S_SLEEP_SAVED] = sc[S_SLEEP_REAL] = su.sleep_jiffies
    sc[S_EVAL] = sc[S_HROUND] = sc[S_FSR] = 1
    sc[S_NEW_H] = sc[S_NEW_T] = sc[S_DEDUP_H] = sc[S_SN_HEAD] = -1
    sc[S_IT_NF] = sc[S_SN_NF] = sc[S_NV_NF] = cap
    sc[S_MEMCMP] = int(params.memcmp_cost)
    sc[S_MAXCPU] = su.max_cpu
    sc[S_HZ] = su.hz
    SL = np.zeros((max(n_inst, 1), N_CCOLS), np.int64)
    if n_inst:
        SL[:n_inst, C_PROC] = T.proc
        SL[:n_inst, C_PAGES] = T.pages
        SL[:n_inst, C_BASE] = T.base
        SL[:n_inst, C_PGLO] = T.pglo
        SL[:n_inst, C_PGHI] = T.pghi
        SL[:n_inst, C_KEY] = T.key
    SL[:, C_RUNG] = -1
    SL[:, C_INDEX] = -1
    SL[:, C_NEXT] = -1
    SL[:, C_PREV] = -1
    SL[:, C_DNEXT] = -1
    RG = np.zeros((4, N_GCOLS), np.int64)
    RG[:, : R.N_RCOLS] = su.rg
    RG[:, G_CUR] = -1
    perm = np.empty(total, np.int64)
    for i in range(n_inst):
        b, p = int(T.base[i]), int(T.pages[i])
        perm[b : b + p] = np.arange(p)
    nk = max(su.n_keys, 1)
    stn = np.zeros((nk, 4), np.int64)
    stn[:, T_GEN] = -1
    stn[:, T_ZERO] = -1
    utn = np.zeros((nk, 4), np.int64)
    utn[:, T_GEN] = -1
    utn[:, T_ZERO] = -1
    PGA = np.zeros((max(n_pages, 1), 3), np.int64)
    PGA[:, A_PGSLOT] = -1
    n_cids = su.keys.shape[1]
    return UState(
        SL=SL, RG=RG, RIDX=np.full((4, max(n_inst, 1)), -1, np.int64), PERM=perm, ITEM_OF=np.full(total, -1, np.int64),
        ENTRY_PG=T.entry_pg, IT=np.zeros((cap, N_ICOLS), np.int64), ITF=np.arange(cap - 1, -1, -1, dtype=np.int64),
        SN=np.zeros((cap, N_NCOLS), np.int64), SNF=np.arange(cap - 1, -1, -1, dtype=np.int64),
        NV=np.zeros((cap, N_VCOLS), np.int64), NVF=np.arange(cap - 1, -1, -1, dtype=np.int64),
        NODEOF=np.full(st.n_frame_slots(prep), -1, np.int64), STN=stn, UTN=utn,
        SBH=np.full(n_cids, -1, np.int64), UBH=np.full(n_cids, -1, np.int64), PGA=PGA, KEYS=su.keys, ZK=su.zero_keys,
        RS=su.rs.copy(), RNG=su.rng.copy(), PLO=prep.proc_pg_lo.astype(np.int64), PHI=prep.proc_pg_hi.astype(np.int64),
        BUF=np.zeros(max(n_inst, 1) + 1, np.int64), ADD_OFF=T.add_off, ADD_IDS=T.add_ids, REM_OFF=T.rem_off,
        REM_IDS=T.rem_ids, INH_OFF=T.inh_off, INH_IDS=T.inh_ids, sc=sc,
    )


# --- small helpers ----------------------------------------------------------------------------------
@njit(inline="always")
def _level(U):
    sc = U.sc
    if sc[OP + P.ladder] == 1:
        return U.RS[RS_S]
    return R.snap_level(U.RS[RS_S], sc[OP + P.snap_i])


@njit(inline="always")
def _key(U, cid):
    return U.KEYS[U.sc[S_LEVEL], cid]


@njit(inline="always")
def _hash_max_cost(U):
    d = STRENGTH_MAX - R.strength_words(U.RS)
    U.sc[DU + U_WORDS] += d
    U.RS[RS_NEG] += d


@njit(inline="always")
def _split(E, U, pg):
    pr = E.pg[pg, P_PROC]
    st.split_thp(E, pg, U.PLO[pr], U.PHI[pr], False)


@njit(inline="always")
def _ubh_get(U, cid, h):
    """The unstable item filed under hash_max cid + 1 in tree node ``h`` of this round, or -1."""
    x = U.UBH[cid]
    if x < 0:
        return -1
    IT = U.IT
    if IT[x, I_UN] == 1 and IT[x, I_HR] == U.sc[S_HROUND] and IT[x, I_UKEY] == cid + 1 and IT[x, I_TN] == h:
        return x
    return -1


@njit(inline="always")
def _sbh_get(U, cid, h):
    """The stable node filed under hash_max cid + 1 in tree node ``h``, or -1."""
    x = U.SBH[cid]
    if x < 0:
        return -1
    SN = U.SN
    if SN[x, N_HM] == cid + 1 and SN[x, N_TN] == h:
        return x
    return -1


@njit(inline="always")
def _stn_exists(U, h):
    return U.STN[h, T_GEN] == U.sc[S_SGEN]


@njit(inline="always")
def _utn_exists(U, h):
    return U.UTN[h, T_GEN] == U.sc[S_HROUND] and U.UTN[h, T_COUNT] > 0


# --- hash_max --------------------------------------------------------------------------------------------
@njit
def _item_hash_max(E, U, it):
    IT = U.IT
    if IT[it, I_HM] == 0:
        IT[it, I_HM] = st.cid(E, IT[it, I_PG]) + 1
        _hash_max_cost(U)
        if IT[it, I_UN] == 1 and IT[it, I_HR] == U.sc[S_HROUND] and IT[it, I_UKEY] == 0:  # re-file it
            h = IT[it, I_TN]
            U.UTN[h, T_ZERO] = -1
            IT[it, I_UKEY] = IT[it, I_HM]
            U.UBH[IT[it, I_HM] - 1] = it
    return IT[it, I_HM]


@njit
def _node_hash_max(U, node):
    SN = U.SN
    if SN[node, N_HM] == 0:
        SN[node, N_HM] = SN[node, N_CID] + 1
        _hash_max_cost(U)
        h = SN[node, N_TN]
        if h >= 0 and U.STN[h, T_ZERO] == node:
            U.STN[h, T_ZERO] = -1
            U.SBH[SN[node, N_CID]] = node
    return SN[node, N_HM]


# --- items ------------------------------------------------------------------------------------------------
@njit
def _remove_node_from_stable_tree(U, node, keep, unlink):
    SN = U.SN
    NV = U.NV
    IT = U.IT
    sc = U.sc
    sc[DU + U_PRUNE] += 1
    nv = SN[node, N_NVHEAD]
    if nv >= 0:
        while nv >= 0:
            x = NV[nv, V_IHEAD]
            while x >= 0:
                sc[S_SHARING] -= 1
                IT[x, I_ST] = 0
                IT[x, I_NODE] = -1
                IT[x, I_NV] = -1
                x = IT[x, I_NNEXT]
            nxt = NV[nv, V_NEXT]
            U.NVF[sc[S_NV_NF]] = nv
            sc[S_NV_NF] += 1
            nv = nxt
        sc[S_SHARED] -= 1
        sc[S_SHARING] += 1
        SN[node, N_NVHEAD] = -1
    h = SN[node, N_TN]
    if h >= 0 and unlink:
        STN = U.STN
        hm = SN[node, N_HM]
        if hm == 0:
            STN[h, T_ZERO] = -1
        elif U.SBH[hm - 1] == node:
            U.SBH[hm - 1] = -1
        STN[h, T_COUNT] -= 1
        STN[h, T_XOR] ^= node + 1
        if STN[h, T_COUNT] == 0 and not keep:
            STN[h, T_GEN] = -1
            sc[S_NSTN] -= 1
    SN[node, N_TN] = -1
    # the stable_node_list
    hlist_del(SN, N_LPREV, N_LNEXT, sc, S_SN_HEAD, node)
    f = SN[node, N_FRAME]
    if U.NODEOF[f] == node:
        U.NODEOF[f] = -1
    U.SNF[sc[S_SN_NF]] = node
    sc[S_SN_NF] += 1


@njit
def _remove_rmap_item_from_tree(E, U, it):
    IT = U.IT
    sc = U.sc
    if IT[it, I_ST] == 1:
        node = IT[it, I_NODE]
        SN = U.SN
        sc[DU + U_SNV] += 1
        if not st.frame_alive(E, SN[node, N_FRAME], SN[node, N_GEN]):
            _remove_node_from_stable_tree(U, node, False, True)
            IT[it, I_HM] = 0
            return
        NV = U.NV
        nv = IT[it, I_NV]
        a, b = IT[it, I_NPREV], IT[it, I_NNEXT]
        if a >= 0:
            IT[a, I_NNEXT] = b
        else:
            NV[nv, V_IHEAD] = b
        if b >= 0:
            IT[b, I_NPREV] = a
        if NV[nv, V_IHEAD] < 0:  # the node_vma is empty: off the node's list
            a, b = NV[nv, V_PREV], NV[nv, V_NEXT]
            if a >= 0:
                NV[a, V_NEXT] = b
            else:
                SN[node, N_NVHEAD] = b
            if b >= 0:
                NV[b, V_PREV] = a
            U.NVF[sc[S_NV_NF]] = nv
            sc[S_NV_NF] += 1
        if SN[node, N_NVHEAD] < 0:
            sc[S_SHARED] -= 1
        else:
            sc[S_SHARING] -= 1
    elif IT[it, I_UN] == 1:
        if IT[it, I_HR] == sc[S_HROUND]:
            UTN = U.UTN
            h = IT[it, I_TN]
            uk = IT[it, I_UKEY]
            if uk == 0:
                UTN[h, T_ZERO] = -1
            elif U.UBH[uk - 1] == it:
                U.UBH[uk - 1] = -1
            UTN[h, T_COUNT] -= 1
            UTN[h, T_XOR] ^= it + 1
            if UTN[h, T_COUNT] == 0:
                UTN[h, T_GEN] = -1
                sc[S_NUTN] -= 1
        sc[S_UNSHARED] -= 1
    IT[it, I_ST] = 0
    IT[it, I_UN] = 0
    IT[it, I_NODE] = -1
    IT[it, I_NV] = -1
    IT[it, I_HM] = 0


@njit
def _free_item(E, U, it):
    _remove_rmap_item_from_tree(E, U, it)
    IT = U.IT
    sc = U.sc
    U.ITEM_OF[U.SL[IT[it, I_SLOT], C_BASE] + IT[it, I_IDX]] = -1
    U.ITF[sc[S_IT_NF]] = it
    sc[S_IT_NF] += 1
    sc[DU + U_FREE] += 1


# --- the hooks ----------------------------------------------------------------------------------------------
@njit(cache=True)
def on_snapshot(E, U, s, pgs, kinds):
    SL = U.SL
    PGA = U.PGA
    sc = U.sc
    n = len(pgs)
    for i in range(n):  # 1. COWs of merged pages count against the VMA they were in
        k = kinds[i]
        if st.is_removal(k):
            pg = pgs[i]
            m = PGA[pg, A_MERGED]
            PGA[pg, A_MERGED] = 0
            if m != 0 and k != EV_GONE:
                sl = PGA[pg, A_PGSLOT]
                if sl >= 0:
                    SL[sl, C_COWED] += 1
            if m == M_ZERO:
                sc[S_ZERO] -= 1
            if k != EV_WRITE:
                PGA[pg, A_MAPGEN] += 1
    for j in range(U.REM_OFF[s], U.REM_OFF[s + 1]):  # 2. VMAs gone or changed
        i = U.REM_IDS[j]
        for pg in range(SL[i, C_PGLO], SL[i, C_PGHI]):
            if PGA[pg, A_PGSLOT] == i:
                PGA[pg, A_PGSLOT] = -1
        if SL[i, C_STATE] == S_NEW:
            _new_list_remove(U, i)
            SL[i, C_STATE] = S_FREED
        elif SL[i, C_STATE] == S_LADDER:
            SL[i, C_STATE] = S_DEL
            U.BUF[sc[S_DEL_N]] = i  # the del list (freed at the end of the next wake-up)
            sc[S_DEL_N] += 1
    for j in range(U.ADD_OFF[s], U.ADD_OFF[s + 1]):
        i = U.ADD_IDS[j]
        SL[i, C_STATE] = S_NEW
        _new_list_append(U, i)
        anon = 0
        for pg in range(SL[i, C_PGLO], SL[i, C_PGHI]):
            PGA[pg, A_PGSLOT] = i
            if anon == 0 and st.is_candidate(E, pg):
                anon = 1
        for q in range(U.INH_OFF[i], U.INH_OFF[i + 1]):
            if SL[U.INH_IDS[q], C_ANON] == 1:
                anon = 1
        SL[i, C_ANON] = anon
    for i in range(n):  # 3. a page faulted in gives its VMA an anon_vma
        k = kinds[i]
        pg = pgs[i]
        if st.is_arrival(k) and st.is_candidate(E, pg):
            sl = PGA[pg, A_PGSLOT]
            if sl >= 0:
                SL[sl, C_ANON] = 1
            if k == EV_APPEAR and st.page_is_ksm(E, pg):
                PGA[pg, A_MERGED] = M_KSM


@njit(inline="always")
def _new_list_append(U, i):
    list_add_tail(U.SL, C_PREV, C_NEXT, U.sc, S_NEW_H, S_NEW_T, S_NEW_N, i)


@njit(inline="always")
def _new_list_remove(U, i):
    list_del(U.SL, C_PREV, C_NEXT, U.sc, S_NEW_H, S_NEW_T, S_NEW_N, i)


# --- the ladder -------------------------------------------------------------------------------------------
@njit
def _locate(U, r, first, idx):
    """slot_iter: (slot, offset) of concatenated offset ``idx`` from sradix index ``first``; slot -1 if none."""
    RIDX = U.RIDX
    SL = U.SL
    for k in range(first, U.RG[r, G_NIDX]):
        s = RIDX[r, k]
        if s < 0:
            continue
        p = SL[s, C_PAGES]
        if idx < p:
            return s, idx
        idx -= p
    return -1, 0


@njit
def _reset_current_scan(U, r, finished, recalc):
    RG = U.RG
    if finished:
        RG[r, G_FIN] = 1
    if recalc or R.step_need_recalc(RG[r, R_STEP], RG[r, R_PAGES]):
        RG[r, R_STEP] = R.calc_step(RG[r, R_COVER], RG[r, R_PAGES], RG[r, R_RATIO], U.sc[S_EMA])
    o = R.rand32(U.RNG, RNG_RUNG) % RG[r, R_STEP]
    s, off = _locate(U, r, 0, o)
    RG[r, G_CUR] = s
    RG[r, G_OFF] = off


@njit
def _advance_current_scan(U, r):
    RG = U.RG
    slot = RG[r, G_CUR]
    step = RG[r, R_STEP]
    n = ((U.SL[slot, C_PAGES] - RG[r, G_OFF]) % step) & 0xFFFF
    s, off = _locate(U, r, U.SL[slot, C_INDEX] + 1, step - n)
    if s >= 0:
        RG[r, G_CUR] = s
        RG[r, G_OFF] = off
    else:
        _reset_current_scan(U, r, True, False)


@njit
def _rung_rm_slot(U, slot):
    SL = U.SL
    RG = U.RG
    r = SL[slot, C_RUNG]
    if RG[r, G_CUR] == slot:
        _advance_current_scan(U, r)
    U.RIDX[r, SL[slot, C_INDEX]] = -1
    RG[r, G_NSLOTS] -= 1
    RG[r, R_PAGES] -= SL[slot, C_PAGES]
    SL[slot, C_RUNG] = -1
    SL[slot, C_INDEX] = -1
    if R.step_need_recalc(RG[r, R_STEP], RG[r, R_PAGES]):
        RG[r, R_STEP] = R.calc_step(RG[r, R_COVER], RG[r, R_PAGES], RG[r, R_RATIO], U.sc[S_EMA])
    if RG[r, G_NSLOTS] > 0 and RG[r, G_CUR] == slot:
        _reset_current_scan(U, r, True, False)
    U.sc[DU + U_MOVES] += 1


@njit
def _rung_add(U, r, slots, n):
    """Enter ``slots[:n]`` into rung ``r`` at the lowest free sradix indices."""
    SL = U.SL
    RG = U.RG
    RIDX = U.RIDX
    k = 0
    for q in range(n):
        slot = slots[q]
        while k < RG[r, G_NIDX] and RIDX[r, k] >= 0:
            k += 1
        if k == RG[r, G_NIDX]:
            RG[r, G_NIDX] += 1
        RIDX[r, k] = slot
        SL[slot, C_RUNG] = r
        SL[slot, C_INDEX] = k
        RG[r, R_PAGES] += SL[slot, C_PAGES]
        U.sc[DU + U_MOVES] += 1
    RG[r, G_NSLOTS] += n
    if RG[r, G_NSLOTS] == n:
        _reset_current_scan(U, r, False, True)


@njit
def _vma_rung_enter(U, slot, target):
    if U.SL[slot, C_RUNG] == target:
        return False
    _rung_rm_slot(U, slot)
    one = np.empty(1, np.int64)
    one[0] = slot
    _rung_add(U, target, one, 1)
    return True


@njit(inline="always")
def _dedup_ratio(merged, cowed, per, thrash):
    if per == 0:
        return 0
    m = merged
    if m != 0 and thrash != 0:
        m = 0 if cowed * 100 // merged > thrash else merged - cowed
    return m * 100 // per


@njit
def _judge_slot(U, slot):
    SL = U.SL
    sc = U.sc
    r = SL[slot, C_RUNG]
    thrash = sc[OP + P.thrash_threshold]
    dedup = _dedup_ratio(SL[slot, C_MERGED], SL[slot, C_COWED], SL[slot, C_THIS], thrash)
    full = SL[slot, C_PSCAN] == SL[slot, C_PAGES]
    if full and thrash != 0:
        moved = _vma_rung_enter(U, slot, 0)
    elif dedup != 0 and dedup >= sc[OP + P.abundant_threshold]:
        moved = _vma_rung_enter(U, slot, min(r + 1, 3))
        if moved:
            sc[S_PROMO] += 1
    else:
        moved = _vma_rung_enter(U, slot, max(r - 1, 0))
        if moved:
            sc[S_DEMO] += 1
    SL[slot, C_MERGED] = 0
    SL[slot, C_COWED] = 0
    SL[slot, C_THIS] = 0
    if full:
        SL[slot, C_PSCAN] = 0
    if not moved:
        _advance_current_scan(U, r)


@njit
def _round_update_ladder(U):
    SL = U.SL
    RG = U.RG
    sc = U.sc
    for r in range(4):
        RG[r, G_FIN] = 0
    s = sc[S_DEDUP_H]
    while s >= 0:
        nxt = SL[s, C_DNEXT]
        if SL[s, C_RUNG] >= 0:
            d = _dedup_ratio(SL[s, C_BEMERGED], SL[s, C_COWED], SL[s, C_PAGES], sc[OP + P.thrash_threshold])
            if d != 0 and d >= sc[OP + P.abundant_threshold]:
                if _vma_rung_enter(U, s, min(SL[s, C_RUNG] + 1, 3)):
                    sc[S_PROMO] += 1
        SL[s, C_BEMERGED] = 0
        SL[s, C_COWED] = 0
        SL[s, C_INDEDUP] = 0
        SL[s, C_DNEXT] = -1
        s = nxt
    sc[S_DEDUP_H] = -1


@njit
def _del_vma_slot(E, U, slot):
    SL = U.SL
    sc = U.sc
    if SL[slot, C_RUNG] >= 0:
        _rung_rm_slot(U, slot)
    if SL[slot, C_INDEDUP] == 1:  # off the dedup list
        prev = -1
        s = sc[S_DEDUP_H]
        while s >= 0 and s != slot:
            prev = s
            s = SL[s, C_DNEXT]
        if prev >= 0:
            SL[prev, C_DNEXT] = SL[slot, C_DNEXT]
        else:
            sc[S_DEDUP_H] = SL[slot, C_DNEXT]
        SL[slot, C_DNEXT] = -1
        SL[slot, C_INDEDUP] = 0
    base = SL[slot, C_BASE]
    ITEM_OF = U.ITEM_OF
    for j in range(SL[slot, C_PAGES]):
        it = ITEM_OF[base + j]
        if it >= 0:
            _free_item(E, U, it)
    if SL[slot, C_INUKSM] == 1:
        sc[S_TOTAL] -= SL[slot, C_PAGES]
    sub = SL[slot, C_PAGES] if SL[slot, C_FSR] == sc[S_FSR] else SL[slot, C_PSCAN]
    sc[S_SVP] = np.int64(np.uint64(sc[S_SVP]) - np.uint64(sub))
    SL[slot, C_STATE] = S_FREED
    sc[DU + U_MOVES] += 1


@njit
def _cleanup_vma_slots(E, U):
    sc = U.sc
    n = sc[S_DEL_N]
    sc[S_DEL_N] = 0
    dl = U.BUF[:n].copy()
    for b in range(0, n, SPIN_LOCK_PERIOD):
        e = min(b + SPIN_LOCK_PERIOD, n)
        for q in range(e - 1, b - 1, -1):
            _del_vma_slot(E, U, dl[q])


@njit
def _enter_all_slots(U):
    SL = U.SL
    sc = U.sc
    batch = np.empty(ENTER_BATCH, np.int64)
    nb = 0
    wh = -1  # the waiting list, built by head insertion
    wt = -1
    nw = 0
    s = sc[S_NEW_H]
    while s >= 0:
        nxt = SL[s, C_NEXT]
        if SL[s, C_ANON] == 0:
            SL[s, C_PREV] = -1
            SL[s, C_NEXT] = wh
            if wh >= 0:
                SL[wh, C_PREV] = s
            else:
                wt = s
            wh = s
            nw += 1
        else:
            SL[s, C_PREV] = -1
            SL[s, C_NEXT] = -1
            SL[s, C_STATE] = S_LADDER
            batch[nb] = s
            nb += 1
            if nb == ENTER_BATCH:
                _rung_add(U, 0, batch, nb)
                nb = 0
        s = nxt
    sc[S_NEW_H] = wh
    sc[S_NEW_T] = wt
    sc[S_NEW_N] = nw
    if nb > 0:
        _rung_add(U, 0, batch, nb)


# --- the trees -----------------------------------------------------------------------------------------------
@njit
def _stable_tree_search(E, U, it, h):
    """The stable node to merge with, -1 if none; -2 on an internal error."""
    IT = U.IT
    SN = U.SN
    STN = U.STN
    sc = U.sc
    pg = IT[it, I_PG]
    if st.page_is_ksm(E, pg):
        node = U.NODEOF[st.frame(E, pg)]
        if node < 0 or not st.frame_alive(E, SN[node, N_FRAME], SN[node, N_GEN]):
            sc[D_ERR] = ERR_KSM_NO_NODE
            return -2
        return node
    sc[DU + U_HCMP] += bitlen(sc[S_NSTN])
    if not _stn_exists(U, h):
        return -1
    if STN[h, T_COUNT] == 1:
        node = STN[h, T_XOR] - 1
    else:
        hm = _item_hash_max(E, U, it)
        sc[DU + U_HCMP] += bitlen(STN[h, T_COUNT])
        node = _sbh_get(U, hm - 1, h)
        if node < 0:
            return -1
    sc[DU + U_SNV] += 1
    if not st.frame_alive(E, SN[node, N_FRAME], SN[node, N_GEN]):
        _remove_node_from_stable_tree(U, node, False, True)
        return -1
    return node


@njit(inline="always")
def _file_unstable(U, it, h, ukey):
    IT = U.IT
    UTN = U.UTN
    IT[it, I_UN] = 1
    IT[it, I_TN] = h
    IT[it, I_UKEY] = ukey
    IT[it, I_HR] = U.sc[S_HROUND]
    if ukey == 0:
        UTN[h, T_ZERO] = it
    else:
        U.UBH[ukey - 1] = it
    UTN[h, T_COUNT] += 1
    UTN[h, T_XOR] ^= it + 1
    U.sc[S_UNSHARED] += 1


@njit
def _unstable_tree_search_insert(E, U, it, h):
    IT = U.IT
    UTN = U.UTN
    SL = U.SL
    sc = U.sc
    sc[DU + U_HCMP] += bitlen(sc[S_NUTN])
    if not _utn_exists(U, h):  # a new tree_node
        UTN[h, T_GEN] = sc[S_HROUND]
        UTN[h, T_COUNT] = 0
        UTN[h, T_XOR] = 0
        UTN[h, T_ZERO] = -1
        sc[S_NUTN] += 1
        _file_unstable(U, it, h, IT[it, I_HM])
        return -1
    if sc[OP + P.unstable_count_bug] == 0 and UTN[h, T_COUNT] == 1:
        t = UTN[h, T_XOR] - 1
    else:
        hm = _item_hash_max(E, U, it)
        sc[DU + U_HCMP] += bitlen(UTN[h, T_COUNT])
        t = _ubh_get(U, hm - 1, h)
        if t < 0:
            _file_unstable(U, it, h, hm)
            return -1
    if st.frame(E, IT[t, I_PG]) == st.frame(E, IT[it, I_PG]):
        return -1
    sc[DU + U_UNV] += 1
    if SL[IT[t, I_SLOT], C_STATE] == S_DEL:
        return -1
    tpg = IT[t, I_PG]
    if not st.is_candidate(E, tpg) or st.frame(E, tpg) == 0 or U.PGA[tpg, A_MAPGEN] != IT[t, I_PGEN]:
        _remove_rmap_item_from_tree(E, U, t)
        return -1
    return t


@njit
def _new_node(U, h, f, gen, cid, hm):
    SN = U.SN
    STN = U.STN
    sc = U.sc
    if hm == 0:
        if STN[h, T_ZERO] >= 0:
            sc[D_ERR] = ERR_HASH_MAX
        STN[h, T_ZERO] = -1  # (set below)
    elif _sbh_get(U, hm - 1, h) >= 0:
        sc[D_ERR] = ERR_HASH_MAX
    if sc[S_SN_NF] == 0:
        sc[D_ERR] = ERR_NO_NODE
        return 0
    sc[S_SN_NF] -= 1
    node = U.SNF[sc[S_SN_NF]]
    SN[node, N_FRAME] = f
    SN[node, N_GEN] = gen
    SN[node, N_CID] = cid
    SN[node, N_HM] = hm
    SN[node, N_TN] = h
    SN[node, N_NVHEAD] = -1
    if hm == 0:
        STN[h, T_ZERO] = node
    else:
        U.SBH[hm - 1] = node
    STN[h, T_COUNT] += 1
    STN[h, T_XOR] ^= node + 1
    # the stable_node_list: newest first
    hlist_add_head(SN, N_LPREV, N_LNEXT, sc, S_SN_HEAD, node)
    U.NODEOF[f] = node
    return node


@njit
def _try_merge_with_stable(E, U, it, t, node):
    IT = U.IT
    sc = U.sc
    f = U.SN[node, N_FRAME]
    st.merge(E, IT[it, I_PG], f, sc[D_NOW])
    sc[DU + U_REMAP] += 1
    st.merge(E, IT[t, I_PG], f, sc[D_NOW])
    sc[DU + U_REMAP] += 1
    return node


@njit
def _stable_tree_insert(E, U, it, t, h, f, gen):
    """Returns the node both items are appended to (the simulator's inserts never fail)."""
    IT = U.IT
    SN = U.SN
    STN = U.STN
    sc = U.sc
    cid = st.cid(E, IT[it, I_PG])
    sc[DU + U_HCMP] += bitlen(sc[S_NSTN])
    if not _stn_exists(U, h):
        STN[h, T_GEN] = sc[S_SGEN]
        STN[h, T_COUNT] = 0
        STN[h, T_XOR] = 0
        STN[h, T_ZERO] = -1
        sc[S_NSTN] += 1
        return _new_node(U, h, f, gen, cid, 0)
    if STN[h, T_COUNT] == 1:  # first_level_insert
        old = STN[h, T_XOR] - 1
        sc[DU + U_SNV] += 1
        if not st.frame_alive(E, SN[old, N_FRAME], SN[old, N_GEN]):
            _remove_node_from_stable_tree(U, old, True, True)
            return _new_node(U, h, f, gen, cid, 0)
        U.RS[RS_NEG] += sc[S_MEMCMP]
        sc[DU + U_MEMCMP] += 1
        if SN[old, N_CID] == cid:
            return _try_merge_with_stable(E, U, it, t, old)
        _node_hash_max(U, old)
        ihm = _item_hash_max(E, U, it)
        return _new_node(U, h, f, gen, cid, ihm)
    while True:  # stable_subtree_insert
        ihm = _item_hash_max(E, U, it)
        sc[DU + U_HCMP] += bitlen(STN[h, T_COUNT])
        n = _sbh_get(U, ihm - 1, h)
        if n < 0:
            return _new_node(U, h, f, gen, cid, ihm)
        sc[DU + U_SNV] += 1
        if not st.frame_alive(E, SN[n, N_FRAME], SN[n, N_GEN]):
            _remove_node_from_stable_tree(U, n, True, True)
            if STN[h, T_COUNT] > 0:
                continue
            return _new_node(U, h, f, gen, cid, ihm)
        U.RS[RS_NEG] += sc[S_MEMCMP]
        sc[DU + U_MEMCMP] += 1
        if SN[n, N_CID] == cid:
            return _try_merge_with_stable(E, U, it, t, n)
        sc[D_ERR] = ERR_HASH_MAX
        return n


@njit(inline="always")
def _credit(U, slot, factor):
    SL = U.SL
    SL[slot, C_BEMERGED] += factor
    if SL[slot, C_INDEDUP] == 0:
        SL[slot, C_INDEDUP] = 1
        SL[slot, C_DNEXT] = U.sc[S_DEDUP_H]
        U.sc[S_DEDUP_H] = slot


@njit
def _stable_tree_append(U, it, node, logdedup):
    IT = U.IT
    SN = U.SN
    NV = U.NV
    SL = U.SL
    sc = U.sc
    slot = IT[it, I_SLOT]
    IT[it, I_ST] = 1
    IT[it, I_NODE] = node
    if SN[node, N_NVHEAD] < 0:
        sc[S_SHARED] += 1
    else:
        sc[S_SHARING] += 1
    r = SL[slot, C_RUNG]
    factor = U.RG[r, R_STEP] if r >= 0 else 1
    own = SL[slot, C_KEY]
    x = SN[node, N_NVHEAD]
    while x >= 0:
        if SL[NV[x, V_SLOT], C_KEY] >= own:
            break
        if logdedup:
            _credit(U, NV[x, V_SLOT], factor)
        x = NV[x, V_NEXT]
    cont = -1
    if x >= 0 and NV[x, V_SLOT] == slot:
        nv = x
        cont = NV[x, V_NEXT]
    else:
        if sc[S_NV_NF] == 0:
            sc[D_ERR] = ERR_NO_NV
            return
        sc[S_NV_NF] -= 1
        nv = U.NVF[sc[S_NV_NF]]
        NV[nv, V_SLOT] = slot
        NV[nv, V_NODE] = node
        NV[nv, V_IHEAD] = -1
        if x < 0:  # the walk reached the end: add at the head
            head = SN[node, N_NVHEAD]
            NV[nv, V_PREV] = -1
            NV[nv, V_NEXT] = head
            if head >= 0:
                NV[head, V_PREV] = nv
            SN[node, N_NVHEAD] = nv
        else:  # before x
            a = NV[x, V_PREV]
            NV[nv, V_PREV] = a
            NV[nv, V_NEXT] = x
            NV[x, V_PREV] = nv
            if a >= 0:
                NV[a, V_NEXT] = nv
            else:
                SN[node, N_NVHEAD] = nv
            cont = x
    head = NV[nv, V_IHEAD]  # the item at the head of the node_vma's items
    IT[it, I_NPREV] = -1
    IT[it, I_NNEXT] = head
    if head >= 0:
        IT[head, I_NPREV] = it
    NV[nv, V_IHEAD] = it
    IT[it, I_NV] = nv
    if logdedup:
        SL[slot, C_MERGED] += 1
        if cont >= 0:
            x = NV[cont, V_NEXT]
            while x >= 0:
                _credit(U, NV[x, V_SLOT], factor)
                x = NV[x, V_NEXT]


@njit
def _stable_tree_delta_hash(E, U, prev_words):
    SN = U.SN
    STN = U.STN
    sc = U.sc
    sc[S_LEVEL] = _level(U)
    w = R.strength_words(U.RS)
    sc[S_SGEN] += 1
    sc[S_NSTN] = 0
    node = sc[S_SN_HEAD]
    while node >= 0:
        nxt = SN[node, N_LNEXT]
        sc[DU + U_SNV] += 1
        if not st.frame_alive(E, SN[node, N_FRAME], SN[node, N_GEN]):
            _remove_node_from_stable_tree(U, node, False, False)
            node = nxt
            continue
        sc[DU + U_WORDS] += abs(w - prev_words) if SN[node, N_TN] >= 0 else w
        h = _key(U, SN[node, N_CID])
        hm = SN[node, N_HM]
        if not _stn_exists(U, h):
            STN[h, T_GEN] = sc[S_SGEN]
            STN[h, T_COUNT] = 1
            STN[h, T_XOR] = node + 1
            STN[h, T_ZERO] = -1
            sc[S_NSTN] += 1
            SN[node, N_TN] = h
            if hm == 0:
                STN[h, T_ZERO] = node
            else:
                U.SBH[hm - 1] = node
            node = nxt
            continue
        SN[node, N_TN] = -1
        hm = _node_hash_max(U, node)
        if STN[h, T_COUNT] == 1:
            sc[DU + U_SNV] += 1
            _node_hash_max(U, STN[h, T_XOR] - 1)
        if _sbh_get(U, hm - 1, h) >= 0:
            sc[D_ERR] = ERR_HASH_MAX
        U.SBH[hm - 1] = node
        STN[h, T_COUNT] += 1
        STN[h, T_XOR] ^= node + 1
        SN[node, N_TN] = h
        node = nxt


# --- one visit ------------------------------------------------------------------------------------------------
@njit
def _cmp_and_merge_page(E, U, it, h):
    IT = U.IT
    SN = U.SN
    RS = U.RS
    sc = U.sc
    now = sc[D_NOW]
    _remove_rmap_item_from_tree(E, U, it)
    node = _stable_tree_search(E, U, it, h)
    if node == -2:
        return
    w = R.strength_words(RS)
    pg = IT[it, I_PG]
    if node >= 0:
        if st.frame(E, pg) == SN[node, N_FRAME]:
            _stable_tree_append(U, it, node, True)
            return
        sc[DU + U_WP] += 1
        sc[DU + U_MEMCMP] += 1
        if st.cid(E, pg) == SN[node, N_CID]:
            _split(E, U, pg)
            st.merge(E, pg, SN[node, N_FRAME], now)
            sc[DU + U_REMAP] += 1
            U.PGA[pg, A_MERGED] = M_KSM
            _stable_tree_append(U, it, node, True)
            return
        sc[S_COLLI_ST] += 1
        if IT[it, I_HM] != 0:
            RS[RS_NEG] += sc[S_MEMCMP] + STRENGTH_MAX - w
            _hash_max_cost(U)
            return
        RS[RS_NEG] += sc[S_MEMCMP] + w
        sc[DU + U_WORDS] += w
    t = _unstable_tree_search_insert(E, U, it, h)
    if t < 0:
        return
    tpg = IT[t, I_PG]
    sc[DU + U_WP] += 2
    sc[DU + U_MEMCMP] += 1
    if st.cid(E, pg) == st.cid(E, tpg):
        _split(E, U, pg)
        _split(E, U, tpg)
        gen = st.stabilize(E, pg)
        f = st.frame(E, pg)
        st.merge(E, tpg, f, now)
        sc[DU + U_REMAP] += 1
        U.PGA[pg, A_MERGED] = M_KSM
        U.PGA[tpg, A_MERGED] = M_KSM
        _remove_rmap_item_from_tree(E, U, t)
        node = _stable_tree_insert(E, U, it, t, h, f, gen)
        if sc[D_ERR] != 0:
            return
        _stable_tree_append(U, t, node, False)
        _stable_tree_append(U, it, node, True)
        return
    sc[DU + U_REMAP] += 1
    if IT[t, I_HM] != 0 and IT[t, I_HM] == IT[it, I_HM]:
        sc[S_COLLI_MAX] += 1
        _remove_rmap_item_from_tree(E, U, t)
        return
    sc[DU + U_WORDS] += 2 * w
    if _key(U, st.cid(E, pg)) != _key(U, st.cid(E, tpg)):
        sc[S_CHANGED] += 1
        _remove_rmap_item_from_tree(E, U, t)
        return
    sc[S_COLLI_UN] += 1
    RS[RS_NEG] += sc[S_MEMCMP] + 2 * w
    th = _item_hash_max(E, U, t)
    ih = _item_hash_max(E, U, it)
    if th != ih:
        th_tn = IT[t, I_TN]
        if _ubh_get(U, ih - 1, th_tn) >= 0:
            sc[D_ERR] = ERR_HASH_MAX
            return
        # filed in t's sub-tree without pages_unshared++ (Q5)
        _file_unstable(U, it, th_tn, ih)
        sc[S_UNSHARED] -= 1


@njit
def _scan_vma_one_page(E, U, slot):
    SL = U.SL
    IT = U.IT
    RS = U.RS
    sc = U.sc
    pages = SL[slot, C_PAGES]
    base = SL[slot, C_BASE]
    i = SL[slot, C_PSCAN] % pages
    j = i + R.rand32(U.RNG, RNG_PERM) % (pages - i)
    PERM = U.PERM
    pi = PERM[base + i]
    pj = PERM[base + j]
    PERM[base + i] = pj
    PERM[base + j] = pi
    idx = pj
    pg = U.ENTRY_PG[base + idx]
    it = U.ITEM_OF[base + idx]
    got = False
    h = 0
    if pg < 0 or not st.is_candidate(E, pg) or st.frame(E, pg) == 0:
        sc[DU + U_WALKED] += 1
        if it >= 0:
            _free_item(E, U, it)
    else:
        sc[DU + U_VISITED] += 1
        w = R.strength_words(RS)
        sc[DU + U_WORDS] += w
        RS[RS_POS] += max(0, STRENGTH_FULL - w)
        sc[S_PSCANNED] += 1
        cid = st.cid(E, pg)
        h = _key(U, cid)
        zero_done = False
        if h == U.ZK[sc[S_LEVEL]] and w != STRENGTH_MAX:
            sc[DU + U_WP] += 1
            sc[DU + U_ZCHECK] += 1
            if cid == 0:
                _split(E, U, pg)
                st.merge_zero(E, pg, sc[D_NOW])
                sc[DU + U_REMAP] += 1
                U.PGA[pg, A_MERGED] = M_ZERO
                sc[S_ZERO] += 1
                SL[slot, C_MERGED] += 1
                if it >= 0:
                    _free_item(E, U, it)
                zero_done = True
            else:
                RS[RS_NEG] += sc[S_MEMCMP] // 2
                sc[S_ZFALSE] += 1
        if not zero_done:
            if it < 0:
                if sc[S_IT_NF] == 0:
                    sc[D_ERR] = ERR_NO_ITEM
                    return
                sc[S_IT_NF] -= 1
                it = U.ITF[sc[S_IT_NF]]
                IT[it, I_SLOT] = slot
                IT[it, I_IDX] = idx
                IT[it, I_PG] = pg
                IT[it, I_ST] = 0
                IT[it, I_UN] = 0
                IT[it, I_HM] = 0
                IT[it, I_NODE] = -1
                IT[it, I_NV] = -1
                U.ITEM_OF[base + idx] = it
                sc[DU + U_ALLOC] += 1
            IT[it, I_PGEN] = U.PGA[pg, A_MAPGEN]
            got = True
    if got and not (IT[it, I_ST] == 1 and st.page_is_ksm(E, pg)):
        _cmp_and_merge_page(E, U, it, h)
    SL[slot, C_PSCAN] += 1
    SL[slot, C_THIS] += 1
    if SL[slot, C_FSR] != sc[S_FSR]:
        sc[S_SVP] = np.int64(np.uint64(sc[S_SVP]) + np.uint64(1))
    if SL[slot, C_PSCAN] == pages:
        SL[slot, C_FSR] = sc[S_FSR]


# --- the daemon ----------------------------------------------------------------------------------------------------
@njit
def _hash_round_finished(U):
    sc = U.sc
    if np.uint64(sc[S_SVP]) > np.uint64(sc[S_TOTAL] >> 1 >> 1):
        sc[S_SVP] = 0
        if sc[S_PSCANNED] != 0:
            sc[S_FSR] += 1
        return True
    return False


@njit
def _do_scan(E, U):
    RG = U.RG
    SL = U.SL
    sc = U.sc
    hz = sc[S_HZ]
    max_cpu = sc[S_MAXCPU]
    w0 = work_so_far(sc)
    vpages = 0
    max_r = 0
    for r in range(4):
        if RG[r, R_QUOTA] == 0:
            continue
        if RG[r, G_NSLOTS] == 0:
            RG[r, R_QUOTA] = 0
            continue
        max_r = max(max_r, R.real_ratio(RG[r, R_RATIO], max_cpu))
        while RG[r, R_QUOTA] > 0 and RG[r, G_NSLOTS] > 0:
            slot = RG[r, G_CUR]
            if SL[slot, C_STATE] == S_DEL:
                _rung_rm_slot(U, slot)
                continue
            if SL[slot, C_INUKSM] == 0:
                SL[slot, C_INUKSM] = 1
                sc[S_TOTAL] += SL[slot, C_PAGES]
            _scan_vma_one_page(E, U, slot)
            if sc[D_ERR] != 0:
                return 0
            RG[r, R_QUOTA] -= 1
            vpages += 1
            if RG[r, G_OFF] + RG[r, R_STEP] > SL[slot, C_PAGES] - 1 or SL[slot, C_PSCAN] == SL[slot, C_PAGES]:
                _judge_slot(U, slot)
            else:
                RG[r, G_OFF] += RG[r, R_STEP]
    delta = work_so_far(sc) - w0
    _cleanup_vma_slots(E, U)
    _enter_all_slots(U)
    nonempty = False
    finished = True
    for r in range(4):
        if RG[r, G_NSLOTS] > 0:
            nonempty = True
            if RG[r, G_FIN] == 0:
                finished = False
    if nonempty and finished:
        _round_update_ladder(U)
        sc[S_EVAL] += 1
        sc[DU + U_STARTS] += 1
        prev = R.strength_words(U.RS)
        if _hash_round_finished(U) and sc[OP + P.hash_adapt] == 1 and R.rshash_adjust(U.RS, sc[S_PSCANNED], sc[S_FSR]):
            _stable_tree_delta_hash(E, U, prev)
            sc[S_HROUND] += 1
            sc[S_NUTN] = 0
    if vpages > 0 and delta > 0:
        sc[S_EMA] = R.ema(delta // vpages, sc[S_EMA])
    sc[S_EMA], sc[S_SLEEP_J] = R.calc_scan_pages(RG, sc[S_EMA], sc[S_SLEEP_J], sc[S_SLEEP_SAVED], sc[S_EVAL], max_cpu, hz)
    sc[S_SLEEP_REAL] = R.sleep_after_scan(sc[S_SLEEP_J], work_so_far(sc) - w0, max_r, hz)
    sc[S_BATCHES] += 1
    return R.jiffies_to_msecs(sc[S_SLEEP_REAL], hz)


@njit(cache=True)
def run_until(E, U, t_end):
    sc = U.sc
    while wake_up(sc, t_end):
        ms = _do_scan(E, U)
        if sc[D_ERR] != 0:
            return
        sleep(sc, ms, sc[S_HZ])


# --- the runtime object ----------------------------------------------------------------------------------------------
class UksmKernel(KernelRuntime):
    """The kernel behind the driver's calls; counters as :class:`~ksmtrace.policies.uksm.runtime.UksmRuntime`."""

    name = "uksm"

    def __init__(self, params, ctx) -> None:
        super().__init__(params, ctx)
        self.su = setup(ctx.prep, params, ctx)
        self.U = new_state(ctx.prep, params, ctx, self.su)
        self.U.sc[S_LEVEL] = _level(self.U)
        self.sc = self.U.sc

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.prep
        sl = p.events(s)
        on_snapshot(self.E, self.U, np.int64(s), p.ev_pg[sl].astype(np.int64), p.ev_kind[sl].astype(np.int64))
        self.check()

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.U, np.int64(t_end))
        self.check()

    def counters(self) -> dict:
        sc, RG = self.sc, self.U.RG
        return uksm_counters(
            shared=int(sc[S_SHARED]), sharing=int(sc[S_SHARING]), unshared=int(sc[S_UNSHARED]), fsr=int(sc[S_FSR]),
            pages_scanned=int(sc[S_PSCANNED]), strength=int(R.strength_words(self.U.RS)),
            strength_recorded=SAMPLE_STRENGTHS[int(sc[S_LEVEL])], batches=int(sc[S_BATCHES]), ema=int(sc[S_EMA]),
            zero_pages=int(sc[S_ZERO]), sleep_real=int(sc[S_SLEEP_REAL]), hz=int(sc[S_HZ]), eval_round=int(sc[S_EVAL]),
            hash_round=int(sc[S_HROUND]), rung_slots=[int(RG[r, G_NSLOTS]) for r in range(4)],
            new_slots=int(sc[S_NEW_N]), colli=int(sc[S_COLLI_ST] + sc[S_COLLI_UN] + sc[S_COLLI_MAX]),
            changed=int(sc[S_CHANGED]), zero_false=int(sc[S_ZFALSE]), promotions=int(sc[S_PROMO]),
            demotions=int(sc[S_DEMO]), walk_state=int(self.U.RS[RS_STATE]),
        )

    def extras(self) -> dict:
        sc = self.sc
        return uksm_extras(self.su, self.counters(), stable_tree_nodes=int(sc[S_NSTN]), unstable_tree_nodes=int(sc[S_NUTN]),
                           colli_stable=int(sc[S_COLLI_ST]), colli_unstable=int(sc[S_COLLI_UN]),
                           colli_max=int(sc[S_COLLI_MAX]))
