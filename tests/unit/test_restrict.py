"""Safe presets (ksmtrace.trace.restrict): on hand-built traces, every policy obeys them without a
line of its own code; the oracle under a preset equals a brute-force bound (the fewest frames the
pages can use when only the pairs the preset allows share one); results are unchanged without one."""
from __future__ import annotations

import itertools
import json

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmtrace.cli import cli
from ksmtrace.errors import KsmtraceError
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.trace.restrict import parse_restriction, restrict_prepared

POLICIES = ("oracle", "ksm", "pksm", "pksm-delay", "hashtable")
FAST = {"ksm": {"pages_to_scan": 50, "sleep_millisecs": 1}, "pksm": {"pages_to_scan": 50, "sleep_millisecs": 1},
        "pksm-delay": {"pages_to_scan": 50, "sleep_millisecs": 1},
        "hashtable": {"sleep_millisecs": 1, "pages_per_second": 0, "process_pages_per_second": 0}}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))


# Two domains (uid 1 /a: procs 0, 1; uid 2 /b: proc 2).  Content A in every process, B twice in proc 0,
# zero pages in procs 0 and 2, two read-only pages holding C (procs 0 and 2).
PROCS = {0: {"uid": 1, "cgroup": "/a"}, 1: {"uid": 1, "cgroup": "/a"}, 2: {"uid": 2, "cgroup": "/b"}}
SNAP = {
    (0, 1): "A", (1, 1): "A", (2, 1): "A",
    (0, 2): "B", (0, 3): "B",
    (0, 4): 0, (0, 5): 0, (2, 4): 0,
    (0, 6): "C", (2, 6): "C",  # in read-only VMAs
    (1, 7): "U",
}
RO = {"start": 6, "end": 7, "perms": "r--p"}
VMAS = {0: [(1, 6), RO], 1: [(1, 8)], 2: [(1, 6), RO]}


def hand(path, n=12):
    return make_trace(path, [SNAP] * n, interval=0.05, procs=PROCS, vmas=VMAS)


# By hand: 11 frames.  Oracle: A 3->1 (2), B 1, zero 3->0 (3), C 1 = 7.
# zero-pages: the 3 zero frames.  same-domain: A in /a 2->1 (1), B 1, zero in /a 2->1 (1), zero in /b 0,
# C across domains 0 -> 3.  windows: A 1, B 1, zero 3 (common) = 5.  read-only: C 1 (nothing else is
# read-only) = 1.  same-domain:process: B 1, zero in proc 0 1 = 2.
EXPECTED = {None: 7, "zero-pages": 3, "same-domain": 3, "windows": 5, "read-only": 1, "same-domain:process": 2,
            "windows:process": 4, "zero-pages+same-domain": 1, "read-only+windows": 0}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_oracle_under_each_preset_by_hand(tmp_path, preset):
    tr = hand(tmp_path / "t")
    res = replay(tr, "oracle", restrict=preset)
    assert res.table["oracle_saved"].to_list() == [EXPECTED[preset]] * 12
    assert res.table["frames_saved"].to_list() == [EXPECTED[preset]] * 12
    if preset is not None:
        assert res.table["unrestricted_oracle_saved"].to_list() == [7] * 12
        assert res.summary["fraction_of_unrestricted_oracle_mean"] == pytest.approx(EXPECTED[preset] / 7)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_obeys_the_presets(tmp_path, policy):
    tr = hand(tmp_path / "t")
    params = dict(FAST.get(policy, {}))
    free = replay(tr, policy, params)
    # without a preset, merges cross the two domains (A, and the zero pages when ksm merges them into
    # a KSM page); the oracle maps zero pages to the zero page and merges A across domains too
    assert free.summary["exposed_merges"] > 0
    for preset, bound in EXPECTED.items():
        if preset is None:
            continue
        res = replay(tr, policy, {**params, "restrict": preset})
        assert (res.table["frames_saved"] <= bound).all(), preset
        if preset.startswith("same-domain") or preset == "zero-pages+same-domain":
            assert res.summary["exposed_merges"] == 0, preset
        if preset == "zero-pages":
            # only the three zero frames can be saved: frames_saved never exceeds them
            assert res.table["frames_saved"].max() <= 3
    if policy == "ksm":
        z = replay(tr, "ksm", {**params, "restrict": "zero-pages", "use_zero_pages": True})
        assert z.table["frames_saved"][-1] == 3 and z.summary["exposed_merges"] == 0
        w = replay(tr, "ksm", {**params, "restrict": "windows"})
        # under Microsoft's rule only the all-zero pages cross domains: merged into one KSM page (which
        # keeps a frame: 4 of the oracle's 5), or mapped to the zero page with use_zero_pages
        assert w.table["frames_saved"][-1] == 4 and w.summary["exposed_merges"] > 0
        w0 = replay(tr, "ksm", {**params, "restrict": "windows", "use_zero_pages": True})
        assert w0.table["frames_saved"][-1] == 5 and w0.summary["exposed_merges"] == 0


