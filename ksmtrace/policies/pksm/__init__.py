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
  ``hash_strength`` (a what-if: PKSM fixes it at 64 words, ``RSAD_STRENGTH_FULL >> 4``) hashes
  that many words instead: the trees are keyed by the trace's hash at that strength (format
  version 2 records 8 ... 1024 words; a trace with only ``sample`` models every strength with the
  64-word collisions, :mod:`ksmtrace.policies.hashkeys`), and each hash costs ``hash_strength``
  ``sampled_words`` (at 64: one ``sampled_hashes``, as before).
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
* ``anon_vma_walk`` (True): ``pksm_rmap_walk`` visits *every* VMA of the page's anon_vma (not just
  those mapping it) and stops at the first failure: a VMA that does not map the page at its
  address (a fork child that copied or unmapped it, the other half of a split VMA) makes
  ``write_protect_page`` return DROP, and the page is dropped for good after the PTEs replaced so
  far; a ``[stack]`` VMA (``vma_can_enter`` refuses ``VM_GROWSDOWN``) ends the walk.  The anon_vma
  tree comes from :mod:`ksmtrace.trace.addrspace` (VMA lineage and fork clones).  In the zero
  path a failed walk goes on to the trees.  False: the walk visits exactly the page's mappings.

Where it deliberately differs:

* Trees are maps keyed by the sampled hash; a descent costs ``bit_length(size)`` hash compares.
  Page locks, extra references (``check_page_dio``), swap, THP-split failures and migration never
  make a merge fail.
* The rmap walk's anon_vma is approximated from the trace's VMA table (``anon_vma_walk``,
  ``docs/policies-pksm-hashtable.md``); without a VMA table the walk reaches exactly every mapping.
* The zero-check / memcmp results use the snapshot content at the wake-up's virtual time.
* ``rmap_item`` allocations happen in the faulting task (not charged to pksmd); frees are charged.
  ``pages_visited`` counts every page pksmd looks at: ``cmp_and_merge_page`` calls, recheck
  examinations and (``pksm-delay``) probation visits.
"""
from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.policies.base import Params, Policy, param
from ksmtrace.policies.pksm.runtime import PksmRuntime
from ksmtrace.policies.sameaddr import same_address_first_param, same_address_key_param
from ksmtrace.trace.schema import SAMPLE_STRENGTHS


@dataclass(frozen=True)
class PksmParams(Params):
    pages_to_scan: int = param(1000, "items taken from each of the new and rescan lists per wake-up (n+2 each)", "pages", minimum=1)
    sleep_millisecs: int = param(20, "sleep between wake-ups", "ms", minimum=0)
    period_seconds: int = param(10, "target period of the unstable-tree recheck", "s", minimum=1)
    recheck_rotate: bool = param(False, "quirk switch: rotate unchanged items in the recheck walk (False = PKSM's head-only walk)")
    collision_counts_as_merge: bool = param(True, "quirk switch: a failed full compare still counts as a merge (PKSM's err=0 bug)")
    track_cow_pages: bool = param(False, "quirk switch: register COW copies as new pages (False = only do_anonymous_page registers)")
    anon_vma_walk: bool = param(True, "quirk switch: the rmap walk visits every VMA of the page's anon_vma and drops the page "
                                      "at the first that does not map it (pksm_rmap_walk); False = only the page's mappings")
    same_address_first: bool = same_address_first_param()
    same_address_key: str = same_address_key_param()
    hash_strength: int = param(64, "words of the sampled hash (what-if; PKSM: 64)", "words", choices=SAMPLE_STRENGTHS)


class PKSM(Policy):
    """PKSM (anonymous-page KSM): see the module docstring for what is modelled and where it differs."""

    name = "pksm"
    summary = "PKSM: fault-order new/rescan/del lists, sampled-hash trees, zero page first, periodic unstable recheck"
    Params = PksmParams
    default_scope = "anon"
    # the runtimes keep each page's frame and list membership and learn of writes from the
    # snapshot's events (PKSM's fault-time hook, ``pksm_add_new_anon_page`` on a COW, is not
    # modelled between snapshots): write faults are taken at the snapshots
    fault_writes = False
    kernel_counters = (
        "pages_shared", "pages_sharing", "pages_zero_sharing", "pages_unshared", "full_scans",
        "stable_nodes", "rmap_items", "new_list", "rescan_list", "collision_merges",
    )
    # the contract suite (ksmtrace.testing.contract): parameter -> (other value, scenario, base)
    _RECHECK = {"pages_to_scan": 5, "sleep_millisecs": 100}
    sensitivity = {
        "pages_to_scan": (2, "mixed", {}),
        "sleep_millisecs": (200, "mixed", {}),
        "period_seconds": (1, "mixed", _RECHECK),
        "recheck_rotate": (True, "mixed", {**_RECHECK, "period_seconds": 1}),
        "collision_counts_as_merge": (False, "random-2", {}),  # stale unstable items after rewrites
        "track_cow_pages": (True, "mixed", {}),
        "anon_vma_walk": (False, "mixed", {}),
        "same_address_first": (True, "families", {}),
        "same_address_key": ("any", "families", {"same_address_first": True}),
        "hash_strength": (8, "strengths", {"collision_counts_as_merge": False}),
    }

    Runtime = PksmRuntime
    kernel = "ksmtrace.policies.pksm.kernel:PksmKernel"
