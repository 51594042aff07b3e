"""The trace format: the single source of truth for tables, columns, flag bits and the version.

A trace is a directory::

    TRACE/
      manifest.json            format name + version, host facts, capture options, committed snapshots
      pages/snap-000000.parquet      one file per snapshot: the page rows of that snapshot (delta encoded)
      vmas/snap-000000.parquet       every VMA in scope of every target at that snapshot
      processes/snap-000000.parquet  every target process at that snapshot
      ksm/snap-000000.parquet        ground truth: /sys/kernel/mm/ksm/*, cow_ksm, ksmd CPU (if KSM exists)
      ksm_stat/snap-000000.parquet   ground truth: /proc/PID/ksm_stat of every target
      contents/snap-000000.parquet   page contents, content-addressed (only with --contents)
      faults/snap-000000.parquet     kernel events: user write faults of the targets (version 2)
      ksm_events/snap-000000.parquet kernel events: the ksm:* tracepoints (version 2)
      vma_files/snap-000000.parquet  page cache: the file (dev, inode, offset) behind each file VMA (version 2)
      files/snap-000000.parquet      page cache: every file mapped or listed, its size, mtime, cached pages (version 2)
      filepages/snap-000000.parquet  page cache: resident pages of the files under --files (version 2)

Any Parquet reader opens a table with a glob (``pl.scan_parquet("TRACE/pages/*.parquet")``).  Only
files of snapshots listed in the manifest are part of the trace; a file of a snapshot that was
being written when the capture died is ignored (see ``docs/trace-format.md``).

Page rows are delta encoded: snapshot 0 (and every keyframe) lists every page in scope; every
other snapshot lists only pages that appeared (``op=NEW``), changed content, flags or frame
(``op=CHANGED``) or vanished (``op=GONE``).  Keyframes also list unchanged pages (``op=SAME``).
"""
from __future__ import annotations

import pyarrow as pa

FORMAT_NAME = "ksmtrace-trace"
#: the version traces are written in.  Version 2 added the kernel-event tables (faults,
#: ksm_events), ksmd's run-queue wait (ksm.ksmd_wait_ns), the keyed PRF page hash (manifest
#: capture.hash.algorithm), the optional sampled hash at several strengths (STRENGTH_FIELDS) and
#: the page cache: the optional tables vma_files, files, filepages (``PAGECACHE_TABLES``) and the
#: page-cache flag bits F_DIRTY, F_WRITEBACK, F_ACTIVE.  A version-1 trace is read as a version-2
#: trace without them.
FORMAT_VERSION = 2
#: the versions this ksmtrace reads
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PAGE_SIZE = 4096

TABLES = ("pages", "vmas", "processes", "ksm", "ksm_stat", "contents", "faults", "ksm_events",
          "vma_files", "files", "filepages")
#: the page-cache tables (format version 2, optional: written by ``capture --scope all`` and ``--files``)
PAGECACHE_TABLES = ("vma_files", "files", "filepages")
#: tables added after format version 1 (name -> the version that added it): a trace of an older
#: version may not list them
ADDED_TABLES = {"faults": 2, "ksm_events": 2, "vma_files": 2, "files": 2, "filepages": 2}


def snapshot_file(table: str, snap: int) -> str:
    """Relative path of one table's file for one snapshot."""
    return f"{table}/snap-{snap:06d}.parquet"


# --- page row operations --------------------------------------------------------------------
OP_NEW = 0  # (proc, vpn) not mapped at the previous snapshot
OP_CHANGED = 1  # mapped before and now; hash, flags or frame differ
OP_GONE = 2  # mapped before, not now (unmapped, out of scope, or the process exited)
OP_SAME = 3  # unchanged; only written in keyframes

