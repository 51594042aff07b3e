"""``oracle``: perfect, instantaneous deduplication — the bound every other policy is measured against.

Models no kernel.  At every snapshot, the moment a candidate page appears or is written, it is
merged with every other candidate page of equal content (through the same engine primitives as
every policy), and an all-zero page is mapped to the kernel's zero page.  So at every snapshot the
frames in use equal the number of distinct non-zero contents: ``frames_saved == oracle_saved``.
It does no work (no cost units) and its merge latency is zero.  Its COW breaks are the writes to
pages that were sharing a frame: the least any policy that shares everything could cause.
"""
from __future__ import annotations

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine import state as st
from ksmtrace.engine.cost import N_UNITS
from ksmtrace.policies.base import Params, Policy, RunContext
from ksmtrace.trace.prepare import EV_APPEAR, EV_WRITE


class OracleParams(Params):
    pass


class Oracle(Policy):
    """Perfect instantaneous dedup (see the module docstring)."""

    name = "oracle"
    summary = "perfect instantaneous dedup: the upper bound on frames saved"
    Params = OracleParams
    default_scope = "recorded"
    kernel_counters = ()

    def runtime(self, ctx: RunContext):
        if ctx.engine.kind == "reference":
            return OracleReference(ctx)
        return OracleFast(ctx)


class _NoDaemon:
    def run_until(self, t_end: int) -> None:
        return None

    def counters(self) -> dict:
        return {}

    def units(self) -> np.ndarray:
        return np.zeros(N_UNITS, dtype=np.int64)

    def busy_ns(self) -> int:
        return 0

    def extras(self) -> dict:
        return {}


class OracleReference(_NoDaemon):
    """Page by page: each arriving page joins the one frame that holds its content."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.eng = ctx.engine
        self.kpage: dict[int, tuple[int, int]] = {}  # content -> (KSM frame, generation)
        self.holder: dict[int, int] = {}  # content -> the one unmerged page holding it

    def on_snapshot(self, s: int, now: int) -> None:
        prep, eng = self.ctx.prep, self.eng
        sl = prep.events(s)
        for pg, kind in zip(prep.ev_pg[sl].tolist(), prep.ev_kind[sl].tolist()):
            if kind not in (EV_APPEAR, EV_WRITE) or not eng.is_candidate(pg):
                continue
            c = eng.cid(pg)
            if c == 0:
                eng.merge_zero(pg, now)
                continue
            k = self.kpage.get(c)
            if k is not None and eng.frame_alive(*k):
                eng.merge(pg, k[0], now)
                continue
            h = self.holder.get(c)
            if h is None or h == pg or eng.cid(h) != c:
                self.holder[c] = pg
                continue
            if eng.frame(h) == eng.frame(pg):
                continue
            gen = eng.stabilize(h)
            self.kpage[c] = (eng.frame(h), gen)
            eng.merge(pg, eng.frame(h), now)


class OracleFast(_NoDaemon):
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.E = ctx.engine.E
        n = ctx.prep.n_cids
        self.holder = np.full(n, -1, dtype=np.int64)
        self.kframe = np.full(n, -1, dtype=np.int64)
        self.kgen = np.zeros(n, dtype=np.int64)

    def on_snapshot(self, s: int, now: int) -> None:
        p = self.ctx.prep
        sl = p.events(s)
        _oracle_step(self.E, p.ev_pg[sl], p.ev_kind[sl], self.holder, self.kframe, self.kgen, now)


@njit(cache=True)
def _oracle_step(E, pgs, kinds, holder, kframe, kgen, now):
    P = E.pg
    F = E.fr
    for i in range(len(pgs)):
        k = kinds[i]
        pg = pgs[i]
        c = P[pg, st.P_CID]
        if not (k == EV_APPEAR or k == EV_WRITE) or c < 0:
            continue
        if c == 0:
            st.merge_zero(E, pg, now)
            continue
        kf = kframe[c]
        if kf > 0 and F[kf, st.F_REF] > 0 and F[kf, st.F_KSM] == 1 and F[kf, st.F_GEN] == kgen[c]:
            st.merge(E, pg, kf, now)
            continue
        h = holder[c]
        if h < 0 or h == pg or P[h, st.P_CID] != c:
            holder[c] = pg
            continue
        fh = P[h, st.P_FRAME]
        if fh == P[pg, st.P_FRAME]:
            continue
        gen = st.stabilize(E, h)
        kframe[c] = fh
        kgen[c] = gen
        st.merge(E, pg, fh, now)
