"""The readable runtime of ``pksm`` and ``pksm-delay``: one object per rmap_item, dictionaries for
the trees and lists, page by page — the policy's executable spec, on either engine.  The numba
kernel (:mod:`ksmtrace.policies.pksm.kernel`) must agree with it on every counter.  What it models
and where it differs: :mod:`ksmtrace.policies.pksm` and :mod:`ksmtrace.policies.pksm.delay`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ksmtrace.engine.api import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE
from ksmtrace.engine.daemon import Daemon
from ksmtrace.policies import hashkeys
from ksmtrace.policies.sameaddr import SameAddress
from ksmtrace.trace import schema as S
from ksmtrace.trace.addrspace import address_spaces
from ksmtrace.trace.sampled import zero_sample
from ksmtrace.trace.schema import SAMPLE_WORDS


# result codes of cmp_and_merge_page
SUCCESS, DROP, TRY = 0, 1, 2


class Probation(NamedTuple):
    """The Delay plan's rule for the new list (``pksm-delay``): a page becomes a candidate after
    ``passes`` visits and ``ns`` of virtual time; ``restart``: a page seen to change starts over.
    With neither bound the rule is off and the runtime behaves exactly as ``pksm`` (it still
    reports the probation counters)."""

    passes: int
    ns: int
    restart: bool

    @property
    def active(self) -> bool:
        return self.passes > 0 or self.ns > 0


# ---------------------------------------------------------------------------------------------
# shared set-up (runtime and kernel): the tree key of every arrival event
def event_keys(prep, mode: str = "auto", strength: int = SAMPLE_WORDS) -> tuple[np.ndarray, int, int, str]:
    """Per-event tree key (dense int), number of keys, the zero page's key, and a description.

    With a recorded sampled hash (at ``strength``, or the recorded strength that models it:
    :mod:`ksmtrace.policies.hashkeys`) the keys are the dense ranks of the sampled hashes (equal
    sampled hash = equal key, whatever the content); otherwise the content id (collision-free).
    """
    samp = hashkeys.event_samples(prep, strength) if mode == "auto" else None
    if samp is not None:
        samp = samp.astype(np.int64)
        arrival = (prep.ev_kind == EV_APPEAR) | (prep.ev_kind == EV_WRITE)
        zsel = arrival & (prep.ev_cid == 0)
        zs = int(samp[zsel][0]) if zsel.any() else zero_sample(hashkeys.source_strength(prep, strength))
        vals = np.unique(np.append(samp[arrival], zs))
        keys = np.where(arrival, np.searchsorted(vals, samp), -1).astype(np.int64)
        zero_key = int(np.searchsorted(vals, zs))
        return keys, len(vals), zero_key, hashkeys.describe(prep, strength)
    keys = prep.ev_cid.astype(np.int64)
    return keys, max(int(prep.n_cids), 1), 0, "modelled collision-free"


def tree_depth(n: int) -> int:
    return int(n).bit_length()


class AnonVmaWalk:
    """What ``pksm_rmap_walk`` visits, from the trace's VMAs (shared set-up of the runtime and the
    kernel).  PKSM walks *every* VMA on the page's anon_vma (``anon_vma_interval_tree_foreach``
    over ``0..ULONG_MAX``), in the interval tree's order, and stops at the first non-success: a VMA
    that does not hold the page's address (``page_address_in_vma``: a split half) or whose PTE
    there maps another page (``page_check_address``: a fork child that copied or unmapped it) makes
    ``write_protect_page`` return DROP, and a VMA ``vma_can_enter`` refuses (``VM_GROWSDOWN``: the
    stack; ``VM_SHARED``) ends the walk — DROP if it is the first, otherwise the walk "succeeds"
    without visiting the rest.  The anon_vma of a page is the one of the VMA it was allocated in,
    approximated by the lineage group of the VMA holding its *origin* (the mapping of the oldest
    process when PKSM registered it; :mod:`ksmtrace.trace.addrspace`); its tree is that group's
    VMAs plus the groups cloned from it by fork.  ``on`` is False without a VMA table or with the
    quirk switch off: the walk then visits exactly the page's mappings."""

    def __init__(self, ctx, on: bool) -> None:
        prep = ctx.prep
        self.asp = address_spaces(ctx.trace, prep) if on and ctx.trace is not None else None
        self.on = self.asp is not None and self.asp.has_vmas
        if self.on:
            self.snap = self.asp.snap_index(prep).astype(np.int64)
            # VMA rows the walk cannot enter (vma_can_enter: VM_GROWSDOWN, VM_SHARED)
            self.blocked = ((self.asp.flags & (S.V_STACK | S.V_SHARED)) != 0).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The runtime: one object per rmap_item, dicts for trees and lists.
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
    origin: int = -1  # the page id the physical page was allocated at (its anon_vma's VMA)
    group: int = -1  # that VMA's lineage group (ksmtrace.trace.addrspace), -1: unknown
    # delayed PKSM
    cnt: int = 0
    t0: int = 0
    seen: int = -1
    wake: int = -1
    changed: bool = False


