"""Seeded mutations of a small trace, and what ``ksmtrace info`` + ``ksmtrace replay`` must make of each.

The fuzz suite (``tests/fuzz``) drives it with a runner of its own (the CLI, in-process, under a
hang guard)::

    base = build_bases(tmpdir, run)                  # a finished and a killed capture, and references
    for seed in range(2000):
        case = make_case(base, workdir, seed)        # a mutated copy of a base trace
        out = run_case(base, case, run)
        assert out.ok, out

Every case belongs to one class (``CLASSES``: the failures a tester found, issue 9) and says what
a correct reader does with it:

* ``error`` — the trace is inconsistent or crafted: the CLI must exit with one
  ``ksmtrace: error: <file under the trace>: <rule>`` line, raised as a
  :class:`~ksmtrace.errors.KsmtraceError` (a traceback, a hang or a success is a failure);
* ``same`` — the mutation changes nothing a reader may care about (stray files of a killed
  capture, ids renumbered into huge values): info's per-snapshot numbers and the replay's
  summary must be exactly the unmutated trace's;
* ``prefix:N`` — a killed capture's log cut after N snapshots: the result must be exactly that of
  the same capture stopped after N snapshots (built independently).

``Outcome.kind`` is one of ``error``, ``same``, ``prefix`` (as expected) or a failure:
``traceback``, ``hang``, ``silent`` (success on a trace that should have been refused), ``wrong``
(success with other numbers), ``refused`` (an error on a trace that should have worked),
``message`` (an error that does not name a file of the trace).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ksmtrace.trace import schema as S



# --- the base traces -------------------------------------------------------------------------
def base_snapshots() -> list[dict]:
    """Six snapshots of three processes: duplicates within and across processes, zero pages,
    a fork sharing frames (proc 2, from snapshot 2), an exit (proc 1, at snapshot 4), rewrites."""
    snaps = []
    for s in range(6):
        pages: dict[tuple[int, int], Any] = {}
        for v in range(12):
            pages[(0, v)] = "a" if v < 4 else (0 if v < 6 else f"u0-{v}-{s // 2}" if v < 9 else f"k{v % 2}")
        if s < 4:
            for v in range(10):
                pages[(1, 100 + v)] = "a" if v < 3 else (f"k{v % 2}" if v < 6 else f"u1-{v}")
        if s >= 2:
            for v in range(6):
                if s >= 4 and v % 3 == 0:
                    pages[(2, v)] = f"child-{v}"
                else:
                    c = pages[(0, v)]
                    pages[(2, v)] = {"c": c, "frame": ("fork", v)}
                    pages[(0, v)] = {"c": c, "frame": ("fork", v)}
        snaps.append(pages)
    return snaps


PROCS = {0: {"pid": 4100}, 1: {"pid": 4200, "uid": 1000, "cgroup": "/other"}, 2: {"pid": 4300, "ppid": 4100}}


def _write_base(path: Path, n: int | None = None, killed: bool = False) -> Path:
    from ksmtrace.testing.builders import make_trace

    snaps = base_snapshots()[: n or None]
    gt = [[{"run": 0, "pages_sharing": 0, "pages_shared": 0, "full_scans": 0}] for _ in snaps]
    make_trace(path, snaps, interval=0.5, procs=PROCS, keyframe_every=3, ground_truth=gt,
               samples={}, capture={"scope": "anon"})
    if killed:
        m = json.loads((path / S.MANIFEST).read_text())
        m.update(complete=False, end_reason=None, snapshot_count=0)
        m.pop("snapshots", None)
        (path / S.MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
    return path


@dataclass
class Bases:
    """The two base traces and their reference results (``refs[(base, n)]``: the result of the
    base's capture stopped after n snapshots)."""

    dirs: dict[str, Path]
    n_snaps: int
    refs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


# runs ``ksmtrace info`` and ``ksmtrace replay`` on a trace: ("ok", {"info": per-snapshot rows,
# "replay": summary without cpu_seconds}), ("error", the KsmtraceError's message), ("traceback",
# what raised) or ("hang", which command).  The CLI is not the library's to import: the fuzz suite
# (tests/fuzz) passes one that drives it in-process.
Runner = Callable[[Path], tuple[str, Any]]


def build_bases(root: str | os.PathLike, run: Runner) -> Bases:
    """Write the finished and the killed base traces under ``root`` and compute the references
    (each from a trace built independently)."""
    root = Path(root)
    n = len(base_snapshots())
    b = Bases({"complete": _write_base(root / "complete"), "killed": _write_base(root / "killed", killed=True)}, n)
    for name in ("complete", "killed"):
        out = run(b.dirs[name])
        if out[0] != "ok":
            raise RuntimeError(f"the {name} base trace does not replay: {out}")
        b.refs[(name, n)] = out[1]
    for k in range(1, n):
        p = _write_base(root / f"prefix-{k}", k, killed=True)
        out = run(p)
        if out[0] != "ok":
            raise RuntimeError(f"the {k}-snapshot base trace does not replay: {out}")
        b.refs[("killed", k)] = out[1]
    return b


# --- editing a trace ---------------------------------------------------------------------------
def read_log(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "snapshots.jsonl").read_text().splitlines()]


