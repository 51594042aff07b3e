"""Validation on open (issue 9, item 1): every rule a trace can break is one TraceError naming
the file and the rule; nothing blocks, follows a link out of the trace or allocates by an id."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pyarrow as pa
import pytest

from ksmtrace.errors import TraceError, TraceVersionError
from ksmtrace.testing import make_trace
from ksmtrace.testing.fuzz import edit_manifest, read_log, rewrite_table, write_log
from ksmtrace.trace import schema as S
from ksmtrace.trace.info import trace_info
from ksmtrace.trace.reader import open_trace

SNAPS = [
    {(0, 1): "a", (0, 2): "b", (1, 7): 0},
    {(0, 1): "a", (0, 2): "c", (1, 7): 0, (1, 8): "a"},
    {(0, 1): "a", (1, 8): "a"},
    {(0, 1): "d", (1, 8): "a", (1, 9): "e"},
]


@pytest.fixture
def t(tmp_path):
    make_trace(tmp_path / "t", SNAPS, keyframe_every=2)
    return tmp_path / "t"


@pytest.fixture(autouse=True)
def hang_guard(request):
    """Nothing here may block: fail after 20 s (a test's ``hang_limit``) instead of hanging."""
    def alarm(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(getattr(request.function, "hang_limit", 20))
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def refused(path, pattern, *, prepare=False):
    with pytest.raises(TraceError, match=pattern) as ei:
        tr = open_trace(path)
        if prepare:
            tr.prepare("anon", cache=False)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    return msg


# --- the manifest ------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,pattern", [
    ("host", 5, r"manifest.json: 'host' must be an object, not an integer"),
    ("capture", [], r"'capture' must be an object, not a list"),
    ("command_line", "ksmtrace capture", r"'command_line' must be a list of strings"),
    ("complete", "yes", r"'complete' must be a boolean"),
    ("pages_columns", ["snap", "proc"], r"'pages_columns' .* is not a pages layout"),
    ("snapshot_count", True, r"'snapshot_count' must be an integer >= 0, not a boolean"),
])
def test_manifest_fields_have_their_types(t, key, value, pattern):
    edit_manifest(t, lambda m: m.__setitem__(key, value))
    refused(t, pattern)


@pytest.mark.parametrize("key,value,pattern", [
    ("hz", "250", r"'host.hz' must be an integer tick rate"),
    ("hz", 10 ** 30, r"integer tick rate"),
    ("kernel_release", 6.1, r"'host.kernel_release' must be a string"),
])
def test_host_fields_have_their_types(t, key, value, pattern):
    edit_manifest(t, lambda m: m["host"].__setitem__(key, value))
    refused(t, pattern)


@pytest.mark.parametrize("value", [True, 1.0, "1", max(S.READ_VERSIONS) + 1, 0, None, [1]])
def test_format_version_must_be_a_readable_integer(t, value):
    edit_manifest(t, lambda m: m.__setitem__("format_version", value))
    with pytest.raises(TraceVersionError, match=r"format version .* is not supported"):
        open_trace(t)


@pytest.mark.parametrize("text,pattern", [
    ('{"format": "ksmtrace-trace", "format_version": 1, "capture": {"interval_s": NaN}}', "not valid JSON"),
    ('{"format": "ksmtrace-trace", "format_version": 1, "end_reason": "\\ud800"}', "not valid Unicode"),
    ("[" * 100000 + "]" * 100000, "nested too deeply|not a ksmtrace manifest"),
    ("[1, 2]", "not a ksmtrace manifest .*a list"),
])
def test_manifest_json_oddities(t, text, pattern):
    (t / "manifest.json").write_text(text)
    refused(t, pattern)


def test_manifest_not_utf8(t):
    (t / "manifest.json").write_bytes(b'{"format": "\xff"}')
    refused(t, "not UTF-8")


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/hostname"])
def test_manifest_symlink_is_refused_without_reading_it(t, target):
    (t / "manifest.json").unlink()
    os.symlink(target, t / "manifest.json")
    refused(t, r"manifest.json: is a symbolic link")


def test_manifest_fifo_does_not_block(t):
    (t / "manifest.json").unlink()
    os.mkfifo(t / "manifest.json")
    refused(t, r"manifest.json: is a FIFO")


