"""The numba kernel of ``hashtable``: the accelerator of
:class:`~ksmtrace.policies.hashtable.runtime.HashTableRuntime`, the same algorithm on arrays (the table is indexed by the
content id, which is the collision-free full-page hash), one jitted call per snapshot (the fault
side) and one per interval (the scanner).

Packed state (numba passes each array of a tuple to a non-inlined function separately, with
reference counting, and reads tuple fields inside loops with reference counting it cannot prune):
``ENT`` one row per key (the table entry), ``PGS`` one row per page (the hint it holds, the frame it
maps in the policy's view), ``frk`` frame -> key of its shared entry, ``perm`` the scan
permutation, ``mm`` one row per process (cursor, alive, page range) whose ``M_ORDER`` column is the
round-robin order, ``sc`` the daemon's block (:mod:`ksmtrace.engine.daemon`), the policy's scalars and its
parameters (slots named after ``HashTableParams``' fields).
``run_until`` binds them to locals and spells out the scan loop and the common part of a visit
(skip, re-hint, table lookup, stale hint); merges (which call the engine) are ordinary calls.  The
scan order is random, so the loop prefetches the rows of the pages a few steps ahead
(``prefetch_row``: a cache hint, no effect on results).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.cost import UNIT_INDEX
from ksmtrace.engine.daemon import D_NOW, DU, KernelRuntime, new_block, param_slots, params_array, scalar_slots, sleep, wake_up
from ksmtrace.engine.state import F_KSM, F_REF, P_CID, P_FRAME, P_PROC
from ksmtrace.jitutil import prefetch_row
from ksmtrace.policies.hashtable import HashTableParams
from ksmtrace.policies.hashtable.runtime import UNLIMITED, alive_procs, hashtable_counters, hashtable_extras, scan_permutation

U_WAKEUPS = UNIT_INDEX["wakeups"]
U_WALKED = UNIT_INDEX["addresses_walked"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_FHASH = UNIT_INDEX["full_hashes"]
U_OPS = UNIT_INDEX["hashtable_ops"]
U_FOPS = UNIT_INDEX["fault_table_ops"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_ZCHECK = UNIT_INDEX["zero_checks"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]

# sc: the daemon's slots (D_*), then the policy's scalars, then its parameters (at OP)
S_RR, S_GCRED, S_PCRED, S_NHINT, S_NSHARED, S_REFS, S_STALE, S_SCANNED, S_NORDER = scalar_slots(9)
N_SCALARS = 9
P = param_slots(HashTableParams, derived=("hz",))
OP = scalar_slots(N_SCALARS).stop
K_NONE, K_HINT, K_SHARED = 0, 1, 2

E_KIND, E_X, E_REF = range(3)  # table entry columns (one row per key)
Q_HINT, Q_FRAME = range(2)  # page columns: key of the hint it holds, frame (policy's view)
M_CURSOR, M_ALIVE, M_LO, M_HI, M_ORDER = range(5)  # process columns (M_ORDER: row k = k-th in order)

# prefetch distances (scan steps ahead)
PF_FAR = 16
PF_NEAR = 8

HtState = namedtuple("HtState", ["ENT", "PGS", "frk", "perm", "mm", "sc"])


def new_state(prep, params, ctx) -> HtState:
    n, c, f, np_ = prep.n_pages, max(prep.n_cids, 1), st.n_frame_slots(prep), prep.n_procs
    sc = new_block(N_SCALARS, len(P), ctx)
    sc[OP : OP + len(P)] = params_array(params, P, {"hz": ctx.hz})
    sc[S_NORDER] = len(prep.proc_order)
    ENT = np.zeros((c, 3), np.int64)
    ENT[:, E_X] = -1
    mm = np.zeros((max(np_, len(prep.proc_order), 1), 5), np.int64)
    mm[:np_, M_LO] = prep.proc_pg_lo
    mm[:np_, M_HI] = prep.proc_pg_hi
    mm[: len(prep.proc_order), M_ORDER] = prep.proc_order
    return HtState(
        ENT=ENT, PGS=np.full((n, 2), -1, np.int64), frk=np.full(f, -1, np.int64),
        perm=scan_permutation(prep, ctx.seed).astype(np.int64), mm=mm, sc=sc,
    )


@njit(cache=True)
def on_snapshot(E, S, pgs, kinds):
    epg = E.pg
    ENT = S.ENT
    PGS = S.PGS
    frk = S.frk
    sc = S.sc
    n = len(pgs)
    for i in range(n):
        k = kinds[i]
        pg = pgs[i]
        if not st.is_removal(k):
            continue
        f = PGS[pg, Q_FRAME]
        if f < 0:
            continue
        PGS[pg, Q_FRAME] = -1
        key = frk[f]
        if key >= 0:  # _unref
            sc[DU + U_FOPS] += 1
            ENT[key, E_REF] -= 1
            sc[S_REFS] -= 1
            if ENT[key, E_REF] == 0:
                ENT[key, E_KIND] = K_NONE
                ENT[key, E_X] = -1
                frk[f] = -1
                sc[S_NSHARED] -= 1
    for i in range(n):
        k = kinds[i]
        pg = pgs[i]
        if not st.is_arrival(k) or epg[pg, P_CID] < 0:
            continue
        f = epg[pg, P_FRAME]
        PGS[pg, Q_FRAME] = f
        if f >= 0 and frk[f] >= 0:
            ENT[frk[f], E_REF] += 1
            sc[S_REFS] += 1


@njit
def _split(E, mm, pg):
    pr = E.pg[pg, P_PROC]
    st.split_thp(E, pg, mm[pr, M_LO], mm[pr, M_HI], False)


@njit
def _merge_zero(E, S, pg):
    """An all-zero page: onto the zero page (no entry)."""
    sc = S.sc
    sc[DU + U_ZCHECK] += 1
    sc[DU + U_WP] += 1
    sc[DU + U_REMAP] += 1
    _split(E, S.mm, pg)
    st.merge_zero(E, pg, sc[D_NOW])
    S.PGS[pg, Q_FRAME] = 0


@njit
def _merge_hint(E, S, pg, h, hf, key):
    """The hint page ``h`` (frame ``hf``) still holds ``key``: both share its frame, a shared entry."""
    efr = E.fr
    ENT = S.ENT
    PGS = S.PGS
    sc = S.sc
    sc[DU + U_MEMCMP] += 1
    _split(E, S.mm, h)
    _split(E, S.mm, pg)
    st.stabilize(E, h)
    sc[DU + U_WP] += efr[hf, F_REF] + 1
    sc[DU + U_REMAP] += 1
    st.merge(E, pg, hf, sc[D_NOW])
    PGS[pg, Q_FRAME] = hf
    PGS[h, Q_HINT] = -1
    PGS[pg, Q_HINT] = -1
    ENT[key, E_KIND] = K_SHARED
    ENT[key, E_X] = hf
    S.frk[hf] = key
    nref = efr[hf, F_REF]
    ENT[key, E_REF] = nref
    sc[S_REFS] += nref
    sc[S_NHINT] -= 1
    sc[S_NSHARED] += 1
    sc[DU + U_OPS] += 1


@njit
def _merge_shared(E, S, pg, key):
    """A shared entry holds ``key``: map the page onto its frame."""
    ENT = S.ENT
    sc = S.sc
    sf = ENT[key, E_X]
    sc[DU + U_MEMCMP] += 1
    sc[DU + U_WP] += 1
    sc[DU + U_REMAP] += 1
    _split(E, S.mm, pg)
    st.merge(E, pg, sf, sc[D_NOW])
    S.PGS[pg, Q_FRAME] = sf
    S.PGS[pg, Q_HINT] = -1
    ENT[key, E_REF] += 1
    sc[S_REFS] += 1


@njit(inline="always")
def _budget(rate, sleep_ms, credit):
    if rate <= 0:
        return UNLIMITED, 0
    credit += rate * sleep_ms
    return credit // 1000, credit % 1000


@njit(cache=True)
def run_until(E, S, t_end):
    """The scanner from its next wake-up until ``t_end``: scan_batch and the common part of visit
    written out on local arrays."""
    epg = E.pg
    efr = E.fr
    ENT = S.ENT
    PGS = S.PGS
    perm = S.perm
    mm = S.mm
    sc = S.sc
    zero = sc[OP + P.zero_page] == 1
    nord = sc[S_NORDER]
    while wake_up(sc, t_end):
        # ---- scan_batch ----
        total, sc[S_GCRED] = _budget(sc[OP + P.pages_per_second], sc[OP + P.sleep_millisecs], sc[S_GCRED])
        per_proc, sc[S_PCRED] = _budget(sc[OP + P.process_pages_per_second], sc[OP + P.sleep_millisecs], sc[S_PCRED])
        if nord > 0:
            start = sc[S_RR]
            sc[S_RR] = (start + 1) % nord
            for k in range(nord):
                if total <= 0:
                    break
                proc = mm[(start + k) % nord, M_ORDER]
                if mm[proc, M_ALIVE] == 0:
                    continue
                lo = mm[proc, M_LO]
                size = mm[proc, M_HI] - lo
                quota = per_proc if per_proc < total else total
                steps = 0
                cur = mm[proc, M_CURSOR]
                while quota > 0 and steps < size:
                    # (prefetch the engine's and the policy's rows of the pages a few steps ahead)
                    ca = cur + PF_FAR
                    if ca >= size:
                        ca %= size
                    prefetch_row(epg, perm[lo + ca])
                    ca = cur + PF_NEAR
                    if ca >= size:
                        ca %= size
                    pa = perm[lo + ca]
                    prefetch_row(PGS, pa)
                    fa = epg[pa, P_FRAME]
                    if fa > 0:
                        prefetch_row(efr, fa)
                    ca = epg[pa, P_CID]
                    if ca >= 0:
                        prefetch_row(ENT, ca)
                    pg = perm[lo + cur]
                    cur += 1
                    if cur == size:
                        cur = 0
                    steps += 1
                    f = epg[pg, P_FRAME]
                    if epg[pg, P_CID] < 0 or f <= 0:
                        sc[DU + U_WALKED] += 1
                        continue
                    quota -= 1
                    total -= 1
                    # ---- visit ----
                    sc[DU + U_VISITED] += 1
                    sc[S_SCANNED] += 1
                    if efr[f, F_KSM] == 1:  # already sharing a COW frame: nothing to do
                        continue
                    sc[DU + U_FHASH] += 1
                    key = epg[pg, P_CID]
                    old = PGS[pg, Q_HINT]
                    if old >= 0 and old != key:  # its content changed: drop its old hint
                        PGS[pg, Q_HINT] = -1
                        if ENT[old, E_KIND] == K_HINT and ENT[old, E_X] == pg:
                            ENT[old, E_KIND] = K_NONE
                            ENT[old, E_X] = -1
                            sc[S_NHINT] -= 1
                            sc[DU + U_OPS] += 1
                    if key == 0 and zero:
                        _merge_zero(E, S, pg)
                        continue
                    sc[DU + U_OPS] += 1
                    kind = ENT[key, E_KIND]
                    if kind == K_NONE:
                        ENT[key, E_KIND] = K_HINT
                        ENT[key, E_X] = pg
                        PGS[pg, Q_HINT] = key
                        sc[S_NHINT] += 1
                        continue
                    if kind == K_HINT:
                        h = ENT[key, E_X]
                        if h == pg:
                            continue
                        hc = epg[h, P_CID]
                        hf = epg[h, P_FRAME]
                        if hc >= 0 and hf == f:  # another mapping of the hint's frame
                            continue
                        sc[DU + U_FHASH] += 1  # re-hash the hint page
                        if hc != key or hf <= 0 or efr[hf, F_KSM] == 1:
                            sc[S_STALE] += 1
                            ENT[key, E_X] = pg
                            if PGS[h, Q_HINT] == key:
                                PGS[h, Q_HINT] = -1
                            PGS[pg, Q_HINT] = key
                            sc[DU + U_OPS] += 1
                            continue
                        _merge_hint(E, S, pg, h, hf, key)
                        continue
                    _merge_shared(E, S, pg, key)
                mm[proc, M_CURSOR] = cur
        sleep(sc, sc[OP + P.sleep_millisecs], sc[OP + P.hz])


class HashTableKernel(KernelRuntime):
    """The kernel behind the driver's calls; counters as :class:`~ksmtrace.policies.hashtable.runtime.HashTableRuntime`."""

    name = "hashtable"

    def __init__(self, params, ctx) -> None:
        super().__init__(params, ctx)
        self.S = new_state(ctx.prep, params, ctx)
        self.sc = self.S.sc

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.prep
        self.S.mm[: p.n_procs, M_ALIVE] = alive_procs(p, s)
        ev = p.batch(s)
        on_snapshot(self.E, self.S, ev.pg, ev.kind)

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.S, np.int64(t_end))
        self.check()

    def counters(self) -> dict:
        sc = self.sc
        return hashtable_counters(hints=int(sc[S_NHINT]), shared=int(sc[S_NSHARED]), bytes_per_entry=self.p.bytes_per_entry,
                                  refs=int(sc[S_REFS]), zero_pages=int(self.E.ec[st.C_KSM_ZERO]),
                                  stale=int(sc[S_STALE]), scanned=int(sc[S_SCANNED]))

    def extras(self) -> dict:
        return hashtable_extras(self.counters(), self.ctx.seed)
