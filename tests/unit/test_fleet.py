"""ksmtrace fleet: every number against a brute-force count over the traces' own rows (hand-built
fleets and the shipped fleet-vm sample), the same numbers on every executor and partitioning, the
sketches' error, refusals, and the CLI."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ksmtrace.analysis.fleet import FleetError, fleet, hll, hll_count, hll_registers
from ksmtrace.cli import cli
from ksmtrace.testing.builders import make_trace
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace

REPO = Path(__file__).resolve().parents[2]
SAMPLE = [REPO / "sample-traces" / "fleet-vm" / f"guest{i}" for i in range(3)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))


# --- brute force: python sets over each snapshot's page rows ---------------------------------------------
def brute(paths, scope="recorded", steps=None):
    """Per aligned snapshot: intra (sum of per-host savings), cross, host pair matrix, and per
    (host, proc) content sets — from Trace.snapshot() rows, frame = (pfn, hash) as fork leaves it."""
    traces = [open_trace(p) for p in paths]
    n = min(t.n_snapshots for t in traces)
    out = {}
    for s in (range(n) if steps is None else steps):
        sets, units, intra = [], {}, 0
        for h, tr in enumerate(traces):
            rows = tr.snapshot(s).to_dicts()
            frames_by_content: dict = {}
            zero_frames = set()
            keys = set()
            for r in rows:
                f = r["flags"]
                if not (f & S.F_PRESENT) or (f & S.F_SWAPPED) or not (f & S.F_ANON) or (f & S.F_ZERO_PAGE):
                    continue
                if scope == "recorded" and not (f & S.F_MERGEABLE):
                    continue
                frame = (r["pfn"], r["hash"])
                if f & S.F_ZERO_FILLED:
                    zero_frames.add(frame)
                    continue
                frames_by_content.setdefault(r["hash"], set()).add(frame)
                keys.add(r["hash"])
                units.setdefault((h, r["proc"]), set()).add(r["hash"])
            intra += len(zero_frames) + sum(len(v) - 1 for v in frames_by_content.values())
            sets.append(keys)
        union = set().union(*sets)
        cross = sum(len(k) for k in sets) - len(union)
        mat = [[len(a & b) for b in sets] for a in sets]
        out[s] = {"intra": intra, "cross": cross, "mat": mat, "units": units, "union": len(union)}
    return [out[s] for s in sorted(out)] if steps is None else out


def colocation_saved(units: dict, groups) -> int:
    return sum(sum(len(units[u]) for u in g) - len(set().union(*(units[u] for u in g))) for g in groups if g)


def hand_fleet(tmp: Path) -> list[Path]:
    """Three hosts: shared "kernel" pages, zero pages, a fork-shared frame, pages that change,
    an unmergeable VMA, a zero-page mapping, and processes with different overlaps."""
    lib = {f"k{i}": 1 for i in range(6)}
    paths = []
    specs = [
        # host 0: two procs sharing lib, one forked pair of pages (one frame), app A content
        lambda s: {**{(0, v): f"k{v % 6}" for v in range(8)}, **{(0, 20 + v): f"appA{v}" for v in range(5)},
                   (0, 40): 0, (0, 41): 0, (0, 42): {"c": "forked", "frame": "F"}, (1, 42): {"c": "forked", "frame": "F"},
                   **{(1, v): f"k{v % 3}" for v in range(4)}, (1, 50): {"c": f"w{s}"}, (1, 60): {"c": "appB0", "mergeable": False},
                   (1, 70): {"c": 0, "zero_page": True}},
        # host 1: lib, app A (changing over time), app B
        lambda s: {**{(0, v): f"k{v % 6}" for v in range(6)}, **{(0, 20 + v): (f"appA{v}" if s < 2 else f"appA{v}x") for v in range(5)},
                   **{(1, v): f"appB{v}" for v in range(4)}, (1, 9): 0},
        # host 2: app B twice in one process, a little lib
        lambda s: {**{(0, v): f"appB{v % 4}" for v in range(8)}, (0, 30): "k0", (1, 1): "k1", (1, 2): f"w{s}"},
    ]
    for h, spec in enumerate(specs):
        p = tmp / f"host{h}"
        make_trace(p, [spec(s) for s in range(4)], procs={0: {"comm": f"vm{h}a"}, 1: {"comm": f"vm{h}b"}})
        paths.append(p)
    assert lib
    return paths


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return hand_fleet(tmp_path_factory.mktemp("fleet"))


def test_hand_built_fleet_matches_brute_force(hand):
    res = fleet(hand, capacity=2, top_units=10, workers=1, partitions=4)
    want = brute(hand)
    assert res.steps.height == len(want)
    for row, w in zip(res.steps.iter_rows(named=True), want):
        assert row["intra_host_saved"] == w["intra"]
        assert row["cross_host_saved"] == w["cross"]
        assert row["fleet_saved"] == w["intra"] + w["cross"]
        assert row["fleet_distinct_contents"] == w["union"]
        s = row["step"]
        mat = res.host_matrix[s]
        for a in range(3):
            for b in range(3):
                if a != b:
                    assert mat[a, b] == w["mat"][a][b]
            assert mat[a, a] == res.host_table.filter((pl.col("host") == a) & (pl.col("step") == s))["intra_host_saved"][0]
    assert res.steps["cross_host_saved"].sum() > 0 and res.steps["cross_host_saved"].n_unique() > 1
    # intra per host is the prepared trace's oracle saving, the replay's own definition
    for h, p in enumerate(hand):
        prep = open_trace(p).prepare("recorded")
        got = res.host_table.filter(pl.col("host") == h).sort("step")["intra_host_saved"].to_list()
        assert got == prep.oracle_saved.tolist()
    # unit matrix: every pair of units (processes) across and within hosts
    last = want[-1]
    units = last["units"]
    keys = sorted(units)
    proc_of = {}
    for i, lab in enumerate(res.unit_labels):
        host = int(lab.split("/")[0].replace("host", ""))
        comm = lab.split("/")[1].split("(")[0]
        proc_of[i] = (host, 0 if comm.endswith("a") else 1)
    um = res.unit_matrix[max(res.unit_matrix)]
    assert len(res.unit_labels) == len(keys)
    for i, j in itertools.permutations(range(len(keys)), 2):
        assert um[i, j] == len(units[proc_of[i]] & units[proc_of[j]])
    # placement: exact counts of the current and greedy placements, bounded by the fleet oracle and by
    # the best placement found by trying them all
    p = res.placement
    assert p["units"] == len(keys) == 6 and p["capacity"] == 2
    label_to_key = {lab: proc_of[i] for i, lab in enumerate(res.unit_labels)}
    for name in ("current", "greedy"):
        groups = [[label_to_key[x] for x in g] for g in p[name]["groups"]]
        assert p[name]["saved"] == colocation_saved(units, groups)
        assert max(len(g) for g in groups) <= (2 if name == "greedy" else 6)
    assert p["current"]["saved"] == colocation_saved(units, [[k for k in keys if k[0] == h] for h in range(3)])
    bound = sum(len(v) for v in units.values()) - last["union"]
    assert p["bound_saved"] == bound
    best = 0
    for perm in itertools.permutations(keys):
        best = max(best, colocation_saved(units, [perm[0:2], perm[2:4], perm[4:6]]))
    assert p["greedy"]["saved"] <= best <= bound
    assert p["greedy"]["saved"] == best  # on this fleet the greedy finds the best pairing
    assert p["greedy"]["saved"] > p["current"]["saved"]


def test_numbers_do_not_depend_on_partitions_or_executor(hand):
    a = fleet(hand, capacity=2, workers=1, partitions=1)
    b = fleet(hand, capacity=2, workers=2, partitions=64)
    assert a.steps.equals(b.steps)
    assert all(np.array_equal(a.host_matrix[s], b.host_matrix[s]) for s in a.host_matrix)
    assert a.placement == b.placement


def test_fleet_on_dask(hand):
    distributed = pytest.importorskip("distributed")
    import logging

    c = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                 silence_logs=logging.ERROR)
    try:
        here = fleet(hand, capacity=2, workers=1)
        there = fleet(hand, capacity=2, executor=c.scheduler_address, work_dir=Path(hand[0]).parent / "work")
    finally:
        c.close()
    assert there.steps.equals(here.steps) and there.placement == here.placement


def test_sample_fleet_matches_brute_force_and_the_whole_trace():
    res = fleet(SAMPLE, snaps=[0, 2, -1], workers=1)
    want = brute(SAMPLE, steps=[0, 2, 30])
    preps = [open_trace(p).prepare("recorded") for p in SAMPLE]
    for row in res.steps.iter_rows(named=True):
        w = want[row["step"]]
        # the content sets are brute-forced; each host's own saving is the prepared oracle's (real KSM
        # pages and the zero page remaps of a 6.18 host are prepare's business, not a set count's)
        assert (row["cross_host_saved"], row["fleet_distinct_contents"]) == (w["cross"], w["union"])
        assert all(res.host_matrix[row["step"]][a, b] == w["mat"][a][b] for a in range(3) for b in range(3) if a != b)
        intra = sum(int(prep.oracle_saved[row["step"]]) for prep in preps)
        assert row["intra_host_saved"] == intra
    # the three guests were one trace: the frames left after fleet-wide dedup are the frames the
    # oracle leaves on the original host (frames shared between two QEMU processes on the real host
    # are counted per guest in the split, in base and saving alike)
    prep = open_trace(REPO / "sample-traces" / "vm").prepare("recorded")
    for row in res.steps.iter_rows(named=True):
        s = row["step"]
        assert row["base_frames"] - row["fleet_saved"] == prep.base_frames[s] - prep.oracle_saved[s]
    last = res.steps.row(-1, named=True)
    assert last["cross_host_saved"] > 0.4 * last["fleet_saved"] - last["zero_saved"]  # the guests' shared 32 MiB and kernel


def test_sketches_against_exact_counts():
    keys = np.random.default_rng(1).integers(0, 2**64 - 1, size=5000, dtype=np.uint64, endpoint=True)
    ref = hll(np.zeros(1 << 12, np.int8))
    for k in keys[:300].tolist():  # the library's own update, one key at a time
        ref.update(k)
    assert np.array_equal(hll_registers(keys[:300], 12), ref.reg)
    assert abs(hll_count(hll_registers(keys, 14)) - 5000) < 0.03 * 5000
    exact = fleet(SAMPLE, snaps=[0, -1], workers=1)
    est = fleet(SAMPLE, snaps=[0, -1], workers=1, sketch=True)
    for e, x in zip(est.steps.iter_rows(named=True), exact.steps.iter_rows(named=True)):
        assert e["intra_host_saved"] == x["intra_host_saved"]  # counted exactly on each host
        assert abs(e["fleet_distinct_contents"] - x["fleet_distinct_contents"]) <= 0.03 * x["fleet_distinct_contents"]
        assert abs(e["cross_host_saved"] - x["cross_host_saved"]) <= 0.05 * x["cross_host_saved"]


def test_refusals(hand, tmp_path):
    other_key = tmp_path / "otherkey"
    make_trace(other_key, [{(0, 1): "k0"}], capture={"hash": {"algorithm": "xxh3_64", "key_fingerprint": "abcdef"}})
    with pytest.raises(FleetError, match="captured with hash key xxh3_64/abcdef.*cannot be compared"):
        fleet([hand[0], other_key])
    with pytest.raises(FleetError, match="at least two"):
        fleet([hand[0]])
    with pytest.raises(FleetError, match="same trace as"):
        fleet([hand[0], hand[0]])
    with pytest.raises(FleetError, match="power of two"):
        fleet(hand, partitions=3)
    with pytest.raises(FleetError, match="out of range"):
        fleet(hand, snaps=[9])
    with pytest.raises(FleetError, match="do not fit on 1 hosts of 2"):
        fleet(hand, capacity=2, n_hosts=1)
    runner = CliRunner()
    for args in (["fleet", str(hand[0]), str(other_key)], ["fleet", str(hand[0])], ["fleet", str(hand[0]), str(tmp_path / "nope")],
                 ["fleet", *map(str, hand), "--executor", "ray"]):
        res = runner.invoke(cli, args)
        err = res.stderr.strip()
        assert res.exit_code != 0 and err.startswith("ksmtrace: error:") and len(err.splitlines()) == 1, (args, err)


def test_cli_text_json_and_figure(hand, tmp_path):
    runner = CliRunner()
    fig = tmp_path / "m.png"
    res = runner.invoke(cli, ["fleet", *map(str, hand), "--capacity", "2", "--json", "-q", "-j", "1", "--plot", str(fig)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # strict JSON
    assert "NaN" not in res.stdout
    want = brute(hand)
    assert [r["cross_host_saved"] for r in out["steps"]] == [w["cross"] for w in want]
    assert out["alignment"] == "snapshot index" and len(out["host_matrix_mean"]) == 3
    assert out["placement"]["greedy"]["saved"] >= out["placement"]["current"]["saved"]
    assert fig.stat().st_size > 10_000
    res = runner.invoke(cli, ["fleet", *map(str, hand), "--capacity", "2", "-j", "1"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "host sharing matrix" in text and "colocation what-if" in text and "bound (one host)" in text
