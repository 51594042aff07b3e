"""The pagecache what-if checked against brute-force counts of the same page cache (computed here
from the specs the traces are built from, not through the policy or the file scope): once a scan
has passed every page, the saving is (files holding a content - 1) per content, split into frames
of mapped/active pages and of clean, unmapped, inactive ones; dirty pages are never shared; a
write (content, dirty page, mtime) breaks the written file's sharing; within_file and mapped_only.
Both engines, both runtimes (tests/policies/_helpers.run)."""
from __future__ import annotations

import random
from collections import defaultdict

import pytest

from ksmtrace.testing.pagecache import make_pagecache_trace
from tests.policies._helpers import run

SETTLE = 10.0  # s between snapshots: the scanner (100 pages per 20 ms) passes every page many times


def _spec(v):
    return v if isinstance(v, dict) else {"c": v}


def brute_force(snap: dict, within_file: bool = False, mapped_only: bool = False) -> dict:
    """Frames saved and their split at a snapshot of an unchanging page cache, every clean page
    visited: a file with a dirty page is being written, so at every snapshot its sharing breaks
    (the snapshot's row counts it unshared)."""
    written = {f for (f, i), v in snap.items() if _spec(v).get("dirty") or _spec(v).get("writeback")}
    groups: dict = defaultdict(list)  # content -> [(file, hot)]
    for (f, i), v in sorted(snap.items()):
        d = _spec(v)
        if f in written:
            continue
        hot = bool(d.get("mapped")) or bool(d.get("active"))
        if mapped_only and not d.get("mapped"):
            continue
        groups[d["c"]].append((f, hot))
    saved = reclaimable = active = 0
    for c, members in groups.items():
        if not within_file:  # one page per file: the first in scan order (file, then index)
            seen, kept = set(), []
            for f, hot in members:
                if f not in seen:
                    seen.add(f)
                    kept.append((f, hot))
            members = kept
        if len(members) < 2:
            continue
        h = sum(hot for _, hot in members)
        k = len(members) - h
        saved += len(members) - 1
        if h:
            active += h - 1
            reclaimable += k
        else:
            reclaimable += k - 1
    return {"saved": saved, "saved_reclaimable": reclaimable, "saved_active": active}


def random_cache(seed: int, n_files: int = 5, n_pages: int = 14, n_contents: int = 9) -> dict:
    rnd = random.Random(seed)
    snap = {}
    for f in range(n_files):
        contents = rnd.sample([f"lib{k}" for k in range(n_contents)] + [f"own{f}-{i}" for i in range(n_pages)], n_pages)
        for i in range(n_pages):
            if rnd.random() < 0.2:
                continue  # not resident
            d = {"c": contents[i]}
            if rnd.random() < 0.3:
                d["mapped"] = [f % 3]
            if rnd.random() < 0.25:
                d["active"] = True
            if f == 0 and rnd.random() < 0.3:
                d["dirty"] = True  # file 0 is being written
            snap[(f, i)] = d
    return snap


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mapped_only", [False, True])
def test_saving_and_its_split_match_a_brute_force_count(tmp_path, seed, mapped_only):
    snap = random_cache(seed)
    tr = make_pagecache_trace(tmp_path / "t", [snap, snap], interval=SETTLE)
    res = run(tr, "pagecache", {"mapped_only": mapped_only})
    want = brute_force(snap, mapped_only=mapped_only)
    last = res.table.row(-1, named=True)
    assert last["frames_saved"] == want["saved"]
    assert last["saved_reclaimable"] == want["saved_reclaimable"]
    assert last["saved_active"] == want["saved_active"]
    assert res.summary["same_file_skips"] == 0  # no content twice in one file here


def test_equal_pages_of_one_file_share_only_with_within_file(tmp_path):
    snap = {(0, 0): "a", (0, 1): "a", (0, 2): "a", (1, 0): "a", (2, 5): "b", (2, 6): "b"}
    tr = make_pagecache_trace(tmp_path / "t", [snap, snap], interval=SETTLE)
    across = run(tr, "pagecache")
    assert across.table["frames_saved"][-1] == 1  # file 0 and file 1 share one "a"; "b" only within file 2
    assert across.summary["same_file_skips"] > 0
    within = run(tr, "pagecache", {"within_file": True})
    assert within.table["frames_saved"][-1] == 4 == across.table["oracle_saved"][-1]


@pytest.mark.parametrize("how", ["content", "dirty", "mtime"])
def test_a_write_breaks_the_written_files_sharing(tmp_path, how):
    """Three copies of a 6-page file; copy 2 is written at snapshot 2: its merged pages are
    copied back (COW breaks), the other two copies keep sharing; once clean and unchanged again
    it is merged again."""
    base = {(f, i): f"p{i}" for f in range(3) for i in range(6)}
    written = dict(base)
    meta = [None] * 5
    if how == "content":
        written[(2, 1)] = "new"
    elif how == "dirty":
        written[(2, 1)] = {"c": "p1", "dirty": True}
    else:
        meta = [{2: {"mtime_ns": 0}}] * 2 + [{2: {"mtime_ns": 5}}] * 3
    after = dict(written)
    if how == "dirty":
        after[(2, 1)] = "p1"  # written back
    snaps = [base, base, written, after, after]
    tr = make_pagecache_trace(tmp_path / "t", snaps, meta=meta, interval=SETTLE)
    res = run(tr, "pagecache")
    t = res.table
    assert t["frames_saved"][1] == 12  # 6 contents x (3 files - 1)
    assert res.summary["file_breaks"] == 1
    assert t["cow_breaks"][2] == 6  # every merged page of file 2
    # merged again once clean and unchanged (the row of a snapshot is before the scan that follows it)
    assert t["frames_saved"][-1] == (11 if how == "content" else 12)  # the new content is unique
