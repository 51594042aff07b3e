"""The page-cache recorder: the ``files`` and ``filepages`` tables (format version 2).

Per snapshot:

* ``files``: one row per file a target maps (``--scope all``: the procfs reader's ``vma_files``)
  and per regular file under a ``--files PATH`` that has resident pages: its path, size, mtime,
  and how many of its pages are in the page cache, dirty, under writeback (``cachestat(2)`` where
  the kernel has it, Linux 6.5+; else counted from the pages read);
* ``filepages``: the resident pages of the files under ``--files PATH`` — mapped by a target or
  not — keyed by (device, inode, page index), delta encoded like ``pages``, each with the same
  keyed hash as ``pages.hash`` (so a library page mapped by a target and the same page of another
  copy compare), and F_DIRTY, F_WRITEBACK, F_ACTIVE from kpageflags (root).

Reading a file's page cache **without changing it** (``docs/capture.md``; measured by
``tests/live/test_capture_pagecache.py``):

* residency comes from ``mincore(2)`` on a read-only shared mapping of the file, which reports
  the page cache and faults nothing in;
* only resident pages are read, through that mapping, after ``madvise(MADV_RANDOM)``: a fault on
  a ``VM_RAND_READ`` mapping starts no readahead (``do_sync_mmap_readahead`` and
  ``do_async_mmap_readahead`` return early), and unmapping it does not mark the pages accessed
  (``vma_has_recency`` is false), so the LRU lists see no extra use;
* the file is opened ``O_NOATIME`` where allowed (atime and mtime untouched), never written.

The one race left: a page reclaimed between ``mincore`` and its read (microseconds) is read back
from disk — that one page, no readahead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers.hashing import PageHasher
from ksmtrace_tracers.session import RecorderBase, SnapshotContext

PAGE = 4096
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long
_MAP_FAILED = ctypes.c_void_p(-1).value


class FileMapping:
    """A read-only shared mapping of a whole file with ``MADV_RANDOM`` (Python's mmap hides the
    address of a read-only mapping, which ``mincore`` and pagemap need)."""

    def __init__(self, fd: int, size: int) -> None:
        self.n_pages = (size + PAGE - 1) // PAGE
        self.length = self.n_pages * PAGE
        addr = _libc.mmap(None, self.length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.addr = int(addr)
        _libc.madvise(self.addr, self.length, mmap.MADV_RANDOM)

    def resident(self) -> np.ndarray:
        """The page indexes that are in the page cache (``mincore``: faults nothing in)."""
        vec = np.zeros(self.n_pages, np.uint8)
        if _libc.mincore(self.addr, self.length, vec.ctypes.data_as(ctypes.c_void_p)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return np.flatnonzero(vec & 1).astype(np.uint64)

    def page(self, index: int) -> bytes:
        """One page (past EOF within the last page: zeros, as in the page cache)."""
        return ctypes.string_at(self.addr + index * PAGE, PAGE)

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.length)
            self.addr = 0

    def __enter__(self) -> "FileMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cachestat(fd: int) -> tuple[int, int, int] | None:
    """(cached, dirty, writeback) pages of the whole file behind ``fd`` by ``cachestat(2)``, or
    None when the kernel does not have it."""
    if _SYS_CACHESTAT is None:
        return None
    rng, cs = _CachestatRange(0, 0), _Cachestat()  # len 0: to the end of the file
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(cs), 0) != 0:
        return None
    return int(cs.nr_cache), int(cs.nr_dirty), int(cs.nr_writeback)


def has_cachestat() -> bool:
    fd = os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return cachestat(fd) is not None
    finally:
        os.close(fd)


def file_residency(path: str | os.PathLike) -> np.ndarray:
    """The resident page indexes of one file (a test and bench helper)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return np.zeros(0, np.uint64)
        with FileMapping(fd, size) as m:
            return m.resident()
    finally:
        os.close(fd)


@dataclass
class FileRead:
    """One file read in one snapshot."""

    dev: int
    inode: int
    path: str
    size: int
    mtime_ns: int
    state: dict[str, np.ndarray]  # vpn (= page index), hash, flags, pfn
    counts: tuple[int, int, int]  # cached, dirty, writeback


