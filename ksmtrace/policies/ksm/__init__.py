"""``ksm``: mainline Linux KSM (mm/ksm.c), replayed page by page in virtual time.

What it models (read beside ``mm/ksm.c``; function names below are the kernel's):

* **ksmd** wakes every ``sleep_millisecs`` (``msecs_to_jiffies`` + timer-wheel rounding at the
  traced host's HZ) and runs ``ksm_do_scan(pages_to_scan)``; the batch's work, priced by the cost
  model, advances virtual time, so aggressive settings scan slower than budget / sleep.
* **Scan order** (``scan_get_next_rmap_item``): mm slots in list order, each mm's pages in address
  order; only present candidate pages are returned (zero-page PTEs, absent pages are walked over
  and their rmap items freed, as ``get_next_rmap_item`` does).  Without ``range_walk`` (every
  kernel before commit f5548c318d65: 6.18-rc6, backported to 6.12.59 and 5.10.249) the walk also
  looks up every 4 KiB address of a ``VM_MERGEABLE`` VMA with an anon_vma where no page is: those
  holes, counted from the trace's VMA table, are charged as ``addresses_walked`` where the walk
  passes them (:class:`~ksmtrace.policies.ksm.runtime.Holes`).  A new mm is inserted *behind the
  cursor* (``__ksm_enter``), so it is first scanned in the next full scan — a fork child of a
  registered mm at its fork time (``ksm_fork``; the start time in the trace), others at the first
  snapshot with a mergeable VMA; an exiting mm with
  rmap items is moved *after* the cursor (``__ksm_exit``) and its items are freed when ksmd gets
  there, which is when its counters drop.  The budget counts only pages handed to
  ``cmp_and_merge_page``; the rest of a batch is lost when a full scan ends (``seqnr++``).
* **Unstable tree** emptied at the start of every full scan; an item inserted in the previous scan
  is cleaned lazily (``remove_rmap_item_from_tree``, age 0 or 1) — so ``pages_unshared`` is the
  kernel's lazily maintained count, not the tree's size.
* **Checksum gate** (``calc_checksum`` vs ``oldchecksum``): a page enters the unstable tree (and,
  from 6.11, searches the stable tree) only if its content is unchanged since its previous visit.
* **Stable tree** with ``max_page_sharing`` chains and dups (``chain_prune`` / ``stable_node_dup``,
  pruning every ``stable_node_chains_prune_millisecs``, collapse of single-dup chains, the
  fullest-dup preference), stale nodes found through the keyhole check (``ksm_get_folio``) and
  removed with all their items unaccounted.
* **use_zero_pages** (after the gate; not counted in pages_shared/sharing; ``ksm_zero_pages``
  maintained eagerly by the engine), **smart_scan** (``should_skip_rmap_item``: age, skip_age,
  ``pages_skipped``), the **scan-time advisor** (``scan_time_advisor``, integer arithmetic, with the
  modelled ksmd CPU time), and the fork case (a KSM page reached through another mm is appended
  with the sharing limit bypassed).
* **Profiles**: ``6.11`` (default; checksum before the stable search, Chengming Zhou's series),
  ``6.12`` (6.11 plus: splitting a THP maps its all-zero subpages to the shared zero page),
  ``6.10`` (stable search first: a page equal to a KSM page merges on its first visit; and the
  pre-6.11 ``stable_node_dup``: only a dup below the sharing limit is chosen, a chain collapses
  only when a pruning lookup finds exactly one live dup (``prune_stale_stable_nodes && nr == 1``),
  and with every dup full the search takes ``stable_node_dup_any``; 6.11+ collapses a chain left
  with a single dup at every lookup),
  ``3.18`` (stable search first, jhash2 checksum, no smart_scan, no zero pages, no chains, no
  advisor, a stale node in a search is a miss rather than a restart).
* **Counters** exactly as the kernel keeps them, lazily where it is lazy: ``pages_shared``,
  ``pages_sharing``, ``pages_unshared``, ``pages_volatile`` (= rmap items − shared − sharing −
  unshared, floored at 0), ``full_scans``, ``pages_scanned``, ``pages_skipped``, ``ksm_zero_pages``,
  ``general_profit`` (= (sharing + zero pages) × 4096 − rmap items × 64), ``stable_node_chains``,
  ``stable_node_dups``.  A write to a merged page is a COW break in the engine at once, but the
  counters change only when ksmd next visits that address.

Where it deliberately differs (each measured or argued in ``docs/policies.md``):

* Trees are modelled as maps keyed by content: a search visits the node of equal content if there
  is one, and pays ``bit_length(tree size)`` node visits (memcmp + page lookup) as its cost.  The
  kernel's real tree shape is not modelled, so a search never aborts on a *different* node whose
  page vanished, and a node whose page changed after insertion into the unstable tree is simply
  never matched (the kernel may also mis-steer other searches around it).
* Merges never fail for page-lock contention, extra references (GUP pins) or -EBUSY migration; the
  page's content is the snapshot's content at the visit's virtual time.
* One NUMA node (``merge_across_nodes`` has no effect); no swap; ``run=2`` is not modelled.
* A THP is split before a merge touches one of its subpages; if the split maps the page itself to
  the zero page (6.12+), the visit ends there (the kernel's merge fails with -EFAULT).
"""
from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.base import Params, Policy, param
from ksmtrace.policies.ksm.runtime import PROFILES, KsmRuntime
from ksmtrace.policies.sameaddr import same_address_first_param, same_address_key_param


