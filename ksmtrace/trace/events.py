"""The prepared trace's page events, snapshot by snapshot: in memory, or in a spill file for traces
whose events would not fit in the memory the replay should need.

Every snapshot's events are one block of parallel columns (``COLUMNS``: page id, kind, content id,
shared frame id, huge page id; the sampled hash when the trace has it; during preparation the
frame number too).  A replay reads one snapshot's block at a time (:meth:`EventStore.read`), so a
spilled store keeps no more than that in memory: the file's pages stay in the page cache, outside
the process.  ``prepare`` decides where a store lives (:func:`spill_bytes` is the size from which
it spills).

A spilled store pickles as a reference to its file (its path and a random token written at the
start of the file), so a cached prepared trace loads in milliseconds; loading it when the file is
gone or was replaced raises :class:`~ksmtrace.errors.TraceError` (the cache then rebuilds).
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ksmtrace.errors import TraceError

MAGIC = b"ksmtrace-events\0"


class Events(NamedTuple):
    """Page events (parallel arrays, in page order within a snapshot)."""

    pg: np.ndarray  # int32 page id
    kind: np.ndarray  # uint8 EV_*
    cid: np.ndarray  # int32 new content (-1 for GONE/UNMERGE)
    gid: np.ndarray  # int32 frame id shared with other arrivals, -1 = a frame of its own
    thp: np.ndarray  # int32 huge page id, -1
    sample: np.ndarray | None  # uint32 sampled hash, when captured


#: (name, dtype) of every column a block holds; ``sample`` only with sampled hashes, ``pfn`` (the
#: arrival's frame number, -1 when it shares with no one) only until preparation is done
COLUMNS = (("pg", np.int32), ("kind", np.uint8), ("cid", np.int32), ("gid", np.int32), ("thp", np.int32))
OPTIONAL = (("sample", np.uint32), ("pfn", np.int64))
#: columns a spilled store returns as a zero-memory broadcast when a block holds a single value
#: (frames shared by no one, pages in no huge page: -1 throughout most blocks)
CONSTANT_PRONE = ("gid", "thp")


def spill_bytes() -> int:
    """Events of more than this many bytes are spilled to a file (``KSMTRACE_SPILL_MB``, default 64:
    beyond that, a cached prepared trace loads faster with its events in a file it reads a
    snapshot at a time than unpickled whole)."""
    try:
        return int(float(os.environ.get("KSMTRACE_SPILL_MB", "64")) * 2**20)
    except ValueError:
        return 64 * 2**20


class EventStore:
    """One snapshot's events after another; then read back by event index range."""

    def __init__(self, sample: bool, pfn: bool = False, spill: str | os.PathLike | bool | None = None,
                 capacity: int = 0) -> None:
        """``spill``: None/False keeps the events in memory (room for ``capacity`` events to start
        with); True spills to an anonymous temporary file; a path spills to that file (created
        0600, replaced if it exists)."""
        self.columns = list(COLUMNS) + [c for c in OPTIONAL if (c[0] == "sample" and sample) or (c[0] == "pfn" and pfn)]
        self.starts = [0]  # event index at which each block starts
        self.n = 0
        self._filling = False  # in memory, blocks still being added (into self._arr)
        self._mem: dict[str, np.ndarray] | None = None
        self.path: Path | None = None
        self._fd: int | None = None
        self._offsets: list[int] = []  # file offset of each block
        self._const: dict[tuple[int, str], int] = {}  # (block, column) -> the one value it holds
        self._side: dict[str, tuple] = {}  # other arrays: in memory (array,) or in the file (offset, n, dtype)
        self._whole: dict[str, np.ndarray] = {}  # whole columns read from the file (kept once read)
        self._end = 0
        self.token = ""
        self._dropped: set[str] = set()
        self._cap = 0
        self._arr: dict[str, np.ndarray] = {}
        if not spill:
            self._filling = True
            self._cap = int(capacity)
            self._arr = {name: np.empty(self._cap, dt) for name, dt in self.columns}
            return
        if spill is True:
            self._fd = _anonymous_file()
        else:
            self.path = Path(spill)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.replace(tmp, self.path)
        self.token = secrets.token_hex(16)
        head = MAGIC + self.token.encode()
        os.pwrite(self._fd, head, 0)
        self._end = len(head)

    # --- writing ------------------------------------------------------------------------------
    @property
    def spilled(self) -> bool:
        return self._fd is not None

    def reserve(self, n: int) -> dict[str, np.ndarray]:
        """Buffers for the next block of at most ``n`` events (every column of the store), to be
        filled and then committed with :meth:`commit`.  In memory they are views of the store's
        arrays, so nothing is copied."""
        if self._filling:
            need = self.n + n
            if self._cap < need:
                cap = max(need, self._cap + self._cap // 2, 1024)
                for name, dt in self.columns:
                    new = np.empty(cap, dt)
                    new[: self.n] = self._arr[name][: self.n]
                    self._arr[name] = new
                self._cap = cap
            return {name: self._arr[name][self.n : need] for name, _ in self.columns}
        return {name: np.empty(n, dt) for name, dt in self.columns}

    def commit(self, bufs: dict[str, np.ndarray], m: int) -> None:
        """The first ``m`` events of the buffers from :meth:`reserve` are the next block."""
        if not self._filling:
            blk = len(self._offsets)
            self._offsets.append(self._end)
            cols = [bufs[name][:m] for name, _ in self.columns]
            self._end += _pwritev(self._fd, cols, self._end)
            for (name, _), col in zip(self.columns, cols):
                if name in CONSTANT_PRONE and m and col[0] == col[-1] and not np.any(col != col[0]):
                    self._const[(blk, name)] = int(col[0])
        self.n += m
        self.starts.append(self.n)

    def append(self, cols: dict[str, np.ndarray]) -> None:
        """One block (one snapshot's events): every column of the store, equal lengths."""
        m = len(cols["pg"])
        bufs = self.reserve(m)
        for name, _ in self.columns:
            bufs[name][:m] = cols[name]
        self.commit(bufs, m)

    def finish(self) -> None:
        """No more blocks: an in-memory store's arrays are trimmed to their events."""
        if self._filling:
            trim = self._cap > self.n + self.n // 4  # keep a view unless a quarter would be wasted
            self._mem = {name: (self._arr[name][: self.n].copy() if trim else self._arr[name][: self.n])
                         for name, _ in self.columns}
            self._filling = False
            self._arr = {}

    def drop(self, name: str) -> None:
        """Forget a column (``pfn`` once preparation no longer needs it).  A spilled store keeps
        the bytes in its file and skips them."""
        if self._mem is not None:
            self._mem.pop(name, None)
        self._dropped.add(name)

    def has(self, name: str) -> bool:
        return any(c == name for c, _ in self.columns) and name not in self._dropped

    # --- reading ------------------------------------------------------------------------------
    def _col_offset(self, b: int, name: str) -> tuple[int, np.dtype]:
        """File offset of column ``name`` in block ``b``."""
        n = self.starts[b + 1] - self.starts[b]
        off = self._offsets[b]
        for c, dt in self.columns:
            if c == name:
                return off, np.dtype(dt)
            off += n * np.dtype(dt).itemsize
        raise KeyError(name)

    def column_range(self, name: str, a: int, b: int) -> np.ndarray:
        """Column ``name`` of events ``[a, b)`` (a view in memory, a fresh array from a file)."""
        mem = self._arr if self._filling else self._mem
        if mem is not None:
            return mem[name][a:b]
        dt = dict(self.columns)[name]
        if b <= a:
            return np.empty(0, dt)
        blk = int(np.searchsorted(self.starts, a, side="right")) - 1
        last = int(np.searchsorted(self.starts, b, side="left")) - 1
        vals = {self._const.get((i, name)) for i in range(blk, last + 1)}
        if len(vals) == 1 and None not in vals:  # one value throughout: no memory at all
            return np.broadcast_to(np.array(vals.pop(), dt), (b - a,))
        out = np.empty(b - a, dt)
        pos = a
        while pos < b:
            lo, hi = self.starts[blk], self.starts[blk + 1]
            take = min(b, hi) - pos
            if take > 0:
                off, dtt = self._col_offset(blk, name)
                _pread_into(self._fd, out[pos - a : pos - a + take], off + (pos - lo) * dtt.itemsize)
                pos += take
            blk += 1
        return out

    def read(self, a: int, b: int) -> Events:
        """Events ``[a, b)``."""
        return Events(
            self.column_range("pg", a, b), self.column_range("kind", a, b), self.column_range("cid", a, b),
            self.column_range("gid", a, b), self.column_range("thp", a, b),
            self.column_range("sample", a, b) if self.has("sample") else None,
        )

    def column(self, name: str) -> np.ndarray:
        """A whole column (a spilled store reads it from its file once and keeps it: that costs
        its full size in memory; a replay reads blocks, :meth:`read`)."""
        if self._mem is not None or self._filling:
            return self.column_range(name, 0, self.n)
        if name not in self._whole:
            self._whole[name] = self.column_range(name, 0, self.n)
        return self._whole[name]

    # --- arrays beside the events (in memory, or at the end of the file) -------------------------
    def put(self, name: str, arr: np.ndarray) -> None:
        """Keep ``arr`` with the events (after the last block; a spilled store writes it to its file)."""
        arr = np.ascontiguousarray(arr)
        if self._fd is None:
            self._side[name] = (arr,)
            return
        self._side[name] = (self._end, len(arr), arr.dtype.str)
        self._end += _pwritev(self._fd, [arr], self._end)

    def get(self, name: str) -> np.ndarray:
        """An array kept with :meth:`put` (a spilled store reads it from its file each time)."""
        v = self._side[name]
        if len(v) == 1:
            return v[0]
        off, n, dt = v
        out = np.empty(n, np.dtype(dt))
        _pread_into(self._fd, out, off)
        return out

    def blocks(self):
        """(block index, first event index, last + 1) of every block that holds events."""
        for i in range(len(self.starts) - 1):
            if self.starts[i + 1] > self.starts[i]:
                yield i, self.starts[i], self.starts[i + 1]

    def write_column(self, name: str, a: int, values: np.ndarray) -> None:
        """Overwrite column ``name`` of events ``[a, a + len(values))`` (within one block)."""
        dt = dict(self.columns)[name]
        values = np.ascontiguousarray(values, dtype=dt)
        if not len(values):
            return
        mem = self._arr if self._filling else self._mem
        if mem is not None:
            mem[name][a : a + len(values)] = values
            return
        blk = int(np.searchsorted(self.starts, a, side="right")) - 1
        if a + len(values) > self.starts[blk + 1]:
            raise ValueError("write_column spans blocks")
        off, dtt = self._col_offset(blk, name)
        _pwritev(self._fd, [values], off + (a - self.starts[blk]) * dtt.itemsize)
        self._const.pop((blk, name), None)
        self._whole.pop(name, None)

    def with_column(self, name: str, values: np.ndarray) -> "EventStore":
        """A copy of the store, in memory, with column ``name`` replaced by ``values`` (one per
        event) and the same blocks and side arrays: a prepared trace derived from this one (a
        restricted preset's content ids) without touching this store or its file."""
        out = EventStore(self.has("sample"), pfn=self.has("pfn"), capacity=self.n)
        dt = dict(out.columns)[name]
        for i in range(len(self.starts) - 1):
            a, b = self.starts[i], self.starts[i + 1]
            out.append({c: (np.asarray(values[a:b], dt) if c == name else self.column_range(c, a, b)) for c, _ in out.columns})
        out.finish()
        for k in self._side:
            out.put(k, self.get(k))
        return out

    # --- pickling: in memory, the arrays; spilled, the file's path and token ---------------------
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_arr", "_whole")}
        if self._fd is not None and self.path is None:
            raise TypeError("an event store spilled to an anonymous file cannot be pickled")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arr = {}
        self._whole = {}
        self._fd = None
        if self.path is not None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise TraceError(f"{self.path}: the prepared trace's events are gone ({exc.strerror})") from None
            head = os.pread(fd, len(MAGIC) + len(self.token), 0)
            if head != MAGIC + self.token.encode():
                os.close(fd)
                raise TraceError(f"{self.path}: not the events of this prepared trace")
            self._fd = fd

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _anonymous_file() -> int:
    """A file with no name (gone when closed) in the temporary directory."""
    fh = tempfile.TemporaryFile(prefix="ksmtrace-events-")
    fd = os.dup(fh.fileno())
    fh.close()
    return fd


def _pwritev(fd: int, bufs: list[np.ndarray], offset: int) -> int:
    total = 0
    for b in bufs:
        mv = memoryview(b).cast("B")
        while len(mv):
            k = os.pwrite(fd, mv, offset + total)
            total += k
            mv = mv[k:]
    return total


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    mv = memoryview(out).cast("B")
    got = 0
    while got < len(mv):
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k <= 0:
            raise TraceError("the prepared trace's event file is truncated")
        got += k
