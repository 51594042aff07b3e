"""The public trace reader: snapshots, deltas, reconstruction, and one clear error per bad trace."""
import json
import os
import stat

import polars as pl
import pytest

from ksmtrace.errors import TraceError, TraceVersionError
from ksmtrace.testing import content_hash, make_trace
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace

SNAPS = [
    {(0, 1): "a", (0, 2): "b", (1, 7): 0},
    {(0, 1): "a", (0, 2): "c", (1, 7): 0, (1, 8): "a"},  # (0,2) changed, (1,8) new
    {(0, 1): "a", (1, 8): "a"},  # (0,2) and (1,7) gone
]


@pytest.fixture
def trace(tmp_path):
    return make_trace(tmp_path / "t", SNAPS, keyframe_every=2)


def test_snapshots_and_times(trace):
    assert trace.n_snapshots == 3
    assert trace.times_s == [0.0, 1.0, 2.0]
    assert trace.manifest["format_version"] == S.FORMAT_VERSION


def test_deltas_hold_only_changes(trace):
    d = dict(trace.deltas())
    ops1 = {(r["proc"], r["vpn"]): r["op"] for r in d[1].iter_rows(named=True)}
    assert ops1 == {(0, 2): S.OP_CHANGED, (1, 8): S.OP_NEW}
    ops2 = {(r["proc"], r["vpn"]): r["op"] for r in d[2].iter_rows(named=True)}
    assert ops2 == {(0, 2): S.OP_GONE, (1, 7): S.OP_GONE}


@pytest.mark.parametrize("snap", [0, 1, 2])
def test_reconstruct_any_snapshot(trace, snap):
    full = trace.snapshot(snap)
    got = {(r["proc"], r["vpn"]): r["hash"] for r in full.iter_rows(named=True)}
    want = {k: content_hash(0 if c == 0 else c) for k, c in SNAPS[snap].items()}
    assert got == want
    zero = full.filter((pl.col("flags") & S.F_ZERO_FILLED) != 0)
    assert set(zip(zero["proc"].to_list(), zero["vpn"].to_list())) == {k for k, c in SNAPS[snap].items() if c == 0}


def test_prepared_content_ids_are_dense(trace):
    p = trace.prepare("recorded", cache=False)
    assert p.n_pages == 4
    assert sorted(set(p.ev_cid.tolist()) - {-1}) == list(range(p.n_cids))


def test_files_are_private(trace):
    for root, dirs, files in os.walk(trace.path):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(trace.path).st_mode) == 0o700


def test_missing_manifest(trace):
    os.unlink(trace.path / "manifest.json")
    with pytest.raises(TraceError, match="manifest.json: missing manifest"):
        open_trace(trace.path)


def test_unknown_version(trace):
    m = json.loads((trace.path / "manifest.json").read_text())
    m["format_version"] = 99
    (trace.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceVersionError, match="version 99"):
        open_trace(trace.path)


def test_foreign_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(TraceError, match="not a ksmtrace manifest"):
        open_trace(tmp_path / "x")


def test_truncated_parquet_names_the_file(trace):
    f = trace.path / "pages" / "snap-000001.parquet"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"snap-000001.parquet: .* bytes, but the snapshot log recorded"):
        open_trace(trace.path)


def test_foreign_parquet_names_the_file(trace):
    f = trace.path / "pages" / "snap-000002.parquet"
    pl.DataFrame({"x": [1, 2]}).write_parquet(f)
    _fix_log(trace.path, "pages", 2)
    with pytest.raises(TraceError, match=r"snap-000002.parquet: foreign Parquet file"):
        open_trace(trace.path)


def _fix_log(path, table, snap):
    """Make the snapshot log agree with a rewritten file (rows, bytes), so only the content is wrong."""
    import pyarrow.parquet as pq

    f = path / S.snapshot_file(table, snap)
    log = path / "snapshots.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines[snap]["files"][table].update(rows=pq.ParquetFile(f).metadata.num_rows, bytes=f.stat().st_size)
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _killed(path):
    """Make the trace look like a capture killed before it finished (manifest never completed)."""
    m = json.loads((path / "manifest.json").read_text())
    m.update(complete=False, end_reason=None, snapshot_count=0)
    m.pop("snapshots", None)
    (path / "manifest.json").write_text(json.dumps(m))


def test_torn_log_line_is_an_uncommitted_snapshot(trace):
    _killed(trace.path)
    log = trace.path / "snapshots.jsonl"
    committed = log.read_bytes()
    with open(log, "ab") as fh:
        fh.write(b'{"snap": 3, "t_ns": 12')  # a crash in the middle of committing snapshot 3
    tr = open_trace(trace.path)
    assert tr.n_snapshots == 3
    assert log.read_bytes() == committed  # the owner's open cut the torn line
    assert "snapshots.jsonl (torn last line)" in tr.cleaned


