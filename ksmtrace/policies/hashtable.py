"""``hashtable``: VMware ESX-style content-based page sharing (Waldspurger, OSDI'02, §4).

What it models (``docs/kernel-notes.md`` §6, ``docs/policies-pksm-hashtable.md``):

* **One global hash table** keyed by the full-page hash (the content id: a collision-free 64-bit
  hash, as ESX assumes); every scanned page costs one full-page hash (``full_hashes``) and one
  table lookup (``hashtable_ops``).  Two kinds of entry (``bytes_per_entry`` each, 16 B in ESX):
  * a **hint**: a page seen once, *not* write-protected.  When a later page hashes to the same
    key, the hint page is re-hashed: if it changed (or is gone) the hint is stale and the new page
    takes its place; if not, a full compare, then both share one write-protected frame and the
    entry becomes a shared entry.  A write to a hint page costs nothing and is found only then.
    A page whose content changed is re-hinted under its new key when the scanner meets it again
    (its old hint is dropped, as ESX's per-page state points at it).
  * a **shared** entry: one COW frame and a reference count (the pages mapping it).  A later match
    is compared in full and remapped onto the frame (count + 1).
* **COW on a shared page decrements the count eagerly**, in the write-fault handler (as ESX's
  fault handler does: the runtime learns of the write from the snapshot's events); an entry whose
  count drops to 0 is removed there and then.  That work is the writer's (unit
  ``fault_table_ops``, not daemon CPU).  Pages already sharing a frame are skipped by the scanner
  (no hash).
* **Random scan order at a capped rate**: each process's pages are visited in a seeded random
  permutation (fixed per process, deterministic given the run's seed), cyclically.  A daemon wakes
  every ``sleep_millisecs``; each wake-up visits at most ``pages_per_second`` × sleep present
  pages in all (ESX ``Mem.ShareScanTotal``) and at most ``process_pages_per_second`` × sleep per
  process (``Mem.ShareScanVM``; a process plays the VM), processes taken round-robin from a start
  that advances every wake-up.  0 = no cap; with both uncapped every process is walked once per
  wake-up.  Addresses with no candidate page are walked over (``addresses_walked``) without using
  budget.
* No unstable tree (so nothing to reset) and no checksum gate.
* ``zero_page`` (default True): an all-zero page is recognised by its hash and, after a full zero
  check, mapped to the shared zero page (no entry) — ESX backs zero pages with one shared zero
  frame.  False: the zero content is an ordinary shared entry (one frame still used).

Counters (per snapshot): ``table_entries``, ``hint_entries``, ``shared_entries``, ``table_bytes``
(entries × bytes_per_entry), ``shared_refs`` (sum of the shared entries' counts),
``zero_pages``, ``stale_hints`` (cumulative hints found changed or gone), ``pages_scanned``
(cumulative).

Where it deliberately differs from ESX: guest-physical pages are replaced by the traced
processes' virtual pages (a process = a VM); hints of pages that are freed stay until matched or
until the same address is scanned again; no overflow table (counts are unbounded); no salting;
no large pages (a THP is split before a merge, as KSM does); the scan permutation is not re-drawn
per cycle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ksmtrace.policies.base import Params, Policy, ReferenceDaemon, RunContext, param
from ksmtrace.trace.prepare import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE

UNLIMITED = 1 << 62


@dataclass(frozen=True)
class HashTableParams(Params):
    pages_per_second: int = param(200, "scan-rate cap over all processes (ESX Mem.ShareScanTotal); 0 = no cap", "pages/s", minimum=0)
    process_pages_per_second: int = param(50, "scan-rate cap per process (ESX Mem.ShareScanVM); 0 = no cap", "pages/s", minimum=0)
    sleep_millisecs: int = param(1000, "sleep between wake-ups of the scanner", "ms", minimum=1)
    bytes_per_entry: int = param(16, "metadata bytes per table entry (hint or shared)", "B", minimum=1)
    zero_page: bool = param(True, "map all-zero pages to the shared zero page (False: an ordinary shared entry)")


class HashTable(Policy):
    """VMware ESX-style content-based page sharing (see the module docstring)."""

    name = "hashtable"
    aliases = ("esx", "tps")
    summary = "ESX-style sharing: one global full-hash table, hint entries re-hashed on a match, refcounted shared entries, random capped scan"
    Params = HashTableParams
    default_scope = "anon"
    kernel_counters = (
        "table_entries", "hint_entries", "shared_entries", "table_bytes", "shared_refs",
        "zero_pages", "stale_hints", "pages_scanned",
    )

    sensitivity = {
        "pages_per_second": (20, "mixed", {}),
        "process_pages_per_second": (10, "mixed", {}),
        "sleep_millisecs": (100, "mixed", {}),
        "bytes_per_entry": (8, "mixed", {}),
        "zero_page": (False, "mixed", {"pages_per_second": 0, "process_pages_per_second": 0}),
    }

    @classmethod
    def budget_limit(cls, params):
        """At most ceil(pages_per_second x sleep) pages per wake-up (None when uncapped)."""
        if params.pages_per_second <= 0:
            return None
        return ("pages_scanned", (params.pages_per_second * params.sleep_millisecs + 999) // 1000)

    def runtime(self, ctx: RunContext):
        if ctx.engine.kind == "reference":
            return HashTableReference(self.params, ctx)
        from ksmtrace.policies._hashtable_fast import HashTableFast

        return HashTableFast(self.params, ctx)


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
class HashTableReference(ReferenceDaemon):
    """The executable spec: the table as a dict, page by page."""

    def __init__(self, params: HashTableParams, ctx: RunContext) -> None:
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
        sl = prep.events(s)
        pgs = prep.ev_pg[sl].tolist()
        kinds = prep.ev_kind[sl].tolist()
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
            self.charge("write_protects", eng.frames[hf].ref + 1)
            self.charge("remaps")
            eng.merge(pg, hf, self.now)
            self.pg_frame[pg] = hf
            del self.hint_of[h]
            self.hint_of.pop(pg, None)
            self.table[key] = ("shared", hf)
            self.frame_key[hf] = key
            n = eng.frames[hf].ref
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
        entries = self.n_hints + self.n_shared
        return {
            "table_entries": entries,
            "hint_entries": self.n_hints,
            "shared_entries": self.n_shared,
            "table_bytes": entries * self.p.bytes_per_entry,
            "shared_refs": self.total_refs,
            "zero_pages": self.eng.counters()["ksm_zero_pages_engine"],
            "stale_hints": self.stale,
            "pages_scanned": self.scanned,
        }

    def extras(self) -> dict:
        c = self.counters()
        return {"table_entries": c["table_entries"], "table_bytes": c["table_bytes"], "stale_hints": self.stale, "scan_order_seed": int(self.ctx.seed)}