# --- page flag bits (column ``flags``, uint32) -------------------------------------------------
F_PRESENT = 1 << 0  # pagemap bit 63
F_SWAPPED = 1 << 1  # pagemap bit 62
F_EXCLUSIVE = 1 << 2  # pagemap bit 56: mapped exclusively
F_FILE = 1 << 3  # pagemap bit 61: file page or shared anonymous
F_SOFT_DIRTY = 1 << 4  # pagemap bit 55 (only meaningful when the manifest says soft_dirty)
F_ZERO_FILLED = 1 << 5  # content is all zero bytes (decided at capture, from the keyed hash)
F_ANON = 1 << 6  # an anonymous page (kpageflags ANON, or private VMA and not F_FILE)
F_THP = 1 << 7  # part of a transparent huge page (kpageflags THP)
F_KSM = 1 << 8  # a KSM page of the real kernel (kpageflags KSM)
F_ZERO_PAGE = 1 << 9  # maps the kernel's shared zero page (kpageflags ZERO_PAGE / zero PFN)
F_MERGEABLE = 1 << 10  # its VMA is marked mergeable (smaps VmFlags "mg")
F_PFN = 1 << 11  # the pfn column is real (root); else 0
F_KPF = 1 << 12  # kpageflags were readable for this page
F_READ_FAILED = 1 << 13  # present, but the content could not be read (hash is not valid)
F_HUGETLB = 1 << 14  # hugetlbfs page (never scanned by KSM)
# version 2, from kpageflags (only with F_KPF): the page-cache state of a file page
F_DIRTY = 1 << 15  # kpageflags DIRTY (bit 4): written, not yet written back
F_WRITEBACK = 1 << 16  # kpageflags WRITEBACK (bit 8): being written back
F_ACTIVE = 1 << 17  # kpageflags ACTIVE (bit 6): on an active LRU list (recently used twice)

FLAG_NAMES = {
    "present": F_PRESENT,
    "swapped": F_SWAPPED,
    "exclusive": F_EXCLUSIVE,
    "file": F_FILE,
    "soft_dirty": F_SOFT_DIRTY,
    "zero_filled": F_ZERO_FILLED,
    "anon": F_ANON,
    "thp": F_THP,
    "ksm": F_KSM,
    "zero_page": F_ZERO_PAGE,
    "mergeable": F_MERGEABLE,
    "pfn_known": F_PFN,
    "kpf_known": F_KPF,
    "read_failed": F_READ_FAILED,
    "hugetlb": F_HUGETLB,
    "dirty": F_DIRTY,
    "writeback": F_WRITEBACK,
    "active": F_ACTIVE,
}

# --- VMA flag bits (column ``flags`` of the vmas table) ------------------------------------
V_MERGEABLE = 1 << 0
V_ANON = 1 << 1  # no backing file (anonymous, heap or stack)
V_PRIVATE = 1 << 2
V_FILE = 1 << 3
V_STACK = 1 << 4
V_HEAP = 1 << 5
V_HUGEPAGE = 1 << 6  # VmFlags "hg" (madvise(MADV_HUGEPAGE))
V_NOHUGEPAGE = 1 << 7  # VmFlags "nh"
V_LOCKED = 1 << 8
V_IN_SCOPE = 1 << 9  # captured under the trace's scope
V_SHARED = 1 << 10

# --- Arrow schemas -------------------------------------------------------------------------
PAGES_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("proc", pa.uint32(), nullable=False),  # trace-unique process incarnation id
        pa.field("pid", pa.uint32(), nullable=False),
        pa.field("vpn", pa.uint64(), nullable=False),  # virtual address >> 12
        pa.field("op", pa.uint8(), nullable=False),
        pa.field("hash", pa.uint64(), nullable=False),  # keyed xxh3_64 of the 4 KiB content
        pa.field("flags", pa.uint32(), nullable=False),
        pa.field("pfn", pa.uint64(), nullable=False),
    ]
)
# optional fingerprints (capture --fingerprints): PKSM/UKSM sampled hash and prefix hashes
SAMPLE_FIELD = pa.field("sample", pa.uint32(), nullable=False)
PREFIX_LENGTHS = (64, 256, 1024)
PREFIX_FIELDS = [pa.field(f"pfx{n}", pa.uint32(), nullable=False) for n in PREFIX_LENGTHS]
# optional (format version 2): the sampled hash at several strengths of the SAME word permutation
# as ``sample`` -- the PKSM/UKSM hash state after the first s permuted words, s in SAMPLE_STRENGTHS.
# ``sample`` is strength 64, so the trace holds one column per strength: sample8, sample16,
# sample32, sample (64), sample128, sample256, sample512, sample1024.
SAMPLE_WORDS = 64
SAMPLE_STRENGTHS = (8, 16, 32, 64, 128, 256, 512, 1024)

#: a trace without a ``vmas`` table: a gap of more than this many pages between two pages of a
#: process separates the VMAs a replay synthesises (and that a redaction keeps apart)
SYNTH_VMA_GAP = 1024
STRENGTH_FIELDS = [pa.field(f"sample{n}", pa.uint32(), nullable=False) for n in SAMPLE_STRENGTHS if n != SAMPLE_WORDS]


