"""Turn a trace into the dense arrays the replay engine runs on (once per trace and scope).

What this computes, and the rules it applies (also in ``docs/replay-semantics.md``):

The result is a :class:`ksmtrace.trace.prepared.Prepared`.

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
  (:data:`ksmtrace.trace.prepared.VMFLAG_BITS`) -- what a policy that walks VMAs (``uksm``) needs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace._version import __version__
from ksmtrace.errors import OutputError, TraceError
from ksmtrace.outputs import OutputDir, open_output_dir
from ksmtrace.trace import schema as S
from ksmtrace.jitutil import prefetch_at, prefetch_row
from ksmtrace.trace.events import EventStore, spill_bytes
from ksmtrace.trace.prepared import (EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE, SCOPES, Prepared, VmaTable,
                                     vmflag_mask)

_PREP_VERSION = "11-streaming-int32"  # (a string: other branches' versions differ and share the cache directory)

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
        prep = _prepare(trace, scope, spill_path=(d.path / f"{name[:-4]}.events") if d is not None else None)
        if d is not None:
            try:
                d.write_atomic(name, lambda fh: pickle.dump(prep, fh, protocol=pickle.HIGHEST_PROTOCOL), mode=0o600, sync=False)
            except OutputError:
                pass  # a full or read-only cache only costs the next run a rebuild
        return prep
    finally:
        if d is not None:
            d.close()


# --- the computation: two streaming passes over the page rows, snapshot by snapshot ---------------
#
# Memory is bounded by what the result needs (per page: a few bytes of state; per content: its
# hash and a count), one snapshot's rows, and the events (in memory, or spilled to a file):
#
# 1. ``_page_keys``: every (process, virtual page) that has a NEW row -> page ids in (process,
#    address) order; the first pid and snapshot of every process in the page rows.  Every batch's
#    values are checked first (``_check_values``).
# 2. ``_DeltaCheck``, then ``_derive_events``: each snapshot's rows (SAME rows included) are
#    checked against the delta encoding and the snapshot log as they are read (one int32 a page),
#    before any event is derived from them; then, in page order, against each page's previous row
#    (kept per page): candidates, content ids (a hash table of the page hashes), huge-page ids,
#    events, the per-snapshot counts.  An arrival's frame key (PFN and content) goes through a
#    Bloom filter; a key it may have seen before is a candidate for sharing.
# 3. ``_shared_frames``: the candidate keys that really have two or more arrivals get dense frame
#    ids (in order of first arrival), written into the events; frames with no dedup per snapshot.

# a page's state (its previous row): columns of one int32 row (one cache line for the three)
PS_BITS, PS_CID, PS_THP = range(3)
# bits of PS_BITS
ST_SEEN = 1
ST_CAND = 2
ST_ZP = 4
ST_KSM = 8
ST_SRCKZ = 16  # a zero-filled candidate the real kernel may have mapped to the zero page (or one already)

# accumulator slots of _derive_events' scalar array
A_BAD = 0  # unreadable candidate rows (each a content of its own)
A_NTHP = 1  # huge page ids handed out
A_CAND = 2  # candidate pages now
A_ZPM = 3  # zero-page mapped pages in scope now
A_DISTINCT = 4  # distinct non-zero contents among candidates now
A_ZERO = 5  # zero-filled candidates now
A_EVENTS = 6  # events so far (global index of the next)
N_ACC = 7

CHUNK_ROWS = 1 << 20  # rows of a snapshot derived at a time (a keyframe of a big host is many)
BLOOM_BITS_PER_ROW = 12  # the frame-key filter's size: ~1.6% false positives (each only costs a lookup)
BLOOM_MIN_WORDS = 1024

_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MIX2 = -4417276706812531889  # 0xC2B2AE3D27D4EB4F


@njit(inline="always")
def _slot(h, cap):
    """fastrange: a table slot from the high 32 bits of a mixed 64-bit key."""
    return ((h >> 32) & 0xFFFFFFFF) * cap >> 32


@njit(inline="always")
def _mix(x):
    h = x * _MIX
    return h ^ ((h >> 29) & 0x7FFFFFFFF)


@njit(cache=True, nogil=True)
def _table_grow(tab, new_cap):
    """Rehash an open-addressing table (rows: key, id; id -1 = empty) into ``new_cap`` rows."""
    nt = np.empty((new_cap, 2), np.int64)
    nt[:, 1] = -1
    for j in range(len(tab)):
        if tab[j, 1] >= 0:
            h = _slot(_mix(tab[j, 0]), new_cap)
            while nt[h, 1] >= 0:
                h += 1
                if h == new_cap:
                    h = 0
            nt[h, 0] = tab[j, 0]
            nt[h, 1] = tab[j, 1]
    return nt


@njit(inline="always")
def _table_id(tab, key, next_id):
    """The id of ``key``, or ``next_id`` if it is new (then inserted).  Linear probing."""
    cap = len(tab)
    h = _slot(_mix(key), cap)
    while True:
        j = tab[h, 1]
        if j < 0:
            tab[h, 0] = key
            tab[h, 1] = next_id
            return next_id
        if tab[h, 0] == key:
            return j
        h += 1
        if h == cap:
            h = 0


class _Table:
    """A growing open-addressing table of int64 keys -> dense ids in order of first appearance."""

    def __init__(self) -> None:
        self.tab = np.full((0, 2), -1, np.int64)
        self.count = 0

    def reserve(self, total: int) -> None:
        """Room for ``total`` keys in all, below 70% full (before the first key)."""
        self.tab = np.full((int(total / 0.7) + 1, 2), -1, np.int64)

    def ensure(self, need: int) -> None:
        """Room (below 70% full) for ``need`` more keys."""
        if (self.count + need) * 10 <= len(self.tab) * 7:
            return
        cap = max(1024, int((self.count + need) * 1.5 / 0.7) + 1)
        if self.count:
            self.tab = _table_grow(self.tab, cap)
        else:
            self.tab = np.full((cap, 2), -1, np.int64)


@njit(inline="always")
def _bloom_hash(k1, k2):
    return _mix(k1 ^ _mix(k2 + _MIX2))


@njit(inline="always")
def _bloom_seen(bloom, k1, k2):
    """Test-and-set of the pair (k1, k2) in a Bloom filter blocked in 64-bit words (3 bits a key)."""
    h = _bloom_hash(k1, k2)
    w = _slot(h, len(bloom))
    m = (np.uint64(1) << np.uint64(h & 63)) | (np.uint64(1) << np.uint64((h >> 6) & 63)) | (np.uint64(1) << np.uint64((h >> 12) & 63))
    old = bloom[w]
    bloom[w] = old | m
    return (old & m) == m


@njit(cache=True, nogil=True)
def _page_ids(dproc, vpn, lo, hi, page_vpn, out):
    """Page id of each row (rows sorted by process, then address): a galloping search from the
    previous row's page.  Returns the first row whose page has no NEW row anywhere, or -1."""
    prev_proc = -1
    j = 0
    for i in range(len(vpn)):
        p = dproc[i]
        v = vpn[i]
        if p != prev_proc:
            j = lo[p]
            prev_proc = p
        end = hi[p]
        # gallop: find the first position >= v in page_vpn[j:end]
        step = 1
        k = j
        while k < end and page_vpn[k] < v:
            j = k + 1
            k = j + step
            step *= 2
        if k > end:
            k = end
        a, b = j, k
        while a < b:
            mid = (a + b) >> 1
            if page_vpn[mid] < v:
                a = mid + 1
            else:
                b = mid
        if a >= end or page_vpn[a] != v:
            return i
        out[i] = a
        j = a
    return -1