def test_torn_log_line_of_a_finished_capture_is_an_error(trace):
    with open(trace.path / "snapshots.jsonl", "ab") as fh:
        fh.write(b'{"snap": 3, "t_ns": 12')
    with pytest.raises(TraceError, match="torn line, but the manifest says the capture finished"):
        open_trace(trace.path)


def test_corrupt_log_line(trace):
    log = trace.path / "snapshots.jsonl"
    lines = log.read_bytes().split(b"\n")
    lines[1] = b"garbage"
    log.write_bytes(b"\n".join(lines))
    with pytest.raises(TraceError, match="line 2 is corrupt"):
        open_trace(trace.path)


def test_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TraceError, match="is a directory"):
        open_trace(tmp_path / "f")
    with pytest.raises(TraceError, match="no such trace"):
        open_trace(tmp_path / "missing")


def test_any_parquet_reader_opens_the_tables(trace):
    df = pl.scan_parquet(str(trace.path / "pages" / "*.parquet")).collect()
    assert set(df["snap"].unique().to_list()) == {0, 1, 2}
    assert df.height == sum(e["files"]["pages"]["rows"] for e in trace.snapshots)


def test_writer_undoes_a_failed_commit(tmp_path):
    """A failure while committing a snapshot leaves the trace exactly as it was."""
    import pyarrow as pa

    from ksmtrace.trace.writer import TraceWriter

    w = TraceWriter(tmp_path / "w", host={}, capture={}, tracer={"name": "t"})
    empty = S.PAGES_SCHEMA.empty_table()
    w.commit_snapshot(0, 0, 0, {"pages": empty}, keyframe=True)
    bad = pa.table({"snap": [1]})  # not castable to the processes schema
    with pytest.raises(Exception):
        w.commit_snapshot(1, 1, 1, {"pages": empty, "processes": bad}, keyframe=False)
    assert not (tmp_path / "w" / "pages" / "snap-000001.parquet").exists()
    assert open_trace(tmp_path / "w").n_snapshots == 1
    w.commit_snapshot(1, 2, 2, {"pages": empty}, keyframe=False)
    assert open_trace(tmp_path / "w").n_snapshots == 2


def test_version_1_traces_still_open():
    """Format version 2 added the kernel-event tables, ksm.ksmd_wait_ns and the PRF page hash; the
    shipped sample traces are version 1 and open unchanged, without the newer columns or tables."""
    from ksmtrace.samples import sample_path

    for name in ("prefork", "python-sci", "vm"):
        tr = open_trace(sample_path(name))
        assert tr.version == 1 and tr.manifest["format_version"] == 1
        tr.check()
        if tr.has_table("ksm"):
            assert "ksmd_wait_ns" not in tr.read_table("ksm").columns
        assert not tr.has_table("faults") and tr.read_table("faults").height == 0
        assert tr.read_table("ksm_events").columns == S.KSM_EVENTS_SCHEMA.names


@pytest.mark.parametrize("bad", [True, 1.0, "2", 3, 0])
def test_format_version_must_be_a_readable_int(trace, bad):
    m = json.loads((trace.path / "manifest.json").read_text())
    m["format_version"] = bad
    (trace.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceVersionError, match="is not supported .this ksmtrace reads versions 1, 2"):
        open_trace(trace.path)


def test_columns_added_in_version_2_are_required_in_version_2_files():
    assert "ksmd_wait_ns" not in S.required_columns("ksm", 1)
    assert "ksmd_wait_ns" in S.required_columns("ksm", 2)
    assert S.required_columns("pages", 1) == S.PAGES_SCHEMA.names


def test_read_batches_is_read_table_in_pieces(tmp_path):
    """A snapshot's file in batches: the same rows in file order; a view without a process drops
    its rows from every batch; a file replaced since the trace was opened is refused."""
    from ksmtrace.testing.synth import synthetic_trace
    from ksmtrace.trace.subset import without_processes

    tr = synthetic_trace(tmp_path / "t", pages=3000, snapshots=2, processes=3, seed=1)
    cols = ["proc", "vpn", "op", "hash"]
    whole = tr.read_table("pages", [0], cols)
    parts = list(tr.read_batches("pages", 0, cols, rows=700))
    assert len(parts) == -(-whole.height // 700) and max(p.height for p in parts) <= 700
    assert pl.concat(parts).equals(whole)
    view = without_processes(tr, [int(whole["proc"][0])])
    got = pl.concat(list(view.read_batches("pages", 0, ["vpn", "op"], rows=500)))
    assert got.equals(view.read_table("pages", [0], ["vpn", "op"])) and got.height < whole.height
    f = tr.path / S.snapshot_file("pages", 1)
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)  # a new inode: not the file that was checked
    with pytest.raises(TraceError, match="changed since the trace was opened"):
        list(tr.read_batches("pages", 1, cols))