def write_log(d: Path, lines: list[Any]) -> None:
    (d / "snapshots.jsonl").write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))


def edit_manifest(d: Path, fn: Callable[[dict], Any]) -> None:
    m = json.loads((d / S.MANIFEST).read_text())
    fn(m)
    (d / S.MANIFEST).write_text(json.dumps(m, indent=1) + "\n")


def rewrite_table(d: Path, table: str, snap: int, fn: Callable[[pa.Table], pa.Table], fix_log: bool = True) -> None:
    """Rewrite one table file through ``fn`` (pyarrow); the log's rows and bytes follow, so only
    the content is wrong."""
    f = d / S.snapshot_file(table, snap)
    t = fn(pq.read_table(f))
    try:
        pq.write_table(t, f, **S.PARQUET_OPTIONS.get(table, S.DEFAULT_PARQUET_OPTIONS))
    except (OSError, pa.ArrowException):  # the table's encodings may not suit a rewritten column's type
        pq.write_table(t, f, **S.DEFAULT_PARQUET_OPTIONS)
    if fix_log:
        fix_log_entry(d, table, snap)


def fix_log_entry(d: Path, table: str, snap: int) -> None:
    f = d / S.snapshot_file(table, snap)
    lines = read_log(d)
    lines[snap]["files"][table].update(rows=pq.ParquetFile(f).metadata.num_rows, bytes=f.stat().st_size)
    write_log(d, lines)


def _set_column(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, pa.field(name, values.type, nullable=values.null_count > 0 or t.schema.field(name).nullable), values)


def _tables(d: Path) -> list[str]:
    return sorted({t for t, _ in _files(d)})


def _files(d: Path, table: str | None = None) -> list[tuple[str, int]]:
    out = []
    for e in read_log(d):
        for t in e["files"]:
            if table is None or t == table:
                out.append((t, e["snap"]))
    return out


# --- mutation classes --------------------------------------------------------------------------
# each takes (rng, trace dir, outside scratch dir, base name) and returns (expectation, what it did)
Mut = Callable[[random.Random, Path, Path, str], tuple[str, str]]
OTHER_TYPES = [pa.int64(), pa.uint64(), pa.int32(), pa.uint32(), pa.int16(), pa.uint8(), pa.float64(), pa.string(),
               pa.large_string(), pa.bool_(), pa.binary(), pa.dictionary(pa.int32(), pa.string())]


def _cast(col: pa.ChunkedArray, typ: pa.DataType) -> pa.Array:
    """``col`` in type ``typ``: cast where Arrow can, else values of that type."""
    arr = col.combine_chunks()
    try:
        if pa.types.is_dictionary(typ):
            return arr.cast(pa.string()).dictionary_encode()
        return arr.cast(typ, safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        n = len(arr)
        if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ):
            return pa.array(["x"] * n, typ)
        if pa.types.is_boolean(typ):
            return pa.array([False] * n, typ)
        return pa.array([i % 100 for i in range(n)], typ)


def m_column_type(rng, d, out, base):
    """A column of one or two files of a table rewritten with pyarrow in another type (mixed
    column types across snapshot files)."""
    table = rng.choice(["pages"] + _tables(d))
    snaps = sorted({s for _, s in _files(d, table)})
    picked = rng.sample(snaps, min(len(snaps), rng.choice([1, 2])))
    names = pq.read_schema(d / S.snapshot_file(table, picked[0])).names
    col = rng.choice(names)
    done = []
    for s in picked:
        t = pq.read_table(d / S.snapshot_file(table, s))
        want = t.schema.field(col).type
        # without the Arrow schema in the file (the small tables), a large or dictionary-encoded
        # string column reads back as a plain string: the file is then as valid as before
        stored = S.PARQUET_OPTIONS.get(table, {}).get("store_schema", True)
        typ = rng.choice([x for x in OTHER_TYPES if not x.equals(want) and (
            stored or not (pa.types.is_string(want) and (pa.types.is_large_string(x) or pa.types.is_dictionary(x))))])
        rewrite_table(d, table, s, lambda t: _set_column(t, col, _cast(t.column(col), typ)))
        done.append(f"{table}/{s}.{col}:{typ}")
    return "error", " ".join(done)


MANIFEST_FIELDS = ["host", "capture", "tracer", "pages_columns", "command_line", "complete", "end_reason",
                   "snapshot_count", "snapshots", "summary", "created", "host.hz", "host.kernel_release",
                   "host.root", "capture.soft_dirty", "capture.interval_s", "capture.keyframe_every",
                   "tracer.name", "format"]
