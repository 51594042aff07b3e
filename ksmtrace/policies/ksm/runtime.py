"""The readable runtime of the ``ksm`` policy: one object per rmap_item and stable node, as in
``mm/ksm.c``, page by page.  It is the policy's executable spec: it runs on either engine, and the
numba kernel (:mod:`ksmtrace.policies.ksm.kernel`) must agree with it on every counter.  What it
models and where it differs from the kernel: the package docstring (:mod:`ksmtrace.policies.ksm`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ksmtrace.engine.clock import next_wake
from ksmtrace.engine.daemon import Daemon
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.sameaddr import SameAddress
from ksmtrace.trace.addrspace import NO_TIME, address_spaces

PROFILES = ("6.12", "6.11", "6.10", "3.18")
RMAP_ITEM_SIZE = 64
PAGE_SIZE = 4096
#: parameters a running ksmd takes from /sys/kernel/mm/ksm between batches (a controller's writes).
#: Not these: ``profile`` (another kernel), ``max_page_sharing`` (-EBUSY while any page is shared)
#: and ``advisor_mode`` (switching resets the advisor's context mid-scan: not modelled).
LIVE_PARAMS = ("pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "stable_node_chains_prune_millisecs",
               "advisor_target_scan_time", "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan")


def sysfs_refusals(params, changes) -> dict[str, str]:
    """The writes mm/ksm.c rejects: ``pages_to_scan`` while the scan-time advisor owns it
    (``pages_to_scan_store``: -EINVAL).  A parameter ksmd does not take mid-run is an error."""
    fixed = [k for k in changes if k not in LIVE_PARAMS]
    if fixed:
        raise PolicyParamError(f"ksm: {', '.join(fixed)} cannot change during a run (parameters that can: "
                               f"{', '.join(LIVE_PARAMS)})")
    if "pages_to_scan" in changes and params.advisor_mode != "none":
        return {"pages_to_scan": "EINVAL: the scan-time advisor sets pages_to_scan (pages_to_scan_store)"}
    return {}


def sleep_written(t_wake: int, batch_end: int, now: int, sleep_ms: int, hz: int) -> int:
    """ksmd's next wake-up after ``sleep_millisecs`` changed at ``now``: if it was sleeping, the
    write wakes it at once (``sleep_millisecs_store``: ``wake_up_interruptible(&ksm_iter_wait)``,
    whose condition is the changed value); if its batch was still running, it then sleeps the new
    value."""
    if batch_end > now:
        return int(next_wake(batch_end, sleep_ms, hz))
    return min(int(t_wake), int(now))


def skip_age(age: int) -> int:
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


def tree_depth(n: int) -> int:
    """Node visits charged for one descent of a tree of ``n`` nodes."""
    return int(n).bit_length()


class Holes:
    """The addresses a ksmd without the range walk (before commit f5548c318d65: 6.18-rc6, 6.12.59,
    5.10.249) looks up one by one although no page is there: every 4 KiB of a ``VM_MERGEABLE``
    VMA with an anon_vma (``folio_walk_start`` per address in ``scan_get_next_rmap_item``).  The
    model's walk visits page ids only, so the holes between page ``pg - 1`` and page ``pg`` of a
    process are charged as ``gap[pg]`` addresses walked when the walk reaches ``pg``, and those
    after a process's last page as ``tail[proc]`` at the end of its mm.  Updated at every snapshot
    from the trace's VMA table (:meth:`ksmtrace.trace.addrspace.AddressSpaces.hole_gaps`); all zero
    with the range walk, or for a trace without one.  Shared by the runtime and its kernel."""

    def __init__(self, ctx, on: bool) -> None:
        prep = ctx.prep
        self.gap = np.zeros(max(prep.n_pages, 1), np.int64)
        self.tail = np.zeros(max(prep.n_procs, 1), np.int64)
        self.asp = address_spaces(ctx.trace, prep) if on and ctx.trace is not None else None
        self.on = self.asp is not None and self.asp.has_vmas
        self.prep = prep
        self.snap = self.asp.snap_index(prep) if self.on else None
        self.last = -1

    def update(self, s: int) -> None:
        if not self.on or self.snap[s] == self.last:
            return
        ts = int(self.snap[s])
        procs = np.flatnonzero(self.asp.changed[ts]).tolist() if ts == self.last + 1 else None
        self.asp.hole_gaps(ts, self.prep, self.gap, self.tail, procs)
        self.last = ts


def fork_registrations(ctx) -> list[tuple[int, int, int]]:
    """``(time_ns, child, parent)`` of every process that ``ksm_fork`` puts on ksmd's list at fork
    time, in time order: a child of a process in the trace (``ppid``), whose start time (the
    trace's ``start_ticks``) lies before the first snapshot it appears in, and that registers at
    that snapshot (it has a mergeable VMA there, as a fork inherits them).  The runtime registers
    it then if its parent is on the list at that moment (``MMF_VM_MERGEABLE``); otherwise, or for
    any other process, registration waits for the snapshot (``prepare._registration``)."""
    prep, trace = ctx.prep, ctx.trace
    if trace is None:
        return []
    asp = address_spaces(trace, prep)
    times = np.asarray(prep.times_ns, np.int64)
    out = []
    for c in range(prep.n_procs):
        p, t = int(asp.proc_parent[c]), int(asp.proc_start_ns[c])
        first = int(prep.proc_first_snap[c])
        if p < 0 or t == NO_TIME or first <= 0 or first >= prep.n_snaps or prep.proc_reg_snap[c] != first:
            continue
        if t < times[first]:
            out.append((max(t, int(times[0])), c, p))
    out.sort(key=lambda x: (x[0], int(asp.proc_rank[x[1]])))
    return out


@dataclass(eq=False)
class RmapItem:
    pg: int
    proc: int
    oldchecksum: int = -1  # content id at the previous visit (-1: the zeroed initial value)
    age: int = 0
    remaining_skips: int = 0
    unstable: bool = False
    stable: bool = False
    seqnr: int = 0  # seqnr & 0xff at unstable insertion
    ukey: int = -1  # content at unstable insertion (its position in the tree)
    head: Optional["StableNode"] = None


@dataclass(eq=False)
class StableNode:
    """A plain stable node or a dup of a chain: one KSM page."""

    cid: int
    frame: int
    gen: int
    hlist: list = field(default_factory=list)  # rmap items, most recently appended first
    chain: Optional["StableChain"] = None

    @property
    def rmap_hlist_len(self) -> int:
        return len(self.hlist)


@dataclass(eq=False)
class StableChain:
    cid: int
    dups: list = field(default_factory=list)  # hlist order: head first
    prune_time: int = 0


class KsmRuntime(Daemon):
    """ksmd, readable: the executable spec of the policy."""

    def __init__(self, params, ctx) -> None:
        super().__init__(ctx)
        self.p = params
        self.prep = ctx.prep
        self.eng = ctx.engine
        prof = params.profile
        self.new_order = prof in ("6.11", "6.12")  # checksum before stable search
        self.v318 = prof == "3.18"
        self.zero_remap = prof == "6.12"
        self.old_chains = prof == "6.10"  # stable_node_dup before Chengming Zhou's 6.11 rework
        self.max_sharing = 1 << 62 if self.v318 else params.max_page_sharing
        # ksm_mm_head list: proc ids, in list order; the cursor is an index or None (= at head)
        self.mm_list: list[int] = []
        self.cursor: Optional[int] = None  # proc under the cursor, None = ksm_mm_head
        self.cur_pg = 0  # ksm_scan.address, as the next page id to look at
        self.items: dict[int, RmapItem] = {}
        self.proc_items: dict[int, int] = {}
        self.exited: set[int] = set()
        self.stable: dict[int, object] = {}  # content -> StableNode or StableChain (rb nodes)
        self.frame_node: dict[int, StableNode] = {}  # KSM frame -> its stable node
        self.unstable: dict[int, RmapItem] = {}  # content -> item, for the current scan
        self.unstable_count = 0
        self.seqnr = 0
        self.shared = 0
        self.sharing = 0
        self.unshared = 0
        self.scanned = 0
        self.skipped = 0
        self.chains = 0
        self.dups = 0
        self.pages_to_scan = params.advisor_min_pages_to_scan if params.advisor_mode == "scan-time" else params.pages_to_scan
        self.adv_start = 0
        self.adv_change = 0
        self.adv_scan_time = 0
        self.adv_cpu = 0
        self.idle = True
        self.holes = Holes(ctx, not params.range_walk)
        self.forks = fork_registrations(ctx)
        self.same = SameAddress(ctx, params.same_address_first, params.same_address_key)

    # --- snapshots: mm registration and exit ---------------------------------------------------
    def on_snapshot(self, s: int, now: int) -> None:
        prep = self.prep
        self.holes.update(s)
        self.same.update(s)
        for proc in prep.proc_order.tolist():
            if prep.proc_exit_snap[proc] == s and proc in self.mm_list and proc not in self.exited:
                self._ksm_exit(proc)
        for proc in prep.proc_order.tolist():
            if prep.proc_reg_snap[proc] == s and prep.proc_exit_snap[proc] > s and proc not in self.mm_list:
                self._ksm_enter(proc, now)

    def _ksm_enter(self, proc: int, now: int) -> None:
        """__ksm_enter: insert just behind the cursor (at the tail when the cursor is at head)."""
        if self.cursor is None:
            self.mm_list.append(proc)
        else:
            self.mm_list.insert(self.mm_list.index(self.cursor), proc)
        self.proc_items.setdefault(proc, 0)
        if self.idle:  # ksmd was waiting for an mm: wake_up_interruptible(&ksm_thread_wait)
            self.idle = False
            self.t_wake = max(self.t_wake, now)

    def _ksm_exit(self, proc: int) -> None:
        """__ksm_exit: free the slot at once if it has no items, else move it after the cursor."""
        self.exited.add(proc)
        if self.cursor == proc:
            return
        if self.proc_items.get(proc, 0) == 0:
            self.mm_list.remove(proc)
            return
        self.mm_list.remove(proc)
        if self.cursor is None:
            self.mm_list.insert(0, proc)
        else:
            self.mm_list.insert(self.mm_list.index(self.cursor) + 1, proc)

    # --- the daemon ------------------------------------------------------------------------------
    def run_until(self, t_end: int) -> None:
        """ksmd until ``t_end``; a process forked meanwhile from a registered one joins the list at
        its fork time (``ksm_fork`` -> ``__ksm_enter``), behind the cursor as it is then."""
        while self.forks and self.forks[0][0] < t_end:
            t, child, parent = self.forks.pop(0)
            self._run(t)
            if parent in self.mm_list and parent not in self.exited and child not in self.mm_list:
                self._ksm_enter(child, t)
        self._run(t_end)

    def _run(self, t_end: int) -> None:
        while self.t_wake < t_end:
            if not self.mm_list:  # ksmd_should_run() is false: sleep until an mm registers
                self.idle = True
                self.t_wake = t_end
                return
            self.timed_batch(lambda: self.ksm_do_scan(self.pages_to_scan), self.p.sleep_millisecs)

    def ksm_do_scan(self, n: int) -> None:
        for _ in range(n):
            item = self.scan_get_next_rmap_item()
            if item is None:
                return
            self.cmp_and_merge_page(item)
            self.scanned += 1

    def _cpu_now(self) -> int:
        """ksmd's modelled run time so far, including the batch in progress."""
        return self.busy + self.work_so_far()

    # --- scan_get_next_rmap_item ----------------------------------------------------------------
    def scan_get_next_rmap_item(self) -> Optional[RmapItem]:
        if not self.mm_list:
            return None
        if self.cursor is None:  # start of a full scan
            if self.p.advisor_mode == "scan-time":
                self.adv_start = self.now + self.work_so_far()
            self.charge("scan_starts")
            self.unstable = {}  # root_unstable_tree = RB_ROOT
            self.unstable_count = 0
            self.cursor = self.mm_list[0]
            self.cur_pg = int(self.prep.proc_pg_lo[self.cursor])
        while True:
            proc = self.cursor
            lo, hi = int(self.prep.proc_pg_lo[proc]), int(self.prep.proc_pg_hi[proc])
            gap = self.holes.gap
            if proc not in self.exited:
                pg = max(self.cur_pg, lo)
                while pg < hi:
                    if gap[pg]:  # holes of mergeable VMAs before this page (no range walk)
                        self.charge("addresses_walked", int(gap[pg]))
                    if self._scannable(pg):
                        item = self.items.get(pg)
                        if item is None:
                            item = self._alloc_item(pg, proc)
                        self.charge("pages_visited")
                        if self.should_skip_rmap_item(pg, item):
                            pg += 1
                            continue
                        self.cur_pg = pg + 1
                        return item
                    self.charge("addresses_walked")
                    if pg in self.items:  # get_next_rmap_item frees items it walks past
                        self._free_item(self.items[pg])
                    pg += 1
                if self.holes.tail[proc]:
                    self.charge("addresses_walked", int(self.holes.tail[proc]))
            # end of this mm: remove_trailing_rmap_items (all of them if the mm exited)
            for q in range(lo, hi):
                if q in self.items and (proc in self.exited):
                    self._free_item(self.items[q])
            idx = self.mm_list.index(proc)
            nxt = self.mm_list[idx + 1] if idx + 1 < len(self.mm_list) else None
            if proc in self.exited:
                self.mm_list.remove(proc)
                self.exited.discard(proc)
                self.proc_items.pop(proc, None)
            self.cursor = nxt
            if nxt is None:
                if self.p.advisor_mode == "scan-time":
                    self.scan_time_advisor()
                self.seqnr += 1
                return None
            self.cur_pg = int(self.prep.proc_pg_lo[nxt])

    def _scannable(self, pg: int) -> bool:
        """A present anonymous page the walk returns (not absent, not a zero-page PTE)."""
        return self.eng.is_candidate(pg) and self.eng.frame(pg) != 0

    def _alloc_item(self, pg: int, proc: int) -> RmapItem:
        item = RmapItem(pg=pg, proc=proc)
        self.items[pg] = item
        self.proc_items[proc] = self.proc_items.get(proc, 0) + 1
        self.charge("rmap_allocs")
        return item

    def _free_item(self, item: RmapItem) -> None:
        self.remove_rmap_item_from_tree(item)
        del self.items[item.pg]
        self.proc_items[item.proc] -= 1
        self.charge("rmap_frees")

    # --- smart scan ----------------------------------------------------------------------------
    def should_skip_rmap_item(self, pg: int, item: RmapItem) -> bool:
        if not self.p.smart_scan or self.v318:
            return False
        if self.eng.page_is_ksm(pg):
            return False
        age = item.age
        if item.age != 255:
            item.age += 1
        if age < 3:
            return False
        if item.remaining_skips == 0:
            item.remaining_skips = skip_age(age)
            return False
        self.skipped += 1
        item.remaining_skips -= 1
        self.remove_rmap_item_from_tree(item)
        return True

    # --- trees -----------------------------------------------------------------------------------
    def remove_rmap_item_from_tree(self, item: RmapItem) -> None:
        if item.stable:
            node = item.head
            if not self._node_alive(node):
                self.remove_node_from_stable_tree(node)  # unaccounts this item too
                return
            node.hlist.remove(item)
            if node.hlist:
                self.sharing -= 1
            else:
                self.shared -= 1
            item.stable = False
            item.head = None
        elif item.unstable:
            age = (self.seqnr - item.seqnr) & 0xFF
            assert age <= 1, "unstable item older than one full scan"
            if age == 0:  # still in the live tree: rb_erase
                if self.unstable.get(item.ukey) is item:
                    del self.unstable[item.ukey]
                self.unstable_count -= 1
            self.unshared -= 1
            item.unstable = False

    def _node_alive(self, node: StableNode) -> bool:
        """ksm_get_folio's keyhole check."""
        return self.eng.frame_alive(node.frame, node.gen)

    def remove_node_from_stable_tree(self, node: StableNode) -> None:
        n = len(node.hlist)
        for i, it in enumerate(node.hlist):
            if i < n - 1:
                self.sharing -= 1
            else:
                self.shared -= 1
            it.stable = False
            it.head = None
        node.hlist = []
        self.charge("stale_prunes")
        if self.frame_node.get(node.frame) is node:
            del self.frame_node[node.frame]
        if node.chain is not None:
            node.chain.dups.remove(node)
            node.chain = None
            self.dups -= 1
        else:
            if self.stable.get(node.cid) is node:
                del self.stable[node.cid]

    def is_page_sharing_candidate(self, node: StableNode, offset: int = 0) -> bool:
        if self.v318:
            return True
        return len(node.hlist) > 0 and len(node.hlist) + offset < self.max_sharing

    def stable_node_dup(self, chain: StableChain, prune: bool):
        """Choose a dup of a chain (and prune stale ones); returns the dup or None.

        6.11+: the best dup, a candidate if there is one; a chain left with one dup collapses into
        a plain node at every lookup (``hlist_is_singular_node``); an empty chain is freed here.
        Up to 6.10 (``old_chains``): only a dup below the sharing limit is chosen (the fullest when
        pruning, else the first); the chain collapses only when a pruning lookup found exactly one
        live dup (``prune_stale_stable_nodes && nr == 1``); with no candidate the caller took
        ``stable_node_dup_any``: the first dup (not a candidate: the search misses), or, if every
        dup was stale, the chain is freed and the search starts again.
        """
        if not prune or self.now < chain.prune_time + self.p.stable_node_chains_prune_millisecs * 1_000_000:
            prune = False
        else:
            chain.prune_time = self.now
        old = self.old_chains
        found = None
        found_len = 0
        nr = 0
        for dup in list(chain.dups):
            self.charge("stable_node_visits")
            if not self._node_alive(dup):
                self.remove_node_from_stable_tree(dup)
                continue
            nr += 1
            cand = self.is_page_sharing_candidate(dup)
            if old:
                better = cand and (found is None or len(dup.hlist) > found_len)
            else:
                better = found is None or (cand and (not self.is_page_sharing_candidate(found) or len(dup.hlist) > found_len))
            if better:
                found = dup
                found_len = len(dup.hlist)
                if not prune and self.is_page_sharing_candidate(found):
                    break
        if found is not None:
            if (prune and nr == 1) if old else len(chain.dups) == 1:  # collapse the chain into a plain node
                self.stable[chain.cid] = found
                found.chain = None
                chain.dups = []
                self.chains -= 1
                self.dups -= 1
            elif chain.dups[0] is not found and self.is_page_sharing_candidate(found, 1):
                chain.dups.remove(found)
                chain.dups.insert(0, found)
            return found
        if old and chain.dups:  # stable_node_dup_any: every dup is full
            return chain.dups[0]
        if self.stable.get(chain.cid) is chain:  # free_stable_node_chain
            del self.stable[chain.cid]
        self.chains -= 1
        return None

    def _stable_lookup(self, cid: int, prune: bool):
        """The node of equal content in the stable tree after stale handling: (dup, any) or None."""
        while True:
            root = self.stable.get(cid)
            if root is None:
                return None
            if isinstance(root, StableChain):
                dup = self.stable_node_dup(root, prune)
                if dup is None:
                    if self.v318:
                        return None
                    continue  # chain freed: search again
                return dup
            if not self._node_alive(root):
                self.remove_node_from_stable_tree(root)
                if self.v318:  # 3.18 returns NULL on a stale node instead of restarting
                    return None
                continue
            return root

    def stable_tree_search(self, pg: int) -> Optional[StableNode]:
        cid = self.eng.cid(pg)
        self.charge("stable_node_visits", tree_depth(len(self.stable)))
        dup = self._stable_lookup(cid, prune=True)
        if dup is None or not self.is_page_sharing_candidate(dup):
            return None
        return dup

    def stable_tree_insert(self, frame: int, gen: int, cid: int) -> Optional[StableNode]:
        self.charge("stable_node_visits", tree_depth(len(self.stable)))
        existing = self._stable_lookup(cid, prune=False)
        new = StableNode(cid=cid, frame=frame, gen=gen)
        if existing is None:
            self.stable[cid] = new
        else:
            if self.v318:
                return None
            root = self.stable[cid]
            if isinstance(root, StableNode):  # alloc_stable_node_chain
                chain = StableChain(cid=cid, dups=[root], prune_time=self.now)
                root.chain = chain
                self.stable[cid] = chain
                self.chains += 1
                self.dups += 1
                root_chain = chain
            else:
                root_chain = root
            new.chain = root_chain
            root_chain.dups.insert(0, new)
            self.dups += 1
        self.frame_node[frame] = new
        return new

    def stable_tree_append(self, item: RmapItem, node: StableNode) -> None:
        node.hlist.insert(0, item)
        item.head = node
        item.stable = True
        if len(node.hlist) > 1:
            self.sharing += 1
        else:
            self.shared += 1

    def unstable_tree_search_insert(self, item: RmapItem, pg: int) -> Optional[RmapItem]:
        cid = self.eng.cid(pg)
        self.charge("unstable_node_visits", tree_depth(self.unstable_count))
        tree_item = self.unstable.get(cid)
        if tree_item is not None:
            tpg = tree_item.pg
            if not self._scannable(tpg):  # get_mergeable_page() failed: give up, no insert
                return None
            if self.eng.frame(tpg) == self.eng.frame(pg):  # a forked page: don't substitute
                return None
            if self.eng.cid(tpg) == cid:
                return tree_item
            # the tree page changed since it was inserted: it no longer matches; insert
        item.unstable = True
        item.seqnr = self.seqnr & 0xFF
        item.ukey = cid
        self.unstable[cid] = item
        self.unstable_count += 1
        self.unshared += 1
        return None

    # --- merging --------------------------------------------------------------------------------
    def _split(self, pg: int) -> bool:
        """Split the THP ``pg`` belongs to before merging it; False if pg is no longer mapped."""
        self.eng.split_thp(pg, self.zero_remap)
        return self._scannable(pg)

    def try_to_merge_with_ksm_page(self, pg: int, node: StableNode) -> bool:
        if not self._split(pg):
            return False
        self.charge("write_protects")
        self.charge("memcmp_pages")
        self.charge("remaps")
        return self.eng.merge(pg, node.frame, self.now)

    def try_to_merge_with_zero_page(self, pg: int) -> bool:
        if not self.p.use_zero_pages or self.v318 or self.eng.cid(pg) != 0:
            return False
        if not self._split(pg):
            return True  # the split itself mapped it to the zero page: nothing left to do
        self.charge("write_protects")
        self.charge("memcmp_pages")
        self.charge("remaps")
        return self.eng.merge_zero(pg, self.now)

    def try_to_merge_two_pages(self, pg: int, tpg: int) -> Optional[int]:
        if not self._split(pg) or not self._split(tpg):
            return None
        gen = self.eng.stabilize(pg)
        self.charge("write_protects", 2)
        self.charge("memcmp_pages")
        self.charge("remaps")
        if not self.eng.merge(tpg, self.eng.frame(pg), self.now):
            return None
        return gen

    # --- cmp_and_merge_page ---------------------------------------------------------------------
    def cmp_and_merge_page(self, item: RmapItem) -> None:
        pg = item.pg
        eng = self.eng
        page_node = None
        if eng.page_is_ksm(pg):
            page_node = self.frame_node.get(eng.frame(pg))
        if page_node is not None:
            if item.head is page_node:
                return
            # a KSM page reached through another mm (fork): append, bypassing the sharing limit
            self.remove_rmap_item_from_tree(item)
            self.stable_tree_append(item, page_node)
            return
        if self.new_order:
            self.remove_rmap_item_from_tree(item)
            if not self._checksum_gate(item, pg):
                return
            if self.try_to_merge_with_zero_page(pg):
                return
            if not self._scannable(pg):
                return
            if self.same.on and self.same_address_merge(item, pg):
                return
            if self._stable_merge(item, pg):
                return
        else:
            if self._stable_merge(item, pg):
                return
            if not self._checksum_gate(item, pg):
                return
            if self.try_to_merge_with_zero_page(pg):
                return
            if not self._scannable(pg):
                return
            if self.same.on and self.same_address_merge(item, pg):  # (after the gate: see sameaddr)
                return
        tree_item = self.unstable_tree_search_insert(item, pg)
        if tree_item is None:
            return
        self.remove_rmap_item_from_tree(tree_item)
        self._merge_two(item, pg, tree_item, tree_item.pg)

    def _merge_two(self, item: RmapItem, pg: int, tree_item: Optional[RmapItem], tpg: int) -> None:
        """try_to_merge_two_pages, then the new KSM page into the stable tree with both items."""
        eng = self.eng
        gen = self.try_to_merge_two_pages(pg, tpg)
        if gen is None:
            return
        node = self.stable_tree_insert(eng.frame(pg), gen, eng.cid(pg))
        if node is None:  # cannot happen in this model (3.18's insert race); keep the kernel's shape
            return
        if tree_item is not None:
            self.stable_tree_append(tree_item, node)
        self.stable_tree_append(item, node)

    def same_address_merge(self, item: RmapItem, pg: int) -> bool:
        """``same_address_first``: compare the page with the pages at the same virtual address in
        its related processes (:mod:`ksmtrace.policies.sameaddr`), in process start order, and merge
        with the first equal one: onto its KSM page if it maps one below the sharing limit (as a
        stable-tree hit), else the two pages into a new KSM page (as an unstable-tree hit: the
        partner's rmap item, if it has one, leaves its tree and joins the new stable node).  Each
        page looked at costs a page lookup in another mm and a memcmp (``unstable_node_visits``),
        an address with no page a lookup (``addresses_walked``).  True if the visit ends here."""
        eng = self.eng
        c = eng.cid(pg)
        f = eng.frame(pg)
        proc = int(self.prep.page_proc[pg])
        page_proc = self.prep.page_proc
        for q in self.same.related(pg).tolist():
            if q == pg or int(page_proc[q]) == proc:
                continue
            if not self._scannable(q):
                self.charge("addresses_walked")
                continue
            self.charge("unstable_node_visits")
            fq = eng.frame(q)
            if eng.cid(q) != c or fq == f:
                continue
            if eng.page_is_ksm(q):
                node = self.frame_node.get(fq)
                if node is None or not self._node_alive(node) or not self.is_page_sharing_candidate(node):
                    continue
                if self.try_to_merge_with_ksm_page(pg, node):
                    self.stable_tree_append(item, node)
                return True
            partner = self.items.get(q)
            if partner is not None:
                self.remove_rmap_item_from_tree(partner)
            self._merge_two(item, pg, partner, q)
            return True
        return False

    def _stable_merge(self, item: RmapItem, pg: int) -> bool:
        """Search the stable tree and merge with what it finds; True if the visit ends here."""
        node = self.stable_tree_search(pg)
        self.remove_rmap_item_from_tree(item)
        if node is None:
            return False
        if self.try_to_merge_with_ksm_page(pg, node):
            self.stable_tree_append(item, node)
        return True

    def _checksum_gate(self, item: RmapItem, pg: int) -> bool:
        self.charge("jhash2_checksums" if self.v318 else "checksums")
        c = self.eng.cid(pg)
        if item.oldchecksum != c:
            item.oldchecksum = c
            return False
        return True

    # --- advisor -----------------------------------------------------------------------------------
    def scan_time_advisor(self) -> None:
        p = self.p
        # ktime_get() at the end of the scan: the batch's start plus the work done so far in it
        now = self.now + self.work_so_far()
        scan_time = (now - self.adv_start) // 1_000_000 // 1000
        scan_time = scan_time if scan_time else 1
        cpu_time = self._cpu_now()
        cpu_ms = (cpu_time - self.adv_cpu) // 1000 // 1000
        cpu_percent = (cpu_ms * 100) // (scan_time * 1000)
        cpu_percent = cpu_percent if cpu_percent else 1
        last = self.adv_scan_time if self.adv_scan_time else scan_time
        factor = p.advisor_target_scan_time * 100 // scan_time
        factor = factor if factor else 1
        change = scan_time * 100 // last
        change = change if change else 1
        change = (70 * self.adv_change + 30 * change) // 100
        pages = self.pages_to_scan * 100 // factor
        pages = pages * change // 100
        ppc = self.pages_to_scan // cpu_percent
        ppc = ppc if ppc else 1
        pages = min(pages, ppc * p.advisor_max_cpu)
        pages = max(pages, ppc * 10)
        pages = min(pages, p.advisor_max_pages_to_scan)
        self.adv_change = change
        self.adv_scan_time = scan_time
        self.adv_cpu = cpu_time
        self.pages_to_scan = int(pages)

    # --- sysfs writes between batches (ksmtrace.engine.daemon: set_params) ---------------------------
    def refuse_params(self, changes) -> dict[str, str]:
        return sysfs_refusals(self.p, changes)

    def params_changed(self, old, changes, now: int) -> None:
        if "pages_to_scan" in changes:
            self.pages_to_scan = self.p.pages_to_scan
        if self.p.sleep_millisecs != old.sleep_millisecs and not self.idle:
            self.t_wake = sleep_written(self.t_wake, self.batch_end(), now, self.p.sleep_millisecs, self.ctx.hz)

    # --- reporting ----------------------------------------------------------------------------------
    def counters(self) -> dict:
        return ksm_counters(
            shared=self.shared, sharing=self.sharing, unshared=self.unshared, rmap_items=len(self.items),
            full_scans=self.seqnr, chains=self.chains, dups=self.dups, pages_to_scan=self.pages_to_scan,
            scanned=self.scanned, skipped=self.skipped,
            ksm_zero_pages=self.eng.counters()["ksm_zero_pages_engine"], v318=self.v318,
        )

    def extras(self) -> dict:
        return {"stable_tree_nodes": len(self.stable), "mm_slots": len(self.mm_list)}


def ksm_counters(*, shared: int, sharing: int, unshared: int, rmap_items: int, full_scans: int, chains: int, dups: int,
                 pages_to_scan: int, scanned: int, skipped: int, ksm_zero_pages: int, v318: bool) -> dict:
    """The counters as /sys/kernel/mm/ksm exports them, derived from the daemon's state exactly as
    the kernel derives them (``pages_volatile``, ``general_profit``); 3.18 has no scanned/skipped/
    zero-page counters and no general_profit."""
    out = {
        "pages_shared": shared,
        "pages_sharing": sharing,
        "pages_unshared": unshared,
        "pages_volatile": max(0, rmap_items - shared - sharing - unshared),
        "full_scans": full_scans,
        "rmap_items": rmap_items,
        "stable_node_chains": chains,
        "stable_node_dups": dups,
        "pages_to_scan": pages_to_scan,
    }
    if v318:
        out.update(pages_scanned=None, pages_skipped=None, ksm_zero_pages=None, general_profit=None)
    else:
        out.update(pages_scanned=scanned, pages_skipped=skipped, ksm_zero_pages=ksm_zero_pages,
                   general_profit=(sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * RMAP_ITEM_SIZE)
    return out