@njit(cache=True, nogil=True)
def _sorted_rows(dproc, vpn):
    """Rows already in (process, address) order?"""
    for i in range(1, len(vpn)):
        if dproc[i] < dproc[i - 1] or (dproc[i] == dproc[i - 1] and vpn[i] <= vpn[i - 1]):
            return False
    return True


@njit(inline="always")
def _kz_rule(f, cand, zp_now, has_prev, prev_source, zero_on, split_remap):
    """A row mapping the zero page that the trace's real KSM put there (see _real_ksm_zero_rules):
    its previous row was such a row or a zero-filled candidate the rule applies to (``prev_source``).
    Returns (this row is one, it is a source for the next row)."""
    zf = (f & 32) != 0  # F_ZERO_FILLED
    in_thp = (f & 128) != 0  # F_THP
    source = cand and zf and ((not in_thp and zero_on) or (in_thp and split_remap))
    kz = zp_now and has_prev and prev_source
    return kz, source or kz


@njit(cache=True)
def _kz_rows(order, pg, flags, cand, zp_now, zero_on, split_remap, n_pages):
    """_kz_rule over rows given in (page, snapshot) ``order``."""
    state = np.zeros(n_pages, np.uint8)  # 1: seen, 2: a source for the next row
    out = np.zeros(len(pg), np.bool_)
    for r in order:
        p = pg[r]
        kz, src = _kz_rule(flags[r], cand[r], zp_now[r], state[p] != 0, (state[p] & 2) != 0, zero_on, split_remap)
        out[r] = kz
        state[p] = 1 | (2 if src else 0)
    return out


def _real_ksm_zero_merges(trace, pg, snap, flags, cand, zp_now):
    """Rows (whole-trace arrays) at which a page maps the shared zero page because the real
    kernel's KSM put it there while the trace was captured, or None (the rule prepare applies row
    by row, for callers that hold every row: ``analysis/doctor``)."""
    if not zp_now.any():
        return None
    zero_on, split_remap = _real_ksm_zero_rules(trace)
    if not (zero_on or split_remap):
        return None
    n_pages = int(pg.max()) + 1 if len(pg) else 0
    return _kz_rows(np.lexsort((snap, pg)), np.asarray(pg, np.int64), np.asarray(flags, np.int64), np.asarray(cand),
                    np.asarray(zp_now), zero_on, split_remap, n_pages)


@njit(inline="always")
def _needs_hash(op, f, recorded):
    """A candidate row with readable, non-zero content (its hash gets a content id)."""
    return (op != 2 and (f & 1) != 0 and (f & 2) == 0 and (f & 64) != 0 and (f & 512) == 0 and (f & 16384) == 0
            and ((f & 1024) != 0 or not recorded) and (f & 8192) == 0 and (f & 32) == 0)


@njit(cache=True, nogil=True)
def _content_ids(op, flags, hkey, recorded, tab, count, out):
    """Content ids (dense, from 1, in order of first appearance) of the rows that need one; -1
    elsewhere.  The table rows of the rows ahead are prefetched: they are random accesses."""
    n = len(op)
    cap = len(tab)
    for i in range(n):
        ia = i + 16
        if ia < n and _needs_hash(op[ia], flags[ia], recorded):
            prefetch_row(tab, _slot(_mix(hkey[ia]), cap))
        if _needs_hash(op[i], flags[i], recorded):
            c = _table_id(tab, hkey[i], count[0])
            if c == count[0]:
                count[0] += 1
            out[i] = c + 1
        else:
            out[i] = -1


@njit(cache=True, nogil=True)
def _derive_events(s, pg, dproc, op, flags, cin, pfn, cfg, ps, fpfn, flapfn, flaev,
                   cnt, ttab, bloom, acc, first_cand, child_parent, child_first,
                   o_pg, o_kind, o_cid, o_gid, o_thp, o_pfn, o_row, hits, forks):
    """One snapshot's rows (in page order) against each page's previous row: the events, the
    per-page state after it, and the counts.  ``cin``: the rows' content ids (_content_ids).
    Returns (events, Bloom hits, fork candidates)."""
    recorded = cfg[0] == 1
    zero_on = cfg[1] == 1
    split_remap = cfg[2] == 1
    soft = cfg[3] == 1
    track_fork = cfg[4] == 1
    kz_on = zero_on or split_remap
    ev0 = acc[A_EVENTS]
    m = 0
    nh = 0
    nf = 0
    n = len(pg)
    for i in range(n):
        # cache hints: the page state of the row far ahead; the counts of the old and new content
        # of a nearer one, and its Bloom word
        ib = i + 32
        if ib < n:
            prefetch_row(ps, pg[ib])
        ia = i + 16
        if ia < n:
            ca = ps[pg[ia], PS_CID]
            if ca > 0:
                prefetch_at(cnt, ca - 1)
            ca = cin[ia]
            if ca > 0:
                prefetch_at(cnt, ca - 1)
                if pfn[ia] != 0:
                    prefetch_at(bloom, _slot(_bloom_hash(pfn[ia], ca), len(bloom)))
        p = pg[i]
        f = flags[i]
        mapped = op[i] != 2  # S.OP_GONE
        present = mapped and (f & 1) != 0 and (f & 2) == 0  # F_PRESENT, not F_SWAPPED
        zp = (f & 512) != 0  # F_ZERO_PAGE
        anon_present = present and (f & 64) != 0 and not zp and (f & 16384) == 0  # F_ANON, not F_HUGETLB
        in_scope = (f & 1024) != 0 if recorded else True  # F_MERGEABLE
        cand = anon_present and in_scope
        zp_now = present and zp and in_scope
        st = ps[p, PS_BITS]
        has_prev = (st & ST_SEEN) != 0
        srckz = False
        kz = False
        if kz_on:
            kz, srckz = _kz_rule(f, cand, zp_now, has_prev, (st & ST_SRCKZ) != 0, zero_on, split_remap)
            if kz:
                cand = True
                zp_now = False
        # content id: 0 = zero-filled, unreadable = a content of its own (numbered after the others)
        if not cand:
            c = -1
        elif (f & 8192) != 0:  # F_READ_FAILED
            c = -(acc[A_BAD] + 2)
            acc[A_BAD] += 1
        elif (f & 32) != 0:
            c = 0
        else:
            c = cin[i]
        # huge page: (process, PMD-aligned pfn); a page the real kernel mapped to the zero page
        # keeps its previous row's
        t = -1
        if present and (f & 128) != 0 and (f & 2048) != 0:  # F_THP, F_PFN
            t = _table_id(ttab, dproc[i] * (1 << 44) + (pfn[i] >> 9), acc[A_NTHP])
            if t == acc[A_NTHP]:
                acc[A_NTHP] += 1
        if kz:
            t = ps[p, PS_THP]
        cand_prev = (st & ST_CAND) != 0
        ksm_prev = (st & ST_KSM) != 0
        zp_prev = (st & ST_ZP) != 0
        cid_prev = ps[p, PS_CID]
        thp_prev = ps[p, PS_THP]
        ksm = (f & 256) != 0  # F_KSM
        kind = 0
        if cand and not cand_prev:
            kind = 1  # EV_APPEAR
        elif cand_prev and not cand:
            kind = 3 if anon_present else 2  # EV_UNMERGE, EV_GONE
        elif cand and cand_prev:
            if c != cid_prev or (soft and (f & 16) != 0) or (ksm_prev and not ksm):  # F_SOFT_DIRTY
                kind = 4  # EV_WRITE
            elif t != thp_prev:
                kind = 5  # EV_THP
        # counts
        if cand != cand_prev:
            acc[A_CAND] += 1 if cand else -1
        if zp_now != zp_prev:
            acc[A_ZPM] += 1 if zp_now else -1
        if cand and s < first_cand[dproc[i]]:
            first_cand[dproc[i]] = s
        if kind == 2 or kind == 3 or kind == 4:
            if cid_prev == 0:
                acc[A_ZERO] -= 1
            elif cid_prev > 0:
                cnt[cid_prev - 1] -= 1
                if cnt[cid_prev - 1] == 0:
                    acc[A_DISTINCT] -= 1
            else:
                acc[A_DISTINCT] -= 1
        if kind == 1 or kind == 4:
            if c == 0:
                acc[A_ZERO] += 1
            elif c > 0:
                if cnt[c - 1] == 0:
                    acc[A_DISTINCT] += 1
                cnt[c - 1] += 1
            else:
                acc[A_DISTINCT] += 1
        if kind != 0:
            e = m
            m += 1
            o_pg[e] = p
            o_kind[e] = kind
            o_cid[e] = -1 if (kind == 2 or kind == 3) else c
            o_gid[e] = -1
            o_thp[e] = t
            o_row[e] = i
            o_pfn[e] = -1
            if kind == 1 or kind == 4:
                # its frame with no dedup: (PFN, content) unless the real kernel merged it, it maps
                # the zero page, or the PFN is unknown (then a frame of its own)
                groupable = (f & 2048) != 0 and not ksm and not zp and pfn[i] != 0 and c >= 0
                if groupable:
                    o_pfn[e] = pfn[i]
                    if _bloom_seen(bloom, pfn[i], c):
                        hits[nh, 0] = pfn[i]
                        hits[nh, 1] = c
                        nh += 1
                if track_fork:
                    flapfn[p] = pfn[i] if groupable else -1
                    flaev[p] = ev0 + e
                    pr = dproc[i]
                    if kind == 1 and ksm and child_parent[pr] >= 0 and child_first[pr] == s:
                        forks[nf] = e
                        nf += 1
        if track_fork:
            fpfn[p] = pfn[i]
        ps[p, PS_BITS] = ST_SEEN | (ST_CAND if cand else 0) | (ST_ZP if zp_now else 0) | (ST_KSM if ksm else 0) | (ST_SRCKZ if srckz else 0)
        ps[p, PS_CID] = c
        ps[p, PS_THP] = t
    acc[A_EVENTS] += m
    return m, nh, nf


