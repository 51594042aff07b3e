"""The readable runtime of ``hashtable``: the table as a dict, page by page — the policy's executable
spec, on either engine.  The numba kernel (:mod:`ksmtrace.policies.hashtable.kernel`) must agree
with it on every counter.  What it models and where it differs: :mod:`ksmtrace.policies.hashtable`.
"""
from __future__ import annotations

import numpy as np

from ksmtrace.engine.api import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE
from ksmtrace.engine.daemon import Daemon

UNLIMITED = 1 << 62


def scan_permutation(prep, seed: int) -> np.ndarray:
    """Each process's page ids in a seeded random order (``perm[lo:hi]`` for process ``[lo, hi)``)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x45535821]))
    perm = np.arange(prep.n_pages, dtype=np.int64)
    for p in range(prep.n_procs):
        lo, hi = int(prep.proc_pg_lo[p]), int(prep.proc_pg_hi[p])
        if hi > lo:
            perm[lo:hi] = lo + rng.permutation(hi - lo)
    return perm


def rate_budget(rate: int, sleep_ms: int, credit: int) -> tuple[int, int]:
    """Pages one wake-up may visit at ``rate`` pages/s, carrying the fractional part: (budget, credit)."""
    if rate <= 0:
        return UNLIMITED, 0
    credit += rate * sleep_ms
    return credit // 1000, credit % 1000


def alive_procs(prep, s: int) -> np.ndarray:
    reg = prep.proc_reg_snap
    return (reg >= 0) & (reg <= s) & (prep.proc_exit_snap > s)


# ---------------------------------------------------------------------------------------------
class HashTableRuntime(Daemon):
    """The ESX page-sharing scanner, readable: the executable spec of the policy."""

    def __init__(self, params, ctx) -> None:
        super().__init__(ctx)
        self.p = params
        self.prep = ctx.prep
        self.eng = ctx.engine
        self.perm = scan_permutation(ctx.prep, ctx.seed)
        self.cursor = [0] * ctx.prep.n_procs  # position in each process's permutation
        self.alive = np.zeros(ctx.prep.n_procs, dtype=bool)
        self.rr = 0  # round-robin start (index into proc_order)
        self.gcredit = 0
        self.pcredit = 0
        # the table: key -> ("hint", page) or ("shared", frame); frame -> key; refcounts
        self.table: dict[int, tuple[str, int]] = {}
        self.frame_key: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.hint_of: dict[int, int] = {}  # page -> the key of the hint it holds
        self.pg_frame: dict[int, int] = {}  # the policy's view of page -> frame
        self.n_hints = 0
        self.n_shared = 0
        self.total_refs = 0
        self.stale = 0
        self.scanned = 0

    # --- the write-fault side: eager reference counts ------------------------------------------------
    def on_snapshot(self, s: int, now: int) -> None:
        prep, eng = self.prep, self.eng
        self.alive = alive_procs(prep, s)
        ev = prep.batch(s)
        pgs = ev.pg.tolist()
        kinds = ev.kind.tolist()
        for pg, kind in zip(pgs, kinds):
            if kind not in (EV_GONE, EV_UNMERGE, EV_WRITE) or pg not in self.pg_frame:
                continue
            f = self.pg_frame.pop(pg)
            key = self.frame_key.get(f)
            if key is not None:
                self._unref(key, f)
        for pg, kind in zip(pgs, kinds):
            if kind not in (EV_APPEAR, EV_WRITE) or not eng.is_candidate(pg):
                continue
            f = eng.frame(pg)
            self.pg_frame[pg] = f
            key = self.frame_key.get(f)
            if key is not None:  # a fork child mapping a shared frame
                self.refs[key] += 1
                self.total_refs += 1

    def _unref(self, key: int, f: int) -> None:
        self.charge("fault_table_ops")
        self.refs[key] -= 1
        self.total_refs -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            del self.table[key]
            del self.frame_key[f]
            self.n_shared -= 1

    # --- the scanner ---------------------------------------------------------------------------------
    def run_until(self, t_end: int) -> None:
        while self.t_wake < t_end:
            self.timed_batch(self.scan_batch, self.p.sleep_millisecs)

    def scan_batch(self) -> None:
        prep = self.prep
        total, self.gcredit = rate_budget(self.p.pages_per_second, self.p.sleep_millisecs, self.gcredit)
        per_proc, self.pcredit = rate_budget(self.p.process_pages_per_second, self.p.sleep_millisecs, self.pcredit)
        order = prep.proc_order.tolist()
        np_ = len(order)
        if np_ == 0:
            return
        start = self.rr
        self.rr = (self.rr + 1) % np_
        for k in range(np_):
            if total <= 0:
                break
            proc = order[(start + k) % np_]
            if not self.alive[proc]:
                continue
            lo, hi = int(prep.proc_pg_lo[proc]), int(prep.proc_pg_hi[proc])
            size = hi - lo
            quota = min(per_proc, total)
            steps = 0
            while quota > 0 and steps < size:
                pg = int(self.perm[lo + self.cursor[proc]])
                self.cursor[proc] = (self.cursor[proc] + 1) % size
                steps += 1
                if not self.eng.is_candidate(pg) or self.eng.frame(pg) <= 0:
                    self.charge("addresses_walked")
                    continue
                quota -= 1
                total -= 1
                self.visit(pg)

    def visit(self, pg: int) -> None:
        eng = self.eng
        self.charge("pages_visited")
        self.scanned += 1
        f = eng.frame(pg)
        if eng.page_is_ksm(pg):  # already sharing a COW frame: nothing to do
            return
        self.charge("full_hashes")
        key = eng.cid(pg)
        old = self.hint_of.get(pg)
        if old is not None and old != key:  # its content changed: drop its old hint
            del self.hint_of[pg]
            if self.table.get(old) == ("hint", pg):
                del self.table[old]
                self.n_hints -= 1
                self.charge("hashtable_ops")
        if key == 0 and self.p.zero_page:
            self.charge("zero_checks")
            self.charge("write_protects")
            self.charge("remaps")
            eng.split_thp(pg, False)
            eng.merge_zero(pg, self.now)
            self.pg_frame[pg] = 0
            return
        self.charge("hashtable_ops")
        ent = self.table.get(key)
        if ent is None:
            self.table[key] = ("hint", pg)
            self.hint_of[pg] = key
            self.n_hints += 1
            return
        kind, x = ent
        if kind == "hint":
            h = x
            if h == pg or (eng.is_candidate(h) and eng.frame(h) == f):
                return  # the hint itself, or another mapping of its frame
            self.charge("full_hashes")  # re-hash the hint page
            hf = eng.frame(h)
            if eng.cid(h) != key or hf <= 0 or eng.page_is_ksm(h):
                self.stale += 1
                self.table[key] = ("hint", pg)
                if self.hint_of.get(h) == key:
                    del self.hint_of[h]
                self.hint_of[pg] = key
                self.charge("hashtable_ops")
                return
            self.charge("memcmp_pages")
            eng.split_thp(h, False)
            eng.split_thp(pg, False)
            eng.stabilize(h)
            self.charge("write_protects", eng.frame_refs(hf) + 1)
            self.charge("remaps")
            eng.merge(pg, hf, self.now)
            self.pg_frame[pg] = hf
            del self.hint_of[h]
            self.hint_of.pop(pg, None)
            self.table[key] = ("shared", hf)
            self.frame_key[hf] = key
            n = eng.frame_refs(hf)
            self.refs[key] = n
            self.total_refs += n
            self.n_hints -= 1
            self.n_shared += 1
            self.charge("hashtable_ops")
            return
        sf = x
        self.charge("memcmp_pages")
        self.charge("write_protects")
        self.charge("remaps")
        eng.split_thp(pg, False)
        eng.merge(pg, sf, self.now)
        self.pg_frame[pg] = sf
        self.hint_of.pop(pg, None)
        self.refs[key] += 1
        self.total_refs += 1

    # --- reporting ---------------------------------------------------------------------------------
    def counters(self) -> dict:
        return hashtable_counters(hints=self.n_hints, shared=self.n_shared, bytes_per_entry=self.p.bytes_per_entry,
                                  refs=self.total_refs, zero_pages=self.eng.counters()["ksm_zero_pages_engine"],
                                  stale=self.stale, scanned=self.scanned)

    def extras(self) -> dict:
        return hashtable_extras(self.counters(), self.ctx.seed)


def hashtable_counters(*, hints: int, shared: int, bytes_per_entry: int, refs: int, zero_pages: int, stale: int,
                       scanned: int) -> dict:
    entries = hints + shared
    return {
        "table_entries": entries,
        "hint_entries": hints,
        "shared_entries": shared,
        "table_bytes": entries * bytes_per_entry,
        "shared_refs": refs,
        "zero_pages": zero_pages,
        "stale_hints": stale,
        "pages_scanned": scanned,
    }


def hashtable_extras(counters: dict, seed: int) -> dict:
    return {"table_entries": counters["table_entries"], "table_bytes": counters["table_bytes"],
            "stale_hints": counters["stale_hints"], "scan_order_seed": int(seed)}