WRONG_VALUES = [5, -1, 1.5, "x", [], [1, "a"], {}, {"a": 1}, True, False, 2 ** 70, ""]


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# what each field may hold (null is allowed for every one but format)
ALLOWED: dict[str, Callable[[Any], bool]] = {
    "host": lambda v: isinstance(v, dict), "capture": lambda v: isinstance(v, dict),
    "tracer": lambda v: isinstance(v, dict), "summary": lambda v: isinstance(v, dict),
    "pages_columns": lambda v: False,  # only the exact layouts: none of the wrong values
    "command_line": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "complete": lambda v: isinstance(v, bool), "end_reason": lambda v: isinstance(v, str),
    "snapshot_count": lambda v: False,  # any count disagrees with the log of a finished capture...
    "snapshots": lambda v: v == [],  # an empty list is the same as none
    "created": lambda v: isinstance(v, str), "host.hz": lambda v: _is_int(v) and 1 <= v <= 100000,
    "host.kernel_release": lambda v: isinstance(v, str), "host.root": lambda v: isinstance(v, bool),
    "capture.soft_dirty": lambda v: isinstance(v, bool),
    "capture.interval_s": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 2 ** 63,
    "capture.keyframe_every": lambda v: _is_int(v) and 0 <= v < 2 ** 63, "tracer.name": lambda v: isinstance(v, str),
    "format": lambda v: False,
}


def m_manifest_field(rng, d, out, base):
    """A manifest field of the wrong JSON type (a non-object host, a string hz, a boolean count...)."""
    key = rng.choice(MANIFEST_FIELDS)
    value = rng.choice([v for v in WRONG_VALUES if not ALLOWED[key](v)])
    if key == "snapshot_count" and base == "killed" and _is_int(value) and value >= 0:
        value = -1  # ...but a killed capture's count is not checked against the log: give it a bad one

    def edit(m):
        if "." in key:
            a, b = key.split(".")
            m[a][b] = value
        else:
            m[key] = value

    edit_manifest(d, edit)
    return "error", f"{key}={value!r}"


def m_format_version(rng, d, out, base):
    """``format_version`` true, 1.0, "1", a version after the newest, null, absent..."""
    value = rng.choice([True, 1.0, "1", max(S.READ_VERSIONS) + 1, 0, None, [1], {"v": 1}, -1, 2 ** 70, "missing"])

    def edit(m):
        if value == "missing":
            del m["format_version"]
        else:
            m["format_version"] = value

    edit_manifest(d, edit)
    return "error", f"format_version={value!r}"


def _outside_copy(d: Path, out: Path, rel: str) -> Path:
    dst = out / ("copy-" + rel.replace("/", "-"))
    shutil.copyfile(d / rel, dst)
    return dst


def m_manifest_special(rng, d, out, base):
    """manifest.json pointing at /dev/zero, a FIFO, a directory, not JSON, not UTF-8, NaN, a
    huge number, deep nesting, a lone surrogate..."""
    m = d / S.MANIFEST
    how = rng.choice(["dev-zero", "dev-null", "symlink-out", "symlink-in", "fifo", "dir", "empty", "truncated",
                      "not-utf8", "nan", "inf", "deep", "huge-int", "surrogate", "array", "string", "missing"])
    text = m.read_text()
    if how in ("dev-zero", "dev-null", "symlink-out", "symlink-in", "fifo", "dir", "missing"):
        target = {"dev-zero": "/dev/zero", "dev-null": "/dev/null"}.get(how)
        if how == "symlink-out":
            target = str(_outside_copy(d, out, S.MANIFEST))
        if how == "symlink-in":
            shutil.copyfile(m, d / "manifest.copy")
            target = "manifest.copy"
        m.unlink()
        if target:
            os.symlink(target, m)
        elif how == "fifo":
            os.mkfifo(m)
        elif how == "dir":
            m.mkdir()
    elif how == "empty":
        m.write_text("")
    elif how == "truncated":
        m.write_text(text[: rng.randrange(1, len(text) - 1)])
    elif how == "not-utf8":
        m.write_bytes(text.replace('"builder"', '"b\xff\xfe"').encode("latin-1"))
    elif how == "nan":
        m.write_text(text.replace('"interval_s": 0.5', '"interval_s": NaN'))
    elif how == "inf":
        m.write_text(text.replace('"interval_s": 0.5', '"interval_s": 1e999'))
    elif how == "deep":
        m.write_text(text.replace('"summary"', '"deep": ' + "[" * 100000 + "]" * 100000 + ', "summary"')
                     if '"summary"' in text else "[" * 100000 + "]" * 100000)
    elif how == "huge-int":
        m.write_text(text.replace('"hz": 250', '"hz": ' + "9" * 5000))
    elif how == "surrogate":
        m.write_text(text.replace('"test"', '"\\ud800"', 1))
    elif how == "array":
        m.write_text("[" + text + "]")
    else:
        m.write_text(json.dumps(text))
    return "error", how


