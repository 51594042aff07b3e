"""The reference engine: the executable spec of the engine's ground truth, page by page.

Plain Python objects and dictionaries, no vectorisation: what happens to one page and one frame
at every event is spelled out here.  The fast engine (``engine/state.py``) must agree with it on
every counter of every snapshot.  Counters that the fast engine maintains incrementally are
recomputed here from scratch (``frames_in_use`` by counting distinct frames, ``ksm_zero_pages``
by counting pages), so a bookkeeping slip in either shows up as a difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ksmtrace.engine.state import COUNTER_NAMES, N_LAT_BINS, ZERO_FRAME, lat_bin
from ksmtrace.engine.api import EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE


@dataclass
class Page:
    cid: int  # content
    frame: int  # frame mapped (ZERO_FRAME when the policy mapped it to the zero page)
    since: int  # virtual time it got this content
    thp: int  # huge page id or -1
    zero_ksm: bool = False


@dataclass
class Frame:
    ref: int = 0
    ksm: bool = False
    gen: int = 0
    cid: int = -1
    alias: tuple = (-1, -1)  # (KSM frame, its generation) this frame's pages were merged into
    since: int = 0
    dom: int = -1


class ReferenceEngine:
    kind = "reference"

    def __init__(self, prep) -> None:
        self.prep = prep
        self.pages: dict[int, Page] = {}  # candidate pages only
        self.frames: dict[int, Frame] = {}
        self.split_thps: set[int] = set()
        self.cow_ksm = 0
        self.cow_zero = 0
        self.unmerge_cows = 0
        self.merges = 0
        self.exposed = 0
        self.zero_remapped = 0
        self.violations = 0
        self.lat_sum = 0
        self.splits = 0
        self.lat = [0] * N_LAT_BINS
        self.first_merge: dict[int, int] = {}  # page -> virtual time of its first merge
        self.now = 0
        self.faulted: dict[int, int] = {}  # page written by a fault -> the snapshot time its write carries
        self._fresh = prep.n_gids + 1  # frame ids for arrivals whose frame no other arrival shares

    # --- queries -------------------------------------------------------------------------
    def dom(self, pg: int) -> int:
        return int(self.prep.proc_domain[self.prep.page_proc[pg]])

    def frame_of(self, f: int) -> Frame:
        if f not in self.frames:
            self.frames[f] = Frame()
        return self.frames[f]

    def is_candidate(self, pg: int) -> bool:
        return pg in self.pages

    def cid(self, pg: int) -> int:
        return self.pages[pg].cid if pg in self.pages else -1

    def frame(self, pg: int) -> int:
        return self.pages[pg].frame if pg in self.pages else -1

    def page_is_ksm(self, pg: int) -> bool:
        p = self.pages.get(pg)
        return p is not None and p.frame != ZERO_FRAME and self.frame_of(p.frame).ksm

    def frame_alive(self, f: int, gen: int) -> bool:
        fr = self.frames.get(f)
        return f != ZERO_FRAME and fr is not None and fr.ref > 0 and fr.ksm and fr.gen == gen

    def frame_refs(self, f: int) -> int:
        fr = self.frames.get(f)
        return fr.ref if fr is not None and f != ZERO_FRAME else 0

    # --- policy primitives ----------------------------------------------------------------
    def stabilize(self, pg: int) -> int:
        p = self.pages.get(pg)
        if p is None or p.frame == ZERO_FRAME:
            self.violations += 1
            return -1
        fr = self.frame_of(p.frame)
        if not fr.ksm:
            fr.ksm = True
            fr.gen += 1
        return fr.gen

    def _merged(self, pg: int, partner_since: int, partner_dom: int, now: int) -> None:
        p = self.pages[pg]
        lat = max(0, now - max(p.since, partner_since))
        self.merges += 1
        self.first_merge.setdefault(pg, now)
        self.lat_sum += lat
        self.lat[lat_bin(lat)] += 1
        if partner_dom != self.dom(pg):
            self.exposed += 1

    def merge(self, pg: int, f: int, now: int) -> bool:
        p = self.pages.get(pg)
        fr = self.frames.get(f)
        if (p is None or fr is None or f == ZERO_FRAME or fr.ref <= 0 or not fr.ksm or fr.cid != p.cid
                or p.frame == ZERO_FRAME):  # a page on the zero page is not the policy's to move
            self.violations += 1
            return False
        if p.frame == f:
            return True
        self._merged(pg, fr.since, fr.dom, now)
        if fr.dom != self.dom(pg):
            fr.dom = -2
        old = p.frame
        self.frame_of(old).ref -= 1
        self.frame_of(old).alias = (f, fr.gen)
        p.frame = f
        fr.ref += 1
        return True

    def merge_zero(self, pg: int, now: int) -> bool:
        p = self.pages.get(pg)
        if p is None or p.cid != 0 or p.frame == ZERO_FRAME:
            self.violations += 1
            return False
        self._merged(pg, 0, self.dom(pg), now)
        self.frame_of(p.frame).ref -= 1
        p.frame = ZERO_FRAME
        p.zero_ksm = True
        return True

    def split_thp(self, pg: int, remap_zero: bool) -> int:
        p = self.pages.get(pg)
        if p is None or p.thp < 0 or p.thp in self.split_thps:
            return 0
        t = p.thp
        self.split_thps.add(t)
        self.splits += 1
        proc = self.prep.page_proc[pg]
        lo, hi = int(self.prep.proc_pg_lo[proc]), int(self.prep.proc_pg_hi[proc])
        n = 0
        for q in range(max(lo, pg - 511), min(hi, pg + 512)):
            qp = self.pages.get(q)
            if qp is None or qp.thp != t:
                continue
            qp.thp = -1
            if remap_zero and qp.cid == 0 and qp.frame != ZERO_FRAME and not self.frame_of(qp.frame).ksm:
                self.frame_of(qp.frame).ref -= 1
                del self.pages[q]
                n += 1
        self.zero_remapped += n
        return n

    # --- snapshots --------------------------------------------------------------------------
    def apply_snapshot(self, s: int, now: int) -> int:
        prep = self.prep
        self.now = now
        ev = prep.batch(s)
        events = list(zip(ev.pg.tolist(), ev.kind.tolist(), ev.cid.tolist(), ev.gid.tolist(), ev.thp.tolist()))
        # a page a fault wrote before this snapshot already holds what its EV_WRITE here shows
        events = [(pg, EV_THP if kind == EV_WRITE and self.faulted.get(pg) == now else kind, cid, gid, thp)
                  for pg, kind, cid, gid, thp in events]
        self.faulted = {pg: t for pg, t in self.faulted.items() if t > now}
        cows = 0
        for pg, kind, cid, gid, thp in events:  # removals first
            p = self.pages.get(pg)
            if p is None:
                continue
            if kind in (EV_GONE, EV_UNMERGE, EV_WRITE):
                if kind in (EV_WRITE, EV_UNMERGE):
                    if p.frame != ZERO_FRAME and self.frame_of(p.frame).ksm:  # a KSM folio: COW_KSM
                        cows += 1
                        if kind == EV_UNMERGE:
                            self.unmerge_cows += 1
                    elif p.zero_ksm:  # the policy's zero page: a fresh page, not COW_KSM
                        self.cow_zero += 1
                if p.frame != ZERO_FRAME:
                    self.frame_of(p.frame).ref -= 1
                del self.pages[pg]
            elif kind == EV_THP:
                p.thp = thp
        for pg, kind, cid, gid, thp in events:  # then arrivals
            if kind not in (EV_APPEAR, EV_WRITE) or pg in self.pages:
                continue
            if gid < 0:  # a frame of its own
                self._fresh += 1
                gid = self._fresh
            else:
                gid += 1  # frame 0 is the zero page
            fr = self.frame_of(gid)
            target = gid
            if fr.ref == 0:
                a, agen = fr.alias
                proc = int(prep.page_proc[pg])
                fa = self.frames.get(a) if a > 0 else None
                if (kind == EV_APPEAR and prep.proc_first_snap[proc] == s and fa is not None and fa.ref > 0
                        and fa.ksm and fa.gen == agen and fa.cid == cid):
                    target = a
                else:
                    fr.ksm = False
                    fr.cid = cid
                    fr.alias = (-1, -1)
                    fr.since = now
                    fr.dom = self.dom(pg)
            if target == gid and fr.dom != self.dom(pg):
                fr.dom = -2
            self.frame_of(target).ref += 1
            self.pages[pg] = Page(cid=cid, frame=target, since=now, thp=thp)
        self.cow_ksm += cows
        return cows

    def write_fault(self, pg: int, cid: int, now: int, until: int) -> int:
        """A recorded write fault on ``pg`` at ``now``, leaving content ``cid`` (-1: the same
        bytes): a KSM page is copied (COW_KSM), the policy's zero page gives a fresh page
        (cow_zero), a frame shared by fork is copied; the page ends on a frame of its own, and its
        ``EV_WRITE`` at the snapshot at ``until`` is already applied.  Returns the KSM COW breaks
        (0/1), -1 if the page is not a candidate."""
        p = self.pages.get(pg)
        if p is None:
            return -1
        cow = 0
        if p.frame != ZERO_FRAME and self.frame_of(p.frame).ksm:
            cow = 1
            self.cow_ksm += 1
        elif p.zero_ksm:
            self.cow_zero += 1
        if p.frame != ZERO_FRAME:
            self.frame_of(p.frame).ref -= 1
        self._fresh += 1
        fr = self.frame_of(self._fresh)
        fr.ref, fr.cid, fr.since, fr.dom = 1, (p.cid if cid < 0 else cid), now, self.dom(pg)
        self.pages[pg] = Page(cid=fr.cid, frame=self._fresh, since=now, thp=p.thp)
        self.faulted[pg] = until
        return cow

    # --- metrics -------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        frames_in_use = len({p.frame for p in self.pages.values() if p.frame != ZERO_FRAME})
        vals = {
            "frames_in_use": frames_in_use,
            "cow_ksm": self.cow_ksm,
            "merges": self.merges,
            "exposed_merges": self.exposed,
            "ksm_zero_pages_engine": sum(1 for p in self.pages.values() if p.zero_ksm),
            "thp_zero_remapped": self.zero_remapped,
            "contract_violations": self.violations,
            "merge_latency_sum_ns": self.lat_sum,
            "candidate_pages": len(self.pages),
            "unmerge_cows": self.unmerge_cows,
            "thp_splits": self.splits,
            "cow_zero": self.cow_zero,
        }
        assert tuple(vals) == COUNTER_NAMES
        return vals

    def per_process(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.prep.n_procs
        cand = np.zeros(n, dtype=np.int64)
        merged = np.zeros(n, dtype=np.int64)
        for pg, p in self.pages.items():
            proc = int(self.prep.page_proc[pg])
            cand[proc] += 1
            if p.zero_ksm or (p.frame != ZERO_FRAME and self.frame_of(p.frame).ksm):
                merged[proc] += 1
        return cand, merged

    def latency_hist(self) -> np.ndarray:
        return np.array(self.lat, dtype=np.int64)

    def first_merge_ns(self) -> np.ndarray:
        """Per page, the virtual time of its first merge (-1: never merged)."""
        out = np.full(self.prep.n_pages, -1, dtype=np.int64)
        for pg, t in self.first_merge.items():
            out[pg] = t
        return out
