"""``oracle``: perfect, instantaneous deduplication — the bound every other policy is measured against.

Models no kernel.  At every snapshot, the moment a candidate page appears or is written, it is
merged with every other candidate page of equal content (through the same engine primitives as
every policy), and an all-zero page is mapped to the kernel's zero page.  So at every snapshot the
frames in use equal the number of distinct non-zero contents: ``frames_saved == oracle_saved``.
It does no work (no cost units) and its merge latency is zero.  Its COW breaks are the writes to
pages that were sharing a frame: the least any policy that shares everything could cause.

``same_address_only`` bounds the same-address plan (:mod:`ksmtrace.policies.sameaddr`): a page
merges only with pages of equal content in its same-address class (``same_address_key``) — the
class it had when it arrived (appeared or was written) — and all-zero pages merge like any other
content within their class instead of going to the zero page.  The saving it reaches is what
merging same-address duplicates alone can give.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ksmtrace.engine.api import EV_APPEAR, EV_WRITE, RunContext
from ksmtrace.engine.daemon import NoDaemon
from ksmtrace.policies.base import Params, Policy, param
from ksmtrace.policies.sameaddr import SameAddress, same_address_key_param


@dataclass(frozen=True)
class OracleParams(Params):
    same_address_only: bool = param(False, "bound of the same-address plan: merge only pages of equal content at the same "
                                           "virtual address in related processes (same_address_key); zero pages too, as "
                                           "any content, instead of mapping them to the zero page")
    same_address_key: str = same_address_key_param()


def merge_keys(params, ctx: RunContext) -> tuple[np.ndarray | None, int]:
    """The key under which each arriving page merges: its content (None: use the content id), or
    with ``same_address_only`` its (same-address class, content) (-1: it merges with nothing)."""
    if not params.same_address_only:
        return None, 0
    sa = SameAddress(ctx, True, params.same_address_key)
    if not sa.on:
        return np.full(len(ctx.prep.ev_pg), -1, np.int64), 0
    return sa.event_keys(ctx.prep)


class OracleRuntime(NoDaemon):
    """Readable: page by page, each arriving page joins the one frame that holds its content."""

    def __init__(self, params, ctx: RunContext) -> None:
        self.ctx = ctx
        self.eng = ctx.engine
        self.kpage: dict[int, tuple[int, int]] = {}  # content -> (KSM frame, generation)
        self.holder: dict[int, int] = {}  # content -> the one unmerged page holding it
        self.keys, _ = merge_keys(params, ctx)
        self.hkey: dict[int, int] = {}  # holder page -> the key it became holder of (same_address_only)
        self.pkey: dict[int, int] = {}  # page -> the key of its last arrival (same_address_only)

    def on_snapshot(self, s: int, now: int) -> None:
        prep = self.ctx.prep
        ev = prep.batch(s)
        keys = self.keys[prep.events(s)].tolist() if self.keys is not None else None
        for i, (pg, kind) in enumerate(zip(ev.pg.tolist(), ev.kind.tolist())):
            if kind not in (EV_APPEAR, EV_WRITE):
                continue
            if keys is not None:
                self.pkey[pg] = keys[i]
            self._arrive(pg, keys[i] if keys is not None else None, now)

    def on_fault_write(self, pg: int, now: int) -> None:
        """A recorded write fault gave ``pg`` a frame of its own (``--writes faults``): perfect
        dedup merges it again at once, under the key of its last arrival."""
        self._arrive(pg, self.pkey.get(pg, -1) if self.keys is not None else None, now)

    def _arrive(self, pg: int, key, now: int) -> None:
        """The page ``pg`` (new or written) joins the one frame that holds its content (its key
        with ``same_address_only``)."""
        eng = self.eng
        if not eng.is_candidate(pg):
            return
        c = eng.cid(pg)
        if key is not None:  # same_address_only: merge within the page's class, zero pages too
            c = key
            if c < 0:
                return
        elif c == 0:
            eng.merge_zero(pg, now)
            return
        k = self.kpage.get(c)
        if k is not None and eng.frame_alive(*k):
            eng.merge(pg, k[0], now)
            return
        h = self.holder.get(c)
        if h is None or h == pg or eng.cid(h) != eng.cid(pg) or (key is not None and self.hkey.get(h) != c):
            self.holder[c] = pg
            if key is not None:
                self.hkey[pg] = c
            return
        if eng.frame(h) == eng.frame(pg):
            return
        gen = eng.stabilize(h)
        self.kpage[c] = (eng.frame(h), gen)
        eng.merge(pg, eng.frame(h), now)


class Oracle(Policy):
    """Perfect instantaneous dedup (see the module docstring)."""

    sensitivity = {
        "same_address_only": (True, "families", {}),
        "same_address_key": ("any", "families", {"same_address_only": True}),
    }

    name = "oracle"
    summary = "perfect instantaneous dedup: the upper bound on frames saved"
    Params = OracleParams
    default_scope = "recorded"
    kernel_counters = ()
    Runtime = OracleRuntime
    kernel = "ksmtrace.policies.oracle.kernel:OracleKernel"