def _kernel_at_least(release: str | None, major: int, minor: int) -> bool:
    try:
        parts = (release or "").split(".")
        return (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _real_ksm_zero_rules(trace) -> tuple[bool, bool]:
    """When a page that maps the shared zero page is one the trace's *real* KSM put there.

    Two ways: ``use_zero_pages=1`` (KSM merged an all-zero page with the zero page, counted in
    ``ksm_zero_pages``); and from Linux 6.12, KSM splits a THP before merging one of its subpages,
    and the split maps every all-zero subpage to the zero page (no KSM counter).  Such a page was a
    zero-filled candidate (in a THP, for the second way) at its previous row and maps the zero page
    now.  Without this, a trace captured under real KSM shows those pages as pages that vanished —
    from the no-dedup baseline too — so no replay could count the memory they stand for.  Kept as
    zero-filled candidates, every policy decides about them itself (the ``ksm`` policy's ``6.12``
    profile splits and remaps them as the kernel did).  Applied only when the trace's ground truth
    shows KSM running (otherwise such a transition is MADV_DONTNEED and a read fault: a page that
    really went away).  Returns (use_zero_pages rule, THP split rule).
    """
    if not trace.has_ground_truth:
        return False, False
    g = trace.read_table("ksm", columns=["run", "use_zero_pages"])
    running = g["run"] == 1
    zero_on = bool((running & (g["use_zero_pages"] == 1)).any())
    split_remap = bool(running.any()) and _kernel_at_least(trace.host.get("kernel_release"), 6, 12)
    return zero_on, split_remap


def _page_keys(trace, recorded: bool):
    """Pass 1: per process (trace proc id) the sorted virtual pages that have a NEW row, the first
    pid and snapshot of every process in the page rows (non-SAME rows), per snapshot its rows and
    whether they are in (process, address) order; and for a trace of more than HLL_ROWS rows, an
    estimate of its distinct contents (a HyperLogLog of the hashes that pass 2 numbers), so that
    pass 2 sizes its content table once -- a table that grows holds its old and new self at once,
    the peak of a big host's prepare."""
    vpns: dict[int, list[np.ndarray]] = {}
    seen: dict[int, tuple[int, int]] = {}
    rows = np.zeros(trace.n_snapshots, np.int64)
    in_order = np.zeros(trace.n_snapshots, bool)
    total = sum(int(e.get("files", {}).get("pages", {}).get("rows", 0)) for e in trace.snapshots)
    regs = np.zeros(1 << HLL_BITS, np.uint8) if total > HLL_ROWS else None

    # (snap and pid are read for the reader's checks -- no nulls, the file's own snapshot -- as
    # every column of the pages table is read by one of the two passes)
    cols = ["snap", "proc", "pid", "vpn", "op"]
    if regs is not None:
        cols += ["flags", "hash"]

    def batches():
        """(snapshot, its rows' proc, pid, vpn, NEW?, in (proc, vpn) order?) batch by batch."""
        for s in range(trace.n_snapshots):
            any_rows = False
            for df in trace.read_batches("pages", s, cols, CHUNK_ROWS):
                op = df["op"].to_numpy()
                proc, vpn = df["proc"].to_numpy(), df["vpn"].to_numpy()
                _check_values(trace, s, op, vpn=vpn)
                keep = op != S.OP_SAME
                if regs is not None:
                    _hll_add(regs, op, df["flags"].to_numpy(), np.ascontiguousarray(df["hash"].to_numpy()).view(np.int64),
                             recorded)
                pid = df["pid"].to_numpy()
                vpn = vpn.astype(np.int64)
                ordered = _sorted_rows(proc.astype(np.int64), vpn)  # (all rows: pass 2 reads them all)
                if not keep.all():
                    proc, pid, vpn, op = proc[keep], pid[keep], vpn[keep], op[keep]
                if not ordered:
                    order = np.argsort(proc, kind="stable")
                    proc, pid, vpn, op = proc[order], pid[order], vpn[order], op[order]
                any_rows = True
                yield s, proc, pid, vpn, op == S.OP_NEW, ordered
            if not any_rows:
                e = np.zeros(0, np.int64)
                yield s, e, e, e, e.astype(bool), True

    last_key = {}  # snapshot -> (proc, vpn) of its last row so far (order across batches)
    for s, proc, pid, vpn, new, ordered in _ahead(batches()):
        if s not in last_key:
            in_order[s] = True
        if len(proc) and s in last_key and last_key[s] is not None:
            lp, lv = last_key[s]
            if (int(proc[0]), int(vpn[0])) <= (lp, lv):
                ordered = False
        in_order[s] &= ordered
        last_key[s] = (int(proc[-1]), int(vpn[-1])) if len(proc) else last_key.get(s)
        rows[s] += len(proc)
        if not len(proc):
            continue
        starts = np.flatnonzero(np.r_[True, proc[1:] != proc[:-1]])
        ends = np.r_[starts[1:], len(proc)]
        for a, b in zip(starts.tolist(), ends.tolist()):
            p = int(proc[a])
            if p not in seen:
                seen[p] = (int(pid[a]), s)
            v = vpn[a:b][new[a:b]]
            if len(v):
                vpns.setdefault(p, []).append(v)
    return vpns, seen, rows, in_order, (_hll_estimate(regs) if regs is not None else None)


HLL_ROWS = 1 << 24  # traces of more rows estimate their distinct contents in pass 1
HLL_BITS = 14  # 16 K registers: a standard error of 0.8%


@njit(cache=True, nogil=True)
def _hll_add(regs, op, flags, hkey, recorded):
    """HyperLogLog registers of the hashes of the rows that get a content id (_needs_hash)."""
    for i in range(len(op)):
        if not _needs_hash(op[i], flags[i], recorded):
            continue
        h = _mix(hkey[i])
        j = (h >> (64 - HLL_BITS)) & ((1 << HLL_BITS) - 1)
        w = h << HLL_BITS
        rho = 1
        while w > 0 and rho <= 64 - HLL_BITS:  # leading zeros of the rest, plus one
            w <<= 1
            rho += 1
        if rho > regs[j]:
            regs[j] = rho


def _hll_estimate(regs: np.ndarray) -> int:
    m = len(regs)
    est = 0.7213 / (1 + 1.079 / m) * m * m / float(np.sum(np.ldexp(1.0, -regs.astype(np.int64))))
    zeros = int(np.count_nonzero(regs == 0))
    if est <= 2.5 * m and zeros:
        est = m * np.log(m / zeros)  # linear counting for small counts
    return int(est)


_END = object()


def _ahead(items):
    """The items of an iterator, each computed in a worker thread while the caller works on the one
    before (reading and decoding Parquet, and the nogil numba steps, overlap the caller's)."""
    it = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="ksmtrace-prepare") as ex:
        fut = ex.submit(next, it, _END)
        while True:
            r = fut.result()
            if r is _END:
                return
            fut = ex.submit(next, it, _END)
            yield r