class PksmRuntime(Daemon):
    """pksmd, readable: the executable spec of ``pksm`` and (with a probation rule) ``pksm-delay``."""

    def __init__(self, params, ctx, probation: Optional[Probation] = None) -> None:
        super().__init__(ctx)
        self.p = params
        self.prep = ctx.prep
        self.eng = ctx.engine
        self.delay = probation is not None  # the pksm-delay variant
        self.ev_key, self.n_keys, self.zero_key, self.hash_desc = event_keys(ctx.prep, strength=params.hash_strength)
        self.hash_cost = hashkeys.hash_cost(params.hash_strength)  # one sampled hash: (unit, count)
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
        rule = probation or Probation(0, 0, False)
        self.prob_n = int(rule.passes)
        self.prob_ns = int(rule.ns)
        self.probation = rule.active
        self.restart = bool(rule.restart)
        self.wake_no = 0
        self.walk = AnonVmaWalk(ctx, params.anon_vma_walk)
        self.same = SameAddress(ctx, params.same_address_first, params.same_address_key)
        self.snap = 0

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

    def _register(self, f: int, now: int) -> Item:
        self.n_alloc += 1
        it = Item(iid=self.n_alloc, frame=f, t0=now)
        self.frame_item[f] = it
        self.new_list[it] = None
        self.rmap_items += 1
        return it

    def _set_origin(self, it: Item) -> None:
        """The mapping of the oldest process (the page was allocated there before any fork that
        shares it) and the lineage group of its VMA now."""
        if not self.walk.on or it.frame < 0:
            return
        prep, asp = self.prep, self.walk.asp
        rank = asp.proc_rank
        pg = min(self.frame_pages[it.frame], key=lambda q: (int(rank[prep.page_proc[q]]), q))
        it.origin = pg
        it.group = asp.group_at(int(self.walk.snap[self.snap]), int(prep.page_proc[pg]), int(prep.page_vpn[pg]))

    # --- snapshots ----------------------------------------------------------------------------
    def on_snapshot(self, s: int, now: int) -> None:
        prep, eng = self.prep, self.eng
        self.snap = s
        self.same.update(s)
        sl = prep.events(s)
        registered: list[Item] = []
        ev = prep.batch(s)
        pgs = ev.pg.tolist()
        kinds = ev.kind.tolist()
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
                registered.append(self._register(f, now))
        for it in moving.values():  # (defensive) a page written in place that vanished
            if it is not None:
                self.frame_item[-1 - it.iid] = it
                self._page_freed(-1 - it.iid)
        for it in registered:  # once every mapping of the snapshot is in
            self._set_origin(it)

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
        self.charge(*self.hash_cost)
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
        if it.dell:  # the walk took its last mapping: already queued, the del list frees it this wake-up
            return
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

    def _rmap_walk(self, f: int) -> tuple[list[int], bool]:
        """pksm_rmap_walk over physical page f: the mappings it visits, in order, and whether it
        ends in success (False: DROP at a VMA that does not map f)."""
        pages = list(self.frame_pages[f])
        it = self.frame_item.get(f)
        w = self.walk
        if not w.on or it is None or it.group < 0:
            return pages, True
        prep, asp = self.prep, w.asp
        v = int(prep.page_vpn[it.origin])
        mine = set(pages)
        out: list[int] = []
        for r in asp.tree_rows(int(w.snap[self.snap]), it.group).tolist():
            if w.blocked[r]:  # vma_can_enter fails: the walk ends, DROP if it is the first VMA
                return out, bool(out)
            q = self._page_at(int(asp.proc[r]), v) if asp.start[r] <= v < asp.end[r] else -1
            if q not in mine:  # page_address_in_vma / page_check_address: DROP
                return out, False
            out.append(q)
        seen = set(out)  # mappings the approximated tree does not hold come last
        return out + [q for q in pages if q not in seen], True

    def _page_at(self, proc: int, vpn: int) -> int:
        prep = self.prep
        lo, hi = int(prep.proc_pg_lo[proc]), int(prep.proc_pg_hi[proc])
        i = lo + int(np.searchsorted(prep.page_vpn[lo:hi], vpn))
        return i if i < hi and prep.page_vpn[i] == vpn else -1

    def _remap_all(self, f: int, target: int) -> tuple[int, bool, bool]:
        """rmap walk of page f onto KSM page ``target`` (or the zero page, target 0).

        Per mapping the walk visits: write-protect, full compare (zero check), replace the PTE if
        equal.  Returns (PTEs replaced, whether the contents were equal, whether the walk ended in
        success)."""
        eng = self.eng
        pages, ok = self._rmap_walk(f)
        first = next(iter(self.frame_pages[f]))
        eng.split_thp(first, False)
        cid = eng.cid(first)
        equal = cid == 0 if target == 0 else cid == eng.cid(self._rep(target))
        done = 0
        for q in pages:
            self.charge("write_protects")
            self.charge("zero_checks" if target == 0 else "memcmp_pages")
            if not equal:
                continue
            self.charge("remaps")
            merged = eng.merge_zero(q, self.now) if target == 0 else eng.merge(q, target, self.now)
            if merged:
                self._unmap(q)
                self._map(q, target)
                done += 1
        if not self.frame_pages[f]:
            self._page_freed(f)
        return done, equal, ok

    # --- cmp_and_merge_page ---------------------------------------------------------------------------
    def cmp_and_merge_page(self, it: Item, init: bool) -> int:
        f = it.frame
        if f in self.frame_ksm or it.tree == "stable":
            return DROP
        self.remove_rmap_item_from_tree(it)
        if init:
            it.checksum = self._key(it)
            self.charge(*self.hash_cost)
        key = it.checksum
        # the zero page first (a failed walk goes on to the trees: cmp_and_merge_zero_page -EFAULT)
        if key == self.zero_key:
            n, equal, ok = self._remap_all(f, 0)
            self.zero_sharing += n
            if ok and equal:
                return SUCCESS
            if ok and self.p.collision_counts_as_merge:
                self.collisions += 1
                return SUCCESS
            if f not in self.frame_pages:  # every mapping went to the zero page before the DROP
                return SUCCESS
        # what-if: the pages at the same virtual address first
        if self.same.on:
            r = self.same_address_merge(it, f, key)
            if r is not None:
                return r
        # the stable tree
        t = self.stable_tree_search(key)
        if t is not None:
            return self._merge_stable(f, t)
        # the unstable tree
        t = self.unstable_tree_search_insert(it, key)
        if t is None:
            return SUCCESS
        return self._merge_unstable(it, f, t, key)

    def same_address_merge(self, it: Item, f: int, key: int) -> Optional[int]:
        """``same_address_first`` (:mod:`ksmtrace.policies.sameaddr`): compare the page with the
        pages at the same virtual address in its related processes (in process start order) and
        merge with the first equal one that PKSM tracks: onto its KSM page if it is a stable-tree
        item, else both into a new KSM page as an unstable-tree hit would.  Each page looked at is
        a page lookup in another mm and a memcmp (``unstable_node_visits``); an address with no
        page, a lookup (``addresses_walked``).  None: no partner, go on to the trees."""
        eng, prep = self.eng, self.prep
        pg = self._rep(f)
        c = eng.cid(pg)
        proc = int(prep.page_proc[pg])
        for q in self.same.related(pg).tolist():
            if q == pg or int(prep.page_proc[q]) == proc:
                continue
            if not eng.is_candidate(q) or eng.frame(q) == 0:
                self.charge("addresses_walked")
                continue
            self.charge("unstable_node_visits")
            fq = eng.frame(q)
            if fq == f or eng.cid(q) != c:
                continue
            t = self.frame_item.get(fq)
            if t is None or self._stale(t):
                continue
            if t.tree == "stable":
                return self._merge_stable(f, t)
            if fq in self.frame_ksm:
                continue
            return self._merge_unstable(it, f, t, key)
        return None

    def _merge_stable(self, f: int, t: Item) -> int:
        """A stable tree item ``t`` has the key: map the page onto its KSM page."""
        n, equal, ok = self._remap_all(f, t.frame)
        if not ok:  # pksm_rmap_walk failed: the PTEs replaced so far stay, the page is dropped
            self.sharing += n
            t.mapcount += n
            return DROP
        if not equal and not self.p.collision_counts_as_merge:
            return TRY
        if not equal:
            self.collisions += 1
        self.sharing += n
        t.mapcount += n
        self.stable_tree_append(t)
        return SUCCESS

    def _merge_unstable(self, it: Item, f: int, t: Item, key: int) -> int:
        """An unstable tree item ``t`` has the key: try_to_merge_two_pages, then the stable tree."""
        tf = t.frame
        equal = self.eng.cid(self._rep(f)) == self.eng.cid(self._rep(tf))
        if not equal and not self.p.collision_counts_as_merge:
            return TRY
        # try_to_merge_two_pages: (1) write-protect the scanned page and make it a KSM page (at the
        # first mapping the walk visits: set_page_stable_ksm)
        self.eng.split_thp(self._rep(f), False)
        pages, ok = self._rmap_walk(f)
        self.charge("write_protects", len(pages))
        if pages:
            self.eng.stabilize(self._rep(f))
            self.frame_ksm.add(f)
        if not ok:
            return DROP
        # (2) the tree page's mappings onto it
        n, equal, ok = self._remap_all(tf, f)
        if not equal:
            self.collisions += 1
        self.sharing += n
        it.mapcount += n
        if not ok:  # the tree item stays in the unstable tree; the scanned page is dropped
            return DROP
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
                self.charge(*self.hash_cost)
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
    def _probation_counts(self) -> dict:
        return {"probation_ended": self.prob_ended, "probation_changed": self.prob_changed,
                "probation_died": self.prob_died} if self.delay else {}

    def counters(self) -> dict:
        return pksm_counters(
            shared=self.shared, sharing=self.sharing, zero_sharing=self.zero_sharing, unstable=len(self.unstable),
            stable_nodes=self.stable_nodes, rmap_items=self.rmap_items, new_list=len(self.new_list),
            rescan_list=len(self.rescan_list), collisions=self.collisions, probation=self._probation_counts(),
        )

    def extras(self) -> dict:
        return pksm_extras(self.hash_desc, len(self.stable), len(self.unstable), self.collisions,
                           self._probation_counts())


def pksm_counters(*, shared: int, sharing: int, zero_sharing: int, unstable: int, stable_nodes: int, rmap_items: int,
                  new_list: int, rescan_list: int, collisions: int, probation: dict) -> dict:
    """The counters as /sys/kernel/mm/pksm exports them (``pages_sharing`` includes the zero page's)."""
    return {
        "pages_shared": shared,
        "pages_sharing": sharing + zero_sharing,
        "pages_zero_sharing": zero_sharing,
        "pages_unshared": unstable,
        "full_scans": 0,
        "stable_nodes": stable_nodes,
        "rmap_items": rmap_items,
        "new_list": new_list,
        "rescan_list": rescan_list,
        "collision_merges": collisions,
        **probation,
    }


def pksm_extras(hash_desc: str, stable_nodes: int, unstable_nodes: int, collisions: int, probation: dict) -> dict:
    return {"sampled_hash": hash_desc, "stable_tree_nodes": stable_nodes, "unstable_tree_nodes": unstable_nodes,
            "collision_merges": collisions, **probation}
