"""The public trace reader: open a trace, check it, stream snapshot deltas, rebuild snapshots.

>>> tr = open_trace("my-trace")
>>> tr.n_snapshots, tr.times_s[:3]
>>> for snap, delta in tr.deltas():          # pages that appeared, changed or vanished
...     ...
>>> full = tr.snapshot(5)                     # every page mapped at snapshot 5 (a DataFrame)
>>> prep = tr.prepare(scope="recorded")       # dense page/content/frame ids for the replay engine

Opening a trace checks it before anything is computed from it, and every violation raises
:class:`~ksmtrace.errors.TraceError` as ``<file>: <rule broken>``:

* ``manifest.json`` and ``snapshots.jsonl`` against their typed model (:mod:`ksmtrace.trace.manifest`):
  the format version, the type of every known field, snapshot ids 0, 1, 2... with strictly
  increasing times, each file named by its relative canonical path;
* every table file the log names: a regular file inside the trace directory, opened without
  following symbolic links and without blocking (:mod:`ksmtrace.trace.files`), of the size the
  log recorded, with the rows the log recorded in its Parquet footer, and exactly the columns and
  types of the format version;
* when a file is read: still the same file, its ``snap`` column equal to its snapshot, no nulls
  where the format has none.  The page rows' delta encoding is checked where they are turned
  into events (:func:`ksmtrace.trace.prepare.prepare`).

Opening also removes what a killed capture left behind (see :func:`_clean_leftovers`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ksmtrace.errors import TraceError
from ksmtrace.trace import files, schema
from ksmtrace.trace import manifest as M
from ksmtrace.trace.writer import RESERVE, SNAPSHOT_LOG

STATE_COLUMNS = ["proc", "pid", "vpn", "hash", "flags", "pfn"]


def open_trace(path: str | os.PathLike) -> "Trace":
    """Open and check a trace directory."""
    return Trace(path)


def as_trace(trace: "Trace | str | os.PathLike") -> "Trace":
    """An opened trace, whether given one or a path to one (every library entry point takes either)."""
    if isinstance(trace, Trace):
        return trace
    if isinstance(trace, (str, os.PathLike)):
        return Trace(trace)
    if hasattr(trace, "prepare") and hasattr(trace, "path"):  # a trace-like object (e.g. a refined view)
        return trace
    raise TraceError(f"expected a trace or the path of one, got {type(trace).__name__}")


class Trace:
    """A read-only view of one trace directory, checked when it is opened (see the module doc)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise TraceError(f"{self.path}: no such trace")
        if not self.path.is_dir():
            raise TraceError(f"{self.path}: a trace is a directory (got a file)")
        with files.TraceDir(self.path) as d:
            self._open(d)

    def _open(self, d: files.TraceDir) -> None:
        mpath = self.path / schema.MANIFEST
        try:
            raw, self._manifest_id = files.read_member(d, schema.MANIFEST, M.MAX_MANIFEST_BYTES)
        except TraceError as exc:
            if not (self.path / schema.MANIFEST).exists() and not os.path.islink(mpath):
                raise TraceError(f"{mpath}: missing manifest; not a ksmtrace trace") from None
            raise exc from None
        self.meta: M.Manifest = M.parse_manifest(raw, str(mpath))
        self.manifest: dict[str, Any] = self.meta.raw
        log = self._read_log(d)
        self.cleaned, self.capture_running = _clean_leftovers(self.path, d.fd, self.meta, log)
        if self.cleaned and log.torn_tail:
            log = self._read_log(d)
        self._log = log
        self.snapshots: list[dict[str, Any]] = log.entries
        if not self.snapshots:
            raise TraceError(f"{self.path}: the trace holds no committed snapshot")
        self._footers: dict[tuple[str, int], files.Footer] = {}
        self._fields: dict[str, dict[str, pa.Field]] = {}
        for s, entry in enumerate(log.files):
            for table, fe in entry.items():
                self._footers[(table, s)] = self._check_file(fe, d)

    def _read_log(self, d: files.TraceDir) -> M.SnapshotLog:
        log = self.path / SNAPSHOT_LOG
        try:
            raw, self._log_id = files.read_member(d, SNAPSHOT_LOG, M.MAX_LOG_BYTES)
        except TraceError:
            if not log.exists() and not os.path.islink(log):
                raise TraceError(f"{log}: missing snapshot log") from None
            raise
        return M.parse_log(raw, str(log), self.meta)

    def _check_file(self, fe: M.FileEntry, d: files.TraceDir) -> files.Footer:
        """One table file against the log (bytes, rows) and the schema (column names and types)."""
        where = self.path / fe.path
        ft = files.read_footer(d, fe.path, stats_columns=("snap",), expect_bytes=fe.bytes)
        if ft.rows != fe.rows:
            raise TraceError(f"{where}: {ft.rows:,} rows, but the snapshot log recorded {fe.rows:,}")
        want, want_names = self._schema(fe.table), self._schema_names(fe.table)
        names = ft.schema.names
        if len(set(names)) != len(names):
            raise TraceError(f"{where}: a column name appears twice")
        if len(names) != len(want_names) or any(n not in want_names for n in names):
            have = set(names)
            missing = [n for n in want.names if n not in have]
            if missing:
                raise TraceError(f"{where}: foreign Parquet file (no column {missing[0]!r} of the {fe.table} table)")
            extra = next(n for n in names if n not in want_names)
            raise TraceError(f"{where}: column {extra!r} is not part of the {fe.table} table "
                             f"(format version {self.meta.format_version}; manifest pages_columns for pages)")
        for f in ft.schema:
            g = want_names[f.name]
            if not f.type.equals(g.type):
                raise TraceError(f"{where}: column {f.name!r} is {f.type}, but format version "
                                 f"{self.meta.format_version} stores it as {g.type}")
        lo_hi = ft.statistics.get("snap")
        if lo_hi is not None and fe.rows and lo_hi != (fe.snap, fe.snap):
            raise TraceError(f"{where}: holds rows of snapshot(s) {lo_hi[0]}..{lo_hi[1]}, not of snapshot {fe.snap}")
        return ft

    def _schema(self, table: str) -> pa.Schema:
        """The Arrow schema of ``table`` in this trace (pages: with the manifest's fingerprint columns)."""
        if table == "pages":
            return self._pages_schema
        return schema.table_schema(table, self.meta.format_version)

    @cached_property
    def _pages_schema(self) -> pa.Schema:
        return schema.pages_schema_for(self.meta.pages_columns)

    def _schema_names(self, table: str) -> dict[str, pa.Field]:
        if table not in self._fields:
            self._fields[table] = {f.name: f for f in self._schema(table)}
        return self._fields[table]

    #: the snapshot log's statistics (rows per op) describe this trace's page rows (not so for a view)
    log_describes_rows = True

    @property
    def version(self) -> int:
        """The trace's format version (``schema.READ_VERSIONS``)."""
        return self.meta.format_version

    @property
    def n_snapshots(self) -> int:
        return len(self.snapshots)

    @cached_property
    def t0_ns(self) -> int:
        return int(self.snapshots[0]["t_ns"])

    @cached_property
    def times_ns(self) -> list[int]:
        """Snapshot times in ns since the first snapshot."""
        return [int(e["t_ns"]) - self.t0_ns for e in self.snapshots]

    @property
    def times_s(self) -> list[float]:
        return [t / 1e9 for t in self.times_ns]

    @property
    def host(self) -> dict[str, Any]:
        return self.meta.host

    @property
    def capture(self) -> dict[str, Any]:
        return self.meta.capture

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the manifest and the snapshot log: names this trace's content in run ids."""
        h = hashlib.sha256()
        m = {k: v for k, v in self.manifest.items() if k not in ("complete", "end_reason", "snapshot_count")}
        h.update(json.dumps(m, sort_keys=True).encode())
        for e in self.snapshots:
            h.update(json.dumps({k: e.get(k) for k in ("snap", "t_ns", "files")}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    @cached_property
    def identity(self) -> str:
        """A digest of the fingerprint and of the identity of every file of the trace (device,
        inode, size, mtime, ctime; rows from each Parquet footer): any rewrite, replacement or
        touch of any file changes it.  The prepared cache is keyed by it."""
        h = hashlib.sha256(self.fingerprint.encode())
        for name, ident in ((schema.MANIFEST, self._manifest_id), (SNAPSHOT_LOG, self._log_id)):
            h.update(f"{name}:{ident}".encode())
        for (table, s), ft in sorted(self._footers.items()):
            h.update(f"{table}/{s}:{ft.identity}:{ft.rows}".encode())
        return h.hexdigest()[:32]

    def unchanged(self) -> bool:
        """True when every file of the trace is still the one checked when it was opened."""
        try:
            for name, ident in ((schema.MANIFEST, self._manifest_id), (SNAPSHOT_LOG, self._log_id)):
                if files.FileIdentity.of(os.stat(self.path / name, follow_symlinks=False)) != ident:
                    return False
            for (table, s), ft in self._footers.items():
                st = os.stat(self.path / self._log.files[s][table].path, follow_symlinks=False)
                if files.FileIdentity.of(st) != ft.identity:
                    return False
        except OSError:
            return False
        return True

    def require_unchanged(self) -> None:
        """Raise TraceError when a file changed since the trace was opened (a long-lived Trace
        must not be answered from a cache built for other files)."""
        if not self.unchanged():
            raise TraceError(f"{self.path}: files of the trace changed since it was opened (open the trace again)")

    def has_table(self, name: str) -> bool:
        return any(name in e.get("files", {}) for e in self.snapshots)

    @property
    def has_ground_truth(self) -> bool:
        """True when the capture sampled the host's real KSM counters."""
        if not self.has_table("ksm"):
            return False
        return any(e["files"].get("ksm", {}).get("rows", 0) for e in self.snapshots)

    # -------------------------------------------------------------------------------------
    def _read_file(self, d: files.TraceDir, table: str, snap: int, columns: list[str] | None = None) -> pa.Table | None:
        """One table file of one snapshot (None if that snapshot has none), checked: the same file
        that was checked on open, its ``snap`` column equal to the snapshot, no nulls in a column
        the format declares non-null."""
        fe = self._log.files[snap].get(table)
        if fe is None:
            return None
        ft = self._footers[(table, snap)]
        tab = files.read_parquet(d, fe.path, ft.identity, columns)
        self._check_batch(fe, table, snap, tab)
        return tab

    def _check_batch(self, fe: M.FileEntry, table: str, snap: int, tab: pa.Table | pa.RecordBatch) -> None:
        """Rows read from ``fe``: no nulls in a column the format declares non-null, the ``snap``
        column equal to the snapshot."""
        fields = self._schema_names(table)
        for name in tab.column_names:
            col = tab.column(name)
            if col.null_count and not fields[name].nullable:
                raise TraceError(f"{self.path / fe.path}: column {name!r} holds nulls")
        if "snap" in tab.column_names and tab.num_rows:
            mm = pc.min_max(tab.column("snap"))
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo != snap or hi != snap:
                raise TraceError(f"{self.path / fe.path}: holds rows of snapshot(s) {lo}..{hi}, not of snapshot {snap}")

    def _check_columns(self, table: str, columns: list[str] | None) -> pa.Schema:
        """The table's schema in this trace; every column asked for must be in it."""
        if table not in schema.SCHEMAS:
            raise TraceError(f"unknown table {table!r} (tables: {', '.join(schema.TABLES)})")
        want = self._schema(table)
        if columns:
            unknown = [c for c in columns if c not in want.names]
            if unknown:
                raise TraceError(f"{self.path}: the {table} table of this trace has no column {unknown[0]!r}")
        return want

    def read_batches(self, table: str, snap: int, columns: list[str] | None = None,
                     rows: int = 1 << 20) -> Iterator[pl.DataFrame]:
        """One snapshot's file of ``table`` in batches of at most ``rows`` rows, in file order (a
        big host's keyframe is never in memory at once), with the checks of :meth:`read_table`
        (the same file as on open, no nulls where the format has none, ``snap`` equal to the
        snapshot) applied to every batch."""
        fe = self._log.files[snap].get(table)
        if fe is None:
            return
        self._check_columns(table, columns)
        with files.TraceDir(self.path) as d:
            ft = self._footers[(table, snap)]
            for b in files.iter_parquet(d, fe.path, ft.identity, columns, rows):
                self._check_batch(fe, table, snap, b)
                yield pl.from_arrow(b)

    def read_table(self, table: str, snaps: range | list[int] | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """One table over the committed snapshots (all, or ``snaps``), as a polars DataFrame."""
        want = self._check_columns(table, columns)
        idx = range(self.n_snapshots) if snaps is None else snaps
        parts = []
        with files.TraceDir(self.path) as d:
            for s in idx:
                tab = self._read_file(d, table, s, columns)
                if tab is not None:
                    parts.append(tab)
        if not parts:
            if columns:
                want = pa.schema([want.field(c) for c in columns])
            return pl.from_arrow(want.empty_table())
        return pl.from_arrow(pa.concat_tables(parts))

    @property
    def pages_columns(self) -> list[str]:
        return list(self.meta.pages_columns)

    @property
    def has_sample_hash(self) -> bool:
        return "sample" in self.pages_columns

    @property
    def has_prefix_hashes(self) -> bool:
        return all(f.name in self.pages_columns for f in schema.PREFIX_FIELDS)

    @property
    def has_sample_strengths(self) -> bool:
        """The sampled hash at every strength of ``schema.SAMPLE_STRENGTHS`` (format version 2)."""
        return all(f.name in self.pages_columns for f in schema.STRENGTH_FIELDS)

    def check(self) -> None:
        """Read the ``snap`` column of every committed file (raises TraceError on the first bad
        one; names, types, rows and sizes were checked when the trace was opened)."""
        with files.TraceDir(self.path) as d:
            for s in range(self.n_snapshots):
                for table in self._log.files[s]:
                    self._read_file(d, table, s, columns=["snap"])

    # -------------------------------------------------------------------------------------
    def deltas(self, columns: list[str] | None = None) -> Iterator[tuple[int, pl.DataFrame]]:
        """Stream (snapshot, page rows) in order; unchanged rows of keyframes (op=SAME) dropped."""
        for s in range(self.n_snapshots):
            df = self.read_table("pages", [s], columns)
            if "op" in df.columns:
                df = df.filter(pl.col("op") != schema.OP_SAME)
            yield s, df

    def snapshot(self, snap: int) -> pl.DataFrame:
        """Every page mapped at snapshot ``snap`` (present or swapped), one row per (proc, vpn)."""
        if not 0 <= snap < self.n_snapshots:
            raise TraceError(f"snapshot {snap} out of range (trace has {self.n_snapshots})")
        start = max(s for s in range(snap + 1) if self.snapshots[s].get("keyframe") or s == 0)
        state: pl.DataFrame | None = None
        for s in range(start, snap + 1):
            rows = self.read_table("pages", [s], STATE_COLUMNS + ["op"])
            if state is None or s == start:
                state = rows.filter(pl.col("op") != schema.OP_GONE).drop("op")
                continue
            touched = rows.select("proc", "vpn")
            state = state.join(touched, on=["proc", "vpn"], how="anti")
            state = pl.concat([state, rows.filter(pl.col("op") != schema.OP_GONE).drop("op")])
        assert state is not None
        return state.sort("proc", "vpn")

    def prepare(self, scope: str = "recorded", cache: bool = True):
        """Dense arrays for the replay engine (see :mod:`ksmtrace.trace.prepare`)."""
        from ksmtrace.trace.prepare import prepare

        return prepare(self, scope=scope, cache=cache)


_STRAY = re.compile(r"snap-(\d{6,})\.parquet")


def _clean_leftovers(root: Path, dfd: int, meta: M.Manifest, log: M.SnapshotLog) -> tuple[list[str], bool]:
    """Remove what a killed capture left behind, when the caller owns the trace directory and no
    writer holds it: the ``.reserve`` placeholder, the writer's temporary files, the files of the
    snapshot it was committing and a torn last line of the log.  Returns (what was removed,
    whether a writer is still at work on the trace).

    A writer (:class:`~ksmtrace.trace.writer.TraceWriter`) holds an exclusive ``flock`` on the
    trace directory while it runs, so a capture in progress is never touched.
    """
    try:
        if os.fstat(dfd).st_uid != os.geteuid():
            return [], False
        fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return [], True
    except OSError:
        return [], False
    removed: list[str] = []
    try:
        def unlink(name: str, at: int, rel: str) -> None:
            try:
                os.unlink(name, dir_fd=at)
                removed.append(rel)
            except OSError:
                pass

        killed = not meta.complete
        for name in os.listdir(dfd):
            if name == RESERVE or (name.startswith(".") and name.endswith(".tmp")):
                unlink(name, dfd, name)
        n = len(log.entries)
        for table in schema.TABLES:
            try:
                tfd = os.open(table, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                for name in os.listdir(tfd):
                    m = _STRAY.fullmatch(name)
                    if (name.startswith(".") and name.endswith(".tmp")) or (killed and m and int(m.group(1)) >= n):
                        unlink(name, tfd, f"{table}/{name}")
            finally:
                os.close(tfd)
        if killed and log.torn_tail:
            try:
                fd = os.open(SNAPSHOT_LOG, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    os.ftruncate(fd, log.committed_bytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                removed.append(f"{SNAPSHOT_LOG} (torn last line)")
            except OSError:
                pass
    except OSError:
        pass
    finally:
        try:
            fcntl.flock(dfd, fcntl.LOCK_UN)
        except OSError:
            pass
    return removed, False