def _sorted_unique(runs: list[np.ndarray]) -> np.ndarray:
    """The distinct values of sorted runs (a merge of runs: the stable sort's strength)."""
    v = np.concatenate(runs) if len(runs) > 1 else runs[0]
    if len(runs) > 1 or bool(np.any(v[1:] < v[:-1])):
        v = np.sort(v, kind="stable")
    keep = np.empty(len(v), bool)
    keep[:1] = True
    np.not_equal(v[1:], v[:-1], out=keep[1:])
    return v if keep.all() else v[keep]


def _capture_gaps(trace, proc_ids, proc_pg_lo, proc_pg_hi, page_vpn, n_pages: int) -> dict[int, tuple]:
    """Pages the capture dropped for one snapshot while the real KSM remapped them: per snapshot,
    (pages, flags, hashes, pfns) of the rows that stand for them (their previous rows).

    The capture reads a page's PTE (pagemap) and then its frame's flags (kpageflags); when ksmd
    replaces the PTE in between (a merge into a KSM page, or ``use_zero_pages``) and frees the old
    frame, kpageflags no longer shows an anonymous page and the capture leaves the page out of the
    snapshot (measured: ``validate --workload zero --settings zero`` lost 38-683 pages per run this
    way, the whole of its ``ksm_zero_pages`` deficit; ``prefork`` holds 1,333 such gaps).  Such a
    page is absent for exactly one snapshot between a present row and a row at the next snapshot
    that shows the remap: a real-KSM page with the same content, or the zero page after a
    zero-filled page (when _real_ksm_zero_rules would accept it).  It is taken to have been there,
    unchanged (its previous row), so the replay neither loses nor re-adds it.  A pass over the
    trace with each page's previous row, only for traces captured while the real KSM ran."""
    if not trace.has_ground_truth:
        return {}
    g = trace.read_table("ksm", columns=["run", "use_zero_pages"])
    running = g["run"] == 1
    if not bool(running.any()):
        return {}
    zero_on = bool((running & (g["use_zero_pages"] == 1)).any())
    split_remap = _kernel_at_least(trace.host.get("kernel_release"), 6, 12)
    ok = np.zeros(n_pages, bool)  # the page has a previous row, and it is not GONE
    pflags = np.zeros(n_pages, np.int64)
    phash = np.zeros(n_pages, np.int64)
    ppfn = np.zeros(n_pages, np.int64)
    pend = (np.zeros(0, np.int64),) * 4
    out: dict[int, tuple] = {}
    for s in range(trace.n_snapshots):
        df = trace.read_table("pages", [s], ["proc", "vpn", "op", "flags", "hash", "pfn"])
        df = df.filter(pl.col("op") != S.OP_SAME)
        dproc = np.searchsorted(proc_ids, df["proc"].to_numpy().astype(np.int64)).astype(np.int64)
        vpn = df["vpn"].to_numpy().astype(np.int64)
        order = np.lexsort((vpn, dproc))
        pg = np.empty(len(vpn), np.int64)
        if _page_ids(dproc[order], vpn[order], proc_pg_lo, proc_pg_hi, page_vpn, pg) >= 0:
            continue  # (pass 2 reports the row)
        op = df["op"].to_numpy()[order]
        flags = df["flags"].to_numpy()[order].astype(np.int64)
        h = np.ascontiguousarray(df["hash"].to_numpy()[order]).view(np.int64)
        pfn = df["pfn"].to_numpy()[order].astype(np.int64)
        # last snapshot's GONE rows whose page shows the remap now
        ppg, pf, ph, pp = pend
        if len(ppg):
            j = np.minimum(np.searchsorted(pg, ppg), max(len(pg) - 1, 0))
            here = (len(pg) > 0) & (pg[j] == ppg) if len(pg) else np.zeros(len(ppg), bool)
            qf, qh, qop = flags[j], h[j], op[j]
            in_thp = (pf & S.F_THP) != 0
            ksm = ((qf & S.F_KSM) != 0) & (qh == ph)
            zero = (((qf & S.F_ZERO_PAGE) != 0) & ((pf & S.F_ZERO_FILLED) != 0)
                    & ((~in_thp & zero_on) | (in_thp & split_remap)))
            heal = here & (qop != S.OP_GONE) & (ksm | zero)
            if heal.any():
                out[s - 1] = (ppg[heal], pf[heal], ph[heal], pp[heal])
        gone = op == S.OP_GONE
        q = pg[gone]
        cand = ok[q] & ((pflags[q] & (S.F_PRESENT | S.F_ANON)) == (S.F_PRESENT | S.F_ANON)) & ((pflags[q] & S.F_ZERO_PAGE) == 0)
        q = q[cand]
        pend = (q, pflags[q], phash[q], ppfn[q])
        ok[pg] = ~gone
        pflags[pg], phash[pg], ppfn[pg] = flags, h, pfn
    return out


