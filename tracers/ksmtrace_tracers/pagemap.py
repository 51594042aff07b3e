"""/proc/PID/pagemap and /proc/kpageflags: reading into numpy, decoding, and host probes.

pagemap (Documentation/admin-guide/mm/pagemap.rst), one u64 per virtual page:
bit 63 present, 62 swapped, 61 file-page or shared-anon, 56 exclusively mapped, 55 soft-dirty,
bits 0-54 the PFN when present (zero without CAP_SYS_ADMIN), the swap type/offset when swapped.

kpageflags, one u64 per PFN: KPF_DIRTY 4, KPF_ACTIVE 6, KPF_WRITEBACK 8, KPF_ANON 12, KPF_COMPOUND_HEAD 15, KPF_COMPOUND_TAIL 16, KPF_HUGE 17
(hugetlb), KPF_KSM 21, KPF_THP 22, KPF_ZERO_PAGE 24.
"""
from __future__ import annotations

import mmap
import os

import numpy as np

PM_PRESENT = np.uint64(1 << 63)
PM_SWAP = np.uint64(1 << 62)
PM_FILE = np.uint64(1 << 61)
PM_EXCLUSIVE = np.uint64(1 << 56)
PM_SOFT_DIRTY = np.uint64(1 << 55)
PM_PFN_MASK = np.uint64((1 << 55) - 1)

KPF_LOCKED = 0
KPF_DIRTY = 4
KPF_ACTIVE = 6
KPF_WRITEBACK = 8
KPF_ANON = 12
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_NOPAGE = 20
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24

PAGE = 4096
_CHUNK = 1 << 16  # pagemap entries per preadv (512 KiB)


def read_pagemap(fd: int, start_vpn: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """``n`` pagemap entries from ``start_vpn`` (zeros where the kernel returned nothing, e.g.
    after the process exited)."""
    arr = out if out is not None else np.empty(n, dtype=np.uint64)
    done = 0
    while done < n:
        k = min(_CHUNK, n - done)
        view = arr[done : done + k]
        try:
            got = os.preadv(fd, [view], (start_vpn + done) * 8)
        except OSError:
            got = 0
        if got <= 0:
            arr[done:] = 0
            break
        got //= 8
        if got < k:
            arr[done + got : done + k] = 0
        done += k
    return arr


def decode(pm: np.ndarray) -> dict[str, np.ndarray]:
    """Split pagemap entries into boolean masks and the PFN (0 where not present)."""
    present = (pm & PM_PRESENT) != 0
    return {
        "present": present,
        "swapped": (pm & PM_SWAP) != 0,
        "file": (pm & PM_FILE) != 0,
        "exclusive": (pm & PM_EXCLUSIVE) != 0,
        "soft_dirty": (pm & PM_SOFT_DIRTY) != 0,
        "pfn": np.where(present, pm & PM_PFN_MASK, np.uint64(0)),
    }


def kpf_bit(flags: np.ndarray, bit: int) -> np.ndarray:
    return (flags & np.uint64(1 << bit)) != 0


class KpageflagsReader:
    """Reads /proc/kpageflags for a set of PFNs: sorted PFNs, one preadv per run of nearby PFNs
    (gaps of up to ``GAP`` entries are read through), scattered back."""

    GAP = 32

    def __init__(self, path: str = "/proc/kpageflags") -> None:
        self.path = path
        self.fd: int | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            buf = np.zeros(1, np.uint64)
            os.preadv(self.fd, [buf], 0)
        except OSError:
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None

    @property
    def readable(self) -> bool:
        return self.fd is not None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flags, ok) for every entry of ``pfns`` (any order, repeats allowed)."""
        n = len(pfns)
        flags = np.zeros(n, dtype=np.uint64)
        ok = np.zeros(n, dtype=bool)
        if self.fd is None or n == 0:
            return flags, ok
        order = np.argsort(pfns, kind="stable")
        sp = pfns[order].astype(np.int64)
        # runs of nearby PFNs; a gap of up to GAP entries is read through (an entry costs ~60 ns,
        # a preadv ~1-2 us)
        brk = np.flatnonzero(np.diff(sp) > self.GAP) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [n]))
        lo = sp[starts]
        span = sp[ends - 1] - lo + 1
        offs = np.concatenate(([0], np.cumsum(span)))
        scratch = np.zeros(int(offs[-1]), dtype=np.uint64)
        got = np.zeros(len(starts), dtype=np.int64)
        for i, (a, ln, o) in enumerate(zip(lo.tolist(), span.tolist(), offs[:-1].tolist())):
            got[i] = self._pread(scratch[o : o + ln], a)
        run = np.repeat(np.arange(len(starts)), ends - starts)
        rel = sp - lo[run]
        valid = rel < got[run]
        idx = offs[:-1][run] + rel
        vals = np.where(valid, scratch[np.minimum(idx, len(scratch) - 1)], np.uint64(0))
        flags[order] = vals
        ok[order] = valid
        return flags, ok

    def _pread(self, view: np.ndarray, pfn: int) -> int:
        """Entries read into ``view`` from ``pfn`` on (short at the end of memory)."""
        assert self.fd is not None
        done = 0
        n = len(view)
        while done < n:
            k = min(n - done, _CHUNK)
            try:
                got = os.preadv(self.fd, [view[done : done + k]], (pfn + done) * 8)
            except OSError:
                return done
            if got <= 0:
                return done
            done += got // 8
            if got // 8 < k:
                return done
        return done


# --- host probes ------------------------------------------------------------------------------
def _own_page_entry(write: bool) -> int:
    """pagemap entry of a fresh private anonymous page of this process after touching it."""
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if write:
            m[0:1] = b"\x01"
        else:
            _ = m[0]
        addr = _address_of(m)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            arr = read_pagemap(fd, addr // PAGE, 1)
        finally:
            os.close(fd)
        return int(arr[0])
    finally:
        m.close()


def _address_of(m: mmap.mmap) -> int:
    import ctypes

    buf = (ctypes.c_char * 1).from_buffer(m)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


def pfn_readable() -> bool:
    """True when pagemap shows real PFNs (CAP_SYS_ADMIN)."""
    try:
        e = _own_page_entry(write=True)
    except OSError:
        return False
    return bool(e & (1 << 63)) and (e & ((1 << 55) - 1)) != 0


def zero_pfn() -> int | None:
    """PFN of the kernel's shared zero page (a read fault on fresh anonymous memory maps it), or
    None when PFNs are hidden."""
    try:
        e = _own_page_entry(write=False)
    except OSError:
        return None
    pfn = e & ((1 << 55) - 1)
    return pfn if (e & (1 << 63)) and pfn else None


def soft_dirty_available() -> bool:
    """True when the kernel tracks soft-dirty bits (CONFIG_MEM_SOFT_DIRTY).

    A freshly written page is soft-dirty on such kernels; without the option bit 55 is always 0
    (and writing 4 to clear_refs is accepted but does nothing)."""
    try:
        e = _own_page_entry(write=True)
    except OSError:
        return False
    return bool(e & (1 << 55))
