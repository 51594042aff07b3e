"""The public trace reader: open a trace, check it, stream snapshot deltas, rebuild snapshots.

>>> tr = open_trace("my-trace")
>>> tr.n_snapshots, tr.times_s[:3]
>>> for snap, delta in tr.deltas():          # pages that appeared, changed or vanished
...     ...
>>> full = tr.snapshot(5)                     # every page mapped at snapshot 5 (a DataFrame)
>>> prep = tr.prepare(scope="recorded")       # dense page/content/frame ids for the replay engine

Every way a trace can be unreadable (no manifest, unknown version, a file missing, truncated or
not Parquet, a foreign Parquet file) raises :class:`~ksmtrace.errors.TraceError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ksmtrace.errors import TraceError, TraceVersionError
from ksmtrace.trace import schema
from ksmtrace.trace.writer import SNAPSHOT_LOG

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
    """A read-only view of one trace directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise TraceError(f"{self.path}: no such trace")
        if not self.path.is_dir():
            raise TraceError(f"{self.path}: a trace is a directory (got a file)")
        mpath = self.path / schema.MANIFEST
        try:
            text = mpath.read_text()
        except FileNotFoundError:
            raise TraceError(f"{mpath}: missing manifest; not a ksmtrace trace") from None
        except OSError as exc:
            raise TraceError(f"{mpath}: cannot read manifest: {exc.strerror}") from None
        try:
            manifest = json.loads(text)
        except ValueError:
            raise TraceError(f"{mpath}: manifest is not valid JSON (truncated?)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != schema.FORMAT_NAME:
            raise TraceError(f"{mpath}: not a ksmtrace manifest (format is {manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get("format_version")
        if version not in schema.READ_VERSIONS or isinstance(version, bool):
            raise TraceVersionError(
                f"{mpath}: trace format version {version!r} is not supported "
                f"(this ksmtrace reads versions {', '.join(map(str, schema.READ_VERSIONS))})"
            )
        cols = tuple(manifest.get("pages_columns") or schema.PAGES_SCHEMA.names)
        if cols not in schema.pages_layouts(version):
            raise TraceError(f"{mpath}: 'pages_columns' {list(cols)} is not a pages layout of format version {version}")
        self.manifest: dict[str, Any] = manifest
        self.snapshots: list[dict[str, Any]] = self._read_log()
        if not self.snapshots:
            raise TraceError(f"{self.path}: the trace holds no committed snapshot")

    # -------------------------------------------------------------------------------------
    def _read_log(self) -> list[dict[str, Any]]:
        log = self.path / SNAPSHOT_LOG
        try:
            raw = log.read_bytes()
        except FileNotFoundError:
            raise TraceError(f"{log}: missing snapshot log") from None
        except OSError as exc:
            raise TraceError(f"{log}: cannot read: {exc.strerror}") from None
        entries = []
        lines = raw.split(b"\n")
        # a torn last line (no newline) is an uncommitted snapshot: ignore it
        complete = lines[:-1]
        for i, line in enumerate(complete):
            try:
                e = json.loads(line)
            except ValueError:
                raise TraceError(f"{log}: line {i + 1} is corrupt") from None
            if e.get("snap") != i:
                raise TraceError(f"{log}: line {i + 1} describes snapshot {e.get('snap')}, expected {i}")
            entries.append(e)
        return entries

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
        return self.manifest.get("host", {})

    @property
    def capture(self) -> dict[str, Any]:
        return self.manifest.get("capture", {})

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

    def has_table(self, name: str) -> bool:
        if schema.TABLE_SINCE.get(name, 1) > self.manifest["format_version"]:
            return False  # not a table of this trace's version: read as empty
        return any(name in e.get("files", {}) for e in self.snapshots)

    @property
    def has_ground_truth(self) -> bool:
        """True when the capture sampled the host's real KSM counters."""
        if not self.has_table("ksm"):
            return False
        return any(e["files"].get("ksm", {}).get("rows", 0) for e in self.snapshots)

    # -------------------------------------------------------------------------------------
    def _file(self, table: str, snap: int) -> Path | None:
        if schema.TABLE_SINCE.get(table, 1) > self.manifest["format_version"]:
            return None  # a table newer than the trace's version is not part of it
        info = self.snapshots[snap].get("files", {}).get(table)
        if info is None:
            return None
        return self.path / info["path"]

    def _read_file(self, path: Path, table: str, columns: list[str] | None = None) -> pa.Table:
        try:
            pf = pq.ParquetFile(path)
        except FileNotFoundError:
            raise TraceError(f"{path}: missing (the snapshot log lists it)") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise TraceError(f"{path}: not a readable Parquet file ({_short(exc)})") from None
        want = schema.SCHEMAS[table]
        names = set(pf.schema_arrow.names)
        missing = [f for f in want.names if f not in names]
        if missing:
            raise TraceError(f"{path}: foreign Parquet file (no column {missing[0]!r} of the {table} table)")
        try:
            return pf.read(columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise TraceError(f"{path}: corrupt or truncated ({_short(exc)})") from None

    def read_table(self, table: str, snaps: range | list[int] | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """One table over the committed snapshots (all, or ``snaps``), as a polars DataFrame."""
        if table not in schema.SCHEMAS:
            raise TraceError(f"unknown table {table!r} (tables: {', '.join(schema.TABLES)})")
        idx = range(self.n_snapshots) if snaps is None else snaps
        parts = []
        for s in idx:
            f = self._file(table, s)
            if f is not None:
                parts.append(self._read_file(f, table, columns))
        if not parts:
            want = schema.SCHEMAS[table]
            if table == "pages":
                want = pa.schema([want.field(n) if n in want.names else pa.field(n, pa.uint32()) for n in self.pages_columns])
            if columns:
                want = pa.schema([want.field(c) for c in columns])
            return pl.from_arrow(want.empty_table())
        try:
            tab = pa.concat_tables(parts, promote_options="default")
        except pa.ArrowInvalid as exc:
            raise TraceError(f"{self.path}/{table}: files disagree on the schema ({_short(exc)})") from None
        return pl.from_arrow(tab)

    @property
    def pages_columns(self) -> list[str]:
        return list(self.manifest.get("pages_columns", schema.PAGES_SCHEMA.names))

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
        """Open every committed file once (raises TraceError on the first bad one)."""
        for s in range(self.n_snapshots):
            for table in self.snapshots[s].get("files", {}):
                f = self._file(table, s)
                if f is not None:
                    self._read_file(f, table, columns=[schema.SCHEMAS[table].names[0]])

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


def _short(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return s[0][:160] if s else exc.__class__.__name__
