"""The numba kernel of ``pagecache``: the accelerator of
:class:`~ksmtrace.policies.pagecache.runtime.PageCacheRuntime`, the same algorithm on arrays, one
jitted call per snapshot (writes, classes) and one per interval (the scanner).

State: ``PG`` one row per page (its class, the content of the shared frame it is on in the
policy's view), ``CT`` one row per content id (the shared frame and its generation, the hint page,
the frame's mapped/active and reclaimable members), ``FI`` merged pages per file, ``held`` a typed
dict ``content * n_files + file -> pages of that file on the content's frame``, ``sc`` the daemon's
block, the policy's scalars and its parameters (slots named after ``PageCacheParams``' fields).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit, types
from numba.typed import Dict

from ksmtrace.engine import state as st
from ksmtrace.engine.cost import UNIT_INDEX
from ksmtrace.engine.daemon import D_NOW, DU, KernelRuntime, new_block, param_slots, params_array, scalar_slots, sleep, wake_up
from ksmtrace.engine.state import P_CID
from ksmtrace.policies.pagecache import PageCacheParams
from ksmtrace.policies.pagecache.runtime import page_cache_extras, pagecache_counters
from ksmtrace.trace.pagecache import HOT_MAPPED

U_WALKED = UNIT_INDEX["addresses_walked"]
U_VISITED = UNIT_INDEX["pages_visited"]
U_FHASH = UNIT_INDEX["full_hashes"]
U_OPS = UNIT_INDEX["hashtable_ops"]
U_MEMCMP = UNIT_INDEX["memcmp_pages"]
U_WP = UNIT_INDEX["write_protects"]
U_REMAP = UNIT_INDEX["remaps"]

S_CURSOR, S_TOT_HOT, S_TOT_COLD, S_FR_HOT, S_FR_COLD, S_BREAKS, S_SAME, S_SCANNED, S_NFILES = scalar_slots(9)
N_SCALARS = 9
P = param_slots(PageCacheParams, derived=("hz",))
OP = scalar_slots(N_SCALARS).stop

Q_HOT, Q_MERGED = range(2)  # page columns
C_FRAME, C_GEN, C_HINT, C_HOT, C_COLD = range(5)  # content columns

PcState = namedtuple("PcState", ["PG", "CT", "FI", "owner", "sc"])


def new_state(prep, params, ctx) -> PcState:
    sc = new_block(N_SCALARS, len(P), ctx)
    sc[OP : OP + len(P)] = params_array(params, P, {"hz": ctx.hz})
    sc[S_NFILES] = max(prep.n_procs, 1)
    PG = np.zeros((prep.n_pages, 2), np.int64)
    PG[:, Q_MERGED] = -1
    CT = np.zeros((max(prep.n_cids, 1), 5), np.int64)
    CT[:, C_FRAME] = -1
    CT[:, C_HINT] = -1
    return PcState(PG=PG, CT=CT, FI=np.zeros(max(prep.n_procs, 1), np.int64),
                   owner=prep.page_proc.astype(np.int64), sc=sc)


def new_held():
    return Dict.empty(key_type=types.int64, value_type=types.int64)


@njit(inline="always")
def _adjust(CT, sc, c, dh, dk):
    h = CT[c, C_HOT]
    k = CT[c, C_COLD]
    if h > 0:
        sc[S_FR_HOT] -= 1
    elif k > 0:
        sc[S_FR_COLD] -= 1
    h += dh
    k += dk
    CT[c, C_HOT] = h
    CT[c, C_COLD] = k
    sc[S_TOT_HOT] += dh
    sc[S_TOT_COLD] += dk
    if h > 0:
        sc[S_FR_HOT] += 1
    elif k > 0:
        sc[S_FR_COLD] += 1


@njit
def _join(S, held, pg, c):
    f = S.owner[pg]
    S.PG[pg, Q_MERGED] = c
    key = c * S.sc[S_NFILES] + f
    held[key] = held.get(key, 0) + 1
    S.FI[f] += 1
    if S.PG[pg, Q_HOT] != 0:
        _adjust(S.CT, S.sc, c, 1, 0)
    else:
        _adjust(S.CT, S.sc, c, 0, 1)


@njit
def _leave(S, held, pg):
    c = S.PG[pg, Q_MERGED]
    f = S.owner[pg]
    S.PG[pg, Q_MERGED] = -1
    key = c * S.sc[S_NFILES] + f
    n = held[key] - 1
    if n:
        held[key] = n
    else:
        del held[key]
    S.FI[f] -= 1
    if S.PG[pg, Q_HOT] != 0:
        _adjust(S.CT, S.sc, c, -1, 0)
    else:
        _adjust(S.CT, S.sc, c, 0, -1)


@njit(cache=True)
def on_snapshot(S, held, written, pgs, kinds, hot_pg, hot_val):
    sc = S.sc
    PG = S.PG
    for f in written:
        if S.FI[f] > 0:
            sc[S_BREAKS] += 1
    for i in range(len(pgs)):
        k = kinds[i]
        pg = pgs[i]
        if st.is_removal(k) and PG[pg, Q_MERGED] >= 0:
            _leave(S, held, pg)
    for i in range(len(hot_pg)):
        pg = hot_pg[i]
        v = np.int64(hot_val[i])
        c = PG[pg, Q_MERGED]
        was = PG[pg, Q_HOT] != 0
        if c >= 0 and (v != 0) != was:
            if v != 0:
                _adjust(S.CT, sc, c, 1, -1)
            else:
                _adjust(S.CT, sc, c, -1, 1)
        PG[pg, Q_HOT] = v


@njit(cache=True)
def run_until(E, S, held, t_end):
    epg = E.pg
    PG = S.PG
    CT = S.CT
    owner = S.owner
    sc = S.sc
    n = len(PG)
    within = sc[OP + P.within_file] == 1
    mapped_only = sc[OP + P.mapped_only] == 1
    nfiles = sc[S_NFILES]
    while wake_up(sc, t_end):
        quota = sc[OP + P.pages_to_scan]
        steps = 0
        while quota > 0 and steps < n:
            pg = sc[S_CURSOR]
            sc[S_CURSOR] = pg + 1 if pg + 1 < n else 0
            steps += 1
            if epg[pg, P_CID] < 0:
                sc[DU + U_WALKED] += 1
                continue
            quota -= 1
            # ---- visit ----
            sc[DU + U_VISITED] += 1
            sc[S_SCANNED] += 1
            if st.page_is_ksm(E, pg):
                continue
            if mapped_only and (PG[pg, Q_HOT] & HOT_MAPPED) == 0:
                continue
            sc[DU + U_FHASH] += 1
            sc[DU + U_OPS] += 1
            c = epg[pg, P_CID]
            f = owner[pg]
            ef = CT[c, C_FRAME]
            if ef >= 0 and st.frame_alive(E, ef, CT[c, C_GEN]):
                if not within and held.get(c * nfiles + f, 0) > 0:
                    sc[S_SAME] += 1
                    continue
                sc[DU + U_MEMCMP] += 1
                sc[DU + U_WP] += 1
                sc[DU + U_REMAP] += 1
                st.merge(E, pg, ef, sc[D_NOW])
                _join(S, held, pg, c)
                continue
            h = CT[c, C_HINT]
            if (h < 0 or h == pg or epg[h, P_CID] != c or st.page_is_ksm(E, h)
                    or (mapped_only and (PG[h, Q_HOT] & HOT_MAPPED) == 0)):
                CT[c, C_HINT] = pg
                continue
            if not within and owner[h] == f:
                sc[S_SAME] += 1
                continue
            sc[DU + U_MEMCMP] += 1
            sc[DU + U_WP] += 2
            sc[DU + U_REMAP] += 1
            hf = st.frame(E, h)
            gen = st.stabilize(E, h)
            st.merge(E, pg, hf, sc[D_NOW])
            CT[c, C_FRAME] = hf
            CT[c, C_GEN] = gen
            CT[c, C_HINT] = -1
            _join(S, held, h, c)
            _join(S, held, pg, c)
        sleep(sc, sc[OP + P.sleep_millisecs], sc[OP + P.hz])


class PageCacheKernel(KernelRuntime):
    """The kernel behind the driver's calls; counters as :class:`~ksmtrace.policies.pagecache.runtime.PageCacheRuntime`."""

    name = "pagecache"

    def __init__(self, params, ctx) -> None:
        super().__init__(params, ctx)
        self.S = new_state(ctx.prep, params, ctx)
        self.held = new_held()
        self.sc = self.S.sc
        self.ex = page_cache_extras(ctx.prep)

    def on_snapshot(self, s: int, now: int) -> None:
        p, ex = self.prep, self.ex
        sl = p.events(s)
        w = ex["pc_written"][ex["pc_written_off"][s]:ex["pc_written_off"][s + 1]].astype(np.int64)
        a, b = int(ex["pc_hot_off"][s]), int(ex["pc_hot_off"][s + 1])
        on_snapshot(self.S, self.held, w, p.ev_pg[sl], p.ev_kind[sl], ex["pc_hot_pg"][a:b].astype(np.int64),
                    ex["pc_hot_val"][a:b].astype(np.int64))

    def run_until(self, t_end: int) -> None:
        run_until(self.E, self.S, self.held, np.int64(t_end))
        self.check()

    def counters(self) -> dict:
        sc = self.sc
        return pagecache_counters(sc[S_TOT_HOT], sc[S_TOT_COLD], sc[S_FR_HOT], sc[S_FR_COLD], sc[S_BREAKS],
                                  sc[S_SAME], sc[S_SCANNED])
