"""``pksm``: PKSM (Figo Zhang's anonymous-page KSM, ``mm/pksm.c``, 2012-2013), replayed in virtual time.

What it models (read beside ``mm/pksm.c``; function names below are PKSM's; see also
``docs/kernel-notes.md`` §5 and ``docs/policies-pksm-hashtable.md``):

* **Hooks, not a VMA walk.**  Every new anonymous page is registered at fault time
  (``pksm_add_new_anon_page``: flags NEW|INITCHECKSUM, appended to ``new_anon_page_list``).  In
  the replay a page is *new* when a candidate page appears on a frame no other candidate page
  maps: the snapshot's APPEAR events, in page-id order.  A page that appears on a frame another
  page already maps is another mapping of the same physical page (fork): no new item, but the
  page's rmap walk will reach it.  Items are per *physical page* (frame), not per address.  A
  write to a private page that no one else maps is an in-place write: the item follows the page
  (its stored checksum is now stale).  A write to a merged (KSM or zero) page or to a fork-shared
  page is a COW: the copy comes from ``do_wp_page``, which PKSM does not hook, so it is not
  tracked (``track_cow_pages`` = False, the faithful default; True registers it as new).
* **Frees** (``pksm_del_anon_page``): when the last mapping of a tracked page goes, the item is
  freed at once if it is still on the new or the rescan list, otherwise flagged DEL and queued on
  ``del_anon_page_list``, removed from its tree when ksmd drains that list.
* **pksmd** wakes every ``sleep_millisecs`` and runs ``ksm_do_scan(n)``: up to n+2 items from the
  head of the new list (``list_move`` onto the local list, i.e. each one in front of the previous
  one, so a batch runs newest first), then up to n+2 from the rescan list (appended), through
  ``cmp_and_merge_page``; DROP frees the item (the page is never considered again), TRY sends it
  to the rescan list (re-hashed next time); then the del list is drained, then the unstable
  recheck runs (``pksm_update_unstable_page_checksum``: need = U if U < n else
  U*sleep_ms/(period*1000), capped at n, walking need+2 entries from the *head* of the unstable
  checksum list; a changed page leaves the tree for the rescan list with its new checksum).
* **cmp_and_merge_page**: DROP for a KSM page; the zero page first (sampled hash equal to the
  zero page's → a full 4 KiB zero check per mapping → remapped to PKSM's zero page); then the
  stable tree, then the unstable tree, both keyed by the 32-bit sampled hash only (descents are
  hash compares, never memcmp); a full memcmp happens only before a PTE is replaced.  A two-page
  merge makes the *scanned* page the KSM page and remaps the tree page onto it.  The unstable tree
  is never flushed.
* **The sampled hash**: taken from the trace (``ev_sample``) when the capture recorded it, so
  sampled-hash collisions between different contents happen as on the real system; otherwise a
  collision-free model (the content id).  ``extras["sampled_hash"]`` says which.
* **Counters** as ``/sys/kernel/mm/pksm`` exports them: ``pages_shared`` (stable items with an
  anon node), ``pages_sharing`` (= PTEs replaced by a KSM page, minus COWs as
  ``pksm_unmap_sharing_page`` counts them, minus what a freed KSM page still held, plus
  ``pages_zero_sharing``), ``pages_zero_sharing`` (PTEs remapped to the zero page; PKSM has no
  decrement site, so it only grows), ``pages_unshared`` (the exact unstable tree size),
  ``full_scans`` (always 0), ``stable_nodes`` (stable_node_anon objects), ``rmap_items`` (live
  items, including those waiting on the del list).

Known quirks, each behind a switch that defaults to the faithful behaviour:

* ``recheck_rotate`` (False): the recheck walk restarts at the head of the list every wake-up and
  never rotates unchanged items, so with need+2 < U only the oldest unstable items are ever
  rechecked.  True rotates them to the tail (what the reveriel fork does).
* ``collision_counts_as_merge`` (True): when the full compare before a PTE replacement fails (a
  sampled-hash collision, or a page that changed since it was hashed), ``pksm_writepect_pte`` /
  ``pksm_merge_zero_page`` still return success: in the stable case an anon node is appended, in the
  unstable case the scanned page becomes a KSM page in the stable tree (``pages_shared``+1,
  ``stable_nodes``+2) and the tree page leaves the tree; in the zero case the page is left
  write-protected; the scanned item ends up in no list and no tree.  None of this remaps a page (no
  engine merge: the counters move, the frames do not).  False: a failed compare is a failed merge
  (the scanned item goes to the rescan list as TRY; a zero-hash collision goes on to the trees).
* ``track_cow_pages`` (False): see above.

Where it deliberately differs:

* Trees are maps keyed by the sampled hash; a descent costs ``bit_length(size)`` hash compares.
  Page locks, extra references (``check_page_dio``), swap, THP-split failures and migration never
  make a merge fail; the rmap walk always reaches every mapping.
* The zero-check / memcmp results use the snapshot content at the wake-up's virtual time.
* ``rmap_item`` allocations happen in the faulting task (not charged to pksmd); frees are charged.
  ``pages_visited`` counts every page pksmd looks at: ``cmp_and_merge_page`` calls, recheck
  examinations and (``pksm-delay``) probation visits.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ksmtrace.policies.base import Params, Policy, ReferenceDaemon, RunContext, param
from ksmtrace.trace.prepare import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE

ZERO_CHECKSUM = 0x7AEC7314  # pksm_calc_zero_page_checksum(64), docs/kernel-notes.md 5a

# result codes of cmp_and_merge_page
SUCCESS, DROP, TRY = 0, 1, 2


@dataclass(frozen=True)
class PksmParams(Params):
    pages_to_scan: int = param(1000, "items taken from each of the new and rescan lists per wake-up (n+2 each)", "pages", minimum=1)
    sleep_millisecs: int = param(20, "sleep between wake-ups", "ms", minimum=0)
    period_seconds: int = param(10, "target period of the unstable-tree recheck", "s", minimum=1)
    recheck_rotate: bool = param(False, "quirk switch: rotate unchanged items in the recheck walk (False = PKSM's head-only walk)")
    collision_counts_as_merge: bool = param(True, "quirk switch: a failed full compare still counts as a merge (PKSM's err=0 bug)")
    track_cow_pages: bool = param(False, "quirk switch: register COW copies as new pages (False = only do_anonymous_page registers)")


class PKSM(Policy):
    """PKSM (anonymous-page KSM): see the module docstring for what is modelled and where it differs."""

    name = "pksm"
    summary = "PKSM: fault-order new/rescan/del lists, sampled-hash trees, zero page first, periodic unstable recheck"
    Params = PksmParams
    default_scope = "anon"
    kernel_counters = (
        "pages_shared", "pages_sharing", "pages_zero_sharing", "pages_unshared", "full_scans",
        "stable_nodes", "rmap_items", "new_list", "rescan_list", "collision_merges",
    )
    delay = False
    # the contract suite (ksmtrace.testing.contract): parameter -> (other value, scenario, base)
    _RECHECK = {"pages_to_scan": 5, "sleep_millisecs": 100}
    sensitivity = {
        "pages_to_scan": (2, "mixed", {}),
        "sleep_millisecs": (200, "mixed", {}),
        "period_seconds": (1, "mixed", _RECHECK),
        "recheck_rotate": (True, "mixed", {**_RECHECK, "period_seconds": 1}),
        "collision_counts_as_merge": (False, "random-2", {}),  # stale unstable items after rewrites
        "track_cow_pages": (True, "mixed", {}),
    }

    def runtime(self, ctx: RunContext):
        if ctx.engine.kind == "reference":
            return PksmReference(self.params, ctx, delay=self.delay)
        from ksmtrace.policies._pksm_fast import PksmFast

        return PksmFast(self.params, ctx, delay=self.delay)


# ---------------------------------------------------------------------------------------------
# shared set-up (both runtimes): the tree key of every arrival event
def event_keys(prep, mode: str = "auto") -> tuple[np.ndarray, int, int, str]:
    """Per-event tree key (dense int), number of keys, the zero page's key, and a description.

    With a recorded sampled hash the keys are the dense ranks of the sampled hashes (equal sampled
    hash = equal key, whatever the content); otherwise the content id (collision-free).
    """
    if mode == "auto" and prep.ev_sample is not None:
        samp = prep.ev_sample.astype(np.int64)
        arrival = (prep.ev_kind == EV_APPEAR) | (prep.ev_kind == EV_WRITE)
        zsel = arrival & (prep.ev_cid == 0)
        zero_sample = int(samp[zsel][0]) if zsel.any() else ZERO_CHECKSUM
        vals = np.unique(np.append(samp[arrival], zero_sample))
        keys = np.where(arrival, np.searchsorted(vals, samp), -1).astype(np.int64)
        zero_key = int(np.searchsorted(vals, zero_sample))
        return keys, len(vals), zero_key, "from trace"
    keys = prep.ev_cid.astype(np.int64)
    return keys, max(int(prep.n_cids), 1), 0, "modelled collision-free"


def tree_depth(n: int) -> int:
    return int(n).bit_length()


# ---------------------------------------------------------------------------------------------
# The reference runtime: one object per rmap_item, dicts for trees and lists.
@dataclass(eq=False)
class Item:
    iid: int  # allocation order (for readable debugging only)
    frame: int  # the physical page (engine frame); -1 once the page is freed (item->page = NULL)
    where: str = "new"  # which work list holds it: "new", "rescan", "local", "" (none)
    tree: str = ""  # "", "unstable", "stable"
    dell: bool = False  # DELLIST_FLAG
    inksm: bool = False  # INKSM_FLAG
    init: bool = True  # INITCHECKSUM_FLAG
    checksum: int = -1
    mapcount: int = 0  # _mapcount: PTEs replaced by this (KSM) page
    nanon: int = 0  # stable_node_anon objects on its hlist
    # delayed PKSM
    cnt: int = 0
    t0: int = 0
    seen: int = -1
    wake: int = -1
    changed: bool = False


class PksmReference(ReferenceDaemon):
    """The executable spec: readable, page by page."""

    def __init__(self, params: PksmParams, ctx: RunContext, delay: bool = False) -> None:
        super().__init__(ctx)
        self.p = params
        self.prep = ctx.prep
        self.eng = ctx.engine
        self.delay = delay
        self.ev_key, self.n_keys, self.zero_key, self.hash_desc = event_keys(ctx.prep)
        # the policy's view of page -> frame (the rmap) and frame -> its pages, its item
        self.pg_frame: dict[int, int] = {}
        self.pg_key: dict[int, int] = {}
        self.frame_pages: dict[int, dict[int, None]] = {}  # insertion-ordered set of pages
        self.frame_item: dict[int, Item] = {}
        self.frame_ksm: set[int] = set()
        # lists and trees
        self.new_list: dict[Item, None] = {}
        self.rescan_list: dict[Item, None] = {}
        self.del_list: list[Item] = []
        self.ck_list: dict[Item, None] = {}  # unstabletree_checksum_list
        self.stable: dict[int, Item] = {}
        self.unstable: dict[int, Item] = {}
        self.n_alloc = 0
        # counters
        self.rmap_items = 0
        self.shared = 0
        self.sharing = 0
        self.zero_sharing = 0
        self.stable_nodes = 0
        self.collisions = 0
        self.prob_ended = 0
        self.prob_changed = 0
        self.prob_died = 0
        # delayed PKSM
        N = getattr(params, "probation_passes", 0) if delay else 0
        T = getattr(params, "probation_seconds", 0.0) if delay else 0.0
        self.prob_n = int(N)
        self.prob_ns = int(round(float(T) * 1e9))
        self.probation = self.prob_n > 0 or self.prob_ns > 0
        self.restart = delay and getattr(params, "on_change", "restart") == "restart"
        self.wake_no = 0

    # --- the rmap (policy side) -------------------------------------------------------------------
    def _map(self, pg: int, f: int) -> bool:
        """pg now maps f; True if f had no page before (a new physical page)."""
        self.pg_frame[pg] = f
        if f <= 0:
            return False
        pages = self.frame_pages.setdefault(f, {})
        was_empty = not pages
        pages[pg] = None
        return was_empty

    def _unmap(self, pg: int) -> int:
        """pg leaves its frame; returns the frame's remaining page count (-1: zero page / none)."""
        f = self.pg_frame.pop(pg, -1)
        if f <= 0:
            return -1
        pages = self.frame_pages[f]
        del pages[pg]
        return len(pages)

    def _page_freed(self, f: int) -> None:
        """The last mapping of frame f went: pksm_del_anon_page."""
        self.frame_pages.pop(f, None)
        self.frame_ksm.discard(f)
        it = self.frame_item.pop(f, None)
        if it is None:
            return
        if it.mapcount > 0:
            self.sharing -= it.mapcount
            it.mapcount = 0
        it.frame = -1
        if it.where in ("new", "rescan"):
            if it.where == "new" and it.cnt > 0:
                self.prob_died += 1
            (self.new_list if it.where == "new" else self.rescan_list).pop(it)
            it.where = ""
            self.rmap_items -= 1  # freed at once, in the freeing task
        else:
            it.dell = True
            self.del_list.append(it)

    def _register(self, f: int, now: int) -> None:
        self.n_alloc += 1
        it = Item(iid=self.n_alloc, frame=f, t0=now)
        self.frame_item[f] = it
        self.new_list[it] = None
        self.rmap_items += 1

    # --- snapshots ----------------------------------------------------------------------------
    def on_snapshot(self, s: int, now: int) -> None:
        prep, eng = self.prep, self.eng
        sl = prep.events(s)
        pgs = prep.ev_pg[sl].tolist()
        kinds = prep.ev_kind[sl].tolist()
        keys = self.ev_key[sl].tolist()
        moving: dict[int, Optional[Item]] = {}  # in-place writes: page -> the item that follows it
        for pg, kind in zip(pgs, kinds):  # removals first, as the engine applies them
            if kind not in (EV_GONE, EV_UNMERGE, EV_WRITE) or pg not in self.pg_frame:
                continue
            f = self.pg_frame[pg]
            if f > 0 and kind == EV_WRITE and f in self.frame_ksm:
                self._unmap_sharing_page(f)
            left = self._unmap(pg)
            if left != 0:
                continue
            if kind == EV_WRITE and f not in self.frame_ksm:  # written in place: the item follows
                moving[pg] = self.frame_item.pop(f, None)
                self.frame_pages.pop(f, None)
            else:
                self._page_freed(f)
        for pg, kind, key in zip(pgs, kinds, keys):  # then arrivals
            if kind not in (EV_APPEAR, EV_WRITE) or not eng.is_candidate(pg):
                continue
            f = eng.frame(pg)
            self.pg_key[pg] = key
            new_page = self._map(pg, f)
            if pg in moving:
                it = moving.pop(pg)
                if it is not None:
                    if new_page:
                        it.frame = f
                        self.frame_item[f] = it
                    else:  # cannot really happen: the page joined a frame someone else maps
                        self.frame_item[-1 - it.iid] = it
                        self._page_freed(-1 - it.iid)
                continue
            if not new_page:
                continue
            if kind == EV_APPEAR or self.p.track_cow_pages:
                self._register(f, now)
        for it in moving.values():  # (defensive) a page written in place that vanished
            if it is not None:
                self.frame_item[-1 - it.iid] = it
                self._page_freed(-1 - it.iid)

    def _unmap_sharing_page(self, f: int) -> None:
        """pksm_unmap_sharing_page on a COW of KSM page f (before the writer's PTE goes)."""
        it = self.frame_item.get(f)
        if it is None or not it.inksm or it.frame < 0:
            return
        if len(self.frame_pages.get(f, ())) > it.mapcount:
            return
        if it.mapcount > 0:
            self.sharing -= 1
            it.mapcount -= 1

    # --- the daemon ------------------------------------------------------------------------------
    def run_until(self, t_end: int) -> None:
        while self.t_wake < t_end:
            self.wake_no += 1
            self.timed_batch(lambda: self.ksm_do_scan(self.p.pages_to_scan), self.p.sleep_millisecs)

    def ksm_do_scan(self, n: int) -> None:
        local: deque[Item] = deque()
        # 1. the new list (list_move: each taken item goes in front of the previous ones)
        scan = 0
        while self.new_list:
            it = next(iter(self.new_list))
            if self.delay and it.wake == self.wake_no:
                break  # every item on the list has been visited in this pass
            del self.new_list[it]
            self.charge("list_moves")
            if self.probation and not self._probation_over(it):
                self.new_list[it] = None  # back to the tail
            else:
                if self.probation:
                    self.prob_ended += 1
                it.where = "local"
                it.inksm = True
                local.appendleft(it)
            if scan > n:
                break
            scan += 1
        # 2. the rescan list (appended)
        scan = 0
        while self.rescan_list:
            it = next(iter(self.rescan_list))
            del self.rescan_list[it]
            it.where = ""
            if it.dell:
                continue
            self.charge("list_moves")
            it.where = "local"
            local.append(it)
            if scan > n:
                break
            scan += 1
        # 3. cmp_and_merge_page on each
        for it in local:
            it.where = ""
            if it.dell:
                continue
            init = it.init
            it.init = False
            if it.frame < 0 or not it.inksm:
                continue
            self.charge("pages_visited")
            r = self.cmp_and_merge_page(it, init)
            if r == DROP:
                self._drop(it)
            elif r == TRY:
                it.init = True
                it.where = "rescan"
                self.rescan_list[it] = None
                self.charge("list_moves")
        # 4. drain the del list
        dl, self.del_list = self.del_list, []
        for it in dl:
            self.remove_rmap_item_from_tree(it, free_anon=True)
            self.rmap_items -= 1
            self.charge("rmap_frees")
        # 5. the unstable recheck
        self.update_unstable_page_checksum()

    def _probation_over(self, it: Item) -> bool:
        """One visit of a page on the new list (delayed PKSM).  True: it becomes a candidate."""
        it.cnt += 1
        if it.cnt > self.prob_n and self.now - it.t0 >= self.prob_ns:
            return True
        it.wake = self.wake_no
        self.charge("pages_visited")
        self.charge("sampled_hashes")
        h = self._key(it)
        if it.seen >= 0 and h != it.seen:
            if not it.changed:
                it.changed = True
                self.prob_changed += 1
            if self.restart:
                it.cnt = 0
                it.t0 = self.now
        it.seen = h
        return False

    def _drop(self, it: Item) -> None:
        """pksm_drop_rmap_item: the page is never considered again."""
        self.stable_nodes -= it.nanon
        it.nanon = 0
        if it.frame >= 0 and self.frame_item.get(it.frame) is it:
            del self.frame_item[it.frame]
        it.frame = -1
        self.rmap_items -= 1
        self.charge("rmap_frees")

    # --- helpers -------------------------------------------------------------------------------------
    def _rep(self, f: int) -> int:
        """A page mapping frame f (the first in the policy's rmap)."""
        return next(iter(self.frame_pages[f]))

    def _key(self, it: Item) -> int:
        return self.pg_key[self._rep(it.frame)]

    def remove_rmap_item_from_tree(self, it: Item, free_anon: bool = False) -> None:
        if it.tree == "stable":
            if self.stable.get(it.checksum) is it:
                del self.stable[it.checksum]
            self.shared -= 1
        elif it.tree == "unstable":
            if self.unstable.get(it.checksum) is it:
                del self.unstable[it.checksum]
            del self.ck_list[it]
        it.tree = ""
        if free_anon:
            self.stable_nodes -= it.nanon
            it.nanon = 0

    def _stale(self, t: Item) -> bool:
        return t.dell or t.frame < 0

    def _tree_lookup(self, tree: dict, key: int) -> Optional[Item]:
        """The live node under ``key`` in ``tree``, pruning stale ones met on the way (each
        descent is charged as a walk of the tree's depth)."""
        while True:
            self.charge("hash_compares", tree_depth(len(tree)))
            t = tree.get(key)
            if t is None or not self._stale(t):
                return t
            self.remove_rmap_item_from_tree(t)
            self.charge("stale_prunes")

    def stable_tree_search(self, key: int) -> Optional[Item]:
        return self._tree_lookup(self.stable, key)

    def unstable_tree_search_insert(self, it: Item, key: int) -> Optional[Item]:
        t = self._tree_lookup(self.unstable, key)
        if t is not None:
            return t
        it.tree = "unstable"
        self.unstable[key] = it
        self.ck_list[it] = None
        return None

    def stable_tree_insert(self, it: Item, key: int) -> int:
        if self._tree_lookup(self.stable, key) is not None:
            return TRY
        it.tree = "stable"
        self.stable[key] = it
        return SUCCESS

    def stable_tree_append(self, head: Item) -> None:
        head.nanon += 1
        self.stable_nodes += 1
        if head.nanon == 1:
            self.shared += 1

    def _remap_all(self, f: int, target: int) -> tuple[int, bool]:
        """rmap walk of page f onto KSM page ``target`` (or the zero page, target 0).

        Per mapping: write-protect, full compare (zero check), replace the PTE if equal.
        Returns (PTEs replaced, whether the contents were equal)."""
        eng = self.eng
        pages = list(self.frame_pages[f])
        eng.split_thp(pages[0], False)
        cid = eng.cid(pages[0])
        equal = cid == 0 if target == 0 else cid == eng.cid(self._rep(target))
        done = 0
        for q in pages:
            self.charge("write_protects")
            self.charge("zero_checks" if target == 0 else "memcmp_pages")
            if not equal:
                continue
            self.charge("remaps")
            ok = eng.merge_zero(q, self.now) if target == 0 else eng.merge(q, target, self.now)
            if ok:
                self._unmap(q)
                self._map(q, target)
                done += 1
        if not self.frame_pages[f]:
            self._page_freed(f)
        return done, equal

    # --- cmp_and_merge_page ---------------------------------------------------------------------------
    def cmp_and_merge_page(self, it: Item, init: bool) -> int:
        f = it.frame
        if f in self.frame_ksm or it.tree == "stable":
            return DROP
        self.remove_rmap_item_from_tree(it)
        if init:
            it.checksum = self._key(it)
            self.charge("sampled_hashes")
        key = it.checksum
        # the zero page first
        if key == self.zero_key:
            n, equal = self._remap_all(f, 0)
            self.zero_sharing += n
            if equal:
                return SUCCESS
            if self.p.collision_counts_as_merge:
                self.collisions += 1
                return SUCCESS
        # the stable tree
        t = self.stable_tree_search(key)
        if t is not None:
            n, equal = self._remap_all(f, t.frame)
            if not equal and not self.p.collision_counts_as_merge:
                return TRY
            if not equal:
                self.collisions += 1
            self.sharing += n
            t.mapcount += n
            self.stable_tree_append(t)
            return SUCCESS
        # the unstable tree
        t = self.unstable_tree_search_insert(it, key)
        if t is None:
            return SUCCESS
        tf = t.frame
        equal = self.eng.cid(self._rep(f)) == self.eng.cid(self._rep(tf))
        if not equal and not self.p.collision_counts_as_merge:
            return TRY
        # try_to_merge_two_pages: (1) write-protect the scanned page and make it a KSM page
        self.eng.split_thp(self._rep(f), False)
        self.charge("write_protects", len(self.frame_pages[f]))
        self.eng.stabilize(self._rep(f))
        self.frame_ksm.add(f)
        # (2) the tree page's mappings onto it
        n, equal = self._remap_all(tf, f)
        if not equal:
            self.collisions += 1
        self.sharing += n
        it.mapcount += n
        self.remove_rmap_item_from_tree(t)
        if self.stable_tree_insert(it, key) == TRY:
            return TRY
        self.stable_tree_append(it)
        self.stable_tree_append(it)
        return SUCCESS

    # --- the periodic recheck of the unstable tree --------------------------------------------------------
    def update_unstable_page_checksum(self) -> None:
        n = self.p.pages_to_scan
        U = len(self.unstable)
        need = U if U < n else (U * self.p.sleep_millisecs) // (self.p.period_seconds * 1000)
        if need <= 0:
            return
        need = min(need, n)
        limit = len(self.ck_list) if self.p.recheck_rotate else -1
        scan = 0
        for it in list(self.ck_list):
            if limit >= 0 and scan >= limit:
                break
            if it.frame >= 0 and it.tree == "unstable":
                self.charge("pages_visited")
                self.charge("sampled_hashes")
                c = self._key(it)
                if c != it.checksum:
                    self.remove_rmap_item_from_tree(it)
                    it.checksum = c
                    it.init = False
                    it.where = "rescan"
                    self.rescan_list[it] = None
                    self.charge("list_moves")
                elif self.p.recheck_rotate:
                    del self.ck_list[it]
                    self.ck_list[it] = None
                    self.charge("list_moves")
            if scan > need:
                break
            scan += 1

    # --- reporting --------------------------------------------------------------------------------------
    def counters(self) -> dict:
        out = {
            "pages_shared": self.shared,
            "pages_sharing": self.sharing + self.zero_sharing,
            "pages_zero_sharing": self.zero_sharing,
            "pages_unshared": len(self.unstable),
            "full_scans": 0,
            "stable_nodes": self.stable_nodes,
            "rmap_items": self.rmap_items,
            "new_list": len(self.new_list),
            "rescan_list": len(self.rescan_list),
            "collision_merges": self.collisions,
        }
        if self.delay:
            out.update(probation_ended=self.prob_ended, probation_changed=self.prob_changed, probation_died=self.prob_died)
        return out

    def extras(self) -> dict:
        out = {
            "sampled_hash": self.hash_desc,
            "stable_tree_nodes": len(self.stable),
            "unstable_tree_nodes": len(self.unstable),
            "collision_merges": self.collisions,
        }
        if self.delay:
            out.update(probation_ended=self.prob_ended, probation_changed=self.prob_changed, probation_died=self.prob_died)
        return out
