"""The numba kernel of the ``oracle`` policy: :class:`~ksmtrace.policies.oracle.OracleRuntime` on the
fast engine's arrays, one jitted call per snapshot."""
from __future__ import annotations

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.api import EV_APPEAR, EV_WRITE
from ksmtrace.engine.daemon import NoDaemon
from ksmtrace.policies.oracle import merge_keys


class OracleKernel(NoDaemon):
    def __init__(self, params, ctx) -> None:
        self.ctx = ctx
        self.E = ctx.engine.E
        keys, n_keys = merge_keys(params, ctx)
        self.sa = keys is not None
        self.keys = keys if keys is not None else np.zeros(len(ctx.prep.ev_pg), np.int64)
        n = max(n_keys if self.sa else ctx.prep.n_cids, 1)
        self.holder = np.full(n, -1, dtype=np.int64)
        self.kframe = np.full(n, -1, dtype=np.int64)
        self.kgen = np.zeros(n, dtype=np.int64)
        self.hkey = np.full(max(ctx.prep.n_pages, 1), -1, dtype=np.int64)
        self.pkey = np.full(max(ctx.prep.n_pages, 1), -1, dtype=np.int64)  # key of each page's last arrival

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.ctx.prep
        sl = p.events(s)
        _oracle_step(self.E, p.ev_pg[sl], p.ev_kind[sl], self.keys[sl], self.sa, self.holder, self.kframe, self.kgen,
                     self.hkey, now)
        if self.sa:
            k = p.ev_kind[sl]
            arr = (k == EV_APPEAR) | (k == EV_WRITE)
            self.pkey[p.ev_pg[sl][arr]] = self.keys[sl][arr]

    def on_fault_write(self, pg: int, now: int) -> None:
        """See :meth:`ksmtrace.policies.oracle.OracleRuntime.on_fault_write`."""
        _oracle_step(self.E, np.array([pg], np.int32), np.array([EV_WRITE], np.uint8),
                     np.array([self.pkey[pg]], np.int64), self.sa, self.holder, self.kframe, self.kgen, self.hkey,
                     np.int64(now))


@njit(cache=True)
def _oracle_step(E, pgs, kinds, keys, sa, holder, kframe, kgen, hkey, now):
    P = E.pg
    F = E.fr
    for i in range(len(pgs)):
        k = kinds[i]
        pg = pgs[i]
        c = P[pg, st.P_CID]
        if not (k == EV_APPEAR or k == EV_WRITE) or c < 0:
            continue
        if sa:  # same_address_only: merge within the page's class, zero pages too
            c = keys[i]
            if c < 0:
                continue
        elif c == 0:
            st.merge_zero(E, pg, now)
            continue
        kf = kframe[c]
        if kf > 0 and F[kf, st.F_REF] > 0 and F[kf, st.F_KSM] == 1 and F[kf, st.F_GEN] == kgen[c]:
            st.merge(E, pg, kf, now)
            continue
        h = holder[c]
        if h < 0 or h == pg or P[h, st.P_CID] != P[pg, st.P_CID] or (sa and hkey[h] != c):
            holder[c] = pg
            if sa:
                hkey[pg] = c
            continue
        fh = P[h, st.P_FRAME]
        if fh == P[pg, st.P_FRAME]:
            continue
        gen = st.stabilize(E, h)
        kframe[c] = fh
        kgen[c] = gen
        st.merge(E, pg, fh, now)
