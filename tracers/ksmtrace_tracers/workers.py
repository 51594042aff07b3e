"""``--workers N``: read + hash large page lists in a fork-based process pool.

xxhash holds the GIL, so threads do not help; processes do (limits.md: 2 processes ≈ 1.4x).  A
process's page list is cut into contiguous chunks; each worker reads and hashes its chunks with
its own buffer (same key, same /proc/PID/mem reads) and returns
the hashes; the results are identical to a single-process read.  The pool is created before
any thread or the watchdog exists; workers ignore SIGINT (the parent decides), die with the
parent (PR_SET_PDEATHSIG) and never hold the watchdog's pipe.  ``--contents`` reads in the main
process (contents would have to travel back through pipes).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import signal

import numpy as np

from ksmtrace_tracers.hashing import PageHasher
from ksmtrace_tracers.reading import PageReader, ReadResult

_reader: PageReader | None = None
PR_SET_PDEATHSIG = 1


def _init(key: int, fingerprints: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    global _reader
    _reader = PageReader(PageHasher(key, fingerprints))


def _task(args) -> ReadResult:
    pid, vpns = args
    assert _reader is not None
    return _reader.read(pid, vpns)


class WorkerPool:
    def __init__(self, n: int, key: int, fingerprints: bool, min_chunk: int = 16384) -> None:
        self.n = n
        self.min_chunk = min_chunk
        ctx = multiprocessing.get_context("fork")
        self.pool = ctx.Pool(n, initializer=_init, initargs=(key, fingerprints))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in getattr(self.pool, "_pool", [])]

    def worth_it(self, n_pages: int) -> bool:
        return n_pages >= 2 * self.min_chunk

    def read(self, pid: int, vpns: np.ndarray) -> ReadResult:
        n = len(vpns)
        parts = max(1, min(self.n * 4, n // self.min_chunk))
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        chunks = [(pid, vpns[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        results = self.pool.map(_task, chunks, chunksize=1)
        out = ReadResult(
            hash=np.concatenate([r.hash for r in results]),
            failed=np.concatenate([r.failed for r in results]),
        )
        if results[0].sample is not None:
            out.sample = np.concatenate([r.sample for r in results])  # type: ignore[misc]
            out.strengths = np.concatenate([r.strengths for r in results])  # type: ignore[misc]
            out.pfx = {k: np.concatenate([r.pfx[k] for r in results]) for k in results[0].pfx}  # type: ignore[index,union-attr]
        out.bytes_read = sum(r.bytes_read for r in results)
        out.gone = any(r.gone for r in results)
        out.denied = any(r.denied for r in results)
        return out

    def close(self) -> None:
        try:
            self.pool.terminate()
            self.pool.join()
        except Exception:
            pass