def strength_column(strength: int) -> str:
    """The pages column holding the sampled hash at ``strength`` words."""
    if strength not in SAMPLE_STRENGTHS:
        raise ValueError(f"no column for strength {strength} (strengths: {SAMPLE_STRENGTHS})")
    return "sample" if strength == SAMPLE_WORDS else f"sample{strength}"

VMAS_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("proc", pa.uint32(), nullable=False),
        pa.field("pid", pa.uint32(), nullable=False),
        pa.field("start", pa.uint64(), nullable=False),
        pa.field("end", pa.uint64(), nullable=False),
        pa.field("perms", pa.string(), nullable=False),
        pa.field("flags", pa.uint32(), nullable=False),
        pa.field("vmflags", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("rss_pages", pa.uint64(), nullable=False),
        pa.field("anon_pages", pa.uint64(), nullable=False),
        pa.field("captured_pages", pa.uint64(), nullable=False),
    ]
)

PROCESSES_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("proc", pa.uint32(), nullable=False),
        pa.field("pid", pa.uint32(), nullable=False),
        pa.field("ppid", pa.uint32(), nullable=False),
        pa.field("start_ticks", pa.uint64(), nullable=False),  # /proc/PID/stat field 22
        pa.field("comm", pa.string(), nullable=False),
        pa.field("cmdline", pa.string(), nullable=False),
        pa.field("cgroup", pa.string(), nullable=False),
        pa.field("uid", pa.uint32(), nullable=False),
        pa.field("state", pa.string(), nullable=False),  # ok | exited | partial | denied
        pa.field("rss_pages", pa.uint64(), nullable=False),
        pa.field("anon_pages", pa.uint64(), nullable=False),
        pa.field("captured_pages", pa.uint64(), nullable=False),
        pa.field("mergeable", pa.bool_(), nullable=False),  # has a mergeable VMA or merge_any
        pa.field("merge_any", pa.bool_(), nullable=False),
        pa.field("t_read_ns", pa.int64(), nullable=False),  # monotonic time this process was read
    ]
)

# /sys/kernel/mm/ksm/* numeric files we sample (missing files are null)
KSM_COUNTERS = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "merge_across_nodes",
    "use_zero_pages",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "smart_scan",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)
KSM_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),  # the snapshot this sample belongs to
        pa.field("t_ns", pa.int64(), nullable=False),  # monotonic ns
        pa.field("advisor_mode", pa.string()),
    ]
    + [pa.field(name, pa.int64()) for name in KSM_COUNTERS]
    + [
        pa.field("cow_ksm", pa.int64()),
        pa.field("ksm_swpin_copy", pa.int64()),
        pa.field("ksmd_cpu_ns", pa.int64()),  # /proc/<ksmd>/schedstat run time
        pa.field("ksmd_wait_ns", pa.int64()),  # /proc/<ksmd>/schedstat run-queue wait (version 2)
    ]
)

KSM_STAT_FIELDS = (
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_merging_pages",
    "ksm_process_profit",
)
KSM_STAT_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("t_ns", pa.int64(), nullable=False),
        pa.field("proc", pa.uint32(), nullable=False),
        pa.field("pid", pa.uint32(), nullable=False),
    ]
    + [pa.field(name, pa.int64()) for name in KSM_STAT_FIELDS]
    + [pa.field("ksm_merge_any", pa.bool_()), pa.field("ksm_mergeable", pa.bool_())]
)

CONTENTS_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("hash", pa.uint64(), nullable=False),
        pa.field("data", pa.binary(), nullable=False),  # 4096 bytes; Parquet zstd compresses it
    ]
)