def test_zero_pages_preset_saves_exactly_the_zero_frames(tmp_path):
    """On a trace with churn, the oracle under zero-pages saves exactly the frames holding all-zero
    content (breakdown's zero_saved), and every policy at most that."""
    from ksmtrace.analysis.breakdown import breakdown

    snaps = []
    for s in range(8):
        snap = {(p, v): (0 if (v + s + p) % 3 == 0 else f"x{(v * s) % 4}") for p in range(3) for v in range(10)}
        snap[(1, 20)] = {"c": 0, "frame": f"f{s // 3}"}
        snap[(2, 20)] = {"c": 0, "frame": f"f{s // 3}"}
        snaps.append(snap)
    tr = make_trace(tmp_path / "t", snaps, interval=0.05)
    zero = breakdown(tr)["zero_saved"].to_list()
    assert replay(tr, "oracle", restrict="zero-pages").table["frames_saved"].to_list() == zero
    for pol in ("ksm", "pksm", "hashtable"):
        t = replay(tr, pol, {**FAST[pol], "restrict": "zero-pages"}).table
        assert (t["frames_saved"] <= t["oracle_saved"]).all() and t["oracle_saved"].to_list() == zero


# --- the brute-force bound ----------------------------------------------------------------------------
def _allowed(rule, dom_of, a, b):
    """May pages a and b share a frame that dedup made, under one preset?  a, b: (content, proc, writable)."""
    name, _, d = rule.partition(":")
    za, zb = a[0] == 0, b[0] == 0
    if name == "zero-pages":
        return za and zb
    if name == "read-only":
        return not a[2] and not b[2]
    same = dom_of(d or "user-cgroup", a[1]) == dom_of(d or "user-cgroup", b[1])
    return same or (name == "windows" and za and zb)


def _common(rule, page):
    """May this page map the kernel's zero page?"""
    name = rule.partition(":")[0]
    if page[0] != 0 or name == "same-domain":
        return False
    return not (name == "read-only" and page[2])


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def brute_force_frames(units, rules, dom_of):
    """The fewest frames: units (lists of pages already on one frame, by fork) are grouped so that
    every two pages of different units in a group have equal content and are allowed to share; a
    group of pages that may all map the zero page costs nothing."""
    best = None
    for part in _partitions(list(range(len(units)))):
        cost = 0
        ok = True
        for block in part:
            pages = [p for u in block for p in units[u]]
            for (i, pa), (j, pb) in itertools.combinations([(u, p) for u in block for p in units[u]], 2):
                if i == j:
                    continue
                if pa[0] != pb[0] or not all(_allowed(r, dom_of, pa, pb) for r in rules):
                    ok = False
                    break
            if not ok:
                break
            if not all(p[0] == 0 and all(_common(r, p) for r in rules) for p in pages):
                cost += 1
        if ok and (best is None or cost < best):
            best = cost
    return best


UIDS = {0: 1, 1: 1, 2: 2, 3: 2}
CGROUPS = {0: "/a", 1: "/b", 2: "/a", 3: "/b"}
RULES = ["zero-pages", "same-domain", "windows", "read-only", "same-domain:process", "windows:user", "same-domain:cgroup",
         "read-only+same-domain", "zero-pages+windows:cgroup"]


@st.composite
def small_snapshots(draw):
    n = draw(st.integers(2, 7))
    snap = {}
    frames = {}
    for i in range(n):
        proc = draw(st.integers(0, 3))
        c = draw(st.sampled_from([0, "a", "b"]))
        spec = {"c": c, "writable": draw(st.booleans())}
        if draw(st.integers(0, 3)) == 0:  # shares a frame with an earlier page of equal content (fork)
            prev = [k for k, v in snap.items() if v["c"] == c and k[0] != proc]
            if prev:
                other = prev[0]
                label = frames.setdefault(other, f"F{other}")
                snap[other] = {**snap[other], "frame": label}
                spec["frame"] = label
        snap[(proc, 10 + i)] = spec
    return snap


def test_oracle_under_a_preset_equals_the_brute_force_bound(tmp_path_factory, monkeypatch):
    # many tiny traces written within a second can share a fingerprint: no prepared-trace cache here
    monkeypatch.setenv("KSMTRACE_NO_CACHE", "1")
    procs = {p: {"uid": UIDS[p], "cgroup": CGROUPS[p]} for p in range(4)}

    def dom_of(d, proc):
        return {"user-cgroup": (UIDS[proc], CGROUPS[proc]), "user": UIDS[proc], "cgroup": CGROUPS[proc],
                "process": proc}[d]

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(snap=small_snapshots(), rule=st.sampled_from(RULES))
    def check(snap, rule):
        vmas = {}
        for (proc, v), spec in snap.items():
            vmas.setdefault(proc, []).append({"start": v, "end": v + 1, "perms": "rw-p" if spec["writable"] else "r--p"})
        pages = {k: {kk: vv for kk, vv in spec.items() if kk != "writable"} for k, spec in snap.items()}
        tr = make_trace(tmp_path_factory.mktemp("bf") / "t", [pages], procs=procs, vmas=vmas)
        units: dict = {}
        for (proc, v), spec in snap.items():
            key = spec.get("frame") or (proc, v)
            units.setdefault(key, []).append((spec["c"], proc, spec["writable"]))
        base = len(units)
        frames = brute_force_frames(list(units.values()), rule.split("+"), dom_of)
        got = replay(tr, "oracle", restrict=rule).table.row(0, named=True)
        assert got["base_frames"] == base
        assert got["oracle_saved"] == base - frames, (rule, snap)
        assert got["frames_saved"] == got["oracle_saved"]

    check()