def _fork_parents(trace, procs: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For every process (dense index): its traced parent (-1: none) and its first snapshot in the
    processes table, for fork children's pages that map a page the real kernel had merged (see
    _inherit_frames)."""
    n = procs.height
    parent = np.full(n, -1, np.int32)
    first_snap = np.full(n, -1, np.int64)
    if n == 0 or not trace.has_table("processes"):
        return parent, first_snap
    pt = trace.read_table("processes", columns=["proc", "pid", "ppid", "snap"])
    if pt.height == 0:
        return parent, first_snap
    first = pt.group_by("proc").agg(pl.col("pid").first(), pl.col("ppid").first(), pl.col("snap").min().alias("first"))
    dense = {int(p): i for i, p in enumerate(procs["proc"].to_list())}
    info = {dense[int(r["proc"])]: (int(r["pid"]), int(r["ppid"]), int(r["first"])) for r in first.iter_rows(named=True)
            if int(r["proc"]) in dense}
    by_pid: dict[int, list[tuple[int, int]]] = {}
    for d in sorted(info):
        by_pid.setdefault(info[d][0], []).append((info[d][2], d))
    for c, (_, ppid, f) in info.items():
        first_snap[c] = f
        parents = [d for fs, d in by_pid.get(ppid, []) if fs <= f and d != c]
        if parents:
            parent[c] = max(parents, key=lambda d: info[d][2])
    return parent, first_snap


def _inherit_frames(forks: list, store: EventStore, parent, page_proc, page_vpn, proc_pg_lo, proc_pg_hi,
                    ps, fpfn, flapfn, flaev, bloom, hits: list, pairs: list) -> None:
    """A fork child's page that appears mapping a page the real kernel had merged gets its
    parent's frame key.

    Frame keys deliberately ignore KSM-flagged rows, so that the replay simulates merging itself.
    But a child forked after the real kernel merged some of its parent's pages inherits those
    mappings: without any dedup, each such page would be fork-shared with the parent's page at the
    same address, so it takes the frame key of that page's last arrival (its PFN and content, or
    that arrival itself when it had no key); the engine then maps the child page to whatever the
    parent page maps in the replay (its frame, or the replay's KSM page).  Otherwise the child's
    page is a frame of its own that the replay has not merged yet, and early writes to it are not
    COW breaks (measured: forkdiverge lost 11% of its COW breaks).  Called after a snapshot's rows,
    so the parent page's state is its row at this snapshot.  ``forks``: (event, page, content,
    the row's PFN) of the snapshot's candidates, in row order.
    """
    for ev, q, cid, row_pfn in forks:
        c = int(page_proc[q])
        par = int(parent[c])
        lo, hi = int(proc_pg_lo[par]), int(proc_pg_hi[par])
        v = page_vpn[q]
        j = lo + int(np.searchsorted(page_vpn[lo:hi], v))
        if j >= hi or page_vpn[j] != v:
            continue
        if not (ps[j, PS_BITS] & ST_KSM) or fpfn[j] != row_pfn or ps[j, PS_CID] != cid:
            continue
        if flaev[j] < 0:
            continue
        if flapfn[j] >= 0:
            store.write_column("pfn", ev, np.array([flapfn[j]], np.int64))
            if _bloom_seen(bloom, np.int64(flapfn[j]), np.int64(cid)):
                hits.append(np.array([[flapfn[j], cid]], np.int64))
        else:
            pairs.append((int(flaev[j]), ev))
        flapfn[q] = flapfn[j]
        flaev[q] = flaev[j]


@njit(cache=True, nogil=True)
def _count_keys(pfns, cids, keys_pfn, keys_cid, slots, bits, count, first, ev0):
    """Arrivals per candidate key (an open-addressing table over the unique Bloom hits, behind a
    one-bit-per-key filter ``bits`` that rejects most arrivals at once) and the first arrival of
    each."""
    cap = len(slots)
    nb = len(bits) * 64
    for i in range(len(pfns)):
        p = pfns[i]
        if p < 0:
            continue
        c = cids[i]
        hk = _mix(p ^ _mix(c + _MIX2))
        b = _slot(hk, nb)
        if (bits[b >> 6] >> np.uint64(b & 63)) & np.uint64(1) == 0:
            continue
        h = _slot(hk, cap)
        while True:
            k = slots[h]
            if k < 0:
                break
            if keys_pfn[k] == p and keys_cid[k] == c:
                count[k] += 1
                if first[k] < 0:
                    first[k] = ev0 + i
                break
            h += 1
            if h == cap:
                h = 0


@njit(cache=True, nogil=True)
def _assign_keys(pfns, cids, keys_pfn, keys_cid, slots, gid_of, out):
    cap = len(slots)
    for i in range(len(pfns)):
        out[i] = -1
        p = pfns[i]
        if p < 0:
            continue
        c = cids[i]
        h = _slot(_mix(p ^ _mix(c + _MIX2)), cap)
        while True:
            k = slots[h]
            if k < 0:
                break
            if keys_pfn[k] == p and keys_cid[k] == c:
                out[i] = gid_of[k]
                break
            h += 1
            if h == cap:
                h = 0


@njit(cache=True, nogil=True)
def _key_table(keys_pfn, keys_cid):
    """An open-addressing table of the candidate keys, and a filter of one bit per key (16 bits a key)."""
    cap = max(16, 2 * len(keys_pfn))
    slots = np.full(cap, -1, np.int64)
    bits = np.zeros(max(1, len(keys_pfn) // 4 + 1), np.uint64)
    nb = len(bits) * 64
    for k in range(len(keys_pfn)):
        hk = _mix(keys_pfn[k] ^ _mix(keys_cid[k] + _MIX2))
        b = _slot(hk, nb)
        bits[b >> 6] |= np.uint64(1) << np.uint64(b & 63)
        h = _slot(hk, cap)
        while slots[h] >= 0:
            h += 1
            if h == cap:
                h = 0
        slots[h] = k
    return slots, bits


@njit(cache=True, nogil=True)
def _shared_frame_counts(kinds, pgs, gids, cur, cnt, acc):
    """Pages on a shared frame and shared frames in use, after one snapshot's events (removals
    first, then arrivals)."""
    for i in range(len(kinds)):
        k = kinds[i]
        if k == 2 or k == 3 or k == 4:
            g = cur[pgs[i]]
            if g >= 0:
                cur[pgs[i]] = -1
                acc[0] -= 1
                cnt[g] -= 1
                if cnt[g] == 0:
                    acc[1] -= 1
    for i in range(len(kinds)):
        k = kinds[i]
        if k == 1 or k == 4:
            g = gids[i]
            if g >= 0:
                cur[pgs[i]] = g
                acc[0] += 1
                if cnt[g] == 0:
                    acc[1] += 1
                cnt[g] += 1


def _shared_frames(store: EventStore, off: np.ndarray, hits: list, pairs: list, n_pages: int) -> tuple[int, np.ndarray | None]:
    """Pass 3: dense ids for the frame keys with two or more arrivals (in order of first arrival;
    then frames shared through a fork child's inheritance, in order of the parent's arrival),
    written into the events' ``gid``.  Returns (shared frames, per snapshot the pages on a shared
    frame minus the shared frames in use -- None if there is none)."""
    n_keys = 0
    if hits:
        h = np.unique(np.concatenate(hits), axis=0)
        keys_pfn, keys_cid = np.ascontiguousarray(h[:, 0]), np.ascontiguousarray(h[:, 1])
        slots, bits = _key_table(keys_pfn, keys_cid)
        count = np.zeros(len(keys_pfn), np.int64)
        first = np.full(len(keys_pfn), -1, np.int64)
        for _, a, b in store.blocks():
            _count_keys(store.column_range("pfn", a, b), store.column_range("cid", a, b), keys_pfn, keys_cid, slots, bits,
                        count, first, a)
        shared = np.flatnonzero(count >= 2)
        gid_of = np.full(len(keys_pfn), -1, np.int64)
        gid_of[shared[np.argsort(first[shared], kind="stable")]] = np.arange(len(shared))
        n_keys = len(shared)
        if n_keys:
            for _, a, b in store.blocks():
                out = np.empty(b - a, np.int32)
                _assign_keys(store.column_range("pfn", a, b), store.column_range("cid", a, b), keys_pfn, keys_cid, slots, gid_of, out)
                store.write_column("gid", a, out)
    n_shared = n_keys
    if pairs:  # arrivals with no key that a fork child inherited: shared by construction
        roots = sorted({e for e, _ in pairs})
        ids = {e: n_keys + i for i, e in enumerate(roots)}
        n_shared += len(roots)
        for e, r in pairs:
            for x in (e, r):
                store.write_column("gid", x, np.array([ids[e]], np.int32))
    if n_shared == 0:
        return 0, None
    cur = np.full(n_pages, -1, np.int32)
    cnt = np.zeros(n_shared, np.int64)
    acc = np.zeros(2, np.int64)
    excess = np.zeros(len(off) - 1, np.int64)
    for s in range(len(off) - 1):
        a, b = int(off[s]), int(off[s + 1])
        if b > a:
            _shared_frame_counts(store.column_range("kind", a, b), store.column_range("pg", a, b),
                                 store.column_range("gid", a, b), cur, cnt, acc)
        excess[s] = acc[0] - acc[1]
    return n_shared, excess


def _prepare(trace, scope: str, spill_path: str | os.PathLike | None = None) -> Prepared:
    if scope == "file":
        from ksmtrace.trace.pagecache import prepare_file

        return prepare_file(trace, scope)
    n_snaps = trace.n_snapshots
    times = np.asarray(trace.times_ns, dtype=np.int64)
    has_sample = trace.has_sample_hash
    strength_cols = [S.strength_column(x) for x in S.SAMPLE_STRENGTHS] if trace.has_sample_strengths else []

    # --- pass 1: pages and processes ------------------------------------------------------------
    recorded = scope == "recorded"
    vpns, seen, rows_per_snap, in_order, distinct = _page_keys(trace, recorded)
    procs = _process_table(trace, seen)
    n_procs = procs.height
    # dense process indices (procs is sorted by proc): nothing is sized by an id's value
    proc_ids = procs["proc"].to_numpy().astype(np.int64)
    segs = [_sorted_unique(vpns[p]) if p in vpns else np.zeros(0, np.int64) for p in proc_ids.tolist()]
    vpns.clear()
    sizes = np.array([len(v) for v in segs], np.int64)
    proc_pg_hi = np.cumsum(sizes).astype(np.int64)
    proc_pg_lo = (proc_pg_hi - sizes).astype(np.int64)
    n_pages = int(sizes.sum())
    page_vpn = np.concatenate(segs) if segs else np.zeros(0, np.int64)
    del segs
    page_proc = np.repeat(np.arange(n_procs, dtype=np.int32), sizes)
    if max(n_pages, int(rows_per_snap.sum())) >= 2**31 - 2:
        raise TraceError(f"{trace.path}: too large to prepare ({n_pages:,} pages; 32-bit page and event ids)")

    # --- pass 2: events, snapshot by snapshot -----------------------------------------------------
    gaps = _capture_gaps(trace, proc_ids, proc_pg_lo, proc_pg_hi, page_vpn, n_pages)
    zero_on, split_remap = _real_ksm_zero_rules(trace)
    parent, child_first = _fork_parents(trace, procs)
    track_fork = bool((parent >= 0).any())
    cfg = np.array([scope == "recorded", zero_on, split_remap, bool(trace.capture.get("soft_dirty")), track_fork], np.int64)
    ps = np.full((n_pages, 3), -1, np.int32)  # each page's previous row: PS_BITS, PS_CID, PS_THP
    ps[:, PS_BITS] = 0
    if track_fork:
        fpfn, flapfn, flaev = np.zeros(n_pages, np.int64), np.full(n_pages, -1, np.int64), np.full(n_pages, -1, np.int64)
    else:
        fpfn = flapfn = flaev = np.zeros(0, np.int64)
    ctab, ttab = _Table(), _Table()
    cnt = np.zeros(1024, np.int32)
    if distinct is not None:  # sized once: the estimate, five standard errors and a chunk more
        ctab.reserve(int(distinct * 1.04) + CHUNK_ROWS)
        cnt = np.zeros(int(distinct * 1.04) + CHUNK_ROWS, np.int32)
    total_rows = int(rows_per_snap.sum())
    bloom = np.zeros(max(BLOOM_MIN_WORDS, total_rows * BLOOM_BITS_PER_ROW // 64 + 1), np.uint64)
    acc = np.zeros(N_ACC, np.int64)
    first_cand = np.full(n_procs, n_snaps, np.int64)
    spilled = total_rows * 25 > spill_bytes()
    store = EventStore(has_sample, pfn=True, spill=(spill_path or True) if spilled else None,
                       capacity=0 if spilled else total_rows)
    base_pages = np.zeros(n_snaps, np.int64)
    zpm = np.zeros(n_snaps, np.int64)
    oracle_frames = np.zeros(n_snaps, np.int64)
    zero_filled = np.zeros(n_snaps, np.int64)
    off = np.zeros(n_snaps + 1, np.int64)
    hits: list[np.ndarray] = []
    pairs: list[tuple[int, int]] = []
    strengths: list[np.ndarray] = [np.zeros((0, len(strength_cols)), np.uint32)]  # ev_strength, chunk by chunk
    cols = ["proc", "vpn", "op", "hash", "flags", "pfn"] + (["sample"] if has_sample else [])
    cols += [c for c in strength_cols if c not in cols]
    n_hashed = np.zeros(1, np.int64)
    check = _DeltaCheck(trace, n_pages, proc_ids)

    def chunks():
        """Every snapshot's rows in page order, in chunks of at most CHUNK_ROWS rows (a snapshot
        whose file is not in (process, address) order: whole, sorted), with their page ids,
        checked (``_check_values``, ``_DeltaCheck``; SAME rows are checked, then dropped).  Runs
        in a worker thread, one chunk ahead of the caller."""
        def parts(s: int):
            """(rows, last): the snapshot's file in batches when it is in page order, else whole."""
            if in_order[s]:
                it = trace.read_batches("pages", s, cols, CHUNK_ROWS)
            else:
                it = iter([trace.read_table("pages", [s], cols)])
            df = next(it, None)
            while df is not None:
                nxt = next(it, None)
                yield df, nxt is None
                df = nxt

        for s in range(n_snaps):
            done = False
            for part, last in parts(s):
                done = last
                proc = part["proc"].to_numpy().astype(np.int64)
                dproc = np.minimum(np.searchsorted(proc_ids, proc), max(n_procs - 1, 0)).astype(np.int64)
                vpn = part["vpn"].to_numpy().astype(np.int64)
                op = part["op"].to_numpy()
                pfn = part["pfn"].to_numpy()
                _check_values(trace, s, op, vpn=vpn, pfn=pfn)
                order = None if in_order[s] else np.lexsort((vpn, dproc))
                get = (lambda x: x) if order is None else (lambda x, o=order: x[o])
                proc, dproc, vpn, op = get(proc), get(dproc), get(vpn), get(op)
                unknown = np.flatnonzero(proc_ids[dproc] != proc) if n_procs else np.arange(len(proc))
                if len(unknown):  # a process with no NEW, CHANGED or GONE row anywhere
                    i = int(unknown[0])
                    raise TraceError(f"{_pages_file(trace, s)}: page (proc {int(proc[i])}, vpn {int(vpn[i]):#x}) "
                                     f"is {_OP_NAMES[int(op[i])]} at snapshot {s} but was not mapped before (its NEW row is missing)")
                del proc
                pg = np.empty(len(vpn), np.int64)
                bad = _page_ids(dproc, vpn, proc_pg_lo, proc_pg_hi, page_vpn, pg)
                if bad >= 0:
                    raise TraceError(f"{_pages_file(trace, s)}: page (proc {int(proc_ids[dproc[bad]])}, vpn {int(vpn[bad]):#x}) "
                                     f"is {_OP_NAMES[int(op[bad])]} at snapshot {s} but was not mapped before (its NEW row is missing)")
                check.rows(s, pg, op, dproc, vpn)
                keep = op != S.OP_SAME  # unchanged pages listed by keyframes: no event
                if not keep.all():
                    sel = np.flatnonzero(keep)
                    get = (lambda x, o=sel: x[o]) if order is None else (lambda x, o=order[sel]: x[o])
                    pg, dproc, op = pg[sel], dproc[sel], op[sel]
                del vpn
                n = len(pg)
                flags = get(part["flags"].to_numpy()).astype(np.int64)
                hkey = np.ascontiguousarray(get(part["hash"].to_numpy())).view(np.int64)
                pfn = get(pfn).astype(np.int64)
                if s in gaps:  # rows the capture dropped: their previous rows (see _capture_gaps)
                    gpg, gf, gh, gp = gaps[s]
                    j = np.minimum(np.searchsorted(gpg, pg), len(gpg) - 1)
                    hit = np.flatnonzero(gpg[j] == pg)
                    if len(hit):
                        op, flags, hkey, pfn = op.copy(), flags.copy(), hkey.copy(), pfn.copy()
                        op[hit], flags[hit], hkey[hit], pfn[hit] = S.OP_CHANGED, gf[j[hit]], gh[j[hit]], gp[j[hit]]
                strength = (np.stack([get(part[c].to_numpy()).astype(np.uint32) for c in strength_cols], axis=1)
                            if strength_cols else None)
                if last:
                    check.end(s)
                yield SimpleNamespace(s=s, last=last, n=n, pg=pg, dproc=dproc, op=op, flags=flags, hkey=hkey, pfn=pfn,
                                      sample=get(part["sample"].to_numpy()) if has_sample else None, strength=strength)
            if not done:  # no rows at all
                check.end(s)
                e = np.zeros(0, np.int64)
                yield SimpleNamespace(s=s, last=True, n=0, pg=e, dproc=e, op=e.astype(np.uint8), flags=e, hkey=e,
                                      pfn=e, sample=None, strength=None)

    forks: list[tuple[int, int, int, int]] = []
    for r in _ahead(chunks()):
        s, n = r.s, r.n
        if n:
            ctab.ensure(n)  # content ids, in row order (here: the worker reads the next chunk meanwhile)
            cin = np.empty(n, np.int64)
            _content_ids(r.op, r.flags, r.hkey, recorded, ctab.tab, n_hashed, cin)
            ctab.count = int(n_hashed[0])
            ttab.ensure(int(np.count_nonzero(r.flags & S.F_THP)))
            if len(cnt) < ctab.count:
                cnt = np.concatenate([cnt, np.zeros(max(len(cnt), ctab.count - len(cnt)), np.int32)])
            buf = store.reserve(n)
            o_row, o_hits, o_forks = np.empty(n, np.int64), np.empty((n, 2), np.int64), np.empty(n, np.int64)
            ev0 = int(acc[A_EVENTS])
            m, nh, nf = _derive_events(s, r.pg, r.dproc, r.op, r.flags, cin, r.pfn, cfg, ps, fpfn,
                                       flapfn, flaev, cnt, ttab.tab, bloom, acc, first_cand, parent, child_first,
                                       buf["pg"], buf["kind"], buf["cid"], buf["gid"], buf["thp"], buf["pfn"],
                                       o_row, o_hits, o_forks)
            ttab.count = int(acc[A_NTHP])
            if nh:
                hits.append(o_hits[:nh].copy())
            forks += [(ev0 + e, int(buf["pg"][e]), int(buf["cid"][e]), int(r.pfn[o_row[e]])) for e in o_forks[:nf].tolist()]
            if has_sample:
                buf["sample"][:m] = r.sample[o_row[:m]]
            if strength_cols:
                strengths.append(r.strength[o_row[:m]])
            store.commit(buf, m)
        if not r.last:
            continue
        if forks:  # after every row of the snapshot: the parents' pages are at this snapshot
            _inherit_frames(forks, store, parent, page_proc, page_vpn, proc_pg_lo, proc_pg_hi, ps, fpfn,
                            flapfn, flaev, bloom, hits, pairs)
            forks = []
        off[s + 1] = acc[A_EVENTS]
        base_pages[s] = acc[A_CAND]
        zpm[s] = acc[A_ZPM]
        oracle_frames[s] = acc[A_DISTINCT]
        zero_filled[s] = acc[A_ZERO]
    store.finish()
    del ps, fpfn, flapfn, flaev, ctab, ttab, cnt, bloom
    n_normal, n_bad = int(n_hashed[0]), int(acc[A_BAD])
    n_cids = n_normal + 1 + n_bad
    if n_bad:  # unreadable pages' own contents: numbered after every hashed one
        for _, a, b in store.blocks():
            c = store.column_range("cid", a, b)
            bad = c <= -2
            if bad.any():
                store.write_column("cid", a, np.where(bad, n_normal + 1 + (-c - 2), c))

    # --- pass 3: frames shared by several arrivals ---------------------------------------------------
    n_gids, excess = _shared_frames(store, off, hits, pairs, n_pages)
    store.drop("pfn")
    store.put("page_vpn", page_vpn)
    del page_vpn
    base_frames = base_pages - excess if excess is not None else base_pages.copy()
    # naive: every present page in scope (zero-page mapped ones read as zeros) minus distinct hashes
    naive_distinct = oracle_frames + (zero_filled > 0) + ((zpm > 0) & (zero_filled == 0))
    prep = Prepared(
        scope=scope,
        trace_fingerprint=trace.fingerprint,
        trace_identity=trace.identity,
        times_ns=times,
        n_pages=n_pages,
        page_proc=page_proc,
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
        n_thp=int(acc[A_NTHP]),
        off=off,
        store=store,
        base_pages=base_pages,
        base_frames=base_frames,
        oracle_frames=oracle_frames,
        zero_filled=zero_filled,
        zero_page_mapped=zpm,
        hash_dup_pages=base_pages + zpm - naive_distinct,
        ev_strength=np.concatenate(strengths) if strength_cols else None,
        vmas=_vma_table(trace, proc_ids, n_snaps),
    )
    _registration(prep, procs, first_cand, n_snaps, scope)
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


