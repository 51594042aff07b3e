"""The sharing breakdown (ksmtrace.analysis.breakdown and `ksmtrace breakdown`), on hand-built traces
whose expected numbers are worked out by hand below."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ksmtrace.analysis.breakdown import BREAKDOWN_COLUMNS, _components, breakdown
from ksmtrace.cli import cli
from ksmtrace.errors import KsmtraceError
from ksmtrace.replay import replay
from ksmtrace.testing.builders import make_trace


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))


# Domains: X = uid 1000 cgroup /a (procs 0, 1, 3; proc 3 is a fork child of proc 0), Y = uid 2000 /b (proc 2).
PROCS = {
    0: {"uid": 1000, "cgroup": "/a", "comm": "parent"},
    1: {"uid": 1000, "cgroup": "/a", "comm": "sibling"},
    2: {"uid": 2000, "cgroup": "/b", "comm": "other"},
    3: {"uid": 1000, "cgroup": "/a", "comm": "child", "ppid": 1000},
}


def hand_trace(path):
    s0 = {
        (0, 1): {"c": "A", "frame": "fA"},  # fork-shared with (3, 1): one frame
        (0, 2): "A",
        (0, 3): "B",
        (0, 4): 0,
        (0, 5): 0,
        (0, 6): "U0",
        (0, 7): {"c": 0, "frame": "fZ"},  # a zero-filled frame shared by fork with (3, 3)
        (3, 1): {"c": "A", "frame": "fA"},
        (3, 2): "A",
        (3, 3): {"c": 0, "frame": "fZ"},
        (1, 1): "A",
        (1, 2): "B",
        (1, 3): 0,
        (1, 4): {"zero_page": True},  # maps the kernel zero page: no frame, not a candidate
        (2, 1): "A",
        (2, 2): "C",
        (2, 3): "C",
        (2, 4): 0,
    }
    s1 = {k: v for k, v in s0.items() if k[0] != 2}  # proc 2 exits
    s1[(1, 1)] = "D"  # proc 1 rewrites its copy of A
    return make_trace(path, [s0, s1], procs=PROCS, interval=10.0)


# Snapshot 0, by hand.  Frames: A: fA, (0,2), (3,2), (1,1), (2,1) = 5; B: 2; zero: (0,4), (0,5), fZ,
# (1,3), (2,4) = 5; U0: 1; C: 2 -> 15 frames for 17 candidate pages.  The oracle keeps one frame per
# distinct non-zero content (A, B, U0, C) -> saves 11 = 5 zero + 6 non-zero (A 4, B 1, C 1).
# Within one process: A's frames fA, (0,2), (3,2) collapse through the fork-shared fA (procs 0 and 3),
# (1,1) and (2,1) stay -> 2; B 0; C 1 -> 3; across = 6 - 3 = 3.  Same domain (the preset: nothing
# shared across domains, zero pages included): zero in X ((0,4), (0,5), fZ, (1,3)) -> 1 frame (saves
# 3), zero in Y 0; A in X -> 1 frame (saves 3), A in Y 0, B 1, C 1 -> 3 + 5 = 8, giving up 3.
# Windows (zero pages common): 5 zero + 5 non-zero = 10.  Each process its own domain: fA and fZ span
# procs 0 and 3, so each stays one frame and nothing joins it; zero in proc 0 ((0,4), (0,5)) saves 1,
# C in proc 2 saves 1 -> 2.  Hash-only: 17 candidate pages + 1 zero-page mapping - 5 distinct hashes
# (A, B, 0, U0, C) = 13.  No vmas table: read-only unknown.
EXPECTED_0 = dict(candidate_pages=17, base_frames=15, processes=4, domains=2, oracle_saved=11, zero_saved=5,
                  nonzero_saved=6, within_process_saved=3, across_process_saved=3, same_domain_saved=8,
                  across_domain_saved=3, windows_saved=10, same_process_saved=2, read_only_saved=None,
                  hash_only_saved=13, zero_page_mapped=1)
# Snapshot 1: proc 2 gone, (1,1) now D.  Frames: A 3 (fA, (0,2), (3,2)), B 2, zero 4, U0 1, D 1 = 11
# for 13 pages.  Oracle: 4 zero + A 2 + B 1 = 7; within: A 2 (all through fA), B 0 -> 2, across 1.
# One domain left: same-domain keeps all but the one frame of zeros the domain keeps (6), windows
# everything (7); per process: zero in proc 0 saves 1.  Hash-only: 13 + 1 - 5 = 9.
EXPECTED_1 = dict(candidate_pages=13, base_frames=11, processes=3, domains=1, oracle_saved=7, zero_saved=4,
                  nonzero_saved=3, within_process_saved=2, across_process_saved=1, same_domain_saved=6,
                  across_domain_saved=1, windows_saved=7, same_process_saved=1, read_only_saved=None,
                  hash_only_saved=9, zero_page_mapped=1)


def test_breakdown_hand_computed(tmp_path):
    tr = hand_trace(tmp_path / "t")
    df = breakdown(tr, "recorded")
    assert df.columns == list(BREAKDOWN_COLUMNS)
    assert df["snap"].to_list() == [0, 1]
    assert df["t_s"].to_list() == [0.0, 10.0]
    rows = df.to_dicts()
    for row, exp in zip(rows, (EXPECTED_0, EXPECTED_1)):
        assert {k: row[k] for k in exp} == exp


def test_breakdown_is_an_exact_split_of_the_oracle(tmp_path):
    tr = hand_trace(tmp_path / "t")
    df = breakdown(tr)
    prep = tr.prepare("recorded")
    assert df["base_frames"].to_list() == prep.base_frames.tolist()
    assert df["oracle_saved"].to_list() == prep.oracle_saved.tolist()
    assert (df["zero_saved"] + df["within_process_saved"] + df["across_process_saved"]).to_list() == df["oracle_saved"].to_list()
    assert (df["same_domain_saved"] + df["across_domain_saved"]).to_list() == df["oracle_saved"].to_list()
    # the oracle policy frees exactly that many frames
    res = replay(tr, "oracle")
    assert res.table["frames_saved"].to_list() == df["oracle_saved"].to_list()
    # ordering of the restricted rules: per process <= same domain <= windows <= everything
    assert (df["same_process_saved"] <= df["same_domain_saved"]).all()
    assert (df["same_domain_saved"] <= df["windows_saved"]).all()
    assert (df["windows_saved"] <= df["oracle_saved"]).all()
    # each preset column is the oracle policy's saving replayed under that preset
    from ksmtrace.analysis.breakdown import PRESET_COLUMNS

    for col, preset in PRESET_COLUMNS.items():
        if df[col].null_count() == 0:
            assert replay(tr, "oracle", restrict=preset).table["frames_saved"].to_list() == df[col].to_list(), col


def test_breakdown_accepts_prepared_and_snapshot_subset(tmp_path):
    tr = hand_trace(tmp_path / "t")
    prep = tr.prepare("recorded")
    df = breakdown(prep, snaps=[1])
    assert df["snap"].to_list() == [1]
    assert df.row(0, named=True)["within_process_saved"] == EXPECTED_1["within_process_saved"]
    with pytest.raises(KsmtraceError, match="out of range"):
        breakdown(prep, snaps=[2])
    with pytest.raises(KsmtraceError, match="scope"):
        breakdown(prep, "anon")


def test_same_uid_different_cgroup_is_another_domain(tmp_path):
    procs = {0: {"uid": 7, "cgroup": "/vm1"}, 1: {"uid": 7, "cgroup": "/vm2"}, 2: {"uid": 7, "cgroup": "/vm1"}}
    tr = make_trace(tmp_path / "t", [{(0, 1): "X", (1, 1): "X", (2, 1): "X", (0, 2): "Y", (0, 3): "Y"}], procs=procs)
    row = breakdown(tr).row(0, named=True)
    # X: three frames, one per process -> across-process 2; procs 0 and 2 share a domain -> same-domain 1
    # Y: two frames in proc 0 -> within-process 1
    assert row["domains"] == 2
    assert row["oracle_saved"] == 3
    assert row["within_process_saved"] == 1
    assert row["across_process_saved"] == 2
    assert row["same_domain_saved"] == 2
    assert row["across_domain_saved"] == 1


def test_scope_recorded_excludes_unmergeable_pages(tmp_path):
    snap = {(0, 1): "X", (0, 2): {"c": "X", "mergeable": False}, (1, 1): {"c": "X", "mergeable": False}}
    tr = make_trace(tmp_path / "t", [snap])
    rec = breakdown(tr, "recorded").row(0, named=True)
    anon = breakdown(tr, "anon").row(0, named=True)
    assert (rec["candidate_pages"], rec["oracle_saved"]) == (1, 0)
    assert (anon["candidate_pages"], anon["oracle_saved"], anon["within_process_saved"], anon["across_process_saved"]) == (3, 2, 1, 1)


def test_components_follow_long_fork_chains():
    # content 1 everywhere; frame i is mapped by processes i and i+1 (a chain of fork-shared frames),
    # plus one private frame per process: merging within each process joins the whole chain.
    n = 50
    gid = np.concatenate([np.arange(n), np.arange(n), np.arange(n, 2 * n)])
    key = np.concatenate([np.arange(n), np.arange(1, n + 1), np.arange(n)])
    cid = np.ones(gid.size, dtype=np.int64)
    assert _components(gid, cid, key) == 1
    # without the chain every process keeps its own frame
    assert _components(np.arange(n), np.ones(n, np.int64), np.arange(n)) == n
    assert _components(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)) == 0


def test_breakdown_cli(tmp_path):
    hand_trace(tmp_path / "t")
    runner = CliRunner()
    res = runner.invoke(cli, ["breakdown", str(tmp_path / "t"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["oracle_saved"] for r in out["rows"]] == [11, 7]
    assert out["rows"][0]["within_process_saved"] == 3
    assert out["summary"]["pct_of_oracle"]["same_domain_saved"] == pytest.approx(100 * 7 / 9, abs=0.1)
    assert out["summary"]["pct_of_oracle"]["windows_saved"] == pytest.approx(100 * 8.5 / 9, abs=0.1)
    assert "same_domain_saved" in out["definitions"]
    res = runner.invoke(cli, ["breakdown", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[1].split()
    assert header[:6] == ["snap", "t_s", "candidates", "frames", "oracle", "zero"]
    assert "within_proc" in header and "same_domain" in header
    res = runner.invoke(cli, ["breakdown", str(tmp_path / "t"), "--csv"])
    assert pl.read_csv(res.stdout.encode())["across_process_saved"].to_list() == [3, 1]


def test_breakdown_cli_help_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["breakdown", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
    res = runner.invoke(cli, ["breakdown", str(tmp_path / "missing")])
    assert res.exit_code != 0
    assert res.stderr.strip().startswith("ksmtrace: error:") and len(res.stderr.strip().splitlines()) == 1


def _components_by_union_find(gid, cid, key):
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g, c, k in zip(gid.tolist(), cid.tolist(), key.tolist()):
        a, b = find(("frame", g)), find(("group", c, k))
        if a != b:
            parent[a] = b
    return len({find(("frame", g)) for g in gid.tolist()})


def test_components_match_union_find_on_random_graphs():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        gid = rng.integers(0, max(1, n // 2), n)
        # as in a trace, a frame holds one content (half the cases), or any graph at all
        cid = gid % 3 + 1 if rng.random() < 0.5 else rng.integers(1, 4, n)
        key = rng.integers(0, 5, n)
        assert _components(gid, cid, key) == _components_by_union_find(gid, cid, key)