# --- the snapshot log --------------------------------------------------------------------------
@pytest.mark.parametrize("edit,pattern", [
    (lambda L: L[2].__setitem__("t_ns", L[1]["t_ns"]), r"line 3: snapshot 2 is taken at .* not after snapshot 1"),
    (lambda L: L[1].__setitem__("t_ns", 0), r"line 2: .*times must increase strictly"),
    (lambda L: L[1].__setitem__("t_ns", "1000"), r"line 2: 't_ns' must be an integer"),
    (lambda L: L[1].__setitem__("t_ns", True), r"line 2: 't_ns' must be an integer"),
    (lambda L: L[1].__setitem__("t_ns", 2 ** 64), r"line 2: 't_ns' must be an integer"),
    (lambda L: L[1].__setitem__("snap", 2), r"line 2 describes snapshot 2, expected 1"),
    (lambda L: L.insert(1, L[1]), r"line 3 describes snapshot 1, expected 2"),
    (lambda L: L[1]["files"]["pages"].__setitem__("rows", -1), r"'files.pages.rows' must be an integer >= 0"),
    (lambda L: L[1]["files"]["pages"].__setitem__("bytes", 1.5), r"'files.pages.bytes' must be an integer >= 0"),
    (lambda L: L[1]["files"].pop("pages"), r"line 2: snapshot 1 has no pages file"),
    (lambda L: L[1]["files"].__setitem__("secrets", {"path": "x", "rows": 0, "bytes": 0}), "unknown table 'secrets'"),
    (lambda L: L[1].__setitem__("files", []), r"'files' must be an object"),
    (lambda L: L[1].__setitem__("new", "3"), r"'new' must be an integer >= 0"),
])
def test_log_rules(t, edit, pattern):
    lines = read_log(t)
    edit(lines)
    write_log(t, lines)
    refused(t, pattern)


@pytest.mark.parametrize("path,pattern", [
    ("/etc/passwd", "must be relative"),
    ("../t/pages/snap-000001.parquet", r"leaves the trace directory"),
    ("pages/../pages/snap-000001.parquet", r"leaves the trace directory"),
    ("./pages/snap-000001.parquet", "not normalised"),
    ("pages/snap-000002.parquet", r"the pages file of snapshot 1 is 'pages/snap-000002.parquet', expected"),
])
def test_log_paths_stay_inside_and_are_canonical(t, path, pattern):
    lines = read_log(t)
    lines[1]["files"]["pages"]["path"] = path
    write_log(t, lines)
    refused(t, pattern)


def test_a_finished_capture_commits_what_its_manifest_says(t):
    lines = read_log(t)
    write_log(t, lines[:-1])
    refused(t, r"commits 3 snapshot\(s\), but the manifest of this finished capture says 4")


# --- the table files ---------------------------------------------------------------------------
def test_fifo_table_file_does_not_block(t):
    f = t / "pages" / "snap-000001.parquet"
    f.unlink()
    os.mkfifo(f)
    refused(t, r"pages/snap-000001.parquet: is a FIFO")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs CAP_MKNOD")
