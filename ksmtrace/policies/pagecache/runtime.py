"""The readable runtime of ``pagecache``: the page-cache deduplicator page by page — the policy's
executable spec, on either engine.  The numba kernel (:mod:`ksmtrace.policies.pagecache.kernel`)
must agree with it on every counter.  What it models: :mod:`ksmtrace.policies.pagecache`.
"""
from __future__ import annotations

import numpy as np

from ksmtrace.engine.api import EV_GONE, EV_UNMERGE, EV_WRITE
from ksmtrace.engine.daemon import Daemon
from ksmtrace.trace.pagecache import HOT_MAPPED


def page_cache_extras(prep) -> dict:
    """The ``file`` scope's per-snapshot arrays (empty ones for a prepared trace of another scope)."""
    ex = prep.extras
    if "pc_hot_off" in ex:
        return ex
    z = np.zeros(prep.n_snaps + 1, np.int64)
    return {"pc_hot_off": z, "pc_hot_pg": np.zeros(0, np.int32), "pc_hot_val": np.zeros(0, np.int8),
            "pc_written_off": z, "pc_written": np.zeros(0, np.int32)}


class PageCacheRuntime(Daemon):
    """The page-cache scanner, readable."""

    def __init__(self, params, ctx) -> None:
        super().__init__(ctx)
        self.p = params
        self.prep = ctx.prep
        self.eng = ctx.engine
        self.ex = page_cache_extras(ctx.prep)
        n, c = ctx.prep.n_pages, max(ctx.prep.n_cids, 1)
        self.cursor = 0
        self.hot = np.zeros(n, np.int64)  # HOT_* class of each page (mapped, active)
        self.merged = np.full(n, -1, np.int64)  # content of the shared frame the page is on (policy's view)
        self.entry: dict[int, tuple[int, int]] = {}  # content -> (shared frame, its generation)
        self.hint: dict[int, int] = {}  # content -> a page seen with it
        self.held: dict[tuple[int, int], int] = {}  # (content, file) -> its pages on the content's frame
        self.in_file = np.zeros(max(ctx.prep.n_procs, 1), np.int64)  # merged pages per file
        self.n_hot = np.zeros(c, np.int64)  # per content: mapped/active pages on its frame
        self.n_cold = np.zeros(c, np.int64)  # per content: clean, unmapped, inactive pages on it
        self.tot_hot = self.tot_cold = self.frames_hot = self.frames_cold = 0
        self.file_breaks = 0
        self.same_file = 0
        self.scanned = 0

    # --- bookkeeping of the shared frames ----------------------------------------------------------
    def _adjust(self, c: int, dh: int, dk: int) -> None:
        """Add ``dh`` hot and ``dk`` cold members to content ``c``'s frame, keeping the totals."""
        h, k = self.n_hot[c], self.n_cold[c]
        self.frames_hot -= h > 0
        self.frames_cold -= (h == 0) and (k > 0)
        h, k = h + dh, k + dk
        self.n_hot[c], self.n_cold[c] = h, k
        self.tot_hot += dh
        self.tot_cold += dk
        self.frames_hot += h > 0
        self.frames_cold += (h == 0) and (k > 0)

    def _hot(self, pg: int) -> bool:
        return self.hot[pg] != 0

    def _join(self, pg: int, c: int) -> None:
        f = int(self.prep.page_proc[pg])
        self.merged[pg] = c
        self.held[(c, f)] = self.held.get((c, f), 0) + 1
        self.in_file[f] += 1
        self._adjust(c, 1, 0) if self._hot(pg) else self._adjust(c, 0, 1)

    def _leave(self, pg: int) -> None:
        c = int(self.merged[pg])
        f = int(self.prep.page_proc[pg])
        self.merged[pg] = -1
        n = self.held[(c, f)] - 1
        if n:
            self.held[(c, f)] = n
        else:
            del self.held[(c, f)]
        self.in_file[f] -= 1
        self._adjust(c, -1, 0) if self._hot(pg) else self._adjust(c, 0, -1)

    # --- the snapshot side: writes break sharing, classes move ---------------------------------------
    def on_snapshot(self, s: int, now: int) -> None:
        prep, ex = self.prep, self.ex
        for f in ex["pc_written"][ex["pc_written_off"][s]:ex["pc_written_off"][s + 1]].tolist():
            if self.in_file[f] > 0:
                self.file_breaks += 1
        sl = prep.events(s)
        for pg, kind in zip(prep.ev_pg[sl].tolist(), prep.ev_kind[sl].tolist()):
            if kind in (EV_GONE, EV_UNMERGE, EV_WRITE) and self.merged[pg] >= 0:
                self._leave(pg)
        a, b = int(ex["pc_hot_off"][s]), int(ex["pc_hot_off"][s + 1])
        for pg, v in zip(ex["pc_hot_pg"][a:b].tolist(), ex["pc_hot_val"][a:b].tolist()):
            c = int(self.merged[pg])
            if c >= 0 and (v != 0) != self._hot(pg):
                self._adjust(c, 1, -1) if v != 0 else self._adjust(c, -1, 1)
            self.hot[pg] = v

    # --- the scanner ------------------------------------------------------------------------------
    def run_until(self, t_end: int) -> None:
        while self.t_wake < t_end:
            self.timed_batch(self.scan_batch, self.p.sleep_millisecs)

    def scan_batch(self) -> None:
        n = self.prep.n_pages
        quota = self.p.pages_to_scan
        steps = 0
        while quota > 0 and steps < n:
            pg = self.cursor
            self.cursor = pg + 1 if pg + 1 < n else 0
            steps += 1
            if not self.eng.is_candidate(pg):
                self.charge("addresses_walked")
                continue
            quota -= 1
            self.visit(pg)

    def visit(self, pg: int) -> None:
        eng = self.eng
        self.charge("pages_visited")
        self.scanned += 1
        if eng.page_is_ksm(pg):  # already on a shared frame
            return
        if self.p.mapped_only and not (self.hot[pg] & HOT_MAPPED):
            return
        self.charge("full_hashes")
        self.charge("hashtable_ops")
        c = eng.cid(pg)
        f = int(self.prep.page_proc[pg])
        ent = self.entry.get(c)
        if ent is not None and eng.frame_alive(ent[0], ent[1]):
            if not self.p.within_file and self.held.get((c, f), 0) > 0:
                self.same_file += 1
                return
            self.charge("memcmp_pages")
            self.charge("write_protects")
            self.charge("remaps")
            eng.merge(pg, ent[0], self.now)
            self._join(pg, c)
            return
        h = self.hint.get(c, -1)
        if (h < 0 or h == pg or eng.cid(h) != c or eng.page_is_ksm(h)  # none, itself, or stale
                or (self.p.mapped_only and not (self.hot[h] & HOT_MAPPED))):
            self.hint[c] = pg
            return
        if not self.p.within_file and int(self.prep.page_proc[h]) == f:
            self.same_file += 1
            return
        self.charge("memcmp_pages")
        self.charge("write_protects", 2)
        self.charge("remaps")
        hf = eng.frame(h)
        gen = eng.stabilize(h)
        eng.merge(pg, hf, self.now)
        self.entry[c] = (hf, gen)
        del self.hint[c]
        self._join(h, c)
        self._join(pg, c)

    # --- reporting ---------------------------------------------------------------------------------
    def counters(self) -> dict:
        return pagecache_counters(self.tot_hot, self.tot_cold, self.frames_hot, self.frames_cold,
                                  self.file_breaks, self.same_file, self.scanned)


def pagecache_counters(tot_hot, tot_cold, frames_hot, frames_cold, breaks, same_file, scanned) -> dict:
    """The policy's counters from its totals: a shared frame keeps one page (a mapped or active one
    when it has one) and frees the others' frames."""
    return {
        "shared_frames": int(frames_hot + frames_cold),
        "sharing_pages": int(tot_hot + tot_cold),
        "saved_reclaimable": int(tot_cold - frames_cold),
        "saved_active": int(tot_hot - frames_hot),
        "file_breaks": int(breaks),
        "same_file_skips": int(same_file),
        "pages_scanned": int(scanned),
    }
