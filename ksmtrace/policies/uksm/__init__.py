"""``uksm``: UKSM (Ultra KSM, Nai Xia; release 0.1.2.6, ``mm/uksm.c`` of the dolohow/uksm 5.17
patch, unchanged up to the 6.12 port), replayed in virtual time.

The specification it follows, rule by rule with the kernel's line numbers, is
``notes/uksm-spec.md`` (the pseudo-code of its §11); ``docs/policies-uksm.md`` summarises it and
lists every deviation with its expected effect.  What it models:

* **Slots.**  Every eligible VMA (no ``pf io de ht mm sh ms gd`` VmFlags: private file mappings
  yes, ``[stack]`` no) gets a ``vma_slot`` when it appears; a VMA whose bounds change is a new
  slot (the kernel deletes and re-creates slots on every split, merge, resize): slot identity is
  (process, start, end) (:mod:`ksmtrace.policies.uksm.slots`).  New slots wait on the new list
  until their VMA has an anon_vma (a present anonymous page in it, inherited across a
  split/resize), then enter rung 0 in batches; a removed slot still on the new list is freed at
  once, one in the ladder goes to the del list and is freed (its rmap items leave the trees) at
  the end of the next wake-up.  (The kernel's noadd list holds slots whose VMA became ineligible
  between creation and entry; eligibility is a per-snapshot fact here, so it stays empty.)
* **The ladder.**  4 rungs with the CPU governor presets (``full`` default, ``medium``, ``low``,
  ``quiet``: per-rung CPU ratios, cover times, max CPU), overridable as in sysfs
  (``cpu_ratios``, ``eval_intervals``, ``max_cpu_percentage``).  Each wake-up serves rungs 0..3 in
  order, each up to its quota = its CPU budget over one sleep / the per-page cost EMA; a pass of a
  rung lands every ``step`` pages of its concatenated slots from a random offset, and each landing
  takes the next page of that slot's random permutation (an incremental Fisher-Yates, drawn anew
  every cycle: NEED_RERAND is never cleared).  Holes count: a visit to an address with no page
  costs quota.  After a slot's last landing in a pass, ``judge_slot`` promotes it (dedup ratio of
  the pass >= ``abundant_threshold`` %, with COWs above ``thrash_threshold`` % of its merges
  zeroing the ratio), demotes it, or sends it back to rung 0 when it completed a cycle.  At the end
  of an eval round (every non-empty rung finished a pass), slots that others merged into
  (``pages_bemerged``) are promoted.
* **The EMA and the sleep.**  The per-visit cost EMA (alpha 20 %, doubled on a burst, reset to
  500 ns every 256 eval rounds) is measured on the *modelled* CPU of the scan loop (the timing cost
  model's units), and drives quotas and steps; the sleep is stretched so that the busiest rung
  scanned keeps its duty cycle (at most 1 s) and lengthened when rung 0 could not afford one page.
* **Pages.**  No checksum gate: a page is hashed (the sampled hash at the current strength) at
  every visit, merged with the zero page if it hashes and compares as zero, else searched in the
  stable tree and the unstable tree, merged on a full compare, or inserted.  Both trees are two
  levels: tree nodes keyed by the sampled hash, a sub-tree keyed by the full-strength ``hash_max``
  (computed lazily).  Collisions are accounted as the kernel classifies them (COLLI, COLLI_MAX,
  CHANGED; a false zero-hash match) with their CPU and their ``rshash_neg`` cost.  The unstable tree
  is dropped only when the hash strength changes.  The kernel's unstable-tree ``count`` is never
  incremented on insert (notes/uksm-spec.md §6.5), so the "count == 1" shortcut never fires and a
  pair merges at the first page's *second* visit after the second page's first: reproduced by
  default, ``unstable_count_bug=0`` keeps the count.
* **Hash strength** (``hash_strength``, default 64; ``hash_adapt``): UKSM's ``rshash_adjust``
  walk at the end of every hash round (a quarter of all slot pages newly visited; exported as
  ``full_scans``), judged on words saved by sampling against words lost to collisions
  (``memcmp_cost`` words per full compare, 174 by default: the one measured value found).  A
  change re-keys the stable tree (|delta| words per node) and flushes the unstable tree.  The trace
  records the hash only at 8, 16, ..., 1024 words (:mod:`ksmtrace.policies.hashkeys`), so the
  walk runs either on the kernel's strength 1..1034 with collisions taken from the nearest recorded
  strength (``hash_walk=kernel``, ``snap`` nearest/floor/ceil) or on the recorded points only
  (``hash_walk=ladder``: exact at every point, coarser steps).
* **COW accounting.**  A write to a page the policy merged (a KSM page or the UKSM zero page) is
  a ``pages_cowed`` of the slot of the VMA it was in.
* **Counters** as ``/sys/kernel/mm/uksm`` exports them: ``pages_shared``, ``pages_sharing``
  (zero pages excluded), ``pages_unshared`` (decremented for items of an old hash round too),
  ``full_scans`` (starts at 1), ``pages_scanned`` (pages hashed), ``hash_strength``,
  ``sleep_times``, ``ema_per_page_time``, ``sleep_millisecs`` (the sleep in force); plus
  ``ksm_zero_pages`` (NR_UKSM_ZERO_PAGES) and the simulator's view: the recorded strength that
  models the current one, eval and hash rounds, slots per rung and on the new list, collisions,
  CHANGED outcomes, false zero-hash matches, promotions, demotions and the walk's state.

Where it deliberately differs (each in ``docs/policies-uksm.md`` with its expected effect):

* Writes, VMA changes, forks and exits are seen at snapshot times; ``anon_vma`` is inferred
  from page rows; only VMAs the trace captured (``V_IN_SCOPE``) are slots.
* ``hash_max`` (a 32-bit full-strength hash) is modelled by the content itself: a ``hash_max``
  collision between different contents never happens (so no "hell" nodes), and a tree page that
  changed after its ``hash_max`` was cached is COLLI_MAX, its real cause.  A page cannot change
  between its hash and its compare within one visit.
* Merges never fail (page locks, GUP pins, mmap lock contention and its same-mm skipping, THP
  split failures); ``break_cow`` is therefore never needed.
* The kernel's pool-page freeing that can revisit addresses within a cycle (uksm-spec §3.4, Q7)
  and the stale ``hash_max`` after a stale stable node (Q6) are not modelled; the sradix index
  order is "lowest free index".
* A tree item whose page was unmapped and faulted again at its address is gone (-EINVAL); a
  written page is the same page (the merge compare then finds CHANGED).
* Costs are the shared cost model's units; a hashed word is ``sampled_words`` (1/64 of a
  ``sampled_hashes``), slot bookkeeping ``list_moves``.  Random numbers are a seeded splitmix64,
  one stream per use (permutations, rung offsets, slot keys).

Reproduced quirks (uksm-spec §10.3): the landing lost when a stride ends exactly on a slot
boundary (Q2), the step computed from the raw negative ratio until the next wake-up (Q3), the u64
wrap of ``scanned_virtual_pages`` on slot deletion (Q4), ``pages_unshared`` not incremented on a
COLLI insert (Q5), the ``pages_bemerged`` skip and head insertion of ``node_vma`` lists ordered by
a random slot key (Q8), no zero-page match at strength 1034 (Q1); and, as read in
``hash_round_finished``, hash rounds (and so the strength walk) that stop when every slot completes a
cycle within one round before a quarter of all slot pages were newly visited, until a slot is
created or deleted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.base import Params, Policy, param
from ksmtrace.policies.uksm.rules import GOVERNORS
from ksmtrace.policies.uksm.runtime import SNAP_MODES, WALKS, UksmRuntime, parse_quad
from ksmtrace.trace.schema import SAMPLE_STRENGTHS


@dataclass(frozen=True)
class UksmParams(Params):
    cpu_governor: str = param("full", "CPU governor preset: per-rung CPU ratios, cover times, max CPU", choices=tuple(GOVERNORS))
    max_cpu_percentage: int = param(0, "CPU cap of the rungs with a relative ratio (0 = the governor's)", "%", minimum=0, maximum=99)
    cpu_ratios: str = param("", "per-rung CPU ratios in 1/10000, negative = share of max_cpu ('' = the governor's), e.g. 20,40,-2500,-10000")
    eval_intervals: str = param("", "per-rung cover time of one sampling pass ('' = the governor's), e.g. 1000,500,200,50", "ms")
    sleep_millisecs: int = param(100, "sleep between wake-ups (the user value; UKSM stretches it)", "ms", minimum=1, maximum=1000)
    thrash_threshold: int = param(50, "COWs above this share of a slot's merges zero its dedup ratio (0 = off)", "%", minimum=0, maximum=99)
    abundant_threshold: int = param(10, "dedup ratio that promotes a slot one rung", "%", minimum=0, maximum=99)
    hash_strength: int = param(64, "initial sampled-hash strength (fixed when hash_adapt=0)", "words", choices=SAMPLE_STRENGTHS)
    hash_adapt: bool = param(True, "adapt the strength at every hash round (rshash_adjust)")
    hash_walk: str = param("kernel", "strength walk: the kernel's 1..1034 (collisions from the nearest recorded strength) or the recorded ladder only", choices=WALKS)
    snap: str = param("nearest", "hash_walk=kernel: which recorded strength models the current one", choices=SNAP_MODES)
    memcmp_cost: int = param(174, "cost of a full page compare in hashed words (rshash accounting)", "words", minimum=0)
    unstable_count_bug: bool = param(True, "quirk switch: the unstable tree_node count is never incremented (the kernel's behaviour)")

    def check(self) -> None:
        if self.max_cpu_percentage and self.max_cpu_percentage < 1:
            raise PolicyParamError("parameter max_cpu_percentage: must be 0 (the governor's) or 1..99")
        if self.cpu_ratios:
            for r in parse_quad(self.cpu_ratios, "cpu_ratios"):
                if r == 0 or not -10000 <= r < 10000:
                    raise PolicyParamError(f"parameter cpu_ratios={self.cpu_ratios!r}: each ratio must be non-zero and in [-10000, 9999]")
        if self.eval_intervals:
            if any(c < 0 for c in parse_quad(self.eval_intervals, "eval_intervals")):
                raise PolicyParamError(f"parameter eval_intervals={self.eval_intervals!r}: cover times must be >= 0")


class UKSM(Policy):
    """UKSM (see the module docstring for what is modelled and where it differs)."""

    name = "uksm"
    summary = "UKSM: per-VMA slots on a 4-rung CPU ladder, random in-VMA sampling, two-level sampled-hash trees, adaptive hash strength"
    Params = UksmParams
    default_scope = "anon"
    kernel_counters = (
        "pages_shared", "pages_sharing", "pages_unshared", "full_scans", "pages_scanned", "hash_strength",
        "sleep_times", "ema_per_page_time", "ksm_zero_pages", "sleep_millisecs", "hash_strength_recorded",
        "eval_round", "hash_round", "rung0_slots", "rung1_slots", "rung2_slots", "rung3_slots", "new_slots",
        "collisions", "changed", "zero_hash_false", "promotions", "demotions", "walk_state",
    )
    sensitivity = {
        "cpu_governor": ("quiet", "strengths", {}),
        "max_cpu_percentage": (10, "strengths", {"eval_intervals": "1,1,1,1", "timing_cost": {"pages_visited": 2000000}}),
        "cpu_ratios": ("10,20,40,75", "strengths", {}),
        "eval_intervals": ("1,1,1,1", "strengths", {}),
        "sleep_millisecs": (500, "strengths", {}),
        "thrash_threshold": (0, "strengths", {}),
        "abundant_threshold": (60, "strengths", {}),
        "hash_strength": (8, "strengths", {"hash_adapt": False}),
        "hash_adapt": (False, "strengths", {}),
        "hash_walk": ("ladder", "strengths", {}),
        "snap": ("floor", "strengths", {}),
        "memcmp_cost": (20000, "strengths", {}),
        "unstable_count_bug": (False, "strengths", {}),
    }

    Runtime = UksmRuntime
    kernel = "ksmtrace.policies.uksm.kernel:UksmKernel"