def test_device_table_file_is_never_opened(t):
    f = t / "processes" / "snap-000001.parquet"
    f.unlink()
    os.mknod(f, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    refused(t, r"processes/snap-000001.parquet: is a character device")


def test_symlink_to_an_identical_file_outside_is_refused(t, tmp_path):
    f = t / "pages" / "snap-000001.parquet"
    copy = tmp_path / "outside.parquet"
    copy.write_bytes(f.read_bytes())
    f.unlink()
    os.symlink(copy, f)
    refused(t, r"pages/snap-000001.parquet: is a symbolic link")


def test_symlinked_table_directory_is_refused(t, tmp_path):
    import shutil

    shutil.copytree(t / "pages", tmp_path / "pages-elsewhere")
    shutil.rmtree(t / "pages")
    os.symlink(tmp_path / "pages-elsewhere", t / "pages")
    refused(t, r"/pages: is a symbolic link")


def test_rows_disagree_with_the_log(t):
    lines = read_log(t)
    lines[1]["files"]["pages"]["rows"] += 1
    write_log(t, lines)
    refused(t, r"pages/snap-000001.parquet: 2 rows, but the snapshot log recorded 3")


@pytest.mark.parametrize("col,typ", [("vpn", pa.int64()), ("proc", pa.uint64()), ("hash", pa.string()), ("op", pa.int8())])
def test_column_types_are_those_of_the_format(t, col, typ):
    rewrite_table(t, "pages", 1, lambda x: x.set_column(x.schema.get_field_index(col), pa.field(col, typ), x.column(col).cast(typ)))
    refused(t, rf"pages/snap-000001.parquet: column '{col}' is {typ}, but format version \d+ stores it as")


def test_mixed_types_across_snapshot_files(t):
    """One file has uid as int64: refused on open, where concatenating the files used to raise."""
    i = S.PROCESSES_SCHEMA.get_field_index("uid")
    rewrite_table(t, "processes", 2, lambda x: x.set_column(i, pa.field("uid", pa.int64()), x.column("uid").cast(pa.int64())))
    refused(t, r"processes/snap-000002.parquet: column 'uid' is int64, but format version \d+ stores it as uint32")


def test_an_extra_column_is_refused(t):
    rewrite_table(t, "pages", 0, lambda x: x.append_column("secret", pa.array([1] * x.num_rows)))
    refused(t, r"column 'secret' is not part of the pages table")


def test_nulls_where_the_format_has_none(t):
    def null_vpn(x):
        v = x.column("vpn").to_pylist()
        v[0] = None
        return x.set_column(x.schema.get_field_index("vpn"), pa.field("vpn", pa.uint64(), nullable=True), pa.array(v, pa.uint64()))

    rewrite_table(t, "pages", 1, null_vpn)
    with pytest.raises(TraceError, match=r"pages/snap-000001.parquet: column 'vpn' holds nulls"):
        open_trace(t).read_table("pages")


def test_a_file_with_another_snapshots_rows(t):
    rewrite_table(t, "processes", 1, lambda x: x.set_column(0, x.schema.field(0), pa.array([3] * x.num_rows, pa.uint32())))
    with pytest.raises(TraceError, match=r"processes/snap-000001.parquet: holds rows of snapshot\(s\) 3..3, not of snapshot 1"):
        open_trace(t).check()


def test_a_file_changed_after_open_is_not_mixed_in(t):
    tr = open_trace(t)
    rewrite_table(t, "pages", 2, lambda x: x, fix_log=False)  # same content, a new file
    with pytest.raises(TraceError, match="changed since the trace was opened"):
        tr.read_table("pages")


# --- the page rows -----------------------------------------------------------------------------
def test_duplicated_page_rows(t):
    rewrite_table(t, "pages", 1, lambda x: pa.concat_tables([x, x.slice(0, 1)]))
    refused(t, r"pages/snap-000001.parquet: page \(proc \d+, vpn 0x\w+\) appears twice in snapshot 1", prepare=True)


def test_dropped_page_rows_disagree_with_the_log_statistics(t):
    rewrite_table(t, "pages", 1, lambda x: x.slice(1))
    refused(t, r"pages/snap-000001.parquet: \d+ (NEW|CHANGED) rows, but the snapshot log recorded", prepare=True)


def _without_statistics(t):
    """A log without the capture's statistics: only the delta rules can tell."""
    lines = read_log(t)
    for e in lines:
        for k in ("new", "changed", "gone", "pages"):
            e.pop(k, None)
    write_log(t, lines)


def test_a_dropped_new_row_breaks_the_delta_encoding(t):
    """Without statistics in the log, the delta rules still catch a missing NEW row."""
    _without_statistics(t)
    ops = open_trace(t).read_table("pages", [0])
    keep = [i for i, (p, v) in enumerate(zip(ops["proc"], ops["vpn"])) if (p, v) != (0, 2)]
    rewrite_table(t, "pages", 0, lambda x: x.take(keep))
    refused(t, r"page \(proc 0, vpn 0x2\) is CHANGED at snapshot 1 but was not mapped before", prepare=True)


def test_an_emptied_delta_file(t):
    rewrite_table(t, "pages", 3, lambda x: x.slice(0, 0))
    refused(t, r"pages/snap-000003.parquet: 0 NEW rows, but the snapshot log recorded 1", prepare=True)


def test_a_keyframe_must_list_every_mapped_page(t):
    _without_statistics(t)
    tab = open_trace(t).read_table("pages", [2])
    same = [i for i, o in enumerate(tab["op"]) if o == S.OP_SAME]
    rewrite_table(t, "pages", 2, lambda x: x.take([i for i in range(x.num_rows) if i != same[0]]))
    refused(t, r"keyframe snapshot 2 does not list every page mapped before it", prepare=True)


@pytest.mark.parametrize("col,value,pattern", [
    ("op", 9, "op 9 is not a page row operation"),
    ("vpn", 2 ** 63, r"vpn 0x8000000000000000 is not a page number"),
    ("pfn", 2 ** 52, r"pfn 0x10000000000000 is not a page number"),
])
def test_values_the_format_does_not_allow(t, col, value, pattern):
    def edit(x):
        v = x.column(col).to_pylist()
        v[0] = value
        return x.set_column(x.schema.get_field_index(col), x.schema.field(col), pa.array(v, x.schema.field(col).type))

    rewrite_table(t, "pages", 1, edit)
    refused(t, pattern, prepare=True)


def test_huge_ids_allocate_nothing_by_value(tmp_path):
    """proc 2^32-1 and pids, page numbers near their limits: the same numbers, in little memory
    (the reader used to size an array by the largest proc: 32 GiB)."""
    big = 2 ** 32 - 1
    a = make_trace(tmp_path / "a", SNAPS, procs={0: {"pid": 10}, 1: {"pid": 11}})
    b_snaps = [{(big - 1 + p, v + (1 << 51)): c for (p, v), c in s.items()} for s in SNAPS]
    b = make_trace(tmp_path / "b", b_snaps, procs={big - 1: {"pid": big - 1}, big: {"pid": big}})
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from ksmtrace.trace.info import trace_info\n"
        "from ksmtrace.replay import replay\n"
        "from ksmtrace.trace.reader import open_trace\n"
        "d = trace_info(sys.argv[1], cache=False)\n"
        "r = replay(open_trace(sys.argv[1]), 'ksm')\n"
        "print(d['saved_frames'], r.summary['frames_saved_final'], r.summary['merges'])\n"
    )
    outs = []
    for tr in (a, b):
        r = subprocess.run([sys.executable, "-c", code, str(tr.path)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, KSMTRACE_NO_CACHE="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert trace_info(b.path, cache=False)["per_snapshot"] == trace_info(a.path, cache=False)["per_snapshot"]


test_huge_ids_allocate_nothing_by_value.hang_limit = 900  # two subprocesses; a cold numba cache compiles


# --- a killed capture ----------------------------------------------------------------------------
def _killed(path):
    edit_manifest(path, lambda m: m.update(complete=False, end_reason=None, snapshot_count=0) or m.pop("snapshots", None))


def test_leftovers_of_a_killed_capture_are_cleaned_by_the_owner(t):
    _killed(t)
    n = len(read_log(t))
    (t / ".reserve").write_bytes(b"\0" * 4096)
    (t / ".manifest.json.tmp").write_text("{")
    (t / "pages" / f".snap-{n:06d}.parquet.tmp").write_bytes(b"x")
    (t / "pages" / f"snap-{n:06d}.parquet").write_bytes((t / "pages" / "snap-000000.parquet").read_bytes())
    with open(t / "snapshots.jsonl", "ab") as fh:
        fh.write(b'{"snap": 4, "t_')
    tr = open_trace(t)
    assert tr.n_snapshots == n
    assert sorted(tr.cleaned) == sorted([".reserve", ".manifest.json.tmp", f"pages/.snap-{n:06d}.parquet.tmp",
                                         f"pages/snap-{n:06d}.parquet", "snapshots.jsonl (torn last line)"])
    assert not (t / ".reserve").exists() and not (t / "pages" / f"snap-{n:06d}.parquet").exists()
    d = trace_info(t, cache=False)
    assert d["cut"] and not d["complete"] and not d["capture_running"]


def test_a_capture_at_work_is_left_alone(tmp_path):
    """A writer holds the directory's lock: an opener neither cleans nor calls the trace cut."""
    from ksmtrace.trace.writer import TraceWriter

    w = TraceWriter(tmp_path / "w", host={}, capture={}, tracer={"name": "t"})
    w.commit_snapshot(0, 0, 0, {"pages": S.PAGES_SCHEMA.empty_table()}, keyframe=True)
    (tmp_path / "w" / ".reserve").write_bytes(b"\0")
    tr = open_trace(tmp_path / "w")
    assert tr.capture_running and tr.cleaned == [] and (tmp_path / "w" / ".reserve").exists()
    w.close("done")
    tr = open_trace(tmp_path / "w")
    assert not tr.capture_running and tr.meta.complete


def test_info_says_the_last_snapshot_was_cut(t):
    from click.testing import CliRunner

    from ksmtrace.cli import cli

    _killed(t)
    (t / ".reserve").write_bytes(b"\0")
    r = CliRunner().invoke(cli, ["info", str(t), "--no-cache"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("complete"))
    assert "the capture was killed before it finished; the snapshot it was taking was cut" in line
    assert "the 4 committed before are complete" in line and ".reserve" in line
    assert "None" not in line
