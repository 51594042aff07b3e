"""A cache that cannot be stale (issue 9, item 2): one Parquet file of a trace replaced — even by a
file of the same size and row count, so the manifest and the snapshot log are unchanged — and
replay, compare, sweep, breakdown, fidelity and info give the NEW numbers."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ksmtrace import samples
from ksmtrace.cli import cli
from ksmtrace.trace import prepare as P
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace

SAMPLE = "python-sci"


def _same_size_rewrite(path, table: pa.Table, size: int) -> None:
    """Write ``table`` to ``path`` as a Parquet file of exactly ``size`` bytes (padding the
    footer's key-value metadata), so only the content differs."""
    opts = S.PARQUET_OPTIONS["pages"]

    def write(k: int, m: int) -> int:
        pq.write_table(table.replace_schema_metadata({"pad": "x" * k, "q": "y" * m}), path, **opts)
        return os.path.getsize(path)

    s0, s1 = write(0, 0), write(4000, 0)
    assert s0 <= size, "the new content must compress smaller than the old"
    est = int((size - s0) * 4000 / (s1 - s0))
    for k in range(max(0, est - 60), est + 60):
        for m in range(4):
            if write(k, m) == size:
                return
    pytest.fail(f"no padding gives {size} bytes")


def _replace_one_file(trace_dir) -> None:
    """Every present page of one delta file gets one content: many more duplicates."""
    f = trace_dir / "pages" / "snap-000010.parquet"
    size = f.stat().st_size
    t = pq.read_table(f)
    live = pc.not_equal(t.column("op"), S.OP_GONE)
    one = t.column("hash")[0]
    hashes = pc.if_else(live, pa.scalar(one.as_py(), pa.uint64()), t.column("hash"))
    flags = pc.bit_wise_and(t.column("flags"), pa.scalar(~S.F_ZERO_FILLED & 0xFFFFFFFF, pa.uint32()))
    t = t.set_column(t.schema.get_field_index("hash"), t.schema.field("hash"), hashes)
    t = t.set_column(t.schema.get_field_index("flags"), t.schema.field("flags"), flags)
    _same_size_rewrite(f, t, size)


def _run(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _run_process(args):
    """A command in a process of its own (a sweep keeps the traces it opened for its runs)."""
    r = subprocess.run([sys.executable, "-m", "ksmtrace", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _numbers(trace, work, tag, extra=()):
    """What every command prints about the trace (sweeps into a directory of their own)."""
    t = str(trace)
    out = {
        "info": _run(["info", t, "--json", "--max-rows", "0", *extra])["per_snapshot"],
        "replay": _run(["replay", t, "--policy", "ksm", "--json", "-q", *extra])["summary"],
        "compare": _run(["compare", t, "--policies", "oracle,pksm", "--json", "-q", *extra])["rows"],
        "breakdown": _run(["breakdown", t, "--json", "-q", *extra])["rows"],
        "fidelity": _run(["fidelity", t, "--json", "-q", "--sim-step", "0", *extra])["counters"],
        "sweep": _run_process(["sweep", t, "-P", "ksm", "-p", "pages_to_scan=200", "-o", str(work / f"sweep-{tag}"), "-j", "1",
                       "--json", "-q", *extra])["rows"],
    }
    for r in out["compare"]:
        r.pop("cpu_seconds", None)
    out["replay"].pop("cpu_seconds", None)
    for r in out["sweep"]:
        for k in list(r):
            if "cpu" in k or k in ("run_id", "path"):
                r.pop(k)
    return out


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(d))
    monkeypatch.delenv("KSMTRACE_NO_CACHE", raising=False)
    return d


@pytest.mark.slow
def test_a_replaced_file_gives_the_new_numbers_everywhere(tmp_path, private_cache):
    trace = tmp_path / "t"
    shutil.copytree(samples.sample_path(SAMPLE), trace)
    before = _numbers(trace, tmp_path, "a")
    fp = open_trace(trace).fingerprint
    assert any(private_cache.glob("*.pkl"))  # the cache was filled

    _replace_one_file(trace)
    assert open_trace(trace).fingerprint == fp  # manifest and log unchanged: only the file's identity tells
    after = _numbers(trace, tmp_path, "b")
    fresh = _numbers(trace, tmp_path, "c", extra=["--no-cache"])
    for cmd in before:
        assert after[cmd] == fresh[cmd], cmd  # the new numbers ...
    changed = [cmd for cmd in before if after[cmd] != before[cmd]]
    assert set(changed) == set(before), changed  # ... and they are not the old ones
    assert after["info"][10]["saved_frames"] > before["info"][10]["saved_frames"]


def test_the_cache_key_follows_every_file(tmp_path):
    from ksmtrace.testing import make_trace

    tr = make_trace(tmp_path / "t", [{(0, 1): "a", (0, 2): "a"}, {(0, 1): "a", (0, 2): "b"}])
    k0 = P.cache_key(tr, "anon")
    assert P.cache_key(open_trace(tr.path), "anon") == k0  # the same files: the same key
    f = tr.path / "pages" / "snap-000001.parquet"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))  # touched: same bytes
    assert P.cache_key(open_trace(tr.path), "anon") != k0
    k1 = P.cache_key(open_trace(tr.path), "anon")
    shutil.copyfile(f, tmp_path / "x")
    os.replace(tmp_path / "x", f)  # replaced by an identical copy: another inode
    assert P.cache_key(open_trace(tr.path), "anon") not in (k0, k1)
    assert P.cache_key(tr, "recorded") != P.cache_key(tr, "anon")


def test_a_trace_opened_before_a_file_changed_is_not_answered_from_the_cache(tmp_path):
    from ksmtrace.errors import TraceError
    from ksmtrace.testing import make_trace

    tr = make_trace(tmp_path / "t", [{(0, 1): "a", (0, 2): "a"}, {(0, 1): "a", (0, 2): "b"}])
    tr.prepare("anon")  # cached
    f = tr.path / "pages" / "snap-000001.parquet"
    shutil.copyfile(f, tmp_path / "x")
    os.replace(tmp_path / "x", f)
    assert not tr.unchanged()
    with pytest.raises(TraceError, match="changed since it was opened"):
        tr.prepare("anon")
    assert open_trace(tr.path).prepare("anon").n_pages == 2


def test_no_cache_neither_reads_nor_writes(tmp_path, private_cache):
    trace = tmp_path / "t"
    shutil.copytree(samples.sample_path("prefork"), trace)
    _run(["info", str(trace), "--json", "--no-cache"])
    assert not private_cache.exists() or not any(private_cache.glob("*.pkl"))
    assert "KSMTRACE_NO_CACHE" not in os.environ  # the option is scoped to the command
    _run(["info", str(trace), "--json"])
    assert any(private_cache.glob("*.pkl"))


@pytest.mark.parametrize("problem", ["not-ours", "group-writable", "a-file"])
def test_an_unusable_cache_directory_falls_back_to_a_private_one(tmp_path, monkeypatch, problem):
    bad = tmp_path / "cache"
    if problem == "a-file":
        bad.write_text("x")
    else:
        bad.mkdir()
        if problem == "not-ours":
            os.chown(bad, 65534, 65534) if os.geteuid() == 0 else pytest.skip("needs root to chown")
        else:
            bad.chmod(0o777)
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(bad))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    d = P.cache_dir()
    assert d == tmp_path / "tmp" / f"ksmtrace-{os.geteuid()}" / "prepared"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    tr = samples.open_sample("prefork")
    tr.prepare("anon")
    assert any(d.glob("*.pkl"))
    if problem == "group-writable":  # a pickle others could have planted is never loaded
        assert not any(bad.glob("*.pkl"))