# --- kernel events (capture --kernel-events; format version 2) ------------------------------------
# One row per user-mode write fault of a target process (exceptions:page_fault_user with the write
# bit of the x86 error code), in the snapshot whose interval holds it: t_end_ns of the previous
# snapshot < t_ns <= t_end_ns of this one.  A write to a write-protected page (a KSM page, a page a
# fork shares, the zero page) faults, and that fault is the COW break; a first write to a page that
# was not present faults too (``present`` false).  Writes to pages already writable never fault.
FAULTS_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("t_ns", pa.int64(), nullable=False),  # CLOCK_MONOTONIC ns (the snapshots' clock)
        pa.field("proc", pa.uint32()),  # the process incarnation, null if it was never captured
        pa.field("pid", pa.uint32(), nullable=False),  # thread group id (tid where unknown)
        pa.field("tid", pa.uint32(), nullable=False),  # the faulting thread
        pa.field("vpn", pa.uint64(), nullable=False),  # faulting address >> 12
        pa.field("address", pa.uint64(), nullable=False),
        pa.field("error_code", pa.uint32(), nullable=False),  # x86: bit 0 present, 1 write, 2 user, 4 fetch
        pa.field("write", pa.bool_(), nullable=False),
        pa.field("present", pa.bool_(), nullable=False),  # a protection fault on a mapped page (COW)
        pa.field("prev_flags", pa.uint32()),  # the page's F_* flags at the previous snapshot (null: not a row)
        pa.field("cpu", pa.uint16(), nullable=False),
    ]
)
# One row per ksm:* tracepoint hit (every process's, not only the targets': ksmd scans them all).
# Kernel pointers are never stored: ``mm`` and ``rmap_item`` are per-trace ids in order of first
# appearance.  Columns a tracepoint does not have are null.
KSM_EVENT_NAMES = (
    "ksm_start_scan",
    "ksm_stop_scan",
    "ksm_enter",
    "ksm_exit",
    "ksm_merge_one_page",
    "ksm_merge_with_ksm_page",
    "ksm_remove_ksm_page",
    "ksm_remove_rmap_item",
    "ksm_advisor",
)
KSM_EVENTS_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("t_ns", pa.int64(), nullable=False),
        pa.field("event", pa.string(), nullable=False),  # one of KSM_EVENT_NAMES
        pa.field("pid", pa.uint32(), nullable=False),  # the task that hit it (ksmd for the scan events)
        pa.field("mm", pa.uint32()),  # per-trace id of the mm_struct
        pa.field("rmap_item", pa.uint32()),  # per-trace id of the rmap_item
        pa.field("pfn", pa.uint64()),
        pa.field("err", pa.int32()),  # merge result (0: merged)
        pa.field("ksm_page", pa.bool_()),  # ksm_merge_with_ksm_page: merged into an existing KSM page
        pa.field("seq", pa.int32()),  # ksm_start_scan/stop_scan: the full-scan number
        pa.field("rmap_entries", pa.uint32()),
        pa.field("scan_time", pa.int64()),  # ksm_advisor: the last full scan's duration (s)
        pa.field("pages_to_scan", pa.uint64()),
        pa.field("cpu_percent", pa.uint32()),
        pa.field("cpu", pa.uint16(), nullable=False),
    ]
)

# --- page cache (format version 2) -----------------------------------------------------------
# the file behind every file-backed VMA of a target (``--scope all``): /proc/PID/maps' device,
# inode and offset.  ``dev`` is the kernel's dev_t as stat(2) reports it (os.makedev(major, minor)),
# so it joins ``files``; ``pgoff`` is the byte offset of ``start`` in the file.
VMA_FILES_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("proc", pa.uint32(), nullable=False),
        pa.field("pid", pa.uint32(), nullable=False),
        pa.field("start", pa.uint64(), nullable=False),  # joins vmas (proc, start)
        pa.field("end", pa.uint64(), nullable=False),
        pa.field("dev", pa.uint64(), nullable=False),
        pa.field("inode", pa.uint64(), nullable=False),
        pa.field("pgoff", pa.uint64(), nullable=False),  # byte offset in the file of ``start``
    ]
)
# one row per file per snapshot: every file a target maps (scope all) and every regular file under
# ``capture --files PATH`` with resident pages.  ``source``: FILE_MAPPED | FILE_LISTED bits.
FILE_MAPPED = 1  # a target maps it (it has a vma_files row)
FILE_LISTED = 2  # it is under a --files PATH (its resident pages are filepages rows)
FILES_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("dev", pa.uint64(), nullable=False),
        pa.field("inode", pa.uint64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.uint64(), nullable=False),  # st_size, bytes
        pa.field("mtime_ns", pa.int64(), nullable=False),  # st_mtime_ns
        pa.field("source", pa.uint8(), nullable=False),
        pa.field("cached_pages", pa.uint64(), nullable=False),  # resident pages (cachestat or mincore)
        pa.field("dirty_pages", pa.uint64(), nullable=False),  # cachestat nr_dirty (mincore: kpageflags count)
        pa.field("writeback_pages", pa.uint64(), nullable=False),
    ]
)
# the resident page-cache pages of the files under --files PATH, keyed by (dev, inode, index) and
# delta encoded like ``pages`` (op NEW/CHANGED/GONE/SAME); ``flags`` F_PRESENT|F_FILE and, from
# kpageflags, F_DIRTY, F_WRITEBACK, F_ACTIVE, F_KPF; F_ZERO_FILLED, F_READ_FAILED as in pages.
FILEPAGES_SCHEMA = pa.schema(
    [
        pa.field("snap", pa.uint32(), nullable=False),
        pa.field("dev", pa.uint64(), nullable=False),
        pa.field("inode", pa.uint64(), nullable=False),
        pa.field("index", pa.uint64(), nullable=False),  # page index in the file (offset >> 12)
        pa.field("op", pa.uint8(), nullable=False),
        pa.field("hash", pa.uint64(), nullable=False),  # the same keyed hash as pages.hash
        pa.field("flags", pa.uint32(), nullable=False),
        pa.field("pfn", pa.uint64(), nullable=False),
    ]
)