# --- spec, parsing, and nothing changes without a preset ---------------------------------------------
def test_parse_restriction():
    assert parse_restriction(None) is None and parse_restriction("none") is None and parse_restriction("") is None
    assert parse_restriction("same-domain").spec == "same-domain:user-cgroup"
    assert parse_restriction("read-only+zero-pages").spec == "zero-pages+read-only"  # canonical order
    assert parse_restriction("windows:process").spec == "windows:process"
    for bad, msg in (("same-dom", "unknown restriction"), ("same-domain:vm", "unknown domain"),
                     ("zero-pages:user", "takes no domain"), ("windows:user+windows:process", "given twice")):
        with pytest.raises(KsmtraceError, match=msg):
            parse_restriction(bad)


def test_a_preset_is_recorded_and_off_changes_nothing(tmp_path):
    tr = hand(tmp_path / "t", n=3)
    plain = replay(tr, "ksm", FAST["ksm"])
    assert replay(tr, "ksm", {**FAST["ksm"], "restrict": "none"}).run_id == plain.run_id
    assert "restrict" not in plain.spec and "restrict" not in plain.spec["options"]
    assert "unrestricted_oracle_saved" not in plain.table.columns
    r = replay(tr, "ksm", FAST["ksm"], restrict="same-domain")
    assert r.spec["restrict"] == r.spec["options"]["restrict"] == "same-domain:user-cgroup"
    assert r.run_id != plain.run_id
    assert r.run_id == replay(tr, "ksm", {**FAST["ksm"], "restrict": "same-domain:user-cgroup"}).run_id
    assert r.spec["params"] == plain.spec["params"]  # the policy's own parameters are untouched


def test_fork_shared_frames_across_domains_stay_one_frame(tmp_path):
    # proc 1 (another cgroup) shares a frame of X with proc 0 by fork; proc 0 has two more copies of X
    procs = {0: {"uid": 1, "cgroup": "/a"}, 1: {"uid": 1, "cgroup": "/b"}}
    snap = {(0, 1): {"c": "X", "frame": "F"}, (1, 1): {"c": "X", "frame": "F"}, (0, 2): "X", (0, 3): "X"}
    tr = make_trace(tmp_path / "t", [snap, snap], procs=procs)
    prep = tr.prepare("recorded")
    r = restrict_prepared(tr, prep, "same-domain")
    assert (r.base_frames == prep.base_frames).all() and r.base_frames.tolist() == [3, 3]
    # unrestricted: 3 frames -> 1; same-domain: F stays (it spans /a and /b), (0,2) and (0,3) -> 1 = saves 1
    assert prep.oracle_saved.tolist() == [2, 2] and (r.base_frames - r.oracle_frames).tolist() == [1, 1]
    for pol in POLICIES:
        res = replay(tr, pol, {**FAST.get(pol, {}), "restrict": "same-domain"})
        assert res.summary["exposed_merges"] == 0 and res.summary["contract_violations"] == 0


def test_read_only_needs_vma_permissions(tmp_path):
    tr = make_trace(tmp_path / "t", [{(0, 1): "A", (1, 1): "A"}])
    with pytest.raises(KsmtraceError, match="needs the vmas table"):
        replay(tr, "oracle", restrict="read-only")


def test_sweep_over_presets(tmp_path):
    from ksmtrace.sweep import sweep

    hand(tmp_path / "t", n=3)
    df = sweep(str(tmp_path / "t"), "oracle", {"restrict": ["none", "same-domain", "zero-pages", "windows"]}, tmp_path / "out",
               workers=1)
    assert df["restrict"].to_list() == [None, "same-domain:user-cgroup", "zero-pages", "windows:user-cgroup"]
    assert df["frames_saved_final"].to_list() == [7, 3, 3, 5]
    runner = CliRunner()
    res = runner.invoke(cli, ["sweep", str(tmp_path / "t"), "-P", "ksm", "-p", "pages_to_scan=50", "--restrict", "same-domain",
                              "-o", str(tmp_path / "out2"), "-j", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["restrict"] for r in rows] == ["same-domain:user-cgroup"] and rows[0]["exposed_merges"] == 0


def test_results_table_names_the_preset_of_each_run(tmp_path):
    from ksmtrace.sweep import results_table

    tr = hand(tmp_path / "t", n=2)
    runs = [replay(tr, "oracle"), replay(tr, "oracle", restrict="zero-pages")]
    df = results_table(runs)
    assert df["restrict"].to_list() == [None, "zero-pages"] and df["frames_saved_final"].to_list() == [7, 3]
