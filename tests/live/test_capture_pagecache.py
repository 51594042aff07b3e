"""Live captures of the page cache (root): ``--scope all`` records the file behind every file VMA
and the page-cache bits of file pages; ``--files PATH`` records the resident pages of files no
process maps, read without changing which pages are resident (measured with mincore before and
after); the pagecache policy on such a trace agrees with a brute-force count."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import polars as pl
import pytest

from ksmtrace.replay import replay
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers.capture import Capture, CaptureOptions
from ksmtrace_tracers.pagecache import file_residency

from tests._capture_util import assert_one_line_error, needs_root, run_cli

pytestmark = [pytest.mark.live, needs_root]

PAGE = 4096
N_PAGES = 32
KEY = 0x5EED_0000_0000_0C0C
# which pages of each copy are made resident before the capture (the rest evicted)
RESIDENT = {"a": range(0, 32, 1), "b": range(0, 32, 2), "c": range(8, 24, 3)}


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _touch(path, pages) -> None:
    """Make exactly ``pages`` resident: read them through a MADV_RANDOM mapping (no readahead)."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        m.madvise(mmap.MADV_RANDOM)
        for i in pages:
            _ = m[i * PAGE]
        m.close()


@pytest.fixture
def tree(tmp_path):
    """Three copies of one library file (``lib.so``, distinct pages) and one unique file per
    copy, part of each resident; a process mapping copy a's library."""
    rng = np.random.default_rng(7)
    lib = rng.integers(0, 256, N_PAGES * PAGE, dtype=np.uint8).tobytes()
    root = tmp_path / "copies"
    for name in RESIDENT:
        d = root / name
        d.mkdir(parents=True)
        (d / "lib.so").write_bytes(lib)
        (d / "own.dat").write_bytes(rng.integers(0, 256, 4 * PAGE, dtype=np.uint8).tobytes())
    os.sync()
    for name, pages in RESIDENT.items():
        for f in ("lib.so", "own.dat"):
            _evict(root / name / f)
        _touch(root / name / "lib.so", pages)
        _touch(root / name / "own.dat", range(4))
    code = textwrap.dedent(f"""
        import mmap, sys
        f = open({str(root / 'a' / 'lib.so')!r}, 'rb')
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        for i in range(0, {N_PAGES}, 4):
            m[i * {PAGE}]
        print('ready', flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    yield root, p
    p.kill()
    p.wait()
    p.stdin.close()
    p.stdout.close()


def _residency(root) -> dict[str, tuple[int, ...]]:
    return {str(f): tuple(file_residency(f).tolist()) for f in sorted(root.rglob("*")) if f.is_file()}


def test_files_are_read_without_changing_residency(tree, tmp_path):
    root, proc = tree
    before = _residency(root)
    assert before[str(root / "b" / "lib.so")] == tuple(RESIDENT["b"])
    out = tmp_path / "t"
    with Capture(out, [proc.pid], CaptureOptions(scope="all", files=(str(root),), key=KEY, ground_truth=False,
                                                  kernel_events=False)) as cap:
        cap.snapshot()
        cap.snapshot()
    after = _residency(root)
    assert after == before, "the capture changed which file pages are resident"

    tr = open_trace(out)
    tr.check()
    assert tr.version == S.FORMAT_VERSION == 2
    # filepages: exactly the resident pages of every file, equal library pages hash equal
    fp = tr.read_table("filepages", [0])
    files = tr.read_table("files", [0])
    by_path = {r["path"]: r for r in files.iter_rows(named=True)}
    hashes = {}
    for name, pages in RESIDENT.items():
        row = by_path[str(root / name / "lib.so")]
        assert row["source"] & S.FILE_LISTED and row["size"] == N_PAGES * PAGE
        assert row["cached_pages"] == len(pages)
        got = fp.filter((pl.col("dev") == row["dev"]) & (pl.col("inode") == row["inode"])).sort("index")
        assert got["index"].to_list() == list(pages)
        assert (got["op"] == S.OP_NEW).all()
        assert ((got["flags"] & (S.F_PRESENT | S.F_FILE)) == (S.F_PRESENT | S.F_FILE)).all()
        assert not ((got["flags"] & S.F_DIRTY) != 0).any()
        hashes[name] = dict(zip(got["index"].to_list(), got["hash"].to_list()))
    for i in RESIDENT["c"]:
        assert hashes["a"][i] == hashes["b"].get(i, hashes["a"][i]) == hashes["c"][i]
    assert len(set(hashes["a"].values())) == N_PAGES  # distinct pages within a copy
    # the mapped copy: a vma_files row (device, inode, offset), FILE_MAPPED, its pages F_FILE rows
    a = by_path[str(root / "a" / "lib.so")]
    assert a["source"] == S.FILE_MAPPED | S.FILE_LISTED
    vf = tr.read_table("vma_files", [0]).filter((pl.col("inode") == a["inode"]) & (pl.col("dev") == a["dev"]))
    assert vf.height == 1 and vf["pgoff"][0] == 0 and vf["end"][0] - vf["start"][0] == N_PAGES * PAGE
    st = os.stat(root / "a" / "lib.so")
    assert (vf["dev"][0], vf["inode"][0]) == (st.st_dev, st.st_ino)
    start_vpn = vf["start"][0] // PAGE
    pg = tr.read_table("pages", [0]).filter((pl.col("vpn") >= start_vpn) & (pl.col("vpn") < start_vpn + N_PAGES))
    mapped = pg.filter((pl.col("flags") & S.F_PRESENT) != 0)
    assert set((mapped["vpn"] - start_vpn).to_list()) >= set(range(0, N_PAGES, 4))
    assert ((mapped["flags"] & (S.F_FILE | S.F_ANON)) == S.F_FILE).all()
    for v, h in zip(mapped["vpn"].to_list(), mapped["hash"].to_list()):
        assert h == hashes["a"][v - start_vpn]
    # snapshot 1: the unmapped files are unchanged (no rows: our reads did not activate them); the
    # mapped copy's pages may turn active, as reading them through /proc/PID/mem marks them
    # accessed (get_user_pages_remote's FOLL_TOUCH) -- only that bit may move
    f1 = tr.read_table("filepages", [1])
    assert set(f1["inode"].to_list()) <= {a["inode"]}
    prev = dict(zip(fp.filter(pl.col("inode") == a["inode"])["index"].to_list(),
                    fp.filter(pl.col("inode") == a["inode"])["flags"].to_list()))
    for i, fl, op in zip(f1["index"].to_list(), f1["flags"].to_list(), f1["op"].to_list()):
        assert op == S.OP_CHANGED and (fl ^ prev[i]) == S.F_ACTIVE



def test_pagecache_replay_of_listed_files_matches_a_brute_force_count(tree, tmp_path):
    """Scope anon (no file VMAs): the page cache the replay sees is exactly the listed files'
    resident pages (not the capture's own trace, written under the listed directory), so the oracle's saving is resident pages minus distinct contents, and the
    policy (merging across files only) reaches the across-file part of it once its scan passed."""
    root, proc = tree
    before = _residency(root)
    out = root / "trace"  # under --files: the capture skips its own trace directory
    with Capture(out, [proc.pid], CaptureOptions(scope="anon", files=(str(root),), key=KEY, ground_truth=False,
                                                  kernel_events=False)) as cap:
        cap.snapshot()
        time.sleep(0.5)  # virtual time for the scanner (100 pages per 20 ms) to pass every page
        cap.snapshot()
    tr = open_trace(out)
    fp = tr.read_table("filepages", [0])
    assert tr.read_table("filepages", [1]).height == 0
    n_resident = sum(len(v) for v in before.values())
    assert fp.height == n_resident
    res = replay(tr, "pagecache")
    assert res.spec["scope"] == "file"
    assert res.summary["oracle_saved_final"] == n_resident - fp["hash"].n_unique()
    # every duplicate is across files (a copy's pages are distinct): the policy reaches the oracle
    assert res.summary["frames_saved_final"] == res.summary["oracle_saved_final"] > 0
    assert res.summary["same_file_skips"] == 0 and res.summary["file_breaks"] == 0


def test_dirty_page_cache_is_flagged(tree, tmp_path):
    root, proc = tree
    target = root / "b" / "lib.so"
    with open(target, "r+b") as f:  # a write() into the cache: dirty until writeback
        f.seek(2 * PAGE)
        f.write(b"x" * 16)
    out = tmp_path / "t"
    with Capture(out, [proc.pid], CaptureOptions(scope="anon", files=(str(target),), key=KEY, ground_truth=False,
                                                  kernel_events=False)) as cap:
        cap.snapshot()
    tr = open_trace(out)
    assert not tr.has_table("vma_files")  # scope anon: no file VMAs
    fp = tr.read_table("filepages")
    row = fp.filter(pl.col("index") == 2)
    assert row.height == 1
    if row["flags"][0] & S.F_KPF:
        assert row["flags"][0] & (S.F_DIRTY | S.F_WRITEBACK), "a written, not yet written back page is dirty"
    files = tr.read_table("files")
    assert files.height == 1 and files["source"][0] == S.FILE_LISTED
    assert files["dirty_pages"][0] + files["writeback_pages"][0] >= 1


def test_files_path_must_exist(tmp_path, sleeper):
    res = run_cli(["capture", "--pid", str(sleeper.pid), "--files", str(tmp_path / "nope"), "--count", "1",
                   "-o", str(tmp_path / "t")])
    assert_one_line_error(res, "--files", "no such file")
    assert not (tmp_path / "t").exists()
