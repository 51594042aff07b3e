"""``pagecache``: a what-if — deduplicating the page cache across files.

Mainline KSM merges anonymous pages only: ``ksm_compatible()`` (mm/ksm.c) refuses a VMA with
``VM_SHARED`` (and ``VM_MAYSHARE``, ``VM_PFNMAP``, ``VM_IO``, ``VM_DONTEXPAND``, ``VM_HUGETLB``,
``VM_MIXEDMAP``, ``VM_DROPPABLE``), DAX and ``VM_SAO``/``VM_SPARC_ADI``; ``ksm_madvise`` and the
merge-any path go through it; and ``scan_get_next_rmap_item`` walks only VMAs with an
``anon_vma``, taking a page only when ``folio_test_anon(folio)``.  A file page of a private
mapping becomes mergeable only after a write has COW-copied it into an anonymous page.  So
libraries carried as different files (containers, virtualenvs, copies of one tree) are held once
per file in the page cache however equal their contents, and this policy asks how much memory a
page-cache deduplicator would save, and at what risk.

What it models (``docs/policies-pagecache.md``), on the ``file`` scope
(:mod:`ksmtrace.trace.pagecache`: page ids are page-cache pages ``(device, inode, index)``, a
"process" is a file's address space):

* **a scanner** (``pagecache_scand``) that wakes every ``sleep_millisecs`` and visits
  ``pages_to_scan`` resident clean page-cache pages per wake-up, each file's pages in index order
  and the files in (device, inode) order, cyclically; pages that are not candidates are walked over
  (``addresses_walked``) without using budget;
* **one table keyed by the full-page hash** (the content id): the first page seen with a content
  is a hint; the second (of another file) is compared in full and both share one write-protected
  frame (the hint's); later pages of that content are compared and remapped onto it.  A page
  already on a shared frame is skipped without a hash;
* **across files only**: with ``within_file=0`` (default) a page is never merged onto a frame that
  already holds a page of its own file — a folio has one ``(mapping, index)``, so a real page-cache
  deduplicator shares a folio between files, not between offsets of one file (counted as
  ``same_file_skips``); ``within_file=1`` lifts the rule (the bound of merging by content alone);
* ``mapped_only=1`` merges only pages a target maps (a deduplicator that leaves the unmapped page
  cache to reclaim);
* **clean pages only, and a write breaks the file's sharing**: dirty or under-writeback pages are
  not candidates, and a file written in an interval — a page's content changed, a page is dirty,
  or its mtime or size moved (a ``write()``) — has every merged page copied back (COW breaks in
  ``cow_ksm``; ``file_breaks`` counts the files whose sharing broke);
* **what the saving is made of**: each shared frame keeps one page and frees the others; the
  freed frames are split by what the kernel would have done with them anyway —
  ``saved_reclaimable``: clean, unmapped and inactive page cache, which reclaim drops first under
  pressure (the saving is real only while memory is plentiful); ``saved_active``: pages a target
  maps or that sit on an active LRU list (the kept page is one of these when the frame has one).

Where it deliberately differs from any implementation: the scanner is KSM-like (a real design
would more likely dedup at read time, by fingerprint, as EROFS's page-cache sharing does for
files with equal fingerprints) — the saving it reaches is the same once a scan has passed; the
table holds hashes without a memory cost; merges never fail on locked or pinned folios; a file
written between two snapshots is seen as written at the second one (every merged page of it
copied then); readahead and reclaim are the trace's (the replay does not give back the memory a
merge frees to the page cache); all-zero file pages are merged like any content (not onto the
zero page).
"""
from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.policies.base import Params, Policy, param
from ksmtrace.policies.pagecache.runtime import PageCacheRuntime


@dataclass(frozen=True)
class PageCacheParams(Params):
    pages_to_scan: int = param(100, "page-cache pages visited per wake-up", "pages", minimum=1)
    sleep_millisecs: int = param(20, "sleep between wake-ups of the scanner", "ms", minimum=0)
    within_file: bool = param(False, "also merge equal pages at different offsets of one file (not possible for a folio)")
    mapped_only: bool = param(False, "merge only pages a target maps (leave the unmapped page cache to reclaim)")


class PageCache(Policy):
    """Deduplication of the page cache across files, a what-if (see the module docstring)."""

    name = "pagecache"
    summary = "what-if: dedup of equal clean page-cache pages across files; writes break a file's sharing"
    Params = PageCacheParams
    default_scope = "file"
    kernel_counters = (
        "shared_frames", "sharing_pages", "saved_reclaimable", "saved_active", "file_breaks",
        "same_file_skips", "pages_scanned",
    )
    sensitivity = {
        "pages_to_scan": (7, "pagecache", {}),
        "sleep_millisecs": (200, "pagecache", {}),
        "within_file": (True, "pagecache", {}),
        "mapped_only": (True, "pagecache", {}),
    }

    @classmethod
    def budget_limit(cls, params):
        """At most ``pages_to_scan`` pages visited per wake-up."""
        return ("pages_scanned", params.pages_to_scan)

    Runtime = PageCacheRuntime
    kernel = "ksmtrace.policies.pagecache.kernel:PageCacheKernel"