def m_log_special(rng, d, out, base):
    """snapshots.jsonl: a FIFO, a symbolic link, a directory, missing, a corrupt or foreign line."""
    log = d / "snapshots.jsonl"
    how = rng.choice(["fifo", "dev-zero", "symlink-out", "dir", "missing", "garbage", "array", "number",
                      "surrogate", "not-utf8", "nan", "blank-line"])
    lines = log.read_text().splitlines()
    i = rng.randrange(len(lines))
    if how in ("fifo", "dev-zero", "symlink-out", "dir", "missing"):
        target = str(_outside_copy(d, out, "snapshots.jsonl")) if how == "symlink-out" else "/dev/zero"
        log.unlink()
        if how == "fifo":
            os.mkfifo(log)
        elif how == "dir":
            log.mkdir()
        elif how != "missing":
            os.symlink(target, log)
        return "error", how
    if how == "garbage":
        lines[i] = "garbage{"
    elif how == "array":
        lines[i] = "[" + lines[i] + "]"
    elif how == "number":
        lines[i] = "42"
    elif how == "surrogate":
        lines[i] = lines[i].replace('"files"', '"\\udc80":1,"files"')
    elif how == "nan":
        lines[i] = lines[i].replace('"wall":', '"wall":NaN,"w":')
    elif how == "blank-line":
        lines.insert(i, "")
    if how == "not-utf8":
        raw = "\n".join(lines).encode() + b"\n"
        raw = raw.replace(b'"files"', b'"\xff":1,"files"', 1)
        log.write_bytes(raw)
    else:
        log.write_text("\n".join(lines) + "\n")
    return "error", f"{how} at line {i + 1}"


def m_fifo_table(rng, d, out, base):
    """A table file replaced by a FIFO (the old reader blocked forever)."""
    table, s = rng.choice(_files(d))
    f = d / S.snapshot_file(table, s)
    f.unlink()
    os.mkfifo(f)
    return "error", f"{table}/{s}"


def m_symlink_out(rng, d, out, base):
    """A table file, or a table directory, replaced by a symbolic link (to an identical copy
    outside the trace, to /dev/zero, or to a copy inside it)."""
    table, s = rng.choice(_files(d))
    rel = S.snapshot_file(table, s)
    how = rng.choice(["file-out", "file-in", "dev-zero", "dir-out", "proc-self"])
    f = d / rel
    if how == "dir-out":
        dst = out / f"dir-{table}"
        shutil.copytree(d / table, dst)
        shutil.rmtree(d / table)
        os.symlink(dst, d / table)
        return "error", f"{table}/ -> outside"
    target = {"dev-zero": "/dev/zero", "proc-self": "/proc/self/environ"}.get(how)
    if how == "file-out":
        target = str(_outside_copy(d, out, rel))
    elif how == "file-in":
        shutil.copyfile(f, d / table / "other.parquet")
        target = "other.parquet"
    f.unlink()
    os.symlink(target, f)
    return "error", f"{rel} -> {how}"