def walk_files(roots: tuple[str, ...], exclude: str | None = None):
    """Every regular file under the ``roots`` (a root may itself be a file), each once, without
    following symbolic links, and nothing under ``exclude`` (the capture's own trace directory:
    its files change at every snapshot because of the capture itself)."""
    seen: set[tuple[int, int]] = set()
    if exclude is not None:
        try:
            st = os.stat(exclude)
            seen_dirs = {(st.st_dev, st.st_ino)}
        except OSError:
            seen_dirs = set()
    else:
        seen_dirs = set()
    for root in roots:
        try:
            st = os.stat(root)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                yield root
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        for d, dirs, names in os.walk(root):
            kept = []
            for name in sorted(dirs):
                try:
                    ds = os.lstat(os.path.join(d, name))
                except OSError:
                    continue
                if (ds.st_dev, ds.st_ino) not in seen_dirs:
                    kept.append(name)
            dirs[:] = kept
            for name in sorted(names):
                p = os.path.join(d, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    yield p


class PageCacheReader:
    """Reads the resident pages of files without changing their residency (module docstring)."""

    def __init__(self, hasher: PageHasher, kpf: PM.KpageflagsReader | None, pfn_readable: bool) -> None:
        self.hasher = hasher
        self.kpf = kpf
        self.pfn_readable = pfn_readable
        self._pagemap: int | None = None
        if pfn_readable:
            try:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._pagemap = None

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None

    def read(self, path: str) -> FileRead | None:
        """The resident pages of ``path`` (None: gone, unreadable, empty, or nothing resident)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return None
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return None
            try:
                m = FileMapping(fd, st.st_size)
            except OSError:
                return None
            try:
                idx = m.resident()
                counts = cachestat(fd)
                if len(idx) == 0 and (counts is None or counts[0] == 0):
                    return None
                state = self._read_pages(m, idx)
            finally:
                m.close()
            if counts is None:
                fl = state["flags"]
                counts = (len(idx), int(((fl & S.F_DIRTY) != 0).sum()), int(((fl & S.F_WRITEBACK) != 0).sum()))
            return FileRead(st.st_dev, st.st_ino, path, st.st_size, st.st_mtime_ns, state, counts)
        finally:
            os.close(fd)

    def _read_pages(self, m: FileMapping, idx: np.ndarray) -> dict[str, np.ndarray]:
        n = len(idx)
        hashes = self.hasher.hash([m.page(int(i)) for i in idx], n) if n else np.zeros(0, np.uint64)
        flags = np.full(n, S.F_PRESENT | S.F_FILE, np.uint32)
        flags |= np.where(hashes == np.uint64(self.hasher.zero_hash), S.F_ZERO_FILLED, 0).astype(np.uint32)
        pfn = np.zeros(n, np.uint64)
        if self._pagemap is not None and n:
            base = m.addr // PAGE
            pm = np.empty(n, np.uint64)
            # one pagemap read per run of consecutive indexes
            starts = np.concatenate(([0], np.flatnonzero(np.diff(idx.astype(np.int64)) != 1) + 1))
            ends = np.concatenate((starts[1:], [n]))
            for s, e in zip(starts.tolist(), ends.tolist()):
                pm[s:e] = PM.read_pagemap(self._pagemap, base + int(idx[s]), e - s)
            d = PM.decode(pm)
            present = d["present"] & (d["pfn"] != 0)
            pfn = np.where(present, d["pfn"], np.uint64(0)).astype(np.uint64)
            flags |= np.where(present, S.F_PFN, 0).astype(np.uint32)
            if self.kpf is not None and self.kpf.readable and present.any():
                pi = np.flatnonzero(present)
                kf, ok = self.kpf.read(pfn[pi])
                kflags = np.zeros(n, np.uint64)
                kok = np.zeros(n, bool)
                kflags[pi], kok[pi] = kf, ok
                flags |= np.where(kok, S.F_KPF, 0).astype(np.uint32)
                for bit, flag in ((PM.KPF_DIRTY, S.F_DIRTY), (PM.KPF_WRITEBACK, S.F_WRITEBACK), (PM.KPF_ACTIVE, S.F_ACTIVE)):
                    flags |= np.where(kok & PM.kpf_bit(kflags, bit), flag, 0).astype(np.uint32)
        return {"vpn": idx, "hash": hashes, "flags": flags, "pfn": pfn}


class PageCacheRecorder(RecorderBase):
    """Writes ``files`` (with ``--scope all`` or ``--files``) and ``filepages`` (``--files``)."""

    name = "pagecache"

    def __init__(self, roots: tuple[str, ...], scope_all: bool, pages) -> None:
        self.roots = tuple(os.path.abspath(r) for r in roots)
        self.scope_all = scope_all
        self.pages = pages  # the procfs reader: its hasher, kpageflags and the files mapped this snapshot
        self.reader = PageCacheReader(pages.hasher, pages.kpf, pages.pfn_readable)
        self.cachestat = has_cachestat()
        self._state: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._pending: dict[tuple[int, int], dict[str, np.ndarray]] | None = None
        self._reads: list[FileRead] = []
        self.exclude: str | None = None
        self.totals = {"file_pages_read": 0, "file_page_rows": 0}

    def manifest(self) -> dict[str, dict[str, Any]]:
        return {"capture": {
            "files": list(self.roots),
            "page_cache": {
                "residency": "mincore on a shared read-only mapping",
                "counts": "cachestat" if self.cachestat else "mincore and kpageflags",
                "read": "resident pages only, through a MADV_RANDOM mapping (no readahead, no LRU access marks)",
            },
        }}

    def start(self, session) -> None:
        self.exclude = str(session.output)

    def read(self, ctx: SnapshotContext) -> None:
        self._reads = []
        for p in walk_files(self.roots, self.exclude):
            r = self.reader.read(p)
            if r is not None:
                self._reads.append(r)

    def end(self, ctx: SnapshotContext) -> dict[str, pa.Table]:
        snap = ctx.snap
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        mapped = getattr(self.pages, "mapped_files", {}) if self.scope_all else {}
        for (dev, inode), (path, pid, start, end) in sorted(mapped.items()):
            rows[(dev, inode)] = mapped_file_row(snap, dev, inode, path, pid, start, end)
        parts = []
        new_state: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        read_pages = 0
        for r in sorted(self._reads, key=lambda r: (r.dev, r.inode)):
            key = (r.dev, r.inode)
            prev = self._state.get(key)
            parts.append((r.dev, r.inode, D.rows_for(snap, 0, 0, prev, r.state, D.diff(prev, r.state), ctx.keyframe)))
            new_state[key] = r.state
            read_pages += len(r.state["vpn"])
            src = S.FILE_LISTED | (rows[key]["source"] if key in rows else 0)
            rows[key] = {"snap": snap, "dev": r.dev, "inode": r.inode, "path": r.path, "size": r.size,
                         "mtime_ns": r.mtime_ns, "source": src, "cached_pages": r.counts[0],
                         "dirty_pages": r.counts[1], "writeback_pages": r.counts[2]}
        for key in sorted(set(self._state) - set(new_state)):  # a listed file that left the cache
            prev = self._state[key]
            empty = {k: v[:0] for k, v in prev.items()}
            parts.append((key[0], key[1], D.rows_for(snap, 0, 0, prev, empty, D.diff(prev, empty), False)))
        self._pending = new_state
        self._reads = []
        fp = D.filepages_table(snap, parts)
        ctx.stats.update(page_cache_files=len(rows), file_pages=read_pages)
        self._rows = fp.num_rows
        self._read_pages = read_pages
        tables = {"files": pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=S.FILES_SCHEMA)}
        if self.roots:
            tables["filepages"] = fp
        return tables

    def commit(self, ctx: SnapshotContext, ok: bool) -> None:
        pending, self._pending = self._pending, None
        if ok and pending is not None:
            self._state = pending
            self.totals["file_pages_read"] += self._read_pages
            self.totals["file_page_rows"] += self._rows

    def summary(self) -> dict[str, Any]:
        return dict(self.totals)

    def close(self) -> dict[str, Any]:
        self.reader.close()
        return {}


def mapped_file_row(snap: int, dev: int, inode: int, path: str, pid: int, start: int, end: int) -> dict[str, Any]:
    """The ``files`` row of a file a target maps: stat and cachestat of the mapped file itself
    (through /proc/PID/map_files, which names it even when deleted or renamed; else its path when
    that is still the same inode); a file that cannot be reached has size, mtime and counts 0."""
    row = {"snap": snap, "dev": dev, "inode": inode, "path": path, "size": 0, "mtime_ns": 0, "source": S.FILE_MAPPED,
           "cached_pages": 0, "dirty_pages": 0, "writeback_pages": 0}
    for p in (f"/proc/{pid}/map_files/{start:x}-{end:x}", path):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_ino != inode or not stat.S_ISREG(st.st_mode):
                continue
            row.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
            cs = cachestat(fd)
            if cs is not None:
                row.update(cached_pages=cs[0], dirty_pages=cs[1], writeback_pages=cs[2])
            return row
        finally:
            os.close(fd)
    return row
