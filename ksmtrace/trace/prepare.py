"""Turn a trace into the dense arrays the replay engine runs on (once per trace and scope).

What this computes, and the rules it applies (also in ``docs/replay-semantics.md``):

* **page ids** (``pg``): every (process, virtual page) ever seen, numbered in (process, address)
  order, so one process's pages are one contiguous range in address order — the order in which
  ksmd walks an mm.
* **content ids** (``cid``): the keyed page hashes, dictionary-encoded; ``cid 0`` is the all-zero
  page (flagged at capture time).  A page whose content could not be read gets a content id of its
  own that equals nothing else.
* **frame ids** (``gid``): which pages share one physical frame *without any deduplication*: pages
  showing the same PFN with the same content are one frame (fork COW sharing).  Pages the real
  kernel had already merged (kpageflags KSM) are *not* grouped — the replay simulates merging
  itself — and without PFNs (unprivileged capture) every page is its own frame.
* **candidates** under the scope: ``recorded`` = present anonymous pages of mergeable VMAs (what
  ksmd scans); ``anon`` = every present private anonymous page.  Pages mapping the kernel's shared
  zero page, swapped pages and hugetlb pages are never candidates.  ``file`` = the page cache
  (format version 2): resident clean pages of files, one page per (device, inode, index),
  prepared by :mod:`ksmtrace.trace.pagecache`.
* **events** per snapshot and page, from the page's previous row: ``APPEAR`` (became a candidate),
  ``GONE`` (stopped being one: unmapped, exited, swapped, zero-page mapped), ``UNMERGE`` (still a
  present anonymous page but no longer mergeable: the kernel breaks KSM sharing, a COW copy),
  ``WRITE`` (still a candidate and written: its content changed, its soft-dirty bit is set, or it
  stopped being a real-kernel KSM page), ``THP`` (only its huge-page membership changed).
* **baselines** per snapshot: candidate pages, frames with no dedup, the oracle's frames (distinct
  non-zero contents: perfect dedup with zero pages mapped to the zero page), and the hash-only
  duplicate count that naive studies quote.
* **fingerprints** per event, when captured: the sampled hash at strength 64 (``ev_sample``) and at
  every strength of ``schema.SAMPLE_STRENGTHS`` (``ev_strength``, format version 2).
* **VMAs** per snapshot (``vmas``, when the trace has the table): every VMA of a known process, in
  (process, start) order, in pages, with its ``V_*`` flags and its smaps VmFlags as a bit set
  (:data:`VMFLAG_BITS`) -- what a policy that walks VMAs (``uksm``) needs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace._version import __version__
from ksmtrace.errors import OutputError, TraceError
from ksmtrace.outputs import OutputDir, open_output_dir
from ksmtrace.trace import schema as S

SCOPES = ("recorded", "anon", "file")  # file: the page cache (ksmtrace.trace.pagecache)

EV_APPEAR = 1
EV_GONE = 2
EV_UNMERGE = 3
EV_WRITE = 4
EV_THP = 5
EVENT_NAMES = {EV_APPEAR: "appear", EV_GONE: "gone", EV_UNMERGE: "unmerge", EV_WRITE: "write", EV_THP: "thp"}

_PREP_VERSION = "10-strengths-vmas-procid"  # (a string: other branches' versions differ and share the cache directory)

#: smaps VmFlags mnemonics (fs/proc/task_mmu.c show_smap_vma_flags) -> bit of ``VmaTable.vmflags``
VMFLAG_BITS = {name: i for i, name in enumerate(
    "rd wr ex sh mr mw me ms gd pf dw lo io sr rr dc de ac nr ht sf nl ar wf dd sd mm hg nh mg bt mt um uw ss sl".split())}


def vmflag_mask(names: str) -> int:
    """The bit set of a space-separated list of VmFlags mnemonics (unknown ones are ignored)."""
    m = 0
    for n in names.split():
        b = VMFLAG_BITS.get(n)
        if b is not None:
            m |= 1 << b
    return m


@dataclass
class VmaTable:
    """The VMAs of every snapshot: rows of snapshot ``s`` are ``[off[s], off[s+1])``, sorted by
    (process, start); addresses in pages; ``proc`` is the dense process index of ``Prepared``."""

    off: np.ndarray  # int64 [n_snaps + 1]
    proc: np.ndarray  # int32
    start: np.ndarray  # int64 (vpn)
    end: np.ndarray  # int64 (vpn, exclusive)
    flags: np.ndarray  # uint32 (schema V_* bits)
    vmflags: np.ndarray  # int64 (VMFLAG_BITS bit set)


@dataclass
class Prepared:
    """Dense, engine-ready view of one trace under one scope."""

    scope: str
    trace_fingerprint: str
    times_ns: np.ndarray  # int64 [n_snaps], ns since the first snapshot
    n_pages: int
    page_proc: np.ndarray  # int32 [n_pages]
    page_vpn: np.ndarray  # int64 [n_pages]
    n_procs: int
    proc_pid: np.ndarray  # int64 [n_procs]
    proc_id: np.ndarray  # int64 [n_procs]: the trace's process id (``proc`` column of its tables)
    proc_comm: list[str]
    proc_domain: np.ndarray  # int32 [n_procs] security domain id (uid+cgroup)
    proc_first_snap: np.ndarray  # int32: first snapshot the process is seen in
    proc_reg_snap: np.ndarray  # int32: first snapshot at which the mm is registered (-1 never)
    proc_exit_snap: np.ndarray  # int32: first snapshot at which it is gone (n_snaps: never)
    proc_order: np.ndarray  # int32: processes sorted by registration (ksm_mm_head order)
    proc_pg_lo: np.ndarray  # int64 [n_procs]
    proc_pg_hi: np.ndarray  # int64 [n_procs]
    n_cids: int
    n_gids: int  # frame ids shared by several arrivals (fork); other arrivals get frames of their own
    n_thp: int
    off: np.ndarray  # int64 [n_snaps + 1]: events of snapshot s are [off[s], off[s+1])
    ev_pg: np.ndarray  # int32
    ev_kind: np.ndarray  # uint8 (EV_*)
    ev_cid: np.ndarray  # int32 (new content; -1 for GONE/UNMERGE)
    ev_gid: np.ndarray  # int64 frame with no dedup, when another arrival shares it; -1 = a frame of its own
    ev_thp: np.ndarray  # int64 (huge page id, -1 if not in a THP)
    ev_sample: np.ndarray | None  # uint32 sampled hash (PKSM/UKSM style) when captured
    base_pages: np.ndarray  # int64 [n_snaps] candidate pages
    base_frames: np.ndarray  # int64 [n_snaps] frames they use with no dedup
    oracle_frames: np.ndarray  # int64 [n_snaps] frames with perfect dedup
    zero_filled: np.ndarray  # int64 [n_snaps] candidate pages that are all zero
    zero_page_mapped: np.ndarray  # int64 [n_snaps] pages in scope mapping the shared zero page
    hash_dup_pages: np.ndarray  # int64 [n_snaps] present pages minus distinct hashes (naive count)
    extras: dict[str, Any] = field(default_factory=dict)
    ev_strength: np.ndarray | None = None  # uint32 [n_events, len(SAMPLE_STRENGTHS)] when captured
    vmas: VmaTable | None = None  # the vmas table, when the trace has one
    trace_identity: str = ""  # Trace.identity of the files it was built from (the cache checks it)

    @property
    def n_snaps(self) -> int:
        return len(self.times_ns)

    @property
    def oracle_saved(self) -> np.ndarray:
        return self.base_frames - self.oracle_frames

    def events(self, s: int) -> slice:
        return slice(int(self.off[s]), int(self.off[s + 1]))

    def event_frames(self, sl: slice) -> np.ndarray:
        """Frame ids of a slice of events, unique across the trace: an arrival whose frame no
        other arrival shares (``ev_gid == -1``) gets an id of its own (n_gids + event index)."""
        g = self.ev_gid[sl]
        own = np.arange(sl.start, sl.stop, dtype=np.int64) + self.n_gids
        return np.where(g >= 0, g, own)


# --- the prepared cache ---------------------------------------------------------------------
def cache_dir() -> Path | None:
    """Where prepared traces are cached: ``$KSMTRACE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ksmtrace/prepared``; when that cannot be used (not writable, not ours, or
    writable by others), a private ``ksmtrace-<uid>/prepared`` in the temporary directory; None
    (no cache) when neither can be used or ``KSMTRACE_NO_CACHE`` is set."""
    d = _open_cache_dir()
    if d is None:
        return None
    d.close()
    return d.path


def _open_cache_dir() -> OutputDir | None:
    if os.environ.get("KSMTRACE_NO_CACHE"):
        return None
    base = os.environ.get("KSMTRACE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ksmtrace", "prepared"
    )
    for path in (base, os.path.join(tempfile.gettempdir(), f"ksmtrace-{os.geteuid()}", "prepared")):
        try:
            return open_output_dir(path, mode=0o700, what="cache directory")
        except (OutputError, OSError):
            continue
    return None


def cache_key(trace, scope: str) -> str:
    """Names one prepared trace: the identity of every file of the trace (device, inode, size,
    mtime, ctime, Parquet rows: any change means a rebuild), the scope, and the version of the
    code that prepares it (the package version, this module's format and every jitted source)."""
    parts = f"{trace.fingerprint}:{trace.identity}:{scope}:{_PREP_VERSION}:{__version__}:{_jit.CODE_DIGEST}:{_trace_code_digest()}"
    return hashlib.sha256(parts.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _trace_code_digest() -> str:
    """Digest of the trace package's sources: a change to how any table is read or derived
    (not only the jitted parts) makes a new key, so an edited checkout never reads a stale cache."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:16]


def _load_cached(d: OutputDir, name: str, trace) -> Prepared | None:
    """A cached Prepared, if the file is ours and was built from exactly this trace."""
    try:
        fd = d.open_existing(name, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None  # a pickle another user could have written is never loaded
        with os.fdopen(os.dup(fd), "rb") as fh:
            prep = pickle.load(fh)
    except Exception:  # a damaged or foreign cache file is simply rebuilt
        return None
    finally:
        os.close(fd)
    if (isinstance(prep, Prepared) and prep.trace_identity == trace.identity and prep.trace_fingerprint == trace.fingerprint
            and all(f.name in prep.__dict__ for f in dataclasses.fields(Prepared))):  # (not an older layout)
        return prep
    return None


def prepare(trace, scope: str = "recorded", cache: bool = True) -> Prepared:
    """The engine-ready view of ``trace`` under ``scope``, from the cache when it holds one built
    from exactly these files by this code (``cache=False`` or ``KSMTRACE_NO_CACHE=1``: always
    rebuilt, nothing stored)."""
    if scope not in SCOPES:
        raise TraceError(f"unknown scope {scope!r} (scopes: {', '.join(SCOPES)})")
    trace.require_unchanged()  # the key names the files as they were opened: they must still be those
    d = _open_cache_dir() if cache else None
    try:
        name = f"{cache_key(trace, scope)}.pkl" if d is not None else ""
        if d is not None:
            prep = _load_cached(d, name, trace)
            if prep is not None:
                return prep
        prep = _prepare(trace, scope)
        if d is not None:
            try:
                d.write_atomic(name, lambda fh: pickle.dump(prep, fh, protocol=pickle.HIGHEST_PROTOCOL), mode=0o600, sync=False)
            except OutputError:
                pass  # a full or read-only cache only costs the next run a rebuild
        return prep
    finally:
        if d is not None:
            d.close()


@njit(cache=True)
def _hash_ids(keys):
    """Dense ids of int64 keys in order of first appearance (open addressing, O(n))."""
    n = len(keys)
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    slot_key = np.empty(cap, np.int64)
    slot_id = np.full(cap, -1, np.int64)
    ids = np.empty(n, np.int64)
    uniq = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        key = keys[i]
        h = (key * -7046029254386353131) & mask  # multiplicative hashing (0x9E3779B97F4A7C15)
        while True:
            j = slot_id[h]
            if j < 0:
                slot_key[h] = key
                slot_id[h] = k
                uniq[k] = key
                ids[i] = k
                k += 1
                break
            if slot_key[h] == key:
                ids[i] = j
                break
            h = (h + 1) & mask
    return ids, uniq[:k]


def _dense(key: np.ndarray, ordered: bool = False) -> tuple[np.ndarray, int]:
    """Dense ids (0..k-1) of int64 keys: in key order if ``ordered``, else in order of appearance."""
    if len(key) == 0:
        return np.zeros(0, np.int64), 0
    ids, uniq = _hash_ids(np.ascontiguousarray(key, dtype=np.int64))
    if not ordered:
        return ids, len(uniq)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(uniq, kind="stable")] = np.arange(len(uniq))
    return rank[ids], len(uniq)


def _dense2(a: np.ndarray, b: np.ndarray, ordered: bool = False) -> tuple[np.ndarray, int]:
    """Dense ids of pairs (a, b) of non-negative ints (in (a, b) order if ``ordered``)."""
    if len(a) == 0:
        return np.zeros(0, np.int64), 0
    bmax = int(b.max()) + 1
    amax = int(a.max()) + 1
    if amax < (1 << 62) // max(bmax, 1):
        return _dense(a.astype(np.int64) * bmax + b.astype(np.int64), ordered)
    order = np.lexsort((b, a))
    sa, sb = a[order], b[order]
    new = np.ones(len(a), dtype=bool)
    new[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    ids = np.cumsum(new) - 1
    out = np.empty(len(a), np.int64)
    out[order] = ids
    return out, int(ids[-1]) + 1


@njit(cache=True)
def _previous_rows(pg, n_pages):
    """Index of the previous row of the same page (rows in snapshot order), or -1."""
    last = np.full(n_pages, -1, np.int64)
    prev = np.empty(len(pg), np.int64)
    for i in range(len(pg)):
        prev[i] = last[pg[i]]
        last[pg[i]] = i
    return prev


def _prepare(trace, scope: str) -> Prepared:
    if scope == "file":
        from ksmtrace.trace.pagecache import prepare_file

        return prepare_file(trace, scope)
    n_snaps = trace.n_snapshots
    times = np.asarray(trace.times_ns, dtype=np.int64)
    cols = ["snap", "proc", "pid", "vpn", "op", "hash", "flags", "pfn"]
    has_sample = trace.has_sample_hash
    if has_sample:
        cols.append("sample")
    strength_cols = [S.strength_column(x) for x in S.SAMPLE_STRENGTHS] if trace.has_sample_strengths else []
    cols += [c for c in strength_cols if c not in cols]
    rows = trace.read_table("pages", columns=cols)
    op = rows["op"].to_numpy()
    _check_values(trace, rows, op)

    # --- processes -------------------------------------------------------------------------
    procs = _process_table(trace, rows)
    n_procs = procs.height
    # dense process indices (procs is sorted by proc): nothing is sized by an id's value
    proc_ids = procs["proc"].to_numpy().astype(np.int64)

    # --- page ids: (process, virtual page) numbered in that order -----------------------------
    row_proc = np.searchsorted(proc_ids, rows["proc"].to_numpy().astype(np.int64))
    vpn = rows["vpn"].to_numpy().astype(np.int64)
    pg, n_pages = _dense2(row_proc, vpn, ordered=True)
    snap = rows["snap"].to_numpy().astype(np.int64)
    _check_deltas(trace, snap, pg, op, n_pages, row_proc, vpn, proc_ids)
    keep_rows = op != S.OP_SAME  # unchanged pages listed by keyframes: no event
    if not keep_rows.all():
        rows = rows.filter(pl.Series(keep_rows))
        op, row_proc, vpn, pg, snap = op[keep_rows], row_proc[keep_rows], vpn[keep_rows], pg[keep_rows], snap[keep_rows]
    page_proc = np.zeros(n_pages, np.int32)
    page_vpn = np.zeros(n_pages, np.int64)
    page_proc[pg] = row_proc
    page_vpn[pg] = vpn
    proc_pg_lo = np.searchsorted(page_proc, np.arange(n_procs), side="left").astype(np.int64)
    proc_pg_hi = np.searchsorted(page_proc, np.arange(n_procs), side="right").astype(np.int64)

    # --- rows in (snapshot, page) order --------------------------------------------------------
    order_key = snap * max(n_pages, 1) + pg
    if len(order_key) > 1 and not bool(np.all(order_key[1:] > order_key[:-1])):
        order = np.argsort(order_key, kind="stable")
    else:
        order = None

    def col(name, dtype=None):
        a = rows[name].to_numpy()
        if order is not None:
            a = a[order]
        return a.astype(dtype) if dtype is not None else a

    if order is not None:
        snap = snap[order]
        pg = pg[order]
        row_proc = row_proc[order]
        op = op[order]
    flags = col("flags", np.int64)
    hashes = col("hash")
    pfn = col("pfn", np.int64)
    n = len(pg)
    healed = _capture_gaps(trace, snap, pg, op, flags, hashes, n_pages)
    if healed is not None:  # rows the capture dropped while the real KSM remapped them: see _capture_gaps
        r, p = healed
        op, flags, hashes, pfn = op.copy(), flags.copy(), hashes.copy(), pfn.copy()
        op[r], flags[r], hashes[r], pfn[r] = S.OP_CHANGED, flags[p], hashes[p], pfn[p]

    mapped = op != S.OP_GONE
    present = mapped & ((flags & S.F_PRESENT) != 0) & ((flags & S.F_SWAPPED) == 0)
    anon = (flags & S.F_ANON) != 0
    zp = (flags & S.F_ZERO_PAGE) != 0
    huge = (flags & S.F_HUGETLB) != 0
    in_scope = (flags & S.F_MERGEABLE) != 0 if scope == "recorded" else np.ones(n, dtype=bool)
    anon_present = present & anon & ~zp & ~huge
    cand = anon_present & in_scope
    zp_now = present & zp & in_scope
    # pages the *real* kernel merged with the zero page (use_zero_pages) stay zero-filled candidates:
    # the replay simulates that merge itself (see _real_ksm_zero_merges)
    kz = _real_ksm_zero_merges(trace, pg, snap, flags, cand, zp_now)
    if kz is not None:
        cand |= kz
        zp_now &= ~kz

    # content ids: 0 = zero-filled; unreadable pages get a content of their own
    zero_filled = (flags & S.F_ZERO_FILLED) != 0
    unreadable = (flags & S.F_READ_FAILED) != 0
    cid = np.full(n, -1, dtype=np.int64)
    normal = cand & ~zero_filled & ~unreadable
    n_cids = 1
    if normal.any():
        inv, k = _dense(hashes[normal].view(np.int64))
        cid[normal] = inv + 1
        n_cids = k + 1
    cid[cand & zero_filled & ~unreadable] = 0
    bad = cand & unreadable
    if bad.any():
        cid[bad] = n_cids + np.arange(int(bad.sum()))
        n_cids += int(bad.sum())

    # frame ids: (pfn, content) for real, non-KSM frames; otherwise one frame per row
    ksm_flag = (flags & S.F_KSM) != 0
    pfn_known = (flags & S.F_PFN) != 0
    groupable = cand & pfn_known & ~ksm_flag & ~zp & (pfn != 0)  # the zero page is not a frame of theirs
    gid = np.full(n, -1, dtype=np.int64)
    n_gids = 1  # gid 0 is reserved for the shared zero page
    if groupable.any():
        g, k = _dense2(pfn[groupable], cid[groupable])
        gid[groupable] = g + 1
        n_gids = k + 1
    single = cand & ~groupable
    if single.any():
        gid[single] = n_gids + np.arange(int(single.sum()))
        n_gids += int(single.sum())

    # THP membership: (process, PMD-aligned pfn)
    thp_flag = present & ((flags & S.F_THP) != 0) & pfn_known
    thp = np.full(n, -1, dtype=np.int64)
    n_thp = 0
    if thp_flag.any():
        t, n_thp = _dense2(row_proc[thp_flag], pfn[thp_flag] >> 9)
        thp[thp_flag] = t

    # previous row of the same page
    prev = _previous_rows(pg, n_pages)
    if kz is not None and kz.any():
        _carry_thp(thp, prev, np.flatnonzero(kz))
    has_prev = prev >= 0
    pidx = prev[has_prev]
    cand_prev = np.zeros(n, dtype=bool)
    cand_prev[has_prev] = cand[pidx]
    zp_prev = np.zeros(n, dtype=bool)
    zp_prev[has_prev] = zp_now[pidx]
    cid_prev = np.full(n, -1, dtype=np.int64)
    cid_prev[has_prev] = cid[pidx]
    ksm_prev = np.zeros(n, dtype=bool)
    ksm_prev[has_prev] = ksm_flag[pidx]
    thp_prev = np.full(n, -1, dtype=np.int64)
    thp_prev[has_prev] = thp[pidx]
    soft_dirty = (flags & S.F_SOFT_DIRTY) != 0 if trace.capture.get("soft_dirty") else np.zeros(n, bool)

    kind = np.zeros(n, dtype=np.uint8)
    kind[~cand_prev & cand] = EV_APPEAR
    gone = cand_prev & ~cand
    kind[gone] = EV_GONE
    kind[gone & anon_present] = EV_UNMERGE  # still a present anon page, no longer mergeable
    both = cand_prev & cand
    written = both & ((cid != cid_prev) | soft_dirty | (ksm_prev & ~ksm_flag))
    kind[written] = EV_WRITE
    kind[both & ~written & (thp != thp_prev)] = EV_THP
    # a fork child's pages that map a page the *real* kernel had merged are its parent's frame
    # (without dedup they would be fork-shared): see _fork_inherited_ksm
    _fork_inherited_ksm(trace, procs, pg, snap, row_proc, page_vpn, proc_pg_lo, proc_pg_hi, flags, pfn, cid, gid, kind)

    # --- per-snapshot baselines (vectorised running counts) ----------------------------------
    base_pages = np.cumsum(np.bincount(snap, weights=cand.astype(np.int64) - cand_prev, minlength=n_snaps)).astype(np.int64)
    zpm = np.cumsum(np.bincount(snap, weights=zp_now.astype(np.int64) - zp_prev, minlength=n_snaps)).astype(np.int64)
    # frame ids that more than one arrival refers to (fork sharing, a fork child of a merged page)
    # keep a dense id; every other arrival's frame is one of its own (-1): the engine then needs no
    # per-frame-id table for it
    arrive = (kind == EV_APPEAR) | (kind == EV_WRITE)
    refs = np.bincount(gid[arrive], minlength=n_gids) if arrive.any() else np.zeros(n_gids, np.int64)
    shared_gid = refs >= 2
    gmap = np.full(n_gids, -1, np.int64)
    gmap[shared_gid] = np.arange(int(shared_gid.sum()))
    n_gids = int(shared_gid.sum())
    gid = np.where(gid >= 0, gmap[np.maximum(gid, 0)], -1)
    sel = np.flatnonzero(kind != 0)  # already in (snapshot, page) order
    ev_snap = snap[sel]
    off = np.searchsorted(ev_snap, np.arange(n_snaps + 1)).astype(np.int64)
    ev_kind = kind[sel]
    dead = (ev_kind == EV_GONE) | (ev_kind == EV_UNMERGE)
    sample = None
    if has_sample:
        sample = col("sample").astype(np.uint32)[sel]
    strength = None
    if strength_cols:
        strength = np.stack([col(c).astype(np.uint32)[sel] for c in strength_cols], axis=1)

    prep = Prepared(
        scope=scope,
        trace_fingerprint=trace.fingerprint,
        trace_identity=trace.identity,
        times_ns=times,
        n_pages=n_pages,
        page_proc=page_proc,
        page_vpn=page_vpn,
        n_procs=n_procs,
        proc_pid=procs["pid"].to_numpy().astype(np.int64),
        proc_id=proc_ids,
        proc_comm=procs["comm"].to_list(),
        proc_domain=procs["domain"].to_numpy().astype(np.int32),
        proc_first_snap=procs["first_snap"].fill_null(0).to_numpy().astype(np.int32),
        proc_reg_snap=np.zeros(n_procs, dtype=np.int32),
        proc_exit_snap=np.full(n_procs, n_snaps, dtype=np.int32),
        proc_order=np.arange(n_procs, dtype=np.int32),
        proc_pg_lo=proc_pg_lo,
        proc_pg_hi=proc_pg_hi,
        n_cids=n_cids,
        n_gids=n_gids,
        n_thp=n_thp,
        off=off,
        ev_pg=pg[sel].astype(np.int32),
        ev_kind=ev_kind,
        ev_cid=np.where(dead, -1, cid[sel]).astype(np.int32),
        ev_gid=np.where(dead, -1, gid[sel]).astype(np.int64),
        ev_thp=thp[sel],
        ev_sample=sample,
        base_pages=base_pages,
        base_frames=np.zeros(n_snaps, dtype=np.int64),
        oracle_frames=np.zeros(n_snaps, dtype=np.int64),
        zero_filled=np.zeros(n_snaps, dtype=np.int64),
        zero_page_mapped=zpm,
        hash_dup_pages=np.zeros(n_snaps, dtype=np.int64),
        ev_strength=strength,
        vmas=_vma_table(trace, proc_ids, n_snaps),
    )
    _registration(prep, procs, row_proc, cand, snap, n_snaps, scope)
    _baselines(prep)
    return prep


def _vma_table(trace, proc_ids: np.ndarray, n_snaps: int) -> VmaTable | None:
    """The vmas table as arrays (None if the trace has none); VMAs of unknown processes dropped.
    ``proc_ids`` are the trace's process ids, sorted (the dense index is the position)."""
    if not trace.has_table("vmas"):
        return None
    v = trace.read_table("vmas", columns=["snap", "proc", "start", "end", "flags", "vmflags"])
    if v.height == 0:
        return None
    tp = v["proc"].to_numpy().astype(np.int64)
    pos = np.searchsorted(proc_ids, tp)
    known = pos < len(proc_ids)
    known[known] = proc_ids[pos[known]] == tp[known]
    dense = np.where(known, pos, -1).astype(np.int64)
    v = v.with_columns(pl.Series("dproc", dense)).filter(pl.col("dproc") >= 0).sort("snap", "dproc", "start")
    masks = {m: vmflag_mask(m) for m in v["vmflags"].unique().to_list()}
    return VmaTable(
        off=np.searchsorted(v["snap"].to_numpy().astype(np.int64), np.arange(n_snaps + 1)).astype(np.int64),
        proc=v["dproc"].to_numpy().astype(np.int32),
        start=(v["start"].to_numpy().astype(np.int64) >> 12),
        end=((v["end"].to_numpy().astype(np.int64) + S.PAGE_SIZE - 1) >> 12),
        flags=v["flags"].to_numpy().astype(np.uint32),
        vmflags=np.array([masks[m] for m in v["vmflags"].to_list()], dtype=np.int64),
    )


# --- checks of the page rows ------------------------------------------------------------------
MAX_PAGE_NUMBER = 1 << 52  # a 64-bit address >> 12: virtual and physical page numbers are below


def _pages_file(trace, s: int) -> str:
    return str(trace.path / S.snapshot_file("pages", int(s)))


def _check_values(trace, rows: pl.DataFrame, op: np.ndarray) -> None:
    """Values the format allows: an op of 0..3, page numbers below 2^52."""
    if not len(op):
        return
    bad = op > S.OP_SAME
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{_pages_file(trace, rows['snap'][i])}: op {int(op[i])} is not a page row operation (0 NEW, 1 CHANGED, 2 GONE, 3 SAME)")
    for name in ("vpn", "pfn"):
        col = rows[name]
        if int(col.max()) >= MAX_PAGE_NUMBER:
            i = int(col.arg_max())
            raise TraceError(f"{_pages_file(trace, rows['snap'][i])}: {name} {int(col[i]):#x} is not a page number "
                             "(a 64-bit address >> 12 is below 2^52)")


_DELTA_RULES = {
    1: "appears twice in snapshot {s}",
    2: "is NEW at snapshot {s} but was already mapped (a row of an earlier snapshot was dropped or duplicated)",
    3: "is {op} at snapshot {s} but was not mapped before (its NEW row is missing)",
    4: "is SAME at snapshot {s}, which is not a keyframe",
}
_OP_NAMES = {S.OP_NEW: "NEW", S.OP_CHANGED: "CHANGED", S.OP_GONE: "GONE", S.OP_SAME: "SAME"}


def _check_deltas(trace, snap, pg, op, n_pages, row_proc, vpn, proc_ids) -> None:
    """The page rows must be a valid delta encoding, and agree with the statistics the snapshot
    log recorded.

    Each page (proc, vpn) has at most one row per snapshot; NEW only when it is not mapped,
    CHANGED/GONE (and SAME) only when it is; SAME only in keyframes; a keyframe lists every page
    mapped before it.  The log's ``new``, ``changed``, ``gone`` and ``pages`` (mapped pages), when
    present, must equal what the rows say: a dropped, duplicated or emptied delta file shows here
    (for a trace read from disk: a view of one, e.g. without some processes, has other rows).
    """
    n_snaps = trace.n_snapshots
    keyframe = np.array([bool(e.get("keyframe")) for e in trace.snapshots], dtype=np.bool_)
    code, i, counts, mapped = _delta_scan(snap, pg, op.astype(np.int64), n_pages, n_snaps, keyframe)
    if code == 5:
        raise TraceError(f"{_pages_file(trace, i)}: keyframe snapshot {i} does not list every page mapped before it "
                         "(rows were dropped)")
    if code:
        s = int(snap[i])
        what = _DELTA_RULES[code].format(s=s, op=_OP_NAMES.get(int(op[i]), op[i]))
        raise TraceError(f"{_pages_file(trace, s)}: page (proc {int(proc_ids[row_proc[i]])}, vpn {int(vpn[i]):#x}) {what}")
    if not getattr(trace, "log_describes_rows", False):
        return  # a view of a trace (e.g. without some processes): the log describes other rows
    for s, e in enumerate(trace.snapshots):
        for key, k in (("new", S.OP_NEW), ("changed", S.OP_CHANGED), ("gone", S.OP_GONE)):
            want = e.get(key)
            if want is not None and want != counts[s, k]:
                raise TraceError(f"{_pages_file(trace, s)}: {int(counts[s, k]):,} {key.upper()} rows, "
                                 f"but the snapshot log recorded {want:,}")
        want = e.get("pages")
        if want is not None and want != mapped[s]:
            raise TraceError(f"{_pages_file(trace, s)}: the rows leave {int(mapped[s]):,} pages mapped, "
                             f"but the snapshot log recorded {want:,}")


@njit(cache=True)
def _delta_scan(snap, pg, op, n_pages, n_snaps, keyframe):
    """One pass over the rows (in snapshot order).  Returns (rule broken or 0, row index — or
    the snapshot for rule 5, rows per snapshot and op, pages mapped after each snapshot)."""
    live = np.zeros(n_pages, np.bool_)
    last = np.full(n_pages, -1, np.int64)
    counts = np.zeros((n_snaps, 4), np.int64)
    mapped = np.zeros(n_snaps, np.int64)
    n_live = 0
    cur = 0
    live_before = 0
    listed = 0
    n = len(pg)
    for i in range(n + 1):
        s = snap[i] if i < n else n_snaps
        while cur < s:  # close snapshot cur (and any snapshot without rows)
            if keyframe[cur] and listed != live_before:
                return 5, cur, counts, mapped
            mapped[cur] = n_live
            cur += 1
            live_before = n_live
            listed = 0
        if i == n:
            break
        p = pg[i]
        o = op[i]
        if last[p] == s:
            return 1, i, counts, mapped
        last[p] = s
        counts[s, o] += 1
        if o == 0:
            if live[p]:
                return 2, i, counts, mapped
            live[p] = True
            n_live += 1
        else:
            if not live[p]:
                return 3, i, counts, mapped
            listed += 1
            if o == 2:
                live[p] = False
                n_live -= 1
            elif o == 3 and not keyframe[s]:
                return 4, i, counts, mapped
    return 0, -1, counts, mapped


def _process_table(trace, rows: pl.DataFrame) -> pl.DataFrame:
    """One row per process incarnation: pid, comm, domain, registration and exit snapshots."""
    if trace.has_table("processes"):
        p = trace.read_table("processes", columns=["snap", "proc", "pid", "start_ticks", "comm", "cgroup", "uid", "state", "mergeable"])
    else:
        p = None
    seen = rows.group_by("proc").agg(pl.col("pid").first(), pl.col("snap").min().alias("first_row"))
    if p is None or p.height == 0:
        out = seen.with_columns(
            pl.lit(0, dtype=pl.UInt64).alias("start_ticks"),
            pl.lit("").alias("comm"),
            pl.lit("").alias("cgroup"),
            pl.lit(0, dtype=pl.UInt32).alias("uid"),
            pl.col("first_row").alias("first_snap"),
            pl.col("first_row").alias("first_mergeable"),
            pl.lit(None, dtype=pl.Int64).alias("last_alive"),
        ).drop("first_row")
    else:
        alive = p.filter(pl.col("state") != "exited")
        agg = p.group_by("proc").agg(
            pl.col("pid").first(),
            pl.col("start_ticks").first(),
            pl.col("comm").first(),
            pl.col("cgroup").first(),
            pl.col("uid").first(),
            pl.col("snap").min().alias("first_snap"),
            pl.col("snap").filter(pl.col("mergeable")).min().alias("first_mergeable"),
        )
        last = alive.group_by("proc").agg(pl.col("snap").max().alias("last_alive"))
        out = agg.join(last, on="proc", how="left")
        missing = seen.join(out.select("proc"), on="proc", how="anti")
        if missing.height:
            raise TraceError(f"{trace.path}: page rows name process {missing['proc'][0]} missing from the processes table")
    out = out.sort("proc")
    dom = out.select(pl.struct("uid", "cgroup").rank("dense").alias("d"))["d"].to_numpy().astype(np.int32) - 1
    return out.with_columns(pl.Series("domain", dom))


def _registration(prep: Prepared, procs: pl.DataFrame, row_proc, cand, snap, n_snaps, scope) -> None:
    """When each mm joins ksmd's list, when it leaves, and the list order.

    ``recorded``: an mm registers at the first snapshot at which it has a mergeable VMA (or the
    first at which it has a candidate page); ``anon``: at its first snapshot.  Order: registration
    snapshot, then process start time, then pid (processes that register together were started in
    that order; the kernel appends each new mm behind the scan cursor, modelled in the policy).
    """
    n_procs = prep.n_procs
    first_cand = np.full(n_procs, n_snaps, dtype=np.int64)
    if cand.any():
        np.minimum.at(first_cand, row_proc[cand], snap[cand])
    first_snap = procs["first_snap"].fill_null(n_snaps).to_numpy().astype(np.int64)
    if scope == "recorded":
        fm = procs["first_mergeable"].fill_null(n_snaps).to_numpy().astype(np.int64)
        reg = np.minimum(fm, first_cand)
    else:
        reg = np.minimum(first_snap, first_cand)
    reg = np.where(reg >= n_snaps, -1, reg).astype(np.int32)
    last = procs["last_alive"].to_numpy()
    exit_snap = np.full(n_procs, n_snaps, dtype=np.int32)
    for i, v in enumerate(last):
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            exit_snap[i] = int(v) + 1
    starts = procs["start_ticks"].to_numpy().astype(np.int64)
    pids = procs["pid"].to_numpy().astype(np.int64)
    regkey = np.where(reg < 0, n_snaps + 1, reg)
    prep.proc_reg_snap = reg
    prep.proc_exit_snap = np.minimum(exit_snap, n_snaps).astype(np.int32)
    prep.proc_order = np.lexsort((np.arange(n_procs), pids, starts, regkey)).astype(np.int32)


def _baselines(prep: Prepared) -> None:
    """Frames with no dedup, frames with perfect dedup, zero-filled and hash-duplicate pages."""
    bf, of, zf = _baseline_counts(prep.off, prep.ev_pg, prep.ev_kind, prep.ev_cid, prep.ev_gid, prep.n_pages, prep.n_cids, prep.n_gids)
    prep.base_frames = bf
    prep.oracle_frames = of
    prep.zero_filled = zf
    # naive: every present page in scope (zero-page mapped ones read as zeros) minus distinct hashes
    distinct = of + (zf > 0)
    naive_distinct = distinct + ((prep.zero_page_mapped > 0) & (zf == 0))
    prep.hash_dup_pages = prep.base_pages + prep.zero_page_mapped - naive_distinct


@njit(cache=True)
def _baseline_counts(off, ev_pg, ev_kind, ev_cid, ev_gid, n_pages, n_cids, n_gids):
    n_snaps = len(off) - 1
    cur_cid = np.full(n_pages, -1, np.int64)
    cur_gid = np.full(n_pages, -1, np.int64)  # -1: a frame of its own
    cnt_cid = np.zeros(n_cids, np.int64)
    cnt_gid = np.zeros(max(n_gids, 1), np.int64)
    dc = 0
    dg = 0
    bf = np.zeros(n_snaps, np.int64)
    of = np.zeros(n_snaps, np.int64)
    zf = np.zeros(n_snaps, np.int64)
    for s in range(n_snaps):
        for i in range(off[s], off[s + 1]):  # removals first
            k = ev_kind[i]
            if k == 2 or k == 3 or k == 4:
                p = ev_pg[i]
                c = cur_cid[p]
                if c < 0:
                    continue
                g = cur_gid[p]
                cnt_cid[c] -= 1
                if cnt_cid[c] == 0:
                    dc -= 1
                if g < 0:
                    dg -= 1
                else:
                    cnt_gid[g] -= 1
                    if cnt_gid[g] == 0:
                        dg -= 1
                cur_cid[p] = -1
                cur_gid[p] = -1
        for i in range(off[s], off[s + 1]):
            k = ev_kind[i]
            if k == 1 or k == 4:
                p = ev_pg[i]
                c = ev_cid[i]
                g = ev_gid[i]
                if cnt_cid[c] == 0:
                    dc += 1
                cnt_cid[c] += 1
                if g < 0:
                    dg += 1
                else:
                    if cnt_gid[g] == 0:
                        dg += 1
                    cnt_gid[g] += 1
                cur_cid[p] = c
                cur_gid[p] = g
        zero = cnt_cid[0]
        bf[s] = dg
        of[s] = dc - (1 if zero > 0 else 0)
        zf[s] = zero
    return bf, of, zf


def _capture_gaps(trace, snap, pg, op, flags, hashes, n_pages):
    """``(rows, previous rows)`` of pages the capture dropped for one snapshot while the real KSM
    remapped them, or None.

    The capture reads a page's PTE (pagemap) and then its frame's flags (kpageflags); when ksmd
    replaces the PTE in between (a merge into a KSM page, or ``use_zero_pages``) and frees the old
    frame, kpageflags no longer shows an anonymous page and the capture leaves the page out of the
    snapshot (measured: ``validate --workload zero --settings zero`` lost 38-683 pages per run this
    way, the whole of its ``ksm_zero_pages`` deficit; ``prefork`` holds 1,333 such gaps).  Such a
    page is absent for exactly one snapshot between a present row and a row at the next snapshot
    that shows the remap: a real-KSM page with the same content, or the zero page after a
    zero-filled page (when ``_real_ksm_zero_merges`` would accept it).  It is taken to have been
    there, unchanged (its previous row), so the replay neither loses nor re-adds it."""
    gone = np.flatnonzero(op == S.OP_GONE)
    if len(gone) == 0 or not trace.has_ground_truth:
        return None
    g = trace.read_table("ksm", columns=["run", "use_zero_pages"])
    running = g["run"] == 1
    if not bool(running.any()):
        return None
    zero_on = bool((running & (g["use_zero_pages"] == 1)).any())
    split_remap = _kernel_at_least(trace.host.get("kernel_release"), 6, 12)
    prev = _previous_rows(pg, n_pages)
    nxt = np.full(len(pg), -1, np.int64)
    has = prev >= 0
    nxt[prev[has]] = np.flatnonzero(has)
    p, q = prev[gone], nxt[gone]
    ok = (p >= 0) & (q >= 0)
    r, p, q = gone[ok], p[ok], q[ok]
    ok = (op[p] != S.OP_GONE) & (op[q] != S.OP_GONE) & (snap[q] == snap[r] + 1)
    pres = (flags[p] & (S.F_PRESENT | S.F_ANON)) == (S.F_PRESENT | S.F_ANON)
    ksm = ((flags[q] & S.F_KSM) != 0) & (hashes[q] == hashes[p])
    zero_src = (flags[p] & S.F_ZERO_FILLED) != 0
    in_thp = (flags[p] & S.F_THP) != 0
    zero = ((flags[q] & S.F_ZERO_PAGE) != 0) & zero_src & ((~in_thp & zero_on) | (in_thp & split_remap))
    heal = ok & pres & ((flags[p] & S.F_ZERO_PAGE) == 0) & (ksm | zero)
    if not heal.any():
        return None
    return r[heal], p[heal]


def _kernel_at_least(release: str | None, major: int, minor: int) -> bool:
    try:
        parts = (release or "").split(".")
        return (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _real_ksm_zero_merges(trace, pg, snap, flags, cand, zp_now):
    """Rows at which a page maps the shared zero page because the real kernel's KSM put it
    there while the trace was captured, or None.  Two ways:

    * ``use_zero_pages=1``: KSM merged an all-zero page with the zero page (counted in
      ``ksm_zero_pages``);
    * from Linux 6.12, KSM splits a THP before merging one of its subpages, and the split maps
      every all-zero subpage to the zero page (no KSM counter).

    Such a page was a zero-filled candidate (in a THP, for the second way) at its previous row
    and maps the zero page now.  Without this, a trace captured under real KSM shows those pages
    as pages that vanished — from the no-dedup baseline too — so no replay could count the memory
    they stand for.  Kept as zero-filled candidates, every policy decides about them itself (the
    ``ksm`` policy's ``6.12`` profile splits and remaps them as the kernel did).  Applied only when
    the trace's ground truth shows KSM running (otherwise such a transition is MADV_DONTNEED and a
    read fault: a page that really went away).
    """
    if not zp_now.any() or not trace.has_ground_truth:
        return None
    g = trace.read_table("ksm", columns=["run", "use_zero_pages"])
    running = g["run"] == 1
    zero_on = bool((running & (g["use_zero_pages"] == 1)).any())
    split_remap = bool(running.any()) and _kernel_at_least(trace.host.get("kernel_release"), 6, 12)
    if not (zero_on or split_remap):
        return None
    order = np.lexsort((snap, pg))
    p = pg[order]
    z = zp_now[order]
    in_thp = (flags & S.F_THP) != 0
    source = cand & ((flags & S.F_ZERO_FILLED) != 0) & ((~in_thp & zero_on) | (in_thp & split_remap))
    zc = source[order]
    same = np.zeros(len(p), dtype=bool)
    same[1:] = p[1:] == p[:-1]
    kz = np.zeros(len(p), dtype=bool)
    while True:  # a page can stay on the zero page over several rows: follow the chain
        prev_ok = np.zeros(len(p), dtype=bool)
        prev_ok[1:] = zc[:-1] | kz[:-1]
        new = z & same & prev_ok
        if np.array_equal(new, kz):
            break
        kz = new
    out = np.zeros(len(p), dtype=bool)
    out[order] = kz
    return out


@njit(cache=True)
def _carry_thp(thp, prev, rows):
    """Rows kept as candidates by _real_ksm_zero_merges keep the huge page of their previous row
    (the trace shows the kernel's split; the replay splits it itself).  Rows in snapshot order."""
    for r in rows:
        q = prev[r]
        if q >= 0:
            thp[r] = thp[q]


def _fork_inherited_ksm(trace, procs, pg, snap, row_proc, page_vpn, proc_pg_lo, proc_pg_hi, flags, pfn, cid, gid, kind):
    """Give a fork child's page that appears mapping a real-kernel KSM page its parent's frame id.

    PFN grouping (``gid``) deliberately ignores KSM-flagged rows, so that the replay simulates
    merging itself.  But a child forked after the real kernel merged some of its parent's pages
    inherits those mappings: without any dedup, each such page would be fork-shared with the parent's
    page at the same address, so it must get the parent page's current frame id (the ``gid`` of its
    last APPEAR/WRITE row); the engine then maps the child page to whatever the parent page maps in
    the replay (its frame, or the replay's KSM page — ``F_ALIAS``).  Otherwise the child's page is a
    frame of its own that the replay has not merged yet, and early writes to it are not COW breaks
    (measured: forkdiverge lost 11% of its COW breaks).  Rows changed in place: ``gid``.
    """
    ksm = (flags & S.F_KSM) != 0
    appear = kind == EV_APPEAR
    if not (appear & ksm).any() or not trace.has_table("processes"):
        return
    pt = trace.read_table("processes", columns=["proc", "pid", "ppid", "snap"])
    if pt.height == 0:
        return
    first = pt.group_by("proc").agg(pl.col("pid").first(), pl.col("ppid").first(), pl.col("snap").min().alias("first"))
    dense = {int(p): i for i, p in enumerate(procs["proc"].to_list())}
    info = {dense[int(r["proc"])]: (int(r["pid"]), int(r["ppid"]), int(r["first"])) for r in first.iter_rows(named=True)
            if int(r["proc"]) in dense}
    by_pid: dict[int, list[tuple[int, int]]] = {}
    for d, (pid, _, f) in info.items():
        by_pid.setdefault(pid, []).append((f, d))
    cand_rows = np.flatnonzero(appear & ksm)
    # rows of each page in snapshot order, and the subset that set the page's frame (APPEAR/WRITE)
    width = int(snap.max()) + 2 if len(snap) else 1
    order = np.lexsort((snap, pg))
    key_all = pg[order] * width + snap[order]
    evmask = (kind == EV_APPEAR) | (kind == EV_WRITE)
    ev_rows = order[evmask[order]]
    key_ev = pg[ev_rows] * width + snap[ev_rows]
    for r in cand_rows.tolist():
        c = int(row_proc[r])
        s_ = int(snap[r])
        if c not in info or info[c][2] != s_:
            continue  # only a process at its first snapshot (just forked)
        parents = [d for f, d in by_pid.get(info[c][1], []) if f <= s_ and d != c]
        if not parents:
            continue
        p = max(parents, key=lambda d: info[d][2])
        lo, hi = int(proc_pg_lo[p]), int(proc_pg_hi[p])
        v = page_vpn[pg[r]]
        j = lo + int(np.searchsorted(page_vpn[lo:hi], v))
        if j >= hi or page_vpn[j] != v:
            continue
        k = int(np.searchsorted(key_all, j * width + s_, side="right")) - 1  # parent's row now
        if k < 0 or pg[order[k]] != j:
            continue
        pr = order[k]
        if not ksm[pr] or pfn[pr] != pfn[r] or cid[pr] != cid[r]:
            continue
        e = int(np.searchsorted(key_ev, j * width + s_, side="right")) - 1  # parent's frame id now
        if e < 0 or pg[ev_rows[e]] != j:
            continue
        gid[r] = gid[ev_rows[e]]