def _check_values(trace, s: int, op: np.ndarray, vpn: np.ndarray | None = None, pfn: np.ndarray | None = None) -> None:
    """Values the format allows, in rows of snapshot ``s``: an op of 0..3, page numbers below 2^52."""
    if not len(op):
        return
    bad = op > S.OP_SAME
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{_pages_file(trace, s)}: op {int(op[i])} is not a page row operation (0 NEW, 1 CHANGED, 2 GONE, 3 SAME)")
    for name, col in (("vpn", vpn), ("pfn", pfn)):
        if col is not None and int(col.max()) >= MAX_PAGE_NUMBER:
            raise TraceError(f"{_pages_file(trace, s)}: {name} {int(col.max()):#x} is not a page number "
                             "(a 64-bit address >> 12 is below 2^52)")


_DELTA_RULES = {
    1: "appears twice in snapshot {s}",
    2: "is NEW at snapshot {s} but was already mapped (a row of an earlier snapshot was dropped or duplicated)",
    3: "is {op} at snapshot {s} but was not mapped before (its NEW row is missing)",
    4: "is SAME at snapshot {s}, which is not a keyframe",
}
_OP_NAMES = {S.OP_NEW: "NEW", S.OP_CHANGED: "CHANGED", S.OP_GONE: "GONE", S.OP_SAME: "SAME"}


