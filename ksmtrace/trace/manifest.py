"""The typed model of a trace's two JSON files: ``manifest.json`` and the commit log ``snapshots.jsonl``.

Both are parsed once, when a trace is opened, and every field the library reads is checked for its
type and range here, so that nothing downstream meets a string where it expects a number, a list
where it expects an object, or a snapshot time that goes backwards.  Every violation is a
:class:`~ksmtrace.errors.TraceError` of the form ``<file>: <rule broken>``.

>>> m = parse_manifest(raw_bytes, "t/manifest.json")       # a Manifest (and m.raw, the checked dict)
>>> log = parse_log(raw_bytes, "t/snapshots.jsonl", m)      # a SnapshotLog: entries, torn tail

Unknown keys are kept and ignored (a newer writer may add facts); known keys must have their type.
"""
from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

from ksmtrace.errors import TraceError, TraceVersionError
from ksmtrace.trace import schema as S

INT64_MAX = (1 << 63) - 1
MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists every snapshot: ~100 B each
MAX_LOG_BYTES = 1 << 30  # ~1 KB per snapshot

# --- value checks ------------------------------------------------------------------------------
def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and abs(v) < 2.0 ** 63


Check = Callable[[Any], bool]

STR: tuple[str, Check] = ("a string", lambda v: isinstance(v, str))
BOOL: tuple[str, Check] = ("a boolean", lambda v: isinstance(v, bool))
OBJ: tuple[str, Check] = ("an object", lambda v: isinstance(v, dict))
LIST: tuple[str, Check] = ("a list", lambda v: isinstance(v, list))
NUM: tuple[str, Check] = ("a finite number", _is_num)
NONNEG: tuple[str, Check] = ("a number >= 0", lambda v: _is_num(v) and v >= 0)
COUNT: tuple[str, Check] = ("an integer >= 0", lambda v: _is_int(v) and 0 <= v <= INT64_MAX)
POSINT: tuple[str, Check] = ("an integer > 0", lambda v: _is_int(v) and 0 < v <= INT64_MAX)
HZ: tuple[str, Check] = ("an integer tick rate (1..100000)", lambda v: _is_int(v) and 1 <= v <= 100_000)
STRLIST: tuple[str, Check] = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
INTLIST: tuple[str, Check] = ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v))

# known keys: (type, may be null).  Keys not listed are kept as they are.
TOP = {
    "created": (STR, True),
    "ksmtrace_version": (STR, True),
    "tracer": (OBJ, True),
    "command_line": (STRLIST, True),
    "host": (OBJ, True),
    "capture": (OBJ, True),
    "pages_columns": (STRLIST, True),
    "complete": (BOOL, True),
    "end_reason": (STR, True),
    "snapshot_count": (COUNT, True),
    "snapshots": (LIST, True),
    "coverage": (LIST, True),
    "summary": (OBJ, True),
    "validate": (OBJ, True),
}
TRACER = {"name": (STR, True), "version": (STR, True), "module": (STR, True)}
HOST = {
    "kernel_release": (STR, True),
    "machine": (STR, True),
    "hostname": (STR, True),
    "page_size": (POSINT, True),
    "cpus": (POSINT, True),
    "thp_enabled": (STR, True),
    "hz": (HZ, True),
    "root": (BOOL, True),
    "pfn_readable": (BOOL, True),
    "kpageflags_readable": (BOOL, True),
    "soft_dirty": (BOOL, True),
    "ksm_available": (BOOL, True),
    "ksm": (OBJ, True),
}
CAPTURE = {
    "scope": (STR, True),
    "interval_s": (NONNEG, True),
    "duration_s": (NONNEG, True),
    "count": (COUNT, True),
    "fixed_targets": (BOOL, True),
    "freeze": (BOOL, True),
    "soft_dirty": (BOOL, True),
    "fingerprints": (BOOL, True),
    "contents": (BOOL, True),
    "keyframe_every": (COUNT, True),
    "ground_truth": (BOOL, True),
    "ksm_sample_interval_s": (NONNEG, True),
    "workers": (COUNT, True),
    "read_methods": (STR, True),
    "hash": (OBJ, True),
    "sample_hash": (OBJ, True),
    "prefix_lengths": (INTLIST, True),
}
MANIFEST_SNAPSHOT = {"snap": (COUNT, False), "t_ns": (COUNT, False), "t_end_ns": (COUNT, True), "keyframe": (BOOL, True)}
LOG_LINE = {
    "t_end_ns": (COUNT, True),
    "wall": (NUM, True),
    "keyframe": (BOOL, True),
    # statistics the capture records; the ones the reader verifies against the page rows
    "pages": (COUNT, True),
    "new": (COUNT, True),
    "changed": (COUNT, True),
    "gone": (COUNT, True),
}
FILE_ENTRY = {"path": (STR, False), "rows": (COUNT, False), "bytes": (COUNT, False)}


