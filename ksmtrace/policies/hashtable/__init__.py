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

from ksmtrace.policies.base import Params, Policy, param
from ksmtrace.policies.hashtable.runtime import HashTableRuntime


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

    Runtime = HashTableRuntime
    kernel = "ksmtrace.policies.hashtable.kernel:HashTableKernel"