SCHEMAS = {
    "pages": PAGES_SCHEMA,
    "vmas": VMAS_SCHEMA,
    "processes": PROCESSES_SCHEMA,
    "ksm": KSM_SCHEMA,
    "ksm_stat": KSM_STAT_SCHEMA,
    "contents": CONTENTS_SCHEMA,
    "faults": FAULTS_SCHEMA,
    "ksm_events": KSM_EVENTS_SCHEMA,
    "vma_files": VMA_FILES_SCHEMA,
    "files": FILES_SCHEMA,
    "filepages": FILEPAGES_SCHEMA,
}

#: columns a table gained after format version 1 (name -> the version that added it): the files of
#: an older trace do not have them
ADDED_COLUMNS = {"ksm": {"ksmd_wait_ns": 2}}


def required_columns(table: str, version: int) -> list[str]:
    """The columns every file of ``table`` has in a trace of format ``version``."""
    return table_schema(table, version).names


def table_schema(table: str, version: int) -> pa.Schema:
    """The schema of ``table`` (not pages: see :func:`pages_schema_for`) in a trace of format
    ``version``: without the columns added by a later version."""
    added = ADDED_COLUMNS.get(table, {})
    return pa.schema([f for f in SCHEMAS[table] if added.get(f.name, 1) <= version])


def pages_schema(sample: bool = False, prefixes: bool = False, strengths: bool = False) -> pa.Schema:
    """The pages schema with the optional fingerprint columns (``strengths`` implies ``sample``)."""
    fields = list(PAGES_SCHEMA)
    if sample or strengths:
        fields.append(SAMPLE_FIELD)
    if prefixes:
        fields.extend(PREFIX_FIELDS)
    if strengths:
        fields.extend(STRENGTH_FIELDS)
    return pa.schema(fields)


def pages_schema_for(columns) -> pa.Schema:
    """The pages schema of a trace whose manifest lists ``columns`` (its optional columns kept)."""
    cols = set(columns)
    return pages_schema(sample="sample" in cols, prefixes=all(f.name in cols for f in PREFIX_FIELDS),
                        strengths=all(f.name in cols for f in STRENGTH_FIELDS))


def pages_layouts(version: int = FORMAT_VERSION) -> tuple[tuple[str, ...], ...]:
    """Every pages column layout a trace of format ``version`` may have."""
    combos = [(a, b, False) for a in (False, True) for b in (False, True)]
    if version >= 2:
        combos += [(True, b, True) for b in (False, True)]
    return tuple(tuple(pages_schema(*c).names) for c in combos)


# Parquet writer settings per table (measured in ../shared/reference/limits.md: zstd, DELTA on vpn,
# no dictionary on the hash column -> about 5.5 B per page row)
PARQUET_OPTIONS = {
    "pages": dict(
        compression="zstd",
        use_dictionary=["snap", "proc", "pid", "op", "flags"],
        column_encoding={"vpn": "DELTA_BINARY_PACKED"},
    ),
    "contents": dict(compression="zstd", use_dictionary=False),
    "filepages": dict(compression="zstd", use_dictionary=["snap", "dev", "inode", "op", "flags"],
                      column_encoding={"index": "DELTA_BINARY_PACKED"}),
}
# The small tables written at every snapshot (a few rows each): no column statistics, no embedded
# Arrow schema (the column types come back from Parquet's own logical types) and no dictionaries.
# That cuts each file from ~3-10 KB of footer to ~1-4 KB, so an idle snapshot costs ~12 KB instead
# of ~26 KB (bench/capture.py: 0.05 B per page-snapshot of a static 2 GiB process).
_SMALL_TABLE = dict(compression="zstd", use_dictionary=False, write_statistics=False, store_schema=False)
for _name in ("vmas", "processes", "ksm", "ksm_stat", "vma_files", "files"):
    PARQUET_OPTIONS[_name] = _SMALL_TABLE
DEFAULT_PARQUET_OPTIONS = dict(compression="zstd")