class _DeltaCheck:
    """The page rows must be a valid delta encoding, and agree with the statistics the snapshot
    log recorded -- checked chunk by chunk as pass 2 reads them, in one int32 a page.

    Each page (proc, vpn) has at most one row per snapshot; NEW only when it is not mapped,
    CHANGED/GONE (and SAME) only when it is; SAME only in keyframes; a keyframe lists every page
    mapped before it.  The log's ``new``, ``changed``, ``gone`` and ``pages`` (mapped pages), when
    present, must equal what the rows say: a dropped, duplicated or emptied delta file shows here
    (for a trace read from disk: a view of one, e.g. without some processes, has other rows).
    """

    def __init__(self, trace, n_pages: int, proc_ids: np.ndarray) -> None:
        self.trace, self.proc_ids = trace, proc_ids
        self.keyframe = np.array([bool(e.get("keyframe")) for e in trace.snapshots], dtype=np.bool_)
        self.state = np.zeros(n_pages, np.int32)  # (last snapshot with a row + 1) << 1 | mapped
        self.st = np.zeros(_D_N, np.int64)
        self.counts = np.zeros(4, np.int64)
        self.from_disk = getattr(trace, "log_describes_rows", False)

    def rows(self, s: int, pg, op, dproc, vpn) -> None:
        """Rows of snapshot ``s`` (any order within it)."""
        code, i = _delta_rows(s, pg, op.astype(np.int64), bool(self.keyframe[s]), self.state, self.st, self.counts)
        if code:
            what = _DELTA_RULES[code].format(s=s, op=_OP_NAMES.get(int(op[i]), op[i]))
            raise TraceError(f"{_pages_file(self.trace, s)}: page (proc {int(self.proc_ids[dproc[i]])}, vpn {int(vpn[i]):#x}) {what}")

    def end(self, s: int) -> None:
        """After the last row of snapshot ``s``."""
        st, counts = self.st, self.counts
        if self.keyframe[s] and st[D_LISTED] != st[D_BEFORE]:
            raise TraceError(f"{_pages_file(self.trace, s)}: keyframe snapshot {s} does not list every page mapped before it "
                             "(rows were dropped)")
        if self.from_disk:  # (a view of a trace, e.g. without some processes: the log describes other rows)
            e = self.trace.snapshots[s]
            for key, k in (("new", S.OP_NEW), ("changed", S.OP_CHANGED), ("gone", S.OP_GONE)):
                want = e.get(key)
                if want is not None and want != counts[k]:
                    raise TraceError(f"{_pages_file(self.trace, s)}: {int(counts[k]):,} {key.upper()} rows, "
                                     f"but the snapshot log recorded {want:,}")
            want = e.get("pages")
            if want is not None and want != st[D_LIVE]:
                raise TraceError(f"{_pages_file(self.trace, s)}: the rows leave {int(st[D_LIVE]):,} pages mapped, "
                                 f"but the snapshot log recorded {want:,}")
        st[D_BEFORE] = st[D_LIVE]
        st[D_LISTED] = 0
        counts[:] = 0