def m_device(rng, d, out, base):
    """A table file replaced by a character device (the /dev/zero device) or a socket-like node."""
    table, s = rng.choice(_files(d))
    f = d / S.snapshot_file(table, s)
    f.unlink()
    try:
        os.mknod(f, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        return "error", f"{table}/{s} chr(1,5)"
    except (PermissionError, OSError):
        os.mkfifo(f)  # without CAP_MKNOD: the other kind of file that must never be opened
        return "error", f"{table}/{s} fifo (no mknod)"


def m_path(rng, d, out, base):
    """A path in the snapshot log that is absolute, climbs out with '..', is not normalised, or
    names another snapshot's or table's file."""
    lines = read_log(d)
    i = rng.randrange(len(lines))
    table = rng.choice(list(lines[i]["files"]))
    rel = S.snapshot_file(table, i)
    other_table = rng.choice([t for t in lines[i]["files"] if t != table] or ["vmas"])
    j = (i + 1) % len(lines)
    p = rng.choice([
        str((d / rel).resolve()), f"../{d.name}/{rel}", f"{table}/../{rel}", f"./{rel}", rel.replace("/", "//"),
        S.snapshot_file(table, j), S.snapshot_file(other_table, i), "", f"{rel}\u0000x", "/etc/hostname",
        f"{table}/", "manifest.json", f"{table}\\snap-{i:06d}.parquet",
    ])
    lines[i]["files"][table]["path"] = p
    write_log(d, lines)
    return "error", f"line {i + 1} {table} path={p!r}"


def _pages_snaps(d):
    return [e["snap"] for e in read_log(d) if e["files"]["pages"]["rows"] > 0]


def m_dup_rows(rng, d, out, base):
    """Page rows duplicated in one snapshot file (rows and bytes in the log follow)."""
    s = rng.choice(_pages_snaps(d))
    k = rng.randint(1, 4)

    def dup(t):
        idx = [rng.randrange(t.num_rows) for _ in range(k)]
        return pa.concat_tables([t, t.take(idx)])

    rewrite_table(d, "pages", s, dup)
    return "error", f"pages/{s} +{k} rows"


def m_drop_rows(rng, d, out, base):
    """Page rows dropped from one snapshot file (rows and bytes in the log follow)."""
    s = rng.choice(_pages_snaps(d))

    def drop(t):
        k = rng.randint(1, max(1, t.num_rows // 3))
        gone = set(rng.sample(range(t.num_rows), k))
        return t.take([i for i in range(t.num_rows) if i not in gone])

    rewrite_table(d, "pages", s, drop)
    return "error", f"pages/{s} dropped rows"


def m_empty_delta(rng, d, out, base):
    """A pages file replaced by an empty one (log follows)."""
    lines = read_log(d)
    s = rng.randrange(len(lines))
    had = lines[s]["files"]["pages"]["rows"]
    rewrite_table(d, "pages", s, lambda t: t.slice(0, 0))
    return ("error" if had else "same"), f"pages/{s} emptied ({had} rows)"


def m_times(rng, d, out, base):
    """Snapshot times equal, reversed, or not a count of nanoseconds."""
    lines = read_log(d)
    i = rng.randrange(1, len(lines))
    how = rng.choice(["equal", "before", "reversed", "bool", "float", "string", "negative", "huge", "null", "end-before"])
    t = lines[i]["t_ns"]
    if how == "equal":
        lines[i]["t_ns"] = lines[i - 1]["t_ns"]
    elif how == "before":
        lines[i]["t_ns"] = lines[i - 1]["t_ns"] - rng.randint(1, 10 ** 9)
    elif how == "reversed":
        ts = [x["t_ns"] for x in lines][::-1]
        for x, v in zip(lines, ts):
            x["t_ns"] = v
    else:
        lines[i]["t_ns"] = {"bool": True, "float": t + 0.5, "string": str(t), "negative": -t - 1, "huge": 2 ** 64,
                            "null": None, "end-before": t}[how]
        if how == "end-before":
            lines[i]["t_end_ns"] = t - 1
    write_log(d, lines)
    return "error", f"{how} at line {i + 1}"


def m_swap(rng, d, out, base):
    """Two snapshots' files swapped on disk, or their entries in the log."""
    table = rng.choice(_tables(d))
    snaps = sorted({s for _, s in _files(d, table)})
    a, b = rng.sample(snaps, 2)
    fa, fb = d / S.snapshot_file(table, a), d / S.snapshot_file(table, b)
    if rng.random() < 0.6:
        same = fa.read_bytes() == fb.read_bytes()  # two empty delta files: the swap changes nothing
        tmp = d / table / "swap.tmp"
        os.rename(fa, tmp)
        os.rename(fb, fa)
        os.rename(tmp, fb)
        return ("same" if same else "error"), f"{table} files {a}<->{b}"
    lines = read_log(d)
    lines[a]["files"][table], lines[b]["files"][table] = lines[b]["files"][table], lines[a]["files"][table]
    write_log(d, lines)
    return "error", f"{table} log entries {a}<->{b}"


def m_huge_ids(rng, d, out, base):
    """Every id renumbered into huge values, order kept (proc up to 2^32-1, pids, virtual and
    physical page numbers near 2^52): nothing is sized by an id, so the numbers stay the same."""
    cols = {}
    for table, s in _files(d):
        t = pq.read_table(d / S.snapshot_file(table, s))
        for c in ("proc", "pid", "ppid", "vpn", "pfn"):
            if c in t.column_names and t.num_rows:
                cols.setdefault(c, []).append(max(t.column(c).to_pylist()))
    limit = {"proc": 2 ** 32 - 1, "pid": 2 ** 32 - 1, "ppid": 2 ** 32 - 1, "vpn": 2 ** 52 - 1, "pfn": 2 ** 52 - 1}
    top = {c: max(v) for c, v in cols.items()}
    pid_top = max(top.get("pid", 0), top.get("ppid", 0))
    shift = {}
    for c in top:
        room = limit[c] - (pid_top if c in ("pid", "ppid") else top[c])
        if c in ("vpn", "pfn"):
            room -= room % 512  # keep huge-page alignment
            shift[c] = room - 512 * rng.randrange(0, 4)
        else:
            shift[c] = room - rng.randrange(0, 3)
    if "ppid" in shift:
        shift["ppid"] = shift["pid"] = min(shift["pid"], shift["ppid"])
    picked = {c: shift[c] for c in shift if c in ("proc", "pid", "ppid") or rng.random() < 0.7}
    if "pid" in picked or "ppid" in picked:
        picked["pid"] = picked["ppid"] = shift["pid"]

    def renumber(t):
        for c, k in picked.items():
            if c in t.column_names:
                typ = t.schema.field(c).type
                vals = [(v + k if (c != "pfn" or v) else 0) for v in t.column(c).to_pylist()]
                t = t.set_column(t.schema.get_field_index(c), t.schema.field(c), pa.array(vals, typ))
        return t

    for table, s in _files(d):
        if table in ("pages", "processes", "vmas", "ksm_stat"):
            rewrite_table(d, table, s, renumber)
    return "same", " ".join(f"{c}+{k}" for c, k in sorted(picked.items()))


def m_negative_ids(rng, d, out, base):
    """An id column rewritten as signed integers with negative values."""
    table, col = rng.choice([("pages", "proc"), ("pages", "pid"), ("pages", "vpn"), ("pages", "pfn"),
                             ("processes", "proc"), ("processes", "pid")])
    s = rng.choice(sorted({s for _, s in _files(d, table)}))
    rewrite_table(d, table, s, lambda t: _set_column(t, col, pa.array([-1 - v for v in t.column(col).to_pylist()], pa.int64())))
    return "error", f"{table}/{s}.{col} negative"


def m_out_of_range(rng, d, out, base):
    """Values outside what the format allows, in the right type: op 4..255, page numbers >= 2^52."""
    s = rng.choice(_pages_snaps(d))
    col = rng.choice(["op", "vpn", "pfn"])
    bad = {"op": rng.randint(4, 255), "vpn": rng.choice([2 ** 52, 2 ** 63, 2 ** 64 - 1]),
           "pfn": rng.choice([2 ** 52, 2 ** 64 - 1])}[col]

    def edit(t):
        vals = t.column(col).to_pylist()
        vals[rng.randrange(len(vals))] = bad
        return t.set_column(t.schema.get_field_index(col), t.schema.field(col), pa.array(vals, t.schema.field(col).type))

    rewrite_table(d, "pages", s, edit)
    return "error", f"pages/{s}.{col}={bad}"


def m_truncate(rng, d, out, base):
    """A table file, the manifest or the log cut short.  A killed capture's log cut at a line is
    that capture stopped earlier; cut inside a line, the torn line is an uncommitted snapshot."""
    what = rng.choice(["table", "table", "manifest", "log", "log"])
    if what == "table":
        table, s = rng.choice(_files(d))
        f = d / S.snapshot_file(table, s)
        size = f.stat().st_size
        os.truncate(f, rng.randrange(0, size))
        return "error", f"{table}/{s}"
    if what == "manifest":
        f = d / S.MANIFEST
        os.truncate(f, rng.randrange(0, f.stat().st_size - 1))  # not just the final newline
        return "error", "manifest"
    f = d / "snapshots.jsonl"
    raw = f.read_bytes()
    cut = rng.randrange(0, len(raw))
    f.write_bytes(raw[:cut])
    n = raw[:cut].count(b"\n")
    if base == "killed" and n > 0:
        return f"prefix:{n}", f"log cut at byte {cut} ({n} lines)"
    return "error", f"log cut at byte {cut} ({n} lines, {base})"


def m_stray(rng, d, out, base):
    """What a killed capture leaves (.reserve, temporary files, the cut snapshot's files, a torn log
    line) and unrelated files: the committed snapshots read exactly as before."""
    n = len(read_log(d))
    done = []
    for _ in range(rng.randint(1, 4)):
        how = rng.choice(["reserve", "tmp-manifest", "tmp-table", "uncommitted", "readme", "subdir"]
                         + (["torn"] if base == "killed" else []))
        if how == "reserve":
            (d / ".reserve").write_bytes(b"\0" * 131072)
        elif how == "tmp-manifest":
            (d / ".manifest.json.tmp").write_text("{")
        elif how == "tmp-table":
            (d / "pages" / f".snap-{n:06d}.parquet.tmp").write_bytes(b"PAR1")
        elif how == "uncommitted":
            shutil.copyfile(d / S.snapshot_file("pages", n - 1), d / S.snapshot_file("pages", n))
        elif how == "readme":
            (d / "NOTES.txt").write_text("hello")
        elif how == "subdir":
            (d / "extra").mkdir(exist_ok=True)
        elif how == "torn" and not (d / "snapshots.jsonl").read_bytes().endswith(b'"t_ns":9'):
            with open(d / "snapshots.jsonl", "ab") as fh:
                fh.write(b'{"snap":%d,"t_ns":9' % n)
        done.append(how)
    return (f"prefix:{n}" if base == "killed" else "same"), " ".join(done)


def m_nulls(rng, d, out, base):
    """Nulls in a column the format declares non-null."""
    table = rng.choice(["pages", "processes"])
    s = rng.choice(_pages_snaps(d) if table == "pages" else sorted({s for _, s in _files(d, table)}))
    sch = S.SCHEMAS[table]
    col = rng.choice([f.name for f in sch if not f.nullable])

    def edit(t):
        vals = t.column(col).to_pylist()
        vals[rng.randrange(len(vals))] = None
        return _set_column(t, col, pa.array(vals, t.schema.field(col).type))

    rewrite_table(d, table, s, edit)
    return "error", f"{table}/{s}.{col} null"


def m_extra_column(rng, d, out, base):
    """A column the format does not have."""
    table, s = rng.choice(_files(d))
    name = rng.choice(["extra", "sample2", "pfx64", "Snap"])
    rewrite_table(d, table, s, lambda t: t.append_column(name, pa.array([1] * t.num_rows, pa.uint32())) if name not in t.column_names else t.append_column("extra", pa.array([1] * t.num_rows, pa.uint32())))
    return "error", f"{table}/{s}+{name}"


def m_stats(rng, d, out, base):
    """The log's statistics (new, changed, gone, pages mapped) disagree with the rows."""
    lines = read_log(d)
    i = rng.randrange(len(lines))
    key = rng.choice(["new", "changed", "gone", "pages"])
    lines[i][key] = max(0, lines[i][key] + rng.choice([-2, -1, 1, 3])) if lines[i][key] else rng.randint(1, 5)
    write_log(d, lines)
    return "error", f"line {i + 1} {key}"


def m_snap_column(rng, d, out, base):
    """A file's snap column naming another snapshot."""
    table, s = rng.choice([x for x in _files(d)])
    f = d / S.snapshot_file(table, s)
    if pq.ParquetFile(f).metadata.num_rows == 0:
        return m_snap_column(rng, d, out, base)
    n = len(read_log(d))
    other = rng.choice([x for x in range(n + 2) if x != s])
    rewrite_table(d, table, s, lambda t: t.set_column(0, t.schema.field(0), pa.array([other] * t.num_rows, pa.uint32())))
    return "error", f"{table}/{s}.snap={other}"


def m_log_lines(rng, d, out, base):
    """Log lines duplicated, removed from the middle, or reordered."""
    lines = read_log(d)
    i = rng.randrange(1, len(lines) - 1)
    how = rng.choice(["dup", "remove", "swap", "renumber"])
    if how == "dup":
        lines.insert(i, lines[i])
    elif how == "remove":
        del lines[i]
    elif how == "swap":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    else:
        lines[i]["snap"] = i + 7
    write_log(d, lines)
    return "error", f"{how} line {i + 1}"


def m_missing(rng, d, out, base):
    """A table file or directory the log names is missing."""
    table, s = rng.choice(_files(d))
    if rng.random() < 0.3:
        shutil.rmtree(d / table)
        return "error", f"{table}/ removed"
    (d / S.snapshot_file(table, s)).unlink()
    return "error", f"{table}/{s} removed"


def m_processes(rng, d, out, base):
    """A process with page rows removed from the processes table."""
    procs = sorted({r for _, s in _files(d, "processes") for r in pq.read_table(d / S.snapshot_file("processes", s)).column("proc").to_pylist()})
    victim = rng.choice(procs)
    for _, s in _files(d, "processes"):
        rewrite_table(d, "processes", s, lambda t: t.filter(pc.not_equal(t.column("proc"), victim)))
    return "error", f"proc {victim} dropped from processes"


def m_unicode(rng, d, out, base):
    """Strings that are not valid Unicode: lone surrogates in the manifest or the log, invalid
    UTF-8 bytes."""
    how = rng.choice(["manifest-surrogate", "manifest-key", "log-surrogate", "manifest-bytes", "log-bytes"])
    if how == "manifest-surrogate":
        edit = (d / S.MANIFEST).read_text().replace('"builder"', '"b\\udfff"')
        (d / S.MANIFEST).write_text(edit)
    elif how == "manifest-key":
        (d / S.MANIFEST).write_text((d / S.MANIFEST).read_text().replace('"created"', '"\\ud83d"', 1))
    elif how == "log-surrogate":
        lines = (d / "snapshots.jsonl").read_text().splitlines()
        lines[0] = lines[0].replace('"keyframe"', '"\\ud800x":"\\udbff","keyframe"')
        (d / "snapshots.jsonl").write_text("\n".join(lines) + "\n")
    elif how == "manifest-bytes":
        raw = (d / S.MANIFEST).read_bytes().replace(b'"builder"', b'"\xc3\x28"')
        (d / S.MANIFEST).write_bytes(raw)
    else:
        raw = (d / "snapshots.jsonl").read_bytes().replace(b'"files"', b'"\xed\xa0\x80":0,"files"', 1)
        (d / "snapshots.jsonl").write_bytes(raw)
    return "error", how


def m_overflow(rng, d, out, base):
    """Numbers out of range: hz 10^30, an infinite interval, rows 2^64, bytes 10^30, t_ns 2^63."""
    how = rng.choice(["hz", "interval", "rows", "bytes", "t_ns", "count", "page_size"])
    if how in ("hz", "interval", "count", "page_size"):
        text = (d / S.MANIFEST).read_text()
        text = {"hz": text.replace('"hz": 250', '"hz": 1000000000000000000000000000000'),
                "interval": text.replace('"interval_s": 0.5', '"interval_s": 1e999'),
                "count": text.replace('"snapshot_count": ', '"snapshot_count": 18446744073709551616, "x": '),
                "page_size": text.replace('"page_size": 4096', '"page_size": -4096')}[how]
        (d / S.MANIFEST).write_text(text)
        return "error", how
    lines = read_log(d)
    i = rng.randrange(len(lines))
    if how == "rows":
        lines[i]["files"]["pages"]["rows"] = 2 ** 64
    elif how == "bytes":
        lines[i]["files"]["pages"]["bytes"] = 10 ** 30
    else:
        lines[i]["t_ns"] = 2 ** 63
    write_log(d, lines)
    return "error", f"{how} line {i + 1}"


def m_key_error(rng, d, out, base):
    """A required key missing: format, format_version, a line's snap, t_ns, files, pages file,
    path, rows or bytes."""
    how = rng.choice(["format", "format_version", "snap", "t_ns", "files", "files.pages", "path", "rows", "bytes"])
    if how in ("format", "format_version"):
        edit_manifest(d, lambda m: m.pop(how))
        return "error", how
    lines = read_log(d)
    i = rng.randrange(len(lines))
    if how in ("snap", "t_ns", "files"):
        del lines[i][how]
    elif how == "files.pages":
        del lines[i]["files"]["pages"]
    else:
        del lines[i]["files"][rng.choice(list(lines[i]["files"]))][how]
    write_log(d, lines)
    return "error", f"{how} line {i + 1}"


CLASSES: dict[str, Mut] = {
    "column-type": m_column_type,
    "manifest-field": m_manifest_field,
    "format-version": m_format_version,
    "manifest-special": m_manifest_special,
    "log-special": m_log_special,
    "fifo-table": m_fifo_table,
    "symlink-out": m_symlink_out,
    "device": m_device,
    "path": m_path,
    "dup-rows": m_dup_rows,
    "drop-rows": m_drop_rows,
    "empty-delta": m_empty_delta,
    "times": m_times,
    "swap": m_swap,
    "huge-ids": m_huge_ids,
    "negative-ids": m_negative_ids,
    "out-of-range": m_out_of_range,
    "truncate": m_truncate,
    "stray": m_stray,
    "nulls": m_nulls,
    "extra-column": m_extra_column,
    "stats": m_stats,
    "snap-column": m_snap_column,
    "log-lines": m_log_lines,
    "missing": m_missing,
    "processes": m_processes,
    "unicode": m_unicode,
    "overflow": m_overflow,
    "key-error": m_key_error,
}


# --- cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    seed: int
    cls: str
    base: str
    path: Path
    expect: str
    detail: str


def make_case(bases: Bases, work: str | os.PathLike, seed: int) -> Case:
    """Copy a base trace to ``work/case`` and apply the mutation of class ``seed mod |CLASSES|``
    (parameters from ``Random(seed)``)."""
    rng = random.Random(seed)
    names = list(CLASSES)
    cls = names[seed % len(names)]
    base = rng.choice(["complete", "killed"])
    work = Path(work)
    d = work / "case"
    outside = work / "outside"
    for p in (d, outside):
        if p.is_symlink() or p.exists():
            _rmtree(p)
    shutil.copytree(bases.dirs[base], d)
    outside.mkdir()
    expect, detail = CLASSES[cls](rng, d, outside, base)
    return Case(seed, cls, base, d, expect, detail)


def _rmtree(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
        return
    for root, dirs, files in os.walk(p):
        for x in dirs:
            q = Path(root) / x
            if q.is_symlink():
                q.unlink()
    shutil.rmtree(p)


@dataclass
class Outcome:
    kind: str  # error | same | prefix | traceback | hang | silent | wrong | refused | message
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("error", "same", "prefix")


def run_case(bases: Bases, case: Case, run: Runner) -> Outcome:
    """Run info and replay on the case (``run``) and judge the outcome against its expectation."""
    return judge(bases, case, *run(case.path))


def judge(bases: Bases, case: Case, status: str, got: Any) -> Outcome:
    """The outcome of a case whose run ended in ``status`` with ``got`` (see :data:`Runner`)."""
    if status in ("traceback", "hang"):
        return Outcome(status, got)
    if status == "error":
        if case.expect != "error":
            return Outcome("refused", got)
        if not got.startswith(str(case.path)):
            return Outcome("message", got)
        return Outcome("error", got.split(": ", 1)[-1][:120])
    if case.expect == "error":
        return Outcome("silent", case.detail)
    n = bases.n_snaps if case.expect == "same" else int(case.expect.split(":")[1])
    ref = bases.refs[(case.base, n)]
    if got != ref:
        diff = [k for k in ref["replay"] if ref["replay"].get(k) != got["replay"].get(k)]
        return Outcome("wrong", f"info equal: {got['info'] == ref['info']}; replay fields differing: {diff[:6]}")
    return Outcome("same" if case.expect == "same" else "prefix", f"{n} snapshots")
