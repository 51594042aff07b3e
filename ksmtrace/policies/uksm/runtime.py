"""The readable runtime of ``uksm``: one object per slot, rmap item, stable node and node_vma,
dictionaries for the two-level trees -- the policy's executable spec, on either engine.  The numba
kernel (:mod:`ksmtrace.policies.uksm.kernel`) must agree with it on every counter.  What it models
and where it differs: :mod:`ksmtrace.policies.uksm`; the kernel functions named below are
``mm/uksm.c``'s (notes/uksm-spec.md §11 is the pseudo-code this follows).

The governor's arithmetic and the strength walk are shared with the kernel
(:mod:`ksmtrace.policies.uksm.rules`), and so is the set-up (:func:`setup`): the slot instances,
the tree keys at every recorded strength, the rung parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ksmtrace.engine.api import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE, ZERO_FRAME
from ksmtrace.engine.daemon import Daemon
from ksmtrace.errors import PolicyContractError
from ksmtrace.policies import hashkeys
from ksmtrace.policies.uksm import rules as R
from ksmtrace.policies.uksm.slots import SlotTable, build_slots
from ksmtrace.trace.schema import SAMPLE_STRENGTHS

M64 = (1 << 64) - 1
# slot states: on the new list, in the ladder (entered), on the del list, freed
S_NONE, S_NEW, S_LADDER, S_DEL, S_FREED = range(5)
# what a page was merged into (for COW accounting): a KSM page, the UKSM zero page
M_KSM, M_ZERO = 1, 2
SNAP_MODES = ("nearest", "floor", "ceil")
WALKS = ("kernel", "ladder")
SPIN_LOCK_PERIOD = 32  # cleanup_vma_slots frees the del list in reversed batches of this size
ENTER_BATCH = 256  # uksm_enter_all_slots enters slots in batches of one sradix node


def parse_quad(text: str, what: str) -> tuple[int, int, int, int]:
    """Four comma-separated integers (``cpu_ratios``, ``eval_intervals``)."""
    from ksmtrace.errors import PolicyParamError

    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        raise PolicyParamError(f"parameter {what}={text!r}: expected 4 comma-separated integers") from None
    if len(vals) != 4:
        raise PolicyParamError(f"parameter {what}={text!r}: expected 4 values (one per rung), got {len(vals)}")
    return vals  # type: ignore[return-value]


@dataclass
class Setup:
    """What both runtimes compute once from the trace and the parameters."""

    slots: SlotTable
    keys: np.ndarray  # int64 [N_LEVELS, n_cids]: tree key of each content at each recorded strength
    zero_keys: np.ndarray  # int64 [N_LEVELS]: the zero page's key
    n_keys: int
    hash_desc: str
    rg: np.ndarray  # int64 [4, N_RCOLS]: ratios and cover times; quotas and steps at EMA 500
    max_cpu: int
    rs: np.ndarray  # the strength walk's initial state
    rng: np.ndarray  # the seeded random streams (after drawing the slot keys)
    sleep_jiffies: int
    hz: int
    snap: int  # index into SNAP_MODES
    ladder: bool


def setup(prep, params, ctx) -> Setup:
    ratios, covers, max_cpu = R.GOVERNORS[params.cpu_governor]
    if params.cpu_ratios:
        ratios = parse_quad(params.cpu_ratios, "cpu_ratios")
    if params.eval_intervals:
        covers = parse_quad(params.eval_intervals, "eval_intervals")
    if params.max_cpu_percentage:
        max_cpu = params.max_cpu_percentage
    rng = R.new_rng(ctx.seed)
    slots = build_slots(prep, rng)
    n = max(int(prep.n_cids), 1)
    keys = np.zeros((R.N_LEVELS, n), np.int64)
    zero_keys = np.zeros(R.N_LEVELS, np.int64)
    off = 0
    for lv, (k, nk, zk) in enumerate(hashkeys.content_keys(prep, SAMPLE_STRENGTHS)):
        keys[lv] = k + off
        zero_keys[lv] = zk + off
        off += nk
    rec = hashkeys.recorded_strengths(prep)
    hash_desc = ("from trace at every strength" if len(rec) == R.N_LEVELS else
                 "from trace at strength 64 (every strength collides as at 64)" if rec else
                 "modelled collision-free")
    rg = np.zeros((4, R.N_RCOLS), np.int64)
    rg[:, R.R_RATIO] = ratios
    rg[:, R.R_COVER] = covers
    hz = int(ctx.hz)
    sleep_j = int(R.msecs_to_jiffies(params.sleep_millisecs, hz))
    R.calc_scan_pages(rg, R.PAGE_TIME_DEFAULT, sleep_j, sleep_j, 1, max_cpu, hz)  # init_scan_ladder
    ladder = params.hash_walk == "ladder"
    return Setup(slots=slots, keys=keys, zero_keys=zero_keys, n_keys=off, hash_desc=hash_desc, rg=rg,
                 max_cpu=int(max_cpu), rs=R.new_walk(params.hash_strength, ladder), rng=rng, sleep_jiffies=sleep_j,
                 hz=hz, snap=SNAP_MODES.index(params.snap), ladder=ladder)


def bitlen(n: int) -> int:
    return int(n).bit_length()


# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Item:
    """An rmap_item: one per (slot, page index) that held a page when visited."""

    slot: "Slot"
    idx: int  # page index in the slot
    pg: int  # the page id at that address
    stable: bool = False
    unstable: bool = False
    hash_max: int = 0  # content id + 1 when computed (the proxy of the full-strength hash), 0 = not
    hash_round: int = 0
    tn: int = -1  # key of its unstable tree_node
    ukey: int = -1  # the key it is filed under in that tree_node's sub-tree (its hash_max then)
    pgen: int = 0  # the page's mapping generation when it was last visited (item->page)
    node: Optional["SNode"] = None
    nv: Optional["NodeVma"] = None


@dataclass(eq=False)
class Slot:
    """A vma_slot."""

    sid: int
    pages: int
    base: int
    key: int
    state: int = S_NONE
    rung: int = -1
    index: int = -1
    pages_scanned: int = 0
    this_sampled: int = 0
    fsr: int = 0  # fully_scanned_round when it last completed a cycle
    merged: int = 0
    cowed: int = 0
    bemerged: int = 0
    in_dedup: bool = False
    in_uksm: bool = False  # counted in uksm_pages_total
    anon: bool = False  # the VMA has an anon_vma
    perm: dict = field(default_factory=dict)  # rmap_list_pool: position -> page index (identity if absent)
    items: dict = field(default_factory=dict)  # page index -> Item


@dataclass(eq=False)
class NodeVma:
    slot: Slot
    items: dict = field(default_factory=dict)  # Item -> None (insertion ordered)


@dataclass(eq=False)
class SNode:
    """A stable_node: one KSM page."""

    frame: int
    gen: int
    cid: int
    hm: int = 0
    tn: int = -1  # key of its tree_node in the current stable tree (-1: in no tree)
    nvs: list = field(default_factory=list)  # node_vma list, in list order


class Rung:
    """A scan_rung: its slots by sradix index, the cursor, the pass flag (the ratio, cover time,
    page total, quota and step are the runtime's ``RG`` row, shared with the arithmetic)."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.idx: list[Optional[Slot]] = []
        self.nslots = 0
        self.current: Optional[Slot] = None
        self.offset = 0
        self.finished = False


class UksmRuntime(Daemon):
    """uksmd, readable."""

    def __init__(self, params, ctx) -> None:
        super().__init__(ctx)
        self.p = params
        self.prep = ctx.prep
        self.eng = ctx.engine
        su = setup(ctx.prep, params, ctx)
        self.su = su
        self.T = su.slots
        self.keys, self.zero_keys = su.keys, su.zero_keys
        self.RG = su.rg.copy()
        self.RS = su.rs.copy()
        self.rng = su.rng.copy()
        self.hz, self.max_cpu = su.hz, su.max_cpu
        self.memcmp = int(params.memcmp_cost)
        self.slots: list[Slot] = [Slot(sid=i, pages=int(self.T.pages[i]), base=int(self.T.base[i]), key=int(self.T.key[i]))
                                  for i in range(self.T.n)]
        self.entry_pg = self.T.entry_pg
        self.rungs = [Rung(i) for i in range(4)]
        self.new_list: list[Slot] = []
        self.del_list: list[Slot] = []
        self.dedup: dict[Slot, None] = {}  # vma_slot_dedup, in order of joining (the kernel adds at the head)
        self.pgslot: dict[int, Slot] = {}  # page id -> the slot of the VMA holding it now
        self.merged: dict[int, int] = {}  # page id -> M_KSM / M_ZERO while it maps what the policy merged it into
        self.mapgen: dict[int, int] = {}  # page id -> times it went away (a page back at the address is a new page)
        self.stree: dict[int, dict[int, SNode]] = {}  # stable tree: tree_node key -> {hash_max: node}
        self.utree: dict[int, dict[int, Item]] = {}  # unstable tree of this hash round
        self.snodes: dict[SNode, None] = {}  # stable_node_list (creation order; the kernel adds at the head)
        self.node_of_frame: dict[int, SNode] = {}
        # globals
        self.ema = R.PAGE_TIME_DEFAULT
        self.sleep_j = self.sleep_saved = self.sleep_real = su.sleep_jiffies
        self.eval_round = self.hash_round = self.fsr = 1
        self.svp = 0  # scanned_virtual_pages (u64)
        self.pages_total = 0
        self.pages_scanned = 0
        self.shared = self.sharing = self.unshared = 0
        self.zero_pages = 0
        self.batches = 0
        self.level = self._level()
        # extras
        self.colli_stable = self.colli_unstable = self.colli_max = self.changed = self.zero_false = 0
        self.promotions = self.demotions = 0

    # --- strength --------------------------------------------------------------------------------
    def _level(self) -> int:
        if self.su.ladder:
            return int(self.RS[R.RS_S])
        return int(R.snap_level(int(self.RS[R.RS_S]), self.su.snap))

    def words(self) -> int:
        return int(R.strength_words(self.RS))

    def key(self, cid: int) -> int:
        return int(self.keys[self.level, cid])

    def _hash_max_cost(self) -> None:
        d = R.STRENGTH_MAX - self.words()
        self.charge("sampled_words", d)
        self.RS[R.RS_NEG] += d

    def item_hash_max(self, it: Item) -> int:
        """rmap_item_hash_max: computed once, from the page's content now (proxy: content id + 1)."""
        if it.hash_max == 0:
            it.hash_max = self.eng.cid(it.pg) + 1
            self._hash_max_cost()
            if it.unstable and it.hash_round == self.hash_round and it.ukey == 0:  # re-file it in its sub-tree
                sub = self.utree[it.tn]
                del sub[0]
                sub[it.hash_max] = it
                it.ukey = it.hash_max
        return it.hash_max

    def node_hash_max(self, node: SNode) -> int:
        """stable_node_hash_max."""
        if node.hm == 0:
            node.hm = node.cid + 1
            self._hash_max_cost()
            if node.tn >= 0:
                sub = self.stree[node.tn]
                if sub.get(0) is node:
                    del sub[0]
                    sub[node.hm] = node
        return node.hm

    # --- snapshots (the hooks) --------------------------------------------------------------------
    def on_snapshot(self, s: int, now: int) -> None:
        prep, eng, T = self.prep, self.eng, self.T
        sl = prep.events(s)
        pgs = prep.ev_pg[sl].tolist()
        kinds = prep.ev_kind[sl].tolist()
        for pg, k in zip(pgs, kinds):  # 1. COWs of merged pages count against the VMA they were in
            if k == EV_WRITE or k == EV_GONE or k == EV_UNMERGE:
                m = self.merged.pop(pg, 0)
                if m and k != EV_GONE:
                    slot = self.pgslot.get(pg)
                    if slot is not None:
                        slot.cowed += 1
                if m == M_ZERO:
                    self.zero_pages -= 1
                if k != EV_WRITE:
                    self.mapgen[pg] = self.mapgen.get(pg, 0) + 1
        for i in T.rem_ids[T.rem_off[s] : T.rem_off[s + 1]].tolist():  # 2. VMAs gone or changed
            self.remove_vma(self.slots[i])
        for i in T.add_ids[T.add_off[s] : T.add_off[s + 1]].tolist():
            self.add_vma(self.slots[i])
        for pg, k in zip(pgs, kinds):  # 3. a page faulted in gives its VMA an anon_vma
            if (k == EV_APPEAR or k == EV_WRITE) and eng.is_candidate(pg):
                slot = self.pgslot.get(pg)
                if slot is not None:
                    slot.anon = True
                if k == EV_APPEAR and eng.page_is_ksm(pg):  # a fork child of a merged page
                    self.merged[pg] = M_KSM

    def add_vma(self, slot: Slot) -> None:
        """uksm_vma_add_new: a new slot on the new list."""
        T, eng = self.T, self.eng
        i = slot.sid
        slot.state = S_NEW
        self.new_list.append(slot)
        anon = False
        for pg in range(int(T.pglo[i]), int(T.pghi[i])):
            self.pgslot[pg] = slot
            anon = anon or eng.is_candidate(pg)
        for j in T.inh_ids[T.inh_off[i] : T.inh_off[i + 1]].tolist():  # split / merge / resize: same anon_vma
            anon = anon or self.slots[j].anon
        slot.anon = anon

    def remove_vma(self, slot: Slot) -> None:
        """uksm_remove_vma: freed at once if still new, else onto the del list."""
        T = self.T
        i = slot.sid
        for pg in range(int(T.pglo[i]), int(T.pghi[i])):
            if self.pgslot.get(pg) is slot:
                del self.pgslot[pg]
        if slot.state == S_NEW:
            self.new_list.remove(slot)
            slot.state = S_FREED
        elif slot.state == S_LADDER:
            slot.state = S_DEL
            self.del_list.append(slot)

    # --- the daemon ------------------------------------------------------------------------------------
    def run_until(self, t_end: int) -> None:
        while self.t_wake < t_end:
            self.timed_batch(self.do_scan, 0)

    def do_scan(self) -> int:
        """uksm_do_scan: one wake-up; returns the sleep it decides (ms)."""
        RG = self.RG
        w0 = self.work_so_far()
        vpages = 0
        max_r = 0
        for i in range(4):
            rung = self.rungs[i]
            if RG[i, R.R_QUOTA] == 0:
                continue
            if rung.nslots == 0:
                RG[i, R.R_QUOTA] = 0
                continue
            max_r = max(max_r, int(R.real_ratio(int(RG[i, R.R_RATIO]), self.max_cpu)))
            while RG[i, R.R_QUOTA] > 0 and rung.nslots > 0:
                slot = rung.current
                if slot.state == S_DEL:  # its VMA went (or its mm exits): -ENOENT
                    self.rung_rm_slot(slot)
                    continue
                if not slot.in_uksm:  # slot_pool_alloc at the first visit
                    slot.in_uksm = True
                    self.pages_total += slot.pages
                self.scan_vma_one_page(slot)
                RG[i, R.R_QUOTA] -= 1
                vpages += 1
                if rung.offset + RG[i, R.R_STEP] > slot.pages - 1 or slot.pages_scanned == slot.pages:
                    self.judge_slot(slot)
                else:
                    rung.offset += int(RG[i, R.R_STEP])
        delta = self.work_so_far() - w0
        self.cleanup_vma_slots()
        self.enter_all_slots()
        nonempty = [r for r in self.rungs if r.nslots]
        if nonempty and all(r.finished for r in nonempty):
            self.round_update_ladder()
            self.eval_round += 1
            self.charge("scan_starts")  # lru_add_drain_all
            prev = self.words()
            if self.hash_round_finished() and self.p.hash_adapt and R.rshash_adjust(self.RS, self.pages_scanned, self.fsr):
                self.stable_tree_delta_hash(prev)
                self.hash_round += 1
                self.utree = {}
        if vpages and delta > 0:
            self.ema = int(R.ema(delta // vpages, self.ema))
        self.ema, self.sleep_j = (int(x) for x in R.calc_scan_pages(
            RG, self.ema, self.sleep_j, self.sleep_saved, self.eval_round, self.max_cpu, self.hz))
        self.sleep_real = int(R.sleep_after_scan(self.sleep_j, self.work_so_far() - w0, max_r, self.hz))
        self.batches += 1
        return int(R.jiffies_to_msecs(self.sleep_real, self.hz))

    def hash_round_finished(self) -> bool:
        if self.svp > (self.pages_total >> 2):  # (u64: a wrapped value ends the round at once, quirk Q4)
            self.svp = 0
            if self.pages_scanned:
                self.fsr += 1
            return True
        return False

    # --- slots and the ladder ---------------------------------------------------------------------------
    def cleanup_vma_slots(self) -> None:
        dl, self.del_list = self.del_list, []
        for b in range(0, len(dl), SPIN_LOCK_PERIOD):
            for slot in reversed(dl[b : b + SPIN_LOCK_PERIOD]):
                self.del_vma_slot(slot)

    def del_vma_slot(self, slot: Slot) -> None:
        """uksm_del_vma_slot."""
        if slot.rung >= 0:
            self.rung_rm_slot(slot)
        if slot.in_dedup:
            del self.dedup[slot]
            slot.in_dedup = False
        for idx in sorted(slot.items):
            self.free_item(slot.items[idx])
        if slot.in_uksm:
            self.pages_total -= slot.pages
        self.svp = (self.svp - (slot.pages if slot.fsr == self.fsr else slot.pages_scanned)) & M64
        slot.state = S_FREED
        self.charge("list_moves")

    def enter_all_slots(self) -> None:
        """uksm_enter_all_slots: slots with an anon_vma go to rung 0 in batches; the others wait
        (the kernel moves them to the head of a local list, so their order reverses each time)."""
        batch: list[Slot] = []
        waiting: list[Slot] = []
        for slot in self.new_list:
            if not slot.anon:
                waiting.insert(0, slot)
                continue
            batch.append(slot)
            slot.state = S_LADDER
            if len(batch) == ENTER_BATCH:
                self.rung_add(0, batch)
                batch = []
        self.new_list = waiting
        if batch:
            self.rung_add(0, batch)

    def _locate(self, rung: Rung, first: int, idx: int) -> Optional[tuple[Slot, int]]:
        """slot_iter: the slot at or after sradix index ``first`` holding concatenated offset ``idx``."""
        for k in range(first, len(rung.idx)):
            s = rung.idx[k]
            if s is None:
                continue
            if idx < s.pages:
                return s, idx
            idx -= s.pages
        return None

    def reset_current_scan(self, rung: Rung, finished: bool, recalc: bool) -> None:
        RG, i = self.RG, rung.i
        if finished:
            rung.finished = True
        if recalc or R.step_need_recalc(RG[i, R.R_STEP], RG[i, R.R_PAGES]):
            RG[i, R.R_STEP] = R.calc_step(RG[i, R.R_COVER], RG[i, R.R_PAGES], RG[i, R.R_RATIO], self.ema)  # raw ratio: Q3
        o = int(R.rand32_call(self.rng, R.RNG_RUNG)) % int(RG[i, R.R_STEP])
        rung.current, rung.offset = self._locate(rung, 0, o)

    def advance_current_scan(self, rung: Rung) -> None:
        slot = rung.current
        step = int(self.RG[rung.i, R.R_STEP])
        n = ((slot.pages - rung.offset) % step) & 0xFFFF  # unsigned short; 0 -> a landing lost (Q2)
        nxt = self._locate(rung, slot.index + 1, step - n)
        if nxt is not None:
            rung.current, rung.offset = nxt
        else:
            self.reset_current_scan(rung, True, False)

    def rung_rm_slot(self, slot: Slot) -> None:
        rung = self.rungs[slot.rung]
        RG, i = self.RG, rung.i
        if rung.current is slot:
            self.advance_current_scan(rung)
        rung.idx[slot.index] = None
        rung.nslots -= 1
        RG[i, R.R_PAGES] -= slot.pages
        slot.rung = -1
        slot.index = -1
        if R.step_need_recalc(RG[i, R.R_STEP], RG[i, R.R_PAGES]):
            RG[i, R.R_STEP] = R.calc_step(RG[i, R.R_COVER], RG[i, R.R_PAGES], RG[i, R.R_RATIO], self.ema)
        if rung.nslots and rung.current is slot:
            self.reset_current_scan(rung, True, False)
        self.charge("list_moves")

    def rung_add(self, i: int, slots: list[Slot]) -> None:
        """sradix_tree_enter (lowest free index first) and rung_add_new_slots / rung_add_one_slot."""
        rung = self.rungs[i]
        k = 0
        for slot in slots:
            while k < len(rung.idx) and rung.idx[k] is not None:
                k += 1
            if k == len(rung.idx):
                rung.idx.append(None)
            rung.idx[k] = slot
            slot.rung = i
            slot.index = k
            self.RG[i, R.R_PAGES] += slot.pages
            self.charge("list_moves")
        rung.nslots += len(slots)
        if rung.nslots == len(slots):
            self.reset_current_scan(rung, False, True)

    def vma_rung_enter(self, slot: Slot, target: int) -> bool:
        if slot.rung == target:
            return False
        self.rung_rm_slot(slot)
        self.rung_add(target, [slot])
        return True

    def judge_slot(self, slot: Slot) -> None:
        """judge_slot: after a slot's last visit in a pass: promote, demote or back to rung 0."""
        rung = self.rungs[slot.rung]
        dedup = self.dedup_ratio(slot.merged, slot.cowed, slot.this_sampled)
        full = slot.pages_scanned == slot.pages
        thrash = self.p.thrash_threshold
        if full and thrash:
            moved = self.vma_rung_enter(slot, 0)
        elif dedup and dedup >= self.p.abundant_threshold:
            moved = self.vma_rung_enter(slot, min(rung.i + 1, 3))
            self.promotions += moved
        else:
            moved = self.vma_rung_enter(slot, max(rung.i - 1, 0))
            self.demotions += moved
        slot.merged = slot.cowed = slot.this_sampled = 0
        if full:
            slot.pages_scanned = 0
        if not moved:
            self.advance_current_scan(rung)

    def dedup_ratio(self, merged: int, cowed: int, per: int) -> int:
        """cal_dedup_ratio / cal_dedup_ratio_old: merges minus COWs in percent of ``per``, 0 for a
        thrashing VMA (COWs above thrash_threshold % of the merges)."""
        if per == 0:
            return 0
        m = merged
        thrash = self.p.thrash_threshold
        if m and thrash:
            m = 0 if cowed * 100 // merged > thrash else merged - cowed
        return m * 100 // per

    def round_update_ladder(self) -> None:
        for r in self.rungs:
            r.finished = False
        for slot in reversed(list(self.dedup)):  # the kernel's list, from its head
            if slot.rung >= 0:
                d = self.dedup_ratio(slot.bemerged, slot.cowed, slot.pages)
                if d and d >= self.p.abundant_threshold:
                    self.promotions += self.vma_rung_enter(slot, min(slot.rung + 1, 3))
            slot.bemerged = slot.cowed = 0
            slot.in_dedup = False
        self.dedup = {}

    # --- one visit ----------------------------------------------------------------------------------------
    def scan_vma_one_page(self, slot: Slot) -> None:
        got = self.get_next_rmap_item(slot)
        if got is not None:
            it, h = got
            if not (it.stable and self.eng.page_is_ksm(it.pg)):
                self.cmp_and_merge_page(it, h)
        slot.pages_scanned += 1
        slot.this_sampled += 1
        if slot.fsr != self.fsr:
            self.svp = (self.svp + 1) & M64
        if slot.pages_scanned == slot.pages:
            slot.fsr = self.fsr

    def get_next_rmap_item(self, slot: Slot) -> Optional[tuple[Item, int]]:
        eng = self.eng
        i = slot.pages_scanned % slot.pages
        j = i + int(R.rand32_call(self.rng, R.RNG_PERM)) % (slot.pages - i)  # incremental Fisher-Yates
        pi, pj = slot.perm.get(i, i), slot.perm.get(j, j)
        slot.perm[i], slot.perm[j] = pj, pi
        idx = pj
        pg = int(self.entry_pg[slot.base + idx])
        it = slot.items.get(idx)
        if pg < 0 or not eng.is_candidate(pg) or eng.frame(pg) == ZERO_FRAME:  # no page (hole, swapped, zero page)
            self.charge("addresses_walked")
            if it is not None:
                self.free_item(it)
            return None
        self.charge("pages_visited")
        w = self.words()
        self.charge("sampled_words", w)
        self.RS[R.RS_POS] += max(0, R.STRENGTH_FULL - w)
        self.pages_scanned += 1
        cid = eng.cid(pg)
        h = self.key(cid)
        if h == self.zero_keys[self.level] and not (w == R.STRENGTH_MAX):  # (entry 1034 is past the table: Q1)
            self.charge("write_protects")
            self.charge("zero_checks")
            if cid == 0:
                eng.split_thp(pg, False)
                eng.merge_zero(pg, self.now)
                self.charge("remaps")
                self.merged[pg] = M_ZERO
                self.zero_pages += 1
                slot.merged += 1
                if it is not None:
                    self.free_item(it)
                return None
            self.RS[R.RS_NEG] += self.memcmp // 2
            self.zero_false += 1
        if it is None:
            it = Item(slot=slot, idx=idx, pg=pg)
            slot.items[idx] = it
            self.charge("rmap_allocs")
        it.pgen = self.mapgen.get(pg, 0)
        return it, h

    def free_item(self, it: Item) -> None:
        self.remove_rmap_item_from_tree(it)
        del it.slot.items[it.idx]
        self.charge("rmap_frees")

    def cmp_and_merge_page(self, it: Item, h: int) -> None:
        eng = self.eng
        self.remove_rmap_item_from_tree(it)
        node = self.stable_tree_search(it, h)
        w = self.words()
        if node is not None:
            if eng.frame(it.pg) == node.frame:  # already this KSM page (fork, re-created slot)
                self.stable_tree_append(it, node, True)
                return
            self.charge("write_protects")
            self.charge("memcmp_pages")
            if eng.cid(it.pg) == node.cid:
                eng.split_thp(it.pg, False)
                eng.merge(it.pg, node.frame, self.now)
                self.charge("remaps")
                self.merged[it.pg] = M_KSM
                self.stable_tree_append(it, node, True)
                return
            self.colli_stable += 1  # check_collision: a sampled-hash collision
            if it.hash_max:  # at level 2: give up this visit
                self.RS[R.RS_NEG] += self.memcmp + R.STRENGTH_MAX - w
                self._hash_max_cost()
                return
            self.RS[R.RS_NEG] += self.memcmp + w
            self.charge("sampled_words", w)
        t = self.unstable_tree_search_insert(it, h)
        if t is None:
            return
        self.charge("write_protects", 2)
        self.charge("memcmp_pages")
        if eng.cid(it.pg) == eng.cid(t.pg):  # try_to_merge_two_pages succeeds
            eng.split_thp(it.pg, False)
            eng.split_thp(t.pg, False)
            gen = eng.stabilize(it.pg)
            f = eng.frame(it.pg)
            eng.merge(t.pg, f, self.now)
            self.charge("remaps")
            self.merged[it.pg] = self.merged[t.pg] = M_KSM
            self.remove_rmap_item_from_tree(t)
            node, ok1, ok2 = self.stable_tree_insert(it, t, h, f, gen)
            if ok2:
                self.stable_tree_append(t, node, False)
            if ok1:
                self.stable_tree_append(it, node, True)
            return
        self.charge("remaps")  # restore_uksm_page_pte
        if t.hash_max and t.hash_max == it.hash_max:
            self.colli_max += 1
            self.remove_rmap_item_from_tree(t)
            return
        self.charge("sampled_words", 2 * w)
        if self.key(eng.cid(it.pg)) != self.key(eng.cid(t.pg)):
            self.changed += 1
            self.remove_rmap_item_from_tree(t)
            return
        # MERGE_ERR_COLLI (reachable only through tree_node->count == 1)
        self.colli_unstable += 1
        self.RS[R.RS_NEG] += self.memcmp + 2 * w
        th = self.item_hash_max(t)
        ih = self.item_hash_max(it)
        if th != ih:
            sub = self.utree[t.tn]
            if ih in sub:
                raise PolicyContractError("uksm: two unstable items with one hash_max in one tree_node")
            sub[ih] = it
            it.unstable, it.tn, it.ukey, it.hash_round = True, t.tn, ih, self.hash_round  # no pages_unshared++ (Q5)

    # --- the trees -------------------------------------------------------------------------------------------
    def stable_tree_search(self, it: Item, h: int) -> Optional[SNode]:
        eng = self.eng
        if eng.page_is_ksm(it.pg):  # page_stable_node(page): a forked KSM page, or a re-created slot
            node = self.node_of_frame.get(eng.frame(it.pg))
            if node is None or not eng.frame_alive(node.frame, node.gen):
                raise PolicyContractError("uksm: a KSM page without its stable node")
            return node
        self.charge("hash_compares", bitlen(len(self.stree)))
        sub = self.stree.get(h)
        if sub is None:
            return None
        if len(sub) == 1:
            node = next(iter(sub.values()))
        else:
            hm = self.item_hash_max(it)
            self.charge("hash_compares", bitlen(len(sub)))
            node = sub.get(hm)
            if node is None:
                return None
        self.charge("stable_node_visits")  # get_uksm_page: the keyhole check
        if not eng.frame_alive(node.frame, node.gen):
            self.remove_node_from_stable_tree(node)
            return None
        return node

    def unstable_tree_search_insert(self, it: Item, h: int) -> Optional[Item]:
        eng = self.eng
        self.charge("hash_compares", bitlen(len(self.utree)))
        sub = self.utree.get(h)
        if sub is None:  # a new tree_node (count stays 0: the counter bug)
            self.utree[h] = {it.hash_max: it}
            self._file_unstable(it, h, it.hash_max)
            return None
        if not self.p.unstable_count_bug and len(sub) == 1:  # tree_node->count == 1: its only item
            t = next(iter(sub.values()))
        else:
            hm = self.item_hash_max(it)
            self.charge("hash_compares", bitlen(len(sub)))
            t = sub.get(hm)
            if t is None:
                sub[hm] = it
                self._file_unstable(it, h, hm)
                return None
        if eng.frame(t.pg) == eng.frame(it.pg):  # the same physical page (fork)
            return None
        self.charge("unstable_node_visits")  # get_mergeable_page_lock_mmap
        if t.slot.state == S_DEL:  # -EBUSY
            return None
        if not eng.is_candidate(t.pg) or eng.frame(t.pg) == ZERO_FRAME or self.mapgen.get(t.pg, 0) != t.pgen:
            self.remove_rmap_item_from_tree(t)  # -EINVAL: its page is no longer mapped there
            return None
        return t

    def _file_unstable(self, it: Item, h: int, ukey: int) -> None:
        it.unstable, it.tn, it.ukey, it.hash_round = True, h, ukey, self.hash_round
        self.unshared += 1

    def _new_node(self, sub: dict, h: int, f: int, gen: int, cid: int, hm: int) -> SNode:
        node = SNode(frame=f, gen=gen, cid=cid, hm=hm, tn=h)
        if hm in sub:
            raise PolicyContractError("uksm: two stable nodes with one hash_max in one tree_node")
        sub[hm] = node
        self.snodes[node] = None
        self.node_of_frame[f] = node
        return node

    def stable_tree_insert(self, it: Item, t: Item, h: int, f: int, gen: int) -> tuple[Optional[SNode], bool, bool]:
        """stable_tree_insert after a two-page merge: both pages map the new KSM page ``f``."""
        eng = self.eng
        cid = eng.cid(it.pg)
        self.charge("hash_compares", bitlen(len(self.stree)))
        sub = self.stree.get(h)
        if sub is None:
            sub = self.stree[h] = {}
            return self._new_node(sub, h, f, gen, cid, 0), True, True
        if len(sub) == 1:  # first_level_insert
            old = next(iter(sub.values()))
            self.charge("stable_node_visits")
            if not eng.frame_alive(old.frame, old.gen):
                self.remove_node_from_stable_tree(old, keep=True)
                return self._new_node(sub, h, f, gen, cid, 0), True, True
            self.RS[R.RS_NEG] += self.memcmp
            self.charge("memcmp_pages")
            if old.cid == cid:
                return self.try_merge_with_stable(it, t, old)
            self.node_hash_max(old)
            ihm = self.item_hash_max(it)
            return self._new_node(sub, h, f, gen, cid, ihm), True, True
        while True:  # stable_subtree_insert
            ihm = self.item_hash_max(it)
            self.charge("hash_compares", bitlen(len(sub)))
            n = sub.get(ihm)
            if n is None:
                return self._new_node(sub, h, f, gen, cid, ihm), True, True
            self.charge("stable_node_visits")
            if not eng.frame_alive(n.frame, n.gen):
                self.remove_node_from_stable_tree(n, keep=True)
                if sub:
                    continue
                return self._new_node(sub, h, f, gen, cid, ihm), True, True
            self.RS[R.RS_NEG] += self.memcmp
            self.charge("memcmp_pages")
            if n.cid == cid:
                return self.try_merge_with_stable(it, t, n)
            raise PolicyContractError("uksm: equal hash_max, different contents")

    def try_merge_with_stable(self, it: Item, t: Item, node: SNode) -> tuple[SNode, bool, bool]:
        """Both PTEs re-pointed from the new KSM page to the existing stable page."""
        for x in (it, t):
            self.eng.merge(x.pg, node.frame, self.now)
            self.charge("remaps")
        return node, True, True

    def stable_tree_append(self, it: Item, node: SNode, logdedup: bool) -> None:
        slot = it.slot
        it.stable = True
        it.node = node
        if not node.nvs:
            self.shared += 1
        else:
            self.sharing += 1
        factor = int(self.RG[slot.rung, R.R_STEP]) if slot.rung >= 0 else 1
        own = slot.key
        pos = len(node.nvs)
        for k, x in enumerate(node.nvs):
            if x.slot.key >= own:
                pos = k
                break
            if logdedup:
                self._credit(x.slot, factor)
        cont = -1  # crediting resumes after position cont (Q8: the node_vma there is skipped)
        if pos < len(node.nvs) and node.nvs[pos].slot is slot:
            nv = node.nvs[pos]
            cont = pos + 1
        else:
            nv = NodeVma(slot=slot)
            if pos == len(node.nvs):  # the walk reached the end: the kernel adds at the head
                node.nvs.insert(0, nv)
            else:
                node.nvs.insert(pos, nv)
                cont = pos + 1
        nv.items[it] = None
        it.nv = nv
        if logdedup:
            slot.merged += 1
            if 0 <= cont < len(node.nvs):
                for x in node.nvs[cont + 1 :]:
                    self._credit(x.slot, factor)

    def _credit(self, slot: Slot, factor: int) -> None:
        slot.bemerged += factor
        if not slot.in_dedup:
            slot.in_dedup = True
            self.dedup[slot] = None

    def remove_rmap_item_from_tree(self, it: Item) -> None:
        if it.stable:
            node = it.node
            self.charge("stable_node_visits")  # get_uksm_page
            if not self.eng.frame_alive(node.frame, node.gen):
                self.remove_node_from_stable_tree(node)
                it.hash_max = 0
                return
            nv = it.nv
            del nv.items[it]
            if not nv.items:
                node.nvs.remove(nv)
            if not node.nvs:
                self.shared -= 1
            else:
                self.sharing -= 1
        elif it.unstable:
            if it.hash_round == self.hash_round:
                sub = self.utree[it.tn]
                del sub[it.ukey]
                if not sub:
                    del self.utree[it.tn]
            self.unshared -= 1
        it.stable = it.unstable = False
        it.node = it.nv = None
        it.hash_max = 0

    def remove_node_from_stable_tree(self, node: SNode, keep: bool = False, unlink: bool = True) -> None:
        """A stale KSM page: its items leave the stable tree, the node goes."""
        self.charge("stale_prunes")
        if node.nvs:
            for nv in node.nvs:
                for x in nv.items:
                    self.sharing -= 1
                    x.stable = False
                    x.node = x.nv = None
            self.shared -= 1
            self.sharing += 1
            node.nvs = []
        if node.tn >= 0 and unlink:
            sub = self.stree[node.tn]
            del sub[node.hm]
            if not sub and not keep:
                del self.stree[node.tn]
        node.tn = -1
        del self.snodes[node]
        if self.node_of_frame.get(node.frame) is node:
            del self.node_of_frame[node.frame]

    def stable_tree_delta_hash(self, prev_words: int) -> None:
        """Re-key every stable node at the new strength (newest first, as the kernel's list)."""
        self.level = self._level()
        w = self.words()
        self.stree = {}
        for node in reversed(list(self.snodes)):
            self.charge("stable_node_visits")
            if not self.eng.frame_alive(node.frame, node.gen):
                self.remove_node_from_stable_tree(node, unlink=False)
                continue
            self.charge("sampled_words", abs(w - prev_words) if node.tn >= 0 else w)
            h = self.key(node.cid)
            sub = self.stree.get(h)
            if sub is None:
                self.stree[h] = {node.hm: node}
                node.tn = h
                continue
            node.tn = -1
            self.node_hash_max(node)
            if len(sub) == 1:
                self.charge("stable_node_visits")
                self.node_hash_max(next(iter(sub.values())))
            if node.hm in sub:
                raise PolicyContractError("uksm: two stable nodes with one hash_max after a re-key")
            sub[node.hm] = node
            node.tn = h

    # --- reporting ------------------------------------------------------------------------------------------
    def counters(self) -> dict:
        return uksm_counters(
            shared=self.shared, sharing=self.sharing, unshared=self.unshared, fsr=self.fsr,
            pages_scanned=self.pages_scanned, strength=self.words(), strength_recorded=SAMPLE_STRENGTHS[self.level],
            batches=self.batches, ema=self.ema, zero_pages=self.zero_pages, sleep_real=self.sleep_real, hz=self.hz,
            eval_round=self.eval_round, hash_round=self.hash_round, rung_slots=[r.nslots for r in self.rungs],
            new_slots=len(self.new_list), colli=self.colli_stable + self.colli_unstable + self.colli_max,
            changed=self.changed, zero_false=self.zero_false, promotions=self.promotions, demotions=self.demotions,
            walk_state=int(self.RS[R.RS_STATE]),
        )

    def extras(self) -> dict:
        return uksm_extras(self.su, self.counters(), stable_tree_nodes=len(self.stree), unstable_tree_nodes=len(self.utree),
                           colli_stable=self.colli_stable, colli_unstable=self.colli_unstable, colli_max=self.colli_max)


def uksm_counters(*, shared, sharing, unshared, fsr, pages_scanned, strength, strength_recorded, batches, ema,
                  zero_pages, sleep_real, hz, eval_round, hash_round, rung_slots, new_slots, colli, changed, zero_false,
                  promotions, demotions, walk_state) -> dict:
    """The counters as /sys/kernel/mm/uksm exports them, then the simulator's view of its state."""
    return {
        "pages_shared": shared,
        "pages_sharing": sharing,
        "pages_unshared": unshared,
        "full_scans": fsr,
        "pages_scanned": pages_scanned,
        "hash_strength": strength,
        "sleep_times": max(0, batches - 1),
        "ema_per_page_time": ema,
        "ksm_zero_pages": zero_pages,
        "sleep_millisecs": int(R.jiffies_to_msecs(sleep_real, hz)),
        "hash_strength_recorded": strength_recorded,
        "eval_round": eval_round,
        "hash_round": hash_round,
        "rung0_slots": rung_slots[0],
        "rung1_slots": rung_slots[1],
        "rung2_slots": rung_slots[2],
        "rung3_slots": rung_slots[3],
        "new_slots": new_slots,
        "collisions": colli,
        "changed": changed,
        "zero_hash_false": zero_false,
        "promotions": promotions,
        "demotions": demotions,
        "walk_state": walk_state,
    }


def uksm_extras(su: Setup, counters: dict, **more) -> dict:
    return {"sampled_hash": su.hash_desc, "slots": su.slots.source, "slot_instances": su.slots.n,
            "walk": "ladder" if su.ladder else "kernel", "walk_state": R.STATE_NAMES[counters["walk_state"]], **more}