def _check_fields(obj: dict, spec: dict, where: str, what: str) -> None:
    for key, ((desc, ok), nullable) in spec.items():
        if key not in obj:
            continue
        v = obj[key]
        if v is None and nullable:
            continue
        if not ok(v):
            raise TraceError(f"{where}: '{what}{key}' must be {desc}, not {_kind(v)}{_show(v)}")


def _show(v: Any) -> str:
    if isinstance(v, (dict, list)) or v is None:
        return ""
    s = repr(v)
    return f" ({s[:40]}{'...' if len(s) > 40 else ''})"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: bytes | str, where: str, what: str) -> Any:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise TraceError(f"{where}: {what} is not UTF-8 text") from None
    except RecursionError:
        raise TraceError(f"{where}: {what} is nested too deeply") from None
    except ValueError as exc:
        raise TraceError(f"{where}: {what} is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    try:
        _check_text(obj)
    except RecursionError:
        raise TraceError(f"{where}: {what} is nested too deeply") from None
    except UnicodeError:
        raise TraceError(f"{where}: {what} holds a string that is not valid Unicode (a lone surrogate)") from None
    return obj


def _check_text(obj: Any) -> None:
    """Every string (key or value) must encode as UTF-8: JSON's \\ud800 escapes decode to lone
    surrogates that would crash the first print."""
    if isinstance(obj, str):
        obj.encode("utf-8")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            k.encode("utf-8")
            _check_text(v)
    elif isinstance(obj, list):
        for v in obj:
            _check_text(v)


# --- the manifest ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """The checked manifest.  ``raw`` is the whole JSON object (known keys verified)."""

    format_version: int
    pages_columns: tuple[str, ...]
    complete: bool
    end_reason: str | None
    snapshot_count: int | None
    host: dict[str, Any]
    capture: dict[str, Any]
    tracer: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def parse_manifest(text: bytes, where: str) -> Manifest:
    """Parse and check ``manifest.json`` (``where`` names it in errors)."""
    m = _loads(text, where, "the manifest")
    if not isinstance(m, dict):
        raise TraceError(f"{where}: not a ksmtrace manifest (the JSON is {_kind(m)}, not an object)")
    fmt = m.get("format")
    if fmt != S.FORMAT_NAME:
        raise TraceError(f"{where}: not a ksmtrace manifest (format is {fmt!r}, expected {S.FORMAT_NAME!r})"
                         if isinstance(fmt, (str, type(None))) else f"{where}: not a ksmtrace manifest ('format' is {_kind(fmt)})")
    version = m.get("format_version")
    if not _is_int(version) or version not in S.READ_VERSIONS:
        shown = repr(version) if isinstance(version, (int, float, str, type(None))) else _kind(version)
        raise TraceVersionError(
            f"{where}: trace format version {shown} is not supported "
            f"(this ksmtrace reads versions {', '.join(map(str, S.READ_VERSIONS))}, an integer)"
        )
    _check_fields(m, TOP, where, "")
    for key, spec in (("host", HOST), ("capture", CAPTURE), ("tracer", TRACER)):
        if isinstance(m.get(key), dict):
            _check_fields(m[key], spec, where, f"{key}.")
    cols = tuple(m["pages_columns"]) if m.get("pages_columns") is not None else tuple(S.PAGES_SCHEMA.names)
    if cols not in S.pages_layouts(version):
        extra = ", then sample8..sample1024" if version >= 2 else ""
        raise TraceError(f"{where}: 'pages_columns' {list(cols)} is not a pages layout of format version "
                         f"{version} ({', '.join(S.PAGES_SCHEMA.names)}, then optionally sample and pfx64, pfx256, pfx1024{extra})")
    if isinstance(m.get("snapshots"), list):
        for i, e in enumerate(m["snapshots"]):
            if not isinstance(e, dict):
                raise TraceError(f"{where}: 'snapshots'[{i}] must be an object, not {_kind(e)}")
            _check_fields(e, MANIFEST_SNAPSHOT, where, f"snapshots[{i}].")
    return Manifest(
        format_version=version,
        pages_columns=cols,
        complete=bool(m.get("complete")),
        end_reason=m.get("end_reason"),
        snapshot_count=m.get("snapshot_count"),
        host=m.get("host") or {},
        capture=m.get("capture") or {},
        tracer=m.get("tracer") or {},
        raw=m,
    )


# --- the commit log ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One table file of one snapshot, as the log records it."""

    table: str
    snap: int
    path: str
    rows: int
    bytes: int


@dataclass
class SnapshotLog:
    """The committed snapshots (checked JSON objects, in order), their files, and whether a torn
    last line (an uncommitted snapshot) followed them."""

    entries: list[dict[str, Any]]
    files: list[dict[str, FileEntry]]
    torn_tail: bool
    committed_bytes: int  # length of the complete lines


def parse_log(raw: bytes, where: str, manifest: Manifest) -> SnapshotLog:
    """Parse and check ``snapshots.jsonl``: one object per committed snapshot, numbered 0, 1, ...
    in order, times strictly increasing, each naming its table files by their canonical relative
    paths."""
    end = raw.rfind(b"\n") + 1
    torn = end < len(raw)  # a torn last line (no newline) is an uncommitted snapshot
    entries: list[dict[str, Any]] = []
    files: list[dict[str, FileEntry]] = []
    prev_t = -1
    lines = raw[:end].split(b"\n")[:-1] if end else []
    for i, line in enumerate(lines):
        at = f"{where}: line {i + 1}"
        try:
            e = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
            _check_text(e)
        except (ValueError, UnicodeError, RecursionError):
            raise TraceError(f"{at} is corrupt (not a JSON object)") from None
        if not isinstance(e, dict):
            raise TraceError(f"{at} is corrupt (the JSON is {_kind(e)}, not an object)")
        snap = e.get("snap")
        if not _is_int(snap) or snap != i:
            raise TraceError(f"{at} describes snapshot {snap!r}, expected {i} (snapshot ids are 0, 1, 2... in order)")
        t = e.get("t_ns")
        if not _is_int(t) or not 0 <= t <= INT64_MAX:
            raise TraceError(f"{at}: 't_ns' must be an integer of monotonic nanoseconds, not {_kind(t)}{_show(t)}")
        if t <= prev_t:
            raise TraceError(f"{at}: snapshot {i} is taken at t_ns={t}, not after snapshot {i - 1} (t_ns={prev_t}); "
                             "snapshot times must increase strictly")
        prev_t = t
        _check_fields(e, LOG_LINE, at, "")
        if e.get("t_end_ns") is not None and e["t_end_ns"] < t:
            raise TraceError(f"{at}: 't_end_ns' {e['t_end_ns']} is before 't_ns' {t}")
        fs = e.get("files")
        if not isinstance(fs, dict):
            raise TraceError(f"{at}: 'files' must be an object naming the snapshot's table files, not {_kind(fs)}")
        entry_files: dict[str, FileEntry] = {}
        for table, info in fs.items():
            if table not in S.TABLES:
                raise TraceError(f"{at}: unknown table {table[:40]!r} (tables: {', '.join(S.TABLES)})")
            if S.ADDED_TABLES.get(table, 1) > manifest.format_version:
                raise TraceError(f"{at}: table {table!r} is not part of format version {manifest.format_version} "
                                 f"(added in version {S.ADDED_TABLES[table]})")
            if not isinstance(info, dict):
                raise TraceError(f"{at}: 'files'.{table} must be an object (path, rows, bytes), not {_kind(info)}")
            for key in FILE_ENTRY:
                if key not in info:
                    raise TraceError(f"{at}: 'files'.{table} has no {key!r}")
            _check_fields(info, FILE_ENTRY, at, f"files.{table}.")
            path = info["path"]
            check_member_path(path, at)
            want = S.snapshot_file(table, i)
            if path != want:
                raise TraceError(f"{at}: the {table} file of snapshot {i} is {path[:80]!r}, expected {want!r}")
            entry_files[table] = FileEntry(table, i, path, info["rows"], info["bytes"])
        if "pages" not in entry_files:
            raise TraceError(f"{at}: snapshot {i} has no pages file")
        entries.append(e)
        files.append(entry_files)
    log = SnapshotLog(entries, files, torn, end)
    _agree(log, manifest, where)
    return log


def check_member_path(path: str, where: str) -> None:
    """A path the log names must stay inside the trace directory: relative, without ``..``."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise TraceError(f"{where}: path {path[:80]!r} must be relative to the trace directory")
    parts = path.split("/")
    if ".." in parts or posixpath.normpath(path) != path:
        raise TraceError(f"{where}: path {path[:80]!r} leaves the trace directory or is not normalised (no '..', '.', '//')")


def _agree(log: SnapshotLog, manifest: Manifest, where: str) -> None:
    """A finished capture's manifest names how many snapshots it committed (and when): the log
    must hold exactly those."""
    n = len(log.entries)
    if not manifest.complete:
        return
    if manifest.snapshot_count is not None and manifest.snapshot_count != n:
        raise TraceError(f"{where}: commits {n} snapshot(s), but the manifest of this finished capture says "
                         f"{manifest.snapshot_count} (a log line was lost or added)")
    if log.torn_tail:
        raise TraceError(f"{where}: ends in a torn line, but the manifest says the capture finished")
    listed = manifest.raw.get("snapshots")
    if isinstance(listed, list) and listed:
        if len(listed) != n:
            raise TraceError(f"{where}: commits {n} snapshot(s), but the manifest lists {len(listed)}")
        for i, (a, b) in enumerate(zip(listed, log.entries)):
            if a.get("snap") != i or a.get("t_ns") != b["t_ns"]:
                raise TraceError(f"{where}: line {i + 1} (t_ns={b['t_ns']}) disagrees with the manifest's "
                                 f"snapshot {i} (snap={a.get('snap')!r}, t_ns={a.get('t_ns')!r})")
