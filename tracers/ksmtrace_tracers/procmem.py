"""Reading page contents of another process through ``/proc/PID/mem``, into a reused buffer.

Only ``/proc/PID/mem`` (``os.preadv``, one call per run of consecutive pages): the kernel reads it
with get_user_pages *without* FOLL_PIN, so a shared anonymous page — a KSM page, a page a fork
shares, a page ksmd merges or a fork shares while the snapshot is being read — stays shared.
``process_vm_readv`` is never used: it pins what it reads (FOLL_PIN), and the kernel unshares a
pinned anonymous page that is not exclusive (``gup_must_unshare`` -> FAULT_FLAG_UNSHARE -> a COW
copy in the target, counted in ``cow_ksm`` for a KSM page); a page that pagemap showed exclusive
can become shared between the pagemap read and the content read (ksmd merges it, the target
forks), so no pre-check makes it safe.  ``bench/capture.py`` measures what that costs.

Only pages the caller knows to be present are asked for (reading a non-present page would fault
it in: swap it in or map the zero page).  A page whose read fails (unmapped meanwhile:
EFAULT/EIO) is reported as failed and the read goes on with the next page.  A process that
exited raises :class:`ProcessGone`.
"""
from __future__ import annotations

import errno
import os

import numpy as np

PAGE = 4096


class ProcessGone(Exception):
    """The process exited (ESRCH, or its mm is gone)."""


class ReadDenied(Exception):
    """No permission to read the process's memory."""


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

    def __init__(self, batch_pages: int = 256) -> None:
        if batch_pages < 1:
            raise ValueError("batch_pages must be >= 1")
        self.batch_pages = batch_pages
        self.buf = np.zeros(batch_pages * PAGE, dtype=np.uint8)
        self.mv = memoryview(self.buf)
        self.pid: int | None = None
        self._mem_fd: int | None = None
        self.bytes_read = 0

    def open(self, pid: int) -> None:
        self.close()
        self.pid = pid

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

    def fill(self, vpns: np.ndarray) -> np.ndarray:
        """Read pages ``vpns`` (sorted, at most ``batch_pages``) into buffer slots 0..n-1.

        Returns a boolean mask of the pages that were read."""
        n = len(vpns)
        if n > self.batch_pages:
            raise ValueError("batch too large")
        ok = np.ones(n, dtype=bool)
        fd = self._mem()
        starts, lens = runs(vpns)
        for s, ln in zip(starts.tolist(), lens.tolist()):
            j = s
            end = s + ln
            while j < end:
                want = (end - j) * PAGE
                try:
                    r = os.preadv(fd, [self.mv[j * PAGE : j * PAGE + want]], int(vpns[j]) * PAGE)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        raise ProcessGone(self.pid) from None
                    if exc.errno in (errno.EPERM, errno.EACCES):
                        raise ReadDenied(self.pid) from None
                    r = -1
                if r == 0:  # the mm is gone: the process exited
                    raise ProcessGone(self.pid)
                if r == want:
                    self.bytes_read += want
                    break
                good = max(r, 0) // PAGE
                self.bytes_read += good * PAGE
                ok[j + good] = False
                j += good + 1
        return ok
