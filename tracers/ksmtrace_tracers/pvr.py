"""Reading page contents of another process into a reused buffer.

Two methods, both read-only and both reading only pages the caller knows to be present (either
would fault in a non-present page — swap it in or map the zero page — so the caller never asks
for those):

* ``process_vm_readv`` (ctypes, libc; the call releases the GIL): about 10 GiB/s here, one call
  per batch with one remote iovec per run of contiguous pages.  **It pins the pages it reads
  (FOLL_PIN), and a read-only pin of an anonymous page that is not exclusive — a page shared
  with a forked process, or a KSM page — makes the kernel unshare it first (gup_must_unshare →
  FAULT_FLAG_UNSHARE → a COW copy in the target).**  So it is used only for pages that pagemap
  shows exclusively mapped and kpageflags does not show as KSM pages.
* ``/proc/PID/mem`` (os.preadv; get_user_pages without FOLL_PIN, no unsharing): about half the
  speed; used for every other page, and for everything when process_vm_readv is not permitted.

A page whose read fails (unmapped meanwhile: EFAULT/EIO) is reported as failed and the read goes
on with the next page.  A process that exited raises :class:`ProcessGone`.
"""
from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

PAGE = 4096
IOV_MAX = 1024


class ProcessGone(Exception):
    """The process exited (ESRCH, or its mm is gone)."""


class ReadDenied(Exception):
    """No permission to read the process's memory."""


class _PvrUnavailable(Exception):
    pass


_pvr_fn = None


def _pvr():
    global _pvr_fn
    if _pvr_fn is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.process_vm_readv
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        _pvr_fn = fn
    return _pvr_fn


def runs(vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start index, length) of every run of consecutive page numbers in sorted ``vpns``."""
    n = len(vpns)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.flatnonzero(np.diff(vpns.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], brk)).astype(np.int64)
    lens = np.diff(np.concatenate((starts, [n]))).astype(np.int64)
    return starts, lens


class PageFiller:
    """Fills a reused buffer of ``batch_pages`` pages with pages of one process."""

    def __init__(self, batch_pages: int = 1024, allow_pvr: bool = True) -> None:
        if not 1 <= batch_pages <= IOV_MAX:
            raise ValueError(f"batch_pages must be 1..{IOV_MAX}")
        self.batch_pages = batch_pages
        self.buf = np.zeros(batch_pages * PAGE, dtype=np.uint8)
        self.mv = memoryview(self.buf)
        self.addr = int(self.buf.ctypes.data)
        self._riov = np.zeros((IOV_MAX, 2), dtype=np.uint64)
        self._liov = np.zeros((1, 2), dtype=np.uint64)
        self.allow_pvr = allow_pvr
        self.pid: int | None = None
        self._mem_fd: int | None = None
        self.pvr_usable = allow_pvr
        self.bytes_pvr = 0
        self.bytes_mem = 0

    # -------------------------------------------------------------------------------------
    def open(self, pid: int) -> None:
        self.close()
        self.pid = pid
        self.pvr_usable = self.allow_pvr

    def close(self) -> None:
        if self._mem_fd is not None:
            try:
                os.close(self._mem_fd)
            except OSError:
                pass
        self._mem_fd = None
        self.pid = None

    def _mem(self) -> int:
        if self._mem_fd is None:
            try:
                self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                raise ProcessGone(self.pid) from None
            except PermissionError:
                raise ReadDenied(self.pid) from None
        return self._mem_fd

    # -------------------------------------------------------------------------------------
    def fill(self, vpns: np.ndarray, use_pvr: bool) -> np.ndarray:
        """Read pages ``vpns`` (sorted, at most ``batch_pages``) into buffer slots 0..n-1.

        Returns a boolean mask of the pages that were read."""
        n = len(vpns)
        if n > self.batch_pages:
            raise ValueError("batch too large")
        if use_pvr and self.pvr_usable:
            try:
                return self._fill_pvr(vpns)
            except _PvrUnavailable:
                self.pvr_usable = False
        return self._fill_mem(vpns)

    def _fill_pvr(self, vpns: np.ndarray) -> np.ndarray:
        n = len(vpns)
        ok = np.ones(n, dtype=bool)
        fn = _pvr()
        pid = int(self.pid)  # type: ignore[arg-type]
        i = 0
        while i < n:
            sub = vpns[i:]
            starts, lens = runs(sub)
            k = len(starts)
            self._riov[:k, 0] = sub[starts].astype(np.uint64) * np.uint64(PAGE)
            self._riov[:k, 1] = lens.astype(np.uint64) * np.uint64(PAGE)
            want = (n - i) * PAGE
            self._liov[0, 0] = self.addr + i * PAGE
            self._liov[0, 1] = want
            r = fn(pid, self._liov.ctypes.data, 1, self._riov.ctypes.data, k, 0)
            if r == want:
                self.bytes_pvr += want
                break
            if r < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    raise ProcessGone(pid)
                if e in (errno.EPERM, errno.EACCES, errno.ENOSYS):
                    if i == 0:
                        raise _PvrUnavailable()
                    self.pvr_usable = False
                    ok[i:] = self._fill_mem(vpns[i:], offset=i)
                    return ok
                r = 0  # EFAULT/EIO/ENOMEM: the first page of this call failed
            good = r // PAGE
            self.bytes_pvr += good * PAGE
            ok[i + good] = False
            i = i + good + 1
        return ok

    def _fill_mem(self, vpns: np.ndarray, offset: int = 0) -> np.ndarray:
        n = len(vpns)
        ok = np.ones(n, dtype=bool)
        fd = self._mem()
        starts, lens = runs(vpns)
        for s, ln in zip(starts.tolist(), lens.tolist()):
            j = s
            end = s + ln
            while j < end:
                want = (end - j) * PAGE
                slot = offset + j
                try:
                    r = os.preadv(fd, [self.mv[slot * PAGE : slot * PAGE + want]], int(vpns[j]) * PAGE)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        raise ProcessGone(self.pid) from None
                    if exc.errno in (errno.EPERM, errno.EACCES):
                        raise ReadDenied(self.pid) from None
                    r = -1
                if r == 0:  # the mm is gone: the process exited
                    raise ProcessGone(self.pid)
                if r == want:
                    self.bytes_mem += want
                    break
                good = max(r, 0) // PAGE
                self.bytes_mem += good * PAGE
                ok[j + good] = False
                j += good + 1
        return ok
