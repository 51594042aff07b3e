"""The fast route of the ``oracle`` policy: :class:`~ksmtrace.policies.oracle.OracleRuntime` fused with the
fast engine's own snapshot step, one jitted call per snapshot.

The engine applies a snapshot's removals, then its arrivals; the oracle then merges every arrival
with the KSM page of its content (or the zero page).  This route does the three in one call, on
the engine's arrays and with the engine's accounting code (``state.apply_removals``,
``state.apply_arrivals``, ``state.merge``...), and lets the arrivals step put an arriving page
straight onto the live KSM page of its content (``kp``) instead of giving it a fresh frame the
oracle would free again (not with ``same_address_only``, whose merge keys are not contents).  The
differential tests hold it equal to the readable runtime on both engines (every column, the
per-process table, the latency histogram).
"""
from __future__ import annotations

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.api import EV_WRITE
from ksmtrace.engine.daemon import NoDaemon
from ksmtrace.policies.oracle import merge_keys

# kp columns (one row per merge key: a content, or with same_address_only a (class, content)): its
# KSM page and that page's generation, and the one unmerged page holding the key
K_FRAME, K_GEN, K_HOLDER = range(3)


class OracleKernel(NoDaemon):
    """Applies each snapshot itself (the driver calls :meth:`apply_snapshot` instead of the engine's)."""

    def __init__(self, params, ctx) -> None:
        self.ctx = ctx
        self.eng = ctx.engine
        keys, n_keys = merge_keys(params, ctx)
        self.sa = keys is not None
        self.keys = keys
        kp = np.full((max(n_keys if self.sa else ctx.prep.n_cids, 1), 3), -1, dtype=np.int32)
        kp[:, K_GEN] = 0
        self.kp = kp
        self.hkey = np.full(max(ctx.prep.n_pages, 1) if self.sa else 1, -1, dtype=np.int32)
        # the key of each page's last arrival, which a recorded write fault merges it under again
        # (same_address_only; the unfused path only)
        self.pkey = np.full(max(ctx.prep.n_pages, 1) if self.sa else 1, -1, dtype=np.int64)
        off = ctx.prep.off
        self.pend = np.zeros(max(1, int(np.diff(off).max()) if len(off) > 1 else 1), np.int64)
        self._fused_at = -1  # the snapshot apply_snapshot last applied

    def apply_snapshot(self, s: int, now: int) -> int:
        """The engine's snapshot step and the oracle's merges, fused; returns the COW breaks."""
        eng = self.eng
        ev, proc_new = eng.batch(s, now)
        short = not self.sa and not bool((ev.gid >= 0).any())  # see state.apply_arrivals
        keys = self.keys[self.ctx.prep.events(s)] if self.sa else ev.cid
        self._fused_at = s
        return int(_oracle_snapshot(eng.E, ev.pg, ev.kind, ev.cid, ev.gid, ev.thp, proc_new, s, now, self.kp,
                                    self.pend, short, keys, self.sa, self.hkey))

    def on_snapshot(self, s: int, now: int) -> None:
        """Nothing after :meth:`apply_snapshot`.  With recorded write faults (``--writes faults``) the
        driver takes the unfused path instead -- the engine applies the snapshot (a page a fault
        already wrote keeps that write, see ``FastEngine.apply_snapshot``), then this merges every
        arrival as :meth:`ksmtrace.policies.oracle.OracleRuntime.on_snapshot` does -- because the
        fused step's arrivals are the engine's, which skip the writes the faults already applied,
        while the oracle merges those pages again under their key at the snapshot."""
        if self._fused_at == s:
            return None
        p = self.ctx.prep
        ev = p.batch(s)
        keys = self.keys[p.events(s)] if self.sa else ev.cid
        idx = np.arange(len(ev.pg), dtype=np.int64)
        _oracle_unfused(self.eng.E, ev.pg, ev.kind, idx, self.kp, keys, self.sa, self.hkey, self.pkey, np.int64(now))
        return None

    def on_fault_write(self, pg: int, now: int) -> None:
        """See :meth:`ksmtrace.policies.oracle.OracleRuntime.on_fault_write`."""
        key = self.pkey[pg] if self.sa else -1
        _oracle_unfused(self.eng.E, np.array([pg], np.int64), np.array([EV_WRITE], np.uint8),
                        np.zeros(1, np.int64), self.kp, np.array([key], np.int64), self.sa, self.hkey, self.pkey,
                        np.int64(now))


@njit(cache=True)
def _oracle_snapshot(E, pgs, kinds, cids, gids, thps, proc_new, s, now, kp, pend, short, keys, sa, hkey):
    ec = E.ec
    ec[ec[st.C_OTIME] + s] = now
    cows = st.apply_removals(E.pg, E.fr, E.gm, ec, pgs, kinds, thps)
    if short:
        m = st.apply_arrivals(E.pg, E.fr, E.gm, ec, E.first, pgs, kinds, cids, gids, thps, proc_new, s, now, kp, pend)
    else:
        m = st.apply_arrivals(E.pg, E.fr, E.gm, ec, E.first, pgs, kinds, cids, gids, thps, proc_new, s, now, kp[:0], pend)
    _oracle_step(E, pgs, kinds, pend[:m], kp, keys, sa, hkey, now)
    return cows


@njit(cache=True)
def _oracle_unfused(E, pgs, kinds, idx, kp, keys, sa, hkey, pkey, now):
    """The oracle's merges of a snapshot's arrivals ``idx`` (or of one page a fault wrote) after the
    engine applied them; with ``same_address_only`` it notes each arrival's key (``pkey``)."""
    if sa:
        for j in range(len(idx)):
            i = idx[j]
            if st.is_arrival(kinds[i]):
                pkey[pgs[i]] = keys[i]
    _oracle_step(E, pgs, kinds, idx, kp, keys, sa, hkey, now)


@njit(inline="always")
def _oracle_step(E, pgs, kinds, idx, kp, keys, sa, hkey, now):
    """OracleRuntime.on_snapshot on the arrays, over the arrivals ``idx`` that the arrivals step
    did not already merge."""
    P = E.pg
    F = E.fr
    for j in range(len(idx)):
        i = idx[j]
        k = kinds[i]
        pg = pgs[i]
        c = P[pg, st.P_CID]
        if not st.is_arrival(k) or c < 0:
            continue
        f = P[pg, st.P_FRAME]
        if sa:  # same_address_only: merge within the page's class, zero pages too
            c = keys[i]
            if c < 0:
                continue
        elif c == 0:
            if f != st.ZERO_FRAME:
                st.merge_zero(E, pg, now)
            continue
        kf = kp[c, K_FRAME]
        if kf > 0 and F[kf, st.F_REF] > 0 and F[kf, st.F_KSM] == 1 and F[kf, st.F_GEN] == kp[c, K_GEN]:
            if f != kf:
                st.merge(E, pg, kf, now)
            continue
        h = kp[c, K_HOLDER]
        if h < 0 or h == pg or P[h, st.P_CID] != P[pg, st.P_CID] or (sa and hkey[h] != c):
            kp[c, K_HOLDER] = pg
            if sa:
                hkey[pg] = c
            continue
        fh = P[h, st.P_FRAME]
        if fh == f:
            continue
        gen = st.stabilize(E, h)
        kp[c, K_FRAME] = fh
        kp[c, K_GEN] = gen
        st.merge(E, pg, fh, now)
