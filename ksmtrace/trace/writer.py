"""The trace writer: creates a private trace directory and commits snapshots atomically.

Commit protocol (crash-safe, see ``docs/trace-format.md``):

1. every table file of snapshot *n* is written to ``<table>/.snap-n.parquet.tmp``, flushed and
   ``fsync``-ed, then renamed to ``<table>/snap-n.parquet``;
2. one JSON line describing snapshot *n* is appended to ``snapshots.jsonl`` and ``fsync``-ed.

A snapshot exists when, and only when, its line is complete in ``snapshots.jsonl``.  If anything
fails before that (full disk, Ctrl-C, SIGTERM), the files of snapshot *n* are removed and the log is
truncated back, so the trace holds exactly the completed snapshots.  A file of an uncommitted
snapshot left by a hard kill (SIGKILL, power loss) is ignored by readers because no line names it.

Files are created 0600 and directories 0700: page hashes of other processes are private.  The
directory must be the invoking user's and nobody else's to write (``ksmtrace.outputs``).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ksmtrace._version import __version__
from ksmtrace.errors import CaptureError, OutputError, TraceError
from ksmtrace.outputs import OutputDir, open_output_dir
from ksmtrace.trace import schema

SNAPSHOT_LOG = "snapshots.jsonl"
RESERVE = ".reserve"  # the capture's placeholder for the final manifest on a full disk


class TraceWriter:
    """Writes one trace directory.  Used by tracers; nothing else writes traces.

    >>> w = TraceWriter(path, host=host_facts(), capture={...}, tracer={"name": "procfs"})
    >>> w.commit_snapshot(0, t_ns, t_end_ns, {"pages": pages_table, ...}, keyframe=True)
    >>> w.close("count reached")

    The directory is created (or must be an empty one of the invoking user's that nobody else can
    write) and opened once (:func:`ksmtrace.outputs.open_output_dir`); every file is created
    relative to it, so nobody can redirect the writes.  While the writer is open it holds an
    exclusive ``flock`` on the directory: readers then know a capture is at work and leave its
    temporary files alone.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        host: Mapping[str, Any],
        capture: Mapping[str, Any],
        tracer: Mapping[str, Any],
        command_line: list[str] | None = None,
        pages_schema: pa.Schema | None = None,
    ) -> None:
        self.path = Path(path)
        self.pages_schema = pages_schema or schema.PAGES_SCHEMA
        self.dir = open_output_dir(self.path, mode=0o700, empty=True, what="trace directory")
        self._tables: dict[str, OutputDir] = {}
        self._log_fd: int | None = None
        try:
            try:
                fcntl.flock(self.dir.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CaptureError(f"{self.path}: another process is writing a trace here") from None
            for table in schema.TABLES:
                self._tables[table] = self.dir.subdir(table, mode=0o700)
        except BaseException:
            self._release()
            raise
        self.manifest: dict[str, Any] = {
            "format": schema.FORMAT_NAME,
            "format_version": schema.FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ksmtrace_version": __version__,
            "tracer": dict(tracer),
            "command_line": list(command_line or []),
            "host": dict(host),
            "capture": dict(capture),
            "pages_columns": self.pages_schema.names,
            "complete": False,
            "end_reason": None,
            "snapshot_count": 0,
        }
        try:
            self._write_manifest()
            self._log_fd = self.dir.create(SNAPSHOT_LOG, 0o600, os.O_APPEND)
            self.dir.fsync()
        except (OSError, OutputError) as exc:
            self._release()
            msg = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise CaptureError(f"{self.path}: cannot write the manifest: {msg}") from None
        self.committed: list[dict[str, Any]] = []

    def _write_manifest(self) -> None:
        data = (json.dumps(self.manifest, indent=1, sort_keys=False) + "\n").encode()
        try:
            self.dir.write_bytes(schema.MANIFEST, data, mode=0o600)
        except OutputError as exc:  # callers of update_manifest expect OSError on a full disk
            raise _os_error(exc) from None
        self.dir.fsync()

    def _release(self) -> None:
        """Close the directory (which drops the lock) and the log."""
        if self._log_fd is not None:
            try:
                os.close(self._log_fd)
            except OSError:
                pass
            self._log_fd = None
        for d in self._tables.values():
            d.close()
        self._tables = {}
        self.dir.close()

    @property
    def open(self) -> bool:
        return not self.dir.closed

    # ---------------------------------------------------------------------------------------
    def commit_snapshot(
        self,
        snap: int,
        t_ns: int,
        t_end_ns: int,
        tables: Mapping[str, pa.Table],
        *,
        keyframe: bool,
        stats: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write every table of snapshot ``snap`` and commit it.  All or nothing.

        Raises ``OSError`` (after undoing the partial snapshot) when the disk is full or the
        directory vanished; the trace then still holds every earlier snapshot.
        """
        if self._log_fd is None:
            raise TraceError(f"{self.path}: the trace writer is closed")
        if snap != len(self.committed):
            raise TraceError(f"snapshot {snap} committed out of order (expected {len(self.committed)})")
        if "pages" not in tables:
            raise TraceError("a snapshot needs a pages table")
        written: list[tuple[OutputDir, str]] = []
        entry = {
            "snap": snap,
            "t_ns": int(t_ns),
            "t_end_ns": int(t_end_ns),
            "wall": time.time(),
            "keyframe": bool(keyframe),
            "files": {},
        }
        if stats:
            entry.update(stats)
        log_size = os.fstat(self._log_fd).st_size
        try:
            for name, table in tables.items():
                want = self.pages_schema if name == "pages" else schema.SCHEMAS[name]
                if not table.schema.equals(want, check_metadata=False):
                    table = table.select(want.names).cast(want)
                rel = schema.snapshot_file(name, snap)
                d = self._tables[name]
                fname = rel.split("/", 1)[1]
                opts = schema.PARQUET_OPTIONS.get(name, schema.DEFAULT_PARQUET_OPTIONS)
                try:
                    d.write_atomic(fname, lambda fh: pq.write_table(table, fh, **opts), mode=0o600)
                except OutputError as exc:
                    raise _os_error(exc) from None
                written.append((d, fname))
                fd = d.open_existing(fname, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                entry["files"][name] = {"path": rel, "rows": table.num_rows, "bytes": size}
            # the renames must be durable before the log line names the files
            for d in {id(d): d for d, _ in written}.values():
                d.fsync()
            line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
            n = os.write(self._log_fd, line)
            if n != len(line):
                raise OSError(28, "short write to snapshots.jsonl")
            os.fsync(self._log_fd)
        except BaseException:
            self._undo(written, log_size)
            raise
        self.committed.append(entry)
        return entry

    def _undo(self, written: list[tuple[OutputDir, str]], log_size: int) -> None:
        for d, name in written:
            try:
                d.unlink(name)
            except OSError:
                pass
        try:
            if self._log_fd is not None and os.fstat(self._log_fd).st_size != log_size:
                os.ftruncate(self._log_fd, log_size)
        except OSError:
            pass

    def update_manifest(self, **fields: Any) -> None:
        """Merge ``fields`` into the manifest and rewrite it atomically (best effort on a full disk).

        Writing ``complete=True`` finishes the trace: the writer then lets go of the directory.
        """
        if self.dir.closed:
            raise OSError(errno.EBADF, f"{self.path}: the trace writer is closed")
        self.manifest.update(fields)
        self.manifest["snapshot_count"] = len(self.committed)
        self._write_manifest()
        if self.manifest.get("complete"):
            self._release()

    def abandon(self) -> None:
        """Let go of the directory without finishing the trace (it stays ``complete: false``)."""
        self._release()

    def close(self, end_reason: str, **fields: Any) -> None:
        """Mark the capture finished.  A failure here never loses committed snapshots."""
        try:
            self.update_manifest(complete=True, end_reason=end_reason, **fields)
        except OSError:
            pass
        finally:
            self._release()


def _os_error(exc: OutputError) -> OSError:
    """The OSError behind an OutputError (callers tell a full disk by its errno)."""
    code = getattr(exc, "errno", None) or errno.EIO
    return OSError(code, os.strerror(code))


def default_host_facts() -> dict[str, Any]:
    """Host facts every tracer records: kernel release, page size, THP mode, HZ, KSM settings."""
    uname = os.uname()
    facts: dict[str, Any] = {
        "kernel_release": uname.release,
        "machine": uname.machine,
        "hostname": socket.gethostname(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "cpus": os.cpu_count(),
    }
    try:
        facts["thp_enabled"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        facts["thp_enabled"] = None
    facts["hz"] = kernel_hz()
    return facts


def kernel_hz() -> int | None:
    """CONFIG_HZ from /proc/config.gz or /boot/config-*, else None."""
    import gzip

    candidates = [Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")]
    for p in candidates:
        try:
            raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        except OSError:
            continue
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_HZ="):
                try:
                    return int(line.split("=", 1)[1])
                except ValueError:
                    return None
    return None


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file below ``path`` (a trace's size on disk)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
