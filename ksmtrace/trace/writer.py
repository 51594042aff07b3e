"""The trace writer: creates a private trace directory and commits snapshots atomically.

Commit protocol (crash-safe, see ``docs/trace-format.md``):

1. every table file of snapshot *n* is written to ``<table>/.snap-n.parquet.tmp``, flushed and
   ``fsync``-ed, then renamed to ``<table>/snap-n.parquet``;
2. one JSON line describing snapshot *n* is appended to ``snapshots.jsonl`` and ``fsync``-ed.

A snapshot exists when, and only when, its line is complete in ``snapshots.jsonl``.  If anything
fails before that (full disk, Ctrl-C, SIGTERM), the files of snapshot *n* are removed and the log is
truncated back, so the trace holds exactly the completed snapshots.  A file of an uncommitted
snapshot left by a hard kill (SIGKILL, power loss) is ignored by readers because no line names it.

Files are created 0600 and directories 0700: page hashes of other processes are private.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ksmtrace._version import __version__
from ksmtrace.errors import CaptureError, TraceError
from ksmtrace.trace import schema

SNAPSHOT_LOG = "snapshots.jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a private temporary file and a rename."""
    tmp = path.with_name("." + path.name + ".tmp")
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_parquet_private(table: pa.Table, final: Path, options: Mapping[str, Any]) -> None:
    tmp = final.with_name("." + final.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as fh:
            pq.write_table(table, fh, **options)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class TraceWriter:
    """Writes one trace directory.  Used by tracers; nothing else writes traces.

    >>> w = TraceWriter(path, host=host_facts(), capture={...}, tracer={"name": "procfs"})
    >>> w.commit_snapshot(0, t_ns, t_end_ns, {"pages": pages_table, ...}, keyframe=True)
    >>> w.close("count reached")
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
        try:
            old_umask = os.umask(0o077)
            try:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                if any(self.path.iterdir()):
                    raise CaptureError(f"{self.path}: output directory exists and is not empty")
                for table in schema.TABLES:
                    (self.path / table).mkdir(mode=0o700)
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise CaptureError(f"{self.path}: cannot create trace directory: {exc.strerror}") from exc
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
        self._log = self.path / SNAPSHOT_LOG
        try:
            write_json_atomic(self.path / schema.MANIFEST, self.manifest)
            fd = os.open(self._log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
            _fsync_dir(self.path)
        except OSError as exc:
            raise CaptureError(f"{self.path}: cannot write the manifest: {exc.strerror}") from exc
        self.committed: list[dict[str, Any]] = []

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
        if snap != len(self.committed):
            raise TraceError(f"snapshot {snap} committed out of order (expected {len(self.committed)})")
        if "pages" not in tables:
            raise TraceError("a snapshot needs a pages table")
        written: list[Path] = []
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
        log_size = self._log.stat().st_size
        try:
            for name, table in tables.items():
                want = self.pages_schema if name == "pages" else schema.SCHEMAS[name]
                if not table.schema.equals(want, check_metadata=False):
                    table = table.select(want.names).cast(want)
                rel = schema.snapshot_file(name, snap)
                final = self.path / rel
                _write_parquet_private(
                    table, final, schema.PARQUET_OPTIONS.get(name, schema.DEFAULT_PARQUET_OPTIONS)
                )
                written.append(final)
                entry["files"][name] = {"path": rel, "rows": table.num_rows, "bytes": final.stat().st_size}
            # the renames must be durable before the log line names the files
            for d in sorted({p.parent for p in written}):
                _fsync_dir(d)
            line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
            fd = os.open(self._log, os.O_WRONLY | os.O_APPEND)
            try:
                n = os.write(fd, line)
                if n != len(line):
                    raise OSError(28, "short write to snapshots.jsonl")
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self._undo(written, log_size)
            raise
        self.committed.append(entry)
        return entry

    def _undo(self, written: list[Path], log_size: int) -> None:
        for p in written:
            try:
                p.unlink()
            except OSError:
                pass
        try:
            if self._log.stat().st_size != log_size:
                os.truncate(self._log, log_size)
        except OSError:
            pass

    def update_manifest(self, **fields: Any) -> None:
        """Merge ``fields`` into the manifest and rewrite it atomically (best effort on a full disk)."""
        self.manifest.update(fields)
        self.manifest["snapshot_count"] = len(self.committed)
        write_json_atomic(self.path / schema.MANIFEST, self.manifest)

    def close(self, end_reason: str, **fields: Any) -> None:
        """Mark the capture finished.  A failure here never loses committed snapshots."""
        try:
            self.update_manifest(complete=True, end_reason=end_reason, **fields)
        except OSError:
            pass


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
