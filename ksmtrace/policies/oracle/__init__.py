"""``oracle``: perfect, instantaneous deduplication — the bound every other policy is measured against.

Models no kernel.  At every snapshot, the moment a candidate page appears or is written, it is
merged with every other candidate page of equal content (through the same engine primitives as
every policy), and an all-zero page is mapped to the kernel's zero page.  So at every snapshot the
frames in use equal the number of distinct non-zero contents: ``frames_saved == oracle_saved``.
It does no work (no cost units) and its merge latency is zero.  Its COW breaks are the writes to
pages that were sharing a frame: the least any policy that shares everything could cause.
"""
from __future__ import annotations

from ksmtrace.engine.api import EV_APPEAR, EV_WRITE, RunContext
from ksmtrace.engine.daemon import NoDaemon
from ksmtrace.policies.base import Params, Policy


class OracleParams(Params):
    pass


class OracleRuntime(NoDaemon):
    """Readable: page by page, each arriving page joins the one frame that holds its content."""

    def __init__(self, params, ctx: RunContext) -> None:
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


class Oracle(Policy):
    """Perfect instantaneous dedup (see the module docstring)."""

    name = "oracle"
    summary = "perfect instantaneous dedup: the upper bound on frames saved"
    Params = OracleParams
    default_scope = "recorded"
    kernel_counters = ()
    Runtime = OracleRuntime
    kernel = "ksmtrace.policies.oracle.kernel:OracleKernel"