D_LIVE, D_BEFORE, D_LISTED, _D_N = range(4)


@njit(cache=True, nogil=True)
def _delta_rows(s, pg, op, keyframe, state, st, counts):
    """Rows of snapshot ``s`` against each page's state.  Returns (rule broken or 0, row index)."""
    for i in range(len(pg)):
        p = pg[i]
        o = op[i]
        x = state[p]
        if (x >> 1) == s + 1:
            return 1, i
        live = (x & 1) != 0
        counts[o] += 1
        if o == 0:
            if live:
                return 2, i
            live = True
            st[D_LIVE] += 1
        else:
            if not live:
                return 3, i
            st[D_LISTED] += 1
            if o == 2:
                live = False
                st[D_LIVE] -= 1
            elif o == 3 and not keyframe:
                return 4, i
        state[p] = ((s + 1) << 1) | (1 if live else 0)
    return 0, -1


def _process_table(trace, seen: dict[int, tuple[int, int]]) -> pl.DataFrame:
    """One row per process incarnation: pid, comm, domain, registration and exit snapshots.
    ``seen``: the processes of the page rows, with the pid and snapshot of their first row."""
    if trace.has_table("processes"):
        p = trace.read_table("processes", columns=["snap", "proc", "pid", "start_ticks", "comm", "cgroup", "uid", "state", "mergeable"])
    else:
        p = None
    seen_df = pl.DataFrame(
        {"proc": list(seen), "pid": [v[0] for v in seen.values()], "first_row": [v[1] for v in seen.values()]},
        schema={"proc": pl.UInt32, "pid": pl.UInt32, "first_row": pl.Int64},
    )
    if p is None or p.height == 0:
        out = seen_df.with_columns(
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
        missing = seen_df.join(out.select("proc"), on="proc", how="anti")
        if missing.height:
            raise TraceError(f"{trace.path}: page rows name process {missing['proc'][0]} missing from the processes table")
    out = out.sort("proc")
    dom = out.select(pl.struct("uid", "cgroup").rank("dense").alias("d"))["d"].to_numpy().astype(np.int32) - 1
    return out.with_columns(pl.Series("domain", dom))


def _registration(prep: Prepared, procs: pl.DataFrame, first_cand: np.ndarray, n_snaps: int, scope: str) -> None:
    """When each mm joins ksmd's list, when it leaves, and the list order.

    ``recorded``: an mm registers at the first snapshot at which it has a mergeable VMA (or the
    first at which it has a candidate page); ``anon``: at its first snapshot.  Order: registration
    snapshot, then process start time, then pid (processes that register together were started in
    that order; the kernel appends each new mm behind the scan cursor, modelled in the policy).
    """
    n_procs = prep.n_procs
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
