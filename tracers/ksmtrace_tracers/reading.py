"""Read and hash the present pages of one process, batch by batch, in a reused 4 MiB buffer."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ksmtrace.trace.schema import SAMPLE_STRENGTHS
from ksmtrace_tracers.hashing import I64, PageHasher
from ksmtrace_tracers.procmem import PageFiller, ProcessGone, ReadDenied


@dataclass
class ReadResult:
    hash: np.ndarray  # uint64 [n]; 0 where the read failed
    failed: np.ndarray  # bool [n]
    sample: np.ndarray | None = None  # uint32 [n] (fingerprints)
    strengths: np.ndarray | None = None  # uint32 [n, len(SAMPLE_STRENGTHS)] (fingerprints)
    pfx: dict[int, np.ndarray] | None = None  # N -> uint32 [n] (fingerprints)
    bytes_read: int = 0
    gone: bool = False
    denied: bool = False


class ContentStore:
    """Content-addressed page contents for ``--contents``: each distinct content once per trace.

    Contents found during a snapshot are *pending* until the snapshot commits; a discarded
    snapshot forgets them (so a later snapshot stores them again)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.pending: dict[int, bytes] = {}

    def add_batch(self, hashes: np.ndarray, ok: np.ndarray, slices: list[memoryview], k: int) -> None:
        seen, pending = self.seen, self.pending
        for i, h in enumerate(hashes[:k].tolist()):
            if h in seen or h in pending or not ok[i]:
                continue
            pending[h] = bytes(slices[i])

    def add(self, h: int, data: bytes) -> None:
        if h not in self.seen and h not in self.pending:
            self.pending[h] = data

    def take(self) -> tuple[list[int], list[bytes]]:
        keys = sorted(self.pending)
        return keys, [self.pending[k] for k in keys]

    def commit(self) -> None:
        self.seen.update(self.pending)
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()


@dataclass
class PageReader:
    """Reads and hashes pages of processes, batch by batch, in one reused buffer (one per capture,
    or per worker process).

    The batch is 256 pages (1 MiB): the kernel copies each page into the buffer and the hash reads
    it back while it is still in the L2 cache (measured faster than 4 MiB batches for /proc/PID/mem).
    Overlapping the read of batch k+1 (in a helper thread: preadv releases the GIL) with the hashing
    of batch k was tried and measured slower here: the hash holds the GIL for the whole batch, so
    the helper thread cannot even start its system call until the hashing ends, and on two busy
    cores the hand-off costs more than it saves.  Parallelism comes from ``--workers`` processes."""

    hasher: PageHasher
    batch_pages: int = 256
    filler: PageFiller = field(init=False)

    def __post_init__(self) -> None:
        self.filler = PageFiller(self.batch_pages)
        self.slices = self.hasher.slices(self.filler.mv, self.batch_pages)
        self.pslices = self.hasher.prefix_slices(self.filler.mv, self.batch_pages) if self.hasher.fingerprints else None

    def close(self) -> None:
        self.filler.close()

    def read(self, pid: int, vpns: np.ndarray, contents: ContentStore | None = None) -> ReadResult:
        """Read and hash pages ``vpns`` (sorted, present) of ``pid`` through /proc/PID/mem."""
        n = len(vpns)
        res = ReadResult(hash=np.zeros(n, np.uint64), failed=np.ones(n, bool))
        fp = self.hasher.fingerprints
        if fp:
            res.sample = np.zeros(n, np.uint32)
            res.strengths = np.zeros((n, len(SAMPLE_STRENGTHS)), np.uint32)
            res.pfx = {ln: np.zeros(n, np.uint32) for ln in self.pslices}  # type: ignore[union-attr]
        if n == 0:
            return res
        f = self.filler
        f.open(pid)
        b0 = f.bytes_read
        B = self.batch_pages
        try:
            for lo in range(0, n, B):
                k = min(B, n - lo)
                ok = f.fill(vpns[lo : lo + k])
                h = self.hasher.hash(self.slices, k)
                if not ok.all():
                    h[~ok] = 0
                res.hash[lo : lo + k] = h
                res.failed[lo : lo + k] = ~ok
                if fp:
                    st = self.hasher.strengths(f.buf, k)  # every strength in one pass; 64 is ``sample``
                    st[~ok] = 0
                    res.strengths[lo : lo + k] = st  # type: ignore[index]
                    res.sample[lo : lo + k] = st[:, I64]  # type: ignore[index]
                    for ln, arr in self.hasher.prefixes(self.pslices, k).items():  # type: ignore[arg-type]
                        arr[~ok] = 0
                        res.pfx[ln][lo : lo + k] = arr  # type: ignore[index]
                if contents is not None:
                    contents.add_batch(h, ok, self.slices, k)
        except ProcessGone:
            res.gone = True
        except ReadDenied:
            res.denied = True
        finally:
            res.bytes_read = f.bytes_read - b0
            f.close()
        return res