@dataclass(frozen=True)
class KsmParams(Params):
    profile: str = param("6.11", "kernel behaviour to reproduce", choices=PROFILES)
    pages_to_scan: int = param(100, "pages handed to cmp_and_merge_page per wake-up", "pages", minimum=1)
    sleep_millisecs: int = param(20, "sleep between wake-ups", "ms", minimum=0)
    smart_scan: bool = param(True, "skip pages that repeatedly failed to merge (6.7+; forced off for 3.18)")
    use_zero_pages: bool = param(False, "merge all-zero pages with the kernel zero page (4.11+; off for 3.18)")
    max_page_sharing: int = param(256, "mappings per KSM page before a new dup is started (4.13+; unbounded for 3.18)", "mappings", minimum=2)
    stable_node_chains_prune_millisecs: int = param(2000, "how often a chain's stale dups are pruned", "ms", minimum=0)
    advisor_mode: str = param("none", "scan-time advisor tunes pages_to_scan (6.8+)", choices=("none", "scan-time"))
    advisor_target_scan_time: int = param(200, "advisor: target full-scan time", "s", minimum=1)
    advisor_max_cpu: int = param(70, "advisor: CPU cap", "%", minimum=1, maximum=100)
    advisor_min_pages_to_scan: int = param(500, "advisor: initial pages_to_scan", "pages", minimum=1)
    advisor_max_pages_to_scan: int = param(30000, "advisor: maximum pages_to_scan", "pages", minimum=1)
    range_walk: bool = param(False, "the kernel jumps over holes in mergeable VMAs (f5548c318d65: 6.18, 6.12.59+, 5.10.249+); "
                                    "off: every 4 KiB address of a mergeable VMA with an anon_vma is looked up")
    same_address_first: bool = same_address_first_param()
    same_address_key: str = same_address_key_param()

    def check(self) -> None:
        if self.profile == "3.18":
            # features 3.18 does not have are off, whatever the defaults say
            object.__setattr__(self, "smart_scan", False)
            if self.use_zero_pages:
                raise PolicyParamError("parameter use_zero_pages: the 3.18 profile has no use_zero_pages")
            if self.advisor_mode != "none":
                raise PolicyParamError("parameter advisor_mode: the 3.18 profile has no advisor")
        if self.advisor_min_pages_to_scan > self.advisor_max_pages_to_scan:
            raise PolicyParamError("advisor_min_pages_to_scan must not exceed advisor_max_pages_to_scan")


class KSM(Policy):
    """Mainline Linux KSM (see the module docstring for what is modelled and where it differs)."""

    name = "ksm"
    summary = "mainline Linux KSM: mm/VMA/address scan, stable+unstable trees, checksum gate, chains, smart_scan, advisor"
    Params = KsmParams
    default_scope = "recorded"
    kernel_counters = (
        "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
        "pages_scanned", "pages_skipped", "ksm_zero_pages", "general_profit",
        "stable_node_chains", "stable_node_dups", "rmap_items", "pages_to_scan",
    )

    _ADV = {"advisor_mode": "scan-time"}
    # a heavy clock (10 ms per page visit) so that full scans take seconds and the advisor's CPU
    # percentage is large enough for its target and CPU cap to bind
    _ADV_SLOW = {"advisor_mode": "scan-time", "advisor_min_pages_to_scan": 20, "sleep_millisecs": 100,
                 "timing_cost": {"pages_visited": 10_000_000}}
    sensitivity = {
        "profile": ("6.10", "mixed", {}),
        "pages_to_scan": (37, "mixed", {}),
        "sleep_millisecs": (7, "mixed", {}),
        "smart_scan": (False, "mixed", {}),
        "use_zero_pages": (True, "mixed", {}),
        "max_page_sharing": (3, "mixed", {}),
        "stable_node_chains_prune_millisecs": (0, "mixed", {"max_page_sharing": 3}),
        "advisor_mode": ("scan-time", "mixed", {}),
        "advisor_target_scan_time": (1, "mixed-slow", _ADV_SLOW),
        "advisor_max_cpu": (1, "mixed-slow", {**_ADV_SLOW, "advisor_target_scan_time": 1}),
        "advisor_min_pages_to_scan": (50, "mixed", _ADV),
        "advisor_max_pages_to_scan": (600, "mixed", _ADV),
        "range_walk": (True, "mixed", {}),
        "same_address_first": (True, "families", {}),
        "same_address_key": ("any", "families", {"same_address_first": True}),
    }

    Runtime = KsmRuntime
    kernel = "ksmtrace.policies.ksm.kernel:KsmKernel"

    @classmethod
    def budget_limit(cls, params):
        if params.advisor_mode == "scan-time":
            return ("pages_scanned", params.advisor_max_pages_to_scan)
        return ("pages_scanned", params.pages_to_scan)
