"""Opening the files of a trace directory so that a trace cannot make the reader open anything else.

A trace names its files in ``snapshots.jsonl``; a crafted or damaged trace could name a FIFO (the
reader blocks forever), a device (``/dev/zero``: endless input), a symbolic link out of the
directory (any file on the host) or a path with ``..``.  So every member is opened relative to a
file descriptor of the trace directory, one path component at a time with ``O_NOFOLLOW``; it is
``lstat``-ed before it is opened (a FIFO or a device is never opened), opened ``O_NONBLOCK``, and
must be the same regular file after the open.  Each error names the file and the rule it broke.

The identity of every file read (device, inode, size, mtime and ctime) is what the prepared
cache is keyed by (:mod:`ksmtrace.trace.prepare`), and a file that changes after the trace was
opened is an error rather than a silent mix of old and new data.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ksmtrace.errors import TraceError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True)
class FileIdentity:
    """What names one version of a file: a rewrite, a replacement or a touch changes it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_dir(root: Path) -> int:
    """A descriptor of the trace directory itself (the user named it: symbolic links in that
    path are followed)."""
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TraceError(f"{root}: no such trace") from None
    except NotADirectoryError:
        raise TraceError(f"{root}: a trace is a directory (got a file)") from None
    except OSError as exc:
        raise TraceError(f"{root}: cannot open the trace directory ({exc.strerror})") from None


class TraceDir:
    """An open trace directory: its descriptor and those of its sub-directories (each opened
    once, without following a symbolic link).  Use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = open_dir(root)
        self._subdirs: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._subdirs.values():
            os.close(fd)
        self._subdirs = {}
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "TraceDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _parent(self, rel: str) -> tuple[int, str]:
        head, _, name = rel.rpartition("/")
        if not head:
            return self.fd, name
        fd = self._subdirs.get(head)
        if fd is None:
            fd = os.dup(self.fd)
            try:
                parts = head.split("/")
                for i, comp in enumerate(parts):
                    try:
                        nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        raise _open_error(self.root / "/".join(parts[: i + 1]), exc, directory=True) from None
                    os.close(fd)
                    fd = nfd
            except BaseException:
                os.close(fd)
                raise
            self._subdirs[head] = fd
        return fd, name

    def open(self, rel: str) -> tuple[int, os.stat_result]:
        """Open ``rel`` (a checked relative path) for reading: the descriptor and its ``fstat``.

        Raises :class:`TraceError` naming the file when a component is a symbolic link, the file
        is not a regular file (a FIFO or a device is never opened), or it cannot be opened."""
        where = self.root / rel
        dfd, name = self._parent(rel)
        try:
            lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            raise _open_error(where, exc) from None
        if not stat.S_ISREG(lst.st_mode):
            raise TraceError(f"{where}: is {_kind(lst.st_mode)}; a trace's files must be regular files inside the trace directory")
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise _open_error(where, exc) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
            os.close(fd)
            raise TraceError(f"{where}: was replaced while it was being opened")
        return fd, st


def _open_error(path: Path, exc: OSError, directory: bool = False) -> TraceError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
        return TraceError(f"{path}: is a symbolic link; a trace's files must be regular files inside the trace directory")
    if exc.errno == errno.ENOTDIR:
        return TraceError(f"{path}: is not a directory")
    if exc.errno == errno.ENOENT:
        return TraceError(f"{path}: missing (the snapshot log lists it)" if not directory else f"{path}: missing directory")
    return TraceError(f"{path}: cannot open ({exc.strerror})")


def read_member(d: TraceDir, rel: str, limit: int) -> tuple[bytes, FileIdentity]:
    """The whole content of a small member (manifest, snapshot log), at most ``limit`` bytes."""
    root = d.root
    fd, st = d.open(rel)
    try:
        if st.st_size > limit:
            raise TraceError(f"{root / rel}: {st.st_size:,} bytes is too large for this file (at most {limit:,})")
        chunks = []
        left = st.st_size
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) != st.st_size:
            raise TraceError(f"{root / rel}: changed size while it was being read")
        return data, FileIdentity.of(st)
    except OSError as exc:
        raise TraceError(f"{root / rel}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Footer:
    """What a Parquet file's footer says: its rows and its Arrow schema."""

    rows: int
    schema: pa.Schema
    identity: FileIdentity
    statistics: dict[str, tuple[object, object]]  # column -> (min, max) where the footer has them


def read_footer(d: TraceDir, rel: str, stats_columns: tuple[str, ...] = (),
                expect_bytes: int | None = None) -> Footer:
    """Open a member safely and read its Parquet footer (not its data).  ``expect_bytes``: the
    size the file must have (checked before anything is parsed)."""
    root = d.root
    fd, st = d.open(rel)
    if expect_bytes is not None and st.st_size != expect_bytes:
        os.close(fd)
        raise TraceError(f"{root / rel}: {st.st_size:,} bytes, but the snapshot log recorded {expect_bytes:,} "
                         "(truncated, replaced or rewritten)")
    with os.fdopen(fd, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
            md = pf.metadata
            schema = pf.schema_arrow
            rows = md.num_rows
            stats: dict[str, tuple[object, object]] = {}
            if stats_columns and md.num_row_groups:
                names = schema.names
                for col in stats_columns:
                    if col not in names:
                        continue
                    j = names.index(col)
                    lo = hi = None
                    for g in range(md.num_row_groups):
                        c = md.row_group(g).column(j)
                        s = c.statistics
                        if s is None or not s.has_min_max:
                            lo = hi = None
                            break
                        lo = s.min if lo is None else min(lo, s.min)
                        hi = s.max if hi is None else max(hi, s.max)
                    if lo is not None:
                        stats[col] = (lo, hi)
        except Exception as exc:  # pyarrow raises many types for a foreign or damaged file
            raise TraceError(f"{root / rel}: not a readable Parquet file ({_short(exc)})") from None
    return Footer(rows, schema, FileIdentity.of(st), stats)


def _open_same(d: TraceDir, rel: str, identity: FileIdentity) -> int:
    """A descriptor of member ``rel``, which must still be the file checked when the trace was opened."""
    fd, st = d.open(rel)
    if FileIdentity.of(st) != identity:
        os.close(fd)
        raise TraceError(f"{d.root / rel}: changed since the trace was opened (open the trace again)")
    return fd


def read_parquet(d: TraceDir, rel: str, identity: FileIdentity, columns: list[str] | None = None) -> pa.Table:
    """Read (columns of) a member whose footer was checked when the trace was opened; the file
    must still be that version."""
    with os.fdopen(_open_same(d, rel, identity), "rb") as fh:
        try:
            return pq.ParquetFile(fh).read(columns=columns)
        except Exception as exc:
            raise TraceError(f"{d.root / rel}: corrupt or truncated ({_short(exc)})") from None


def iter_parquet(d: TraceDir, rel: str, identity: FileIdentity, columns: list[str] | None = None,
                 rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """:func:`read_parquet` in record batches of at most ``rows`` rows (bounded memory for a big
    file); the file stays open until the last batch."""
    with os.fdopen(_open_same(d, rel, identity), "rb") as fh:
        try:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=rows, columns=columns)
        except Exception as exc:
            raise TraceError(f"{d.root / rel}: corrupt or truncated ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return s[0][:160] if s else exc.__class__.__name__