def test_a_planted_pickle_is_not_loaded(tmp_path, monkeypatch):
    """A cache file that is not the user's own (or that others can write) is rebuilt, not unpickled."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path / "c"))
    tr = samples.open_sample("prefork")
    tr.prepare("anon")
    (pkl,) = (tmp_path / "c").glob("*.pkl")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    pkl.write_bytes(pickle.dumps(Evil()))
    os.chown(pkl, 65534, 65534)
    prep = open_trace(tr.path).prepare("anon")
    assert not marker.exists() and prep.n_pages > 0


def test_a_view_without_some_processes_has_a_cache_entry_of_its_own(tmp_path, private_cache):
    """advise replays the trace without each process: same files, other rows, other arrays."""
    from ksmtrace.testing import make_trace
    from ksmtrace.trace.subset import without_processes

    tr = make_trace(tmp_path / "t", [{(0, 1): "a", (1, 1): "a", (1, 2): "b"}, {(0, 1): "a", (1, 1): "c"}])
    view = without_processes(tr, [1])
    assert P.cache_key(view, "anon") != P.cache_key(tr, "anon")
    assert (tr.prepare("anon").n_pages, view.prepare("anon").n_pages) == (3, 1)
    assert (tr.prepare("anon").n_pages, view.prepare("anon").n_pages) == (3, 1)  # from the cache
    assert len(list(private_cache.glob("*.pkl"))) == 2
