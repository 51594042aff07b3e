"""Mergeable anonymous memory regions, filled through a numpy view."""
from __future__ import annotations

import mmap

import numpy as np

from ksmtrace.errors import WorkloadError
from ksmtrace.lab.workloads.content import PAGE_SIZE, render

# Pages rendered per batch: bounds the temporary (non-mergeable) buffer to 4 MiB.
_BATCH = 1024


class Region:
    """``pages`` pages of private anonymous memory, madvised MADV_MERGEABLE (VmFlags ``mg``)
    and MADV_NOHUGEPAGE (``nh``) unless ``thp`` asks for MADV_HUGEPAGE (``hg``).

    The memory is untouched (not present) until :meth:`write` fills it."""

    def __init__(self, pages: int, *, thp: bool = False, name: str = ""):
        if pages < 1:
            raise WorkloadError(f"region {name or '?'} needs at least one page, got {pages}")
        self.pages = pages
        self.name = name
        try:
            self._mm = mmap.mmap(-1, pages * PAGE_SIZE,
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise WorkloadError(f"cannot map {pages} pages of anonymous memory: {exc}; "
                                "lower the workload's page counts") from None
        try:
            self._mm.madvise(mmap.MADV_MERGEABLE)
        except OSError as exc:
            self._mm.close()
            raise WorkloadError(f"madvise(MADV_MERGEABLE) failed: {exc}; the kernel needs "
                                "CONFIG_KSM") from None
        try:
            self._mm.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE)
        except OSError as exc:
            if thp:
                self._mm.close()
                raise WorkloadError(f"madvise(MADV_HUGEPAGE) failed: {exc}; the kernel needs "
                                    "CONFIG_TRANSPARENT_HUGEPAGE, or drop thp") from None
            # Without THP support there are no huge pages to refuse.
        self._view = np.frombuffer(self._mm, dtype=np.uint8).reshape(pages, PAGE_SIZE)
        self.start = int(self._view.ctypes.data)

    @property
    def end(self) -> int:
        return self.start + self.pages * PAGE_SIZE

    def write(self, seed: int, pages: np.ndarray | None, cells: np.ndarray) -> None:
        """Write the content of ``cells`` into page indices ``pages`` (all pages if None)."""
        if self._view is None:
            raise WorkloadError(f"region {self.name or hex(self.start)} is already unmapped")
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
        if pages is None:
            pages = np.arange(self.pages)
        pages = np.asarray(pages, dtype=np.int64)
        if len(pages) != len(cells):
            raise ValueError("pages and cells differ in length")
        for lo in range(0, len(pages), _BATCH):
            data = render(seed, cells[lo:lo + _BATCH])
            idx = pages[lo:lo + _BATCH]
            if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
                self._view[idx[0]:idx[-1] + 1] = data
            else:
                self._view[idx] = data

    def read(self, page: int) -> bytes:
        """The current bytes of one page (for the process itself; tests read from outside)."""
        return bytes(self._view[page])

    def describe(self) -> dict:
        return {"region": self.name, "start": self.start, "pages": self.pages}

    def close(self) -> None:
        """munmap the region."""
        if self._view is not None:
            self._view = None
            self._mm.close()
