"""The ``pksm`` and ``pksm-delay`` policies: each rule on a hand-built trace, reference == fast on
random traces, every policy at or below the oracle, and every parameter doing something."""
from __future__ import annotations

import random

import pytest

from ksmtrace.errors import PolicyParamError
from ksmtrace.analysis.delay import delay_report
from tests.policies._helpers import _first_diff, col, gen, run  # noqa: F401

PKSM_COLS = [
    "snap", "frames_saved", "oracle_saved", "merges", "cow_breaks", "pages_shared", "pages_sharing",
    "pages_zero_sharing", "pages_unshared", "full_scans", "stable_nodes", "rmap_items", "new_list",
    "rescan_list", "collision_merges",
]


def samples_for(seed):
    rnd = random.Random(seed)
    s = {f"c{i}": 4242 + (i % 2) for i in range(8) if rnd.random() < 0.4}
    s["c7"] = 999
    s[0] = 999 if rnd.random() < 0.5 else 777  # sometimes a non-zero content has the zero page's sampled hash
    return s


RANDOM_PARAMS = {
    "pksm": [
        {"pages_to_scan": 5, "sleep_millisecs": 5},
        {"pages_to_scan": 3, "sleep_millisecs": 3, "period_seconds": 1, "recheck_rotate": 1},
        {"pages_to_scan": 7, "sleep_millisecs": 4, "collision_counts_as_merge": 0, "track_cow_pages": 1},
    ],
    "pksm-delay": [
        {"pages_to_scan": 3, "sleep_millisecs": 3, "probation_passes": 1, "on_change": "keep", "recheck_rotate": 1},
        {"pages_to_scan": 7, "sleep_millisecs": 4, "probation_passes": 0, "probation_seconds": 0.02, "collision_counts_as_merge": 0},
        {"pages_to_scan": 9, "sleep_millisecs": 2, "probation_passes": 2, "probation_seconds": 0.01, "track_cow_pages": 1},
    ],
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy", ["pksm", "pksm-delay"])
def test_reference_equals_fast_and_below_oracle(mk, seed, policy):
    tr = mk(gen(seed), interval=0.03, samples=samples_for(seed) if seed % 2 else None)
    for params in RANDOM_PARAMS[policy]:
        res = run(tr, policy, params)
        t = res.table
        assert (t["frames_saved"] <= t["oracle_saved"]).all()
        assert res.summary["contract_violations"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_delay_zero_is_pksm_on_every_column(mk, seed):
    tr = mk(gen(seed + 10), interval=0.03, samples=samples_for(seed) if seed % 2 else None)
    for params in RANDOM_PARAMS["pksm"] + [{}]:
        a = run(tr, "pksm", params, check_reference=False)
        b = run(tr, "pksm-delay", {**params, "probation_passes": 0, "probation_seconds": 0}, check_reference=False)
        common = [c for c in a.table.columns]
        assert b.table.select(common).equals(a.table), _first_diff(a.table, b.table.select(common))
        assert col(b, "probation_ended")[-1] == col(b, "probation_changed")[-1] == col(b, "probation_died")[-1] == 0


# --- the rules, on hand-built traces --------------------------------------------------------------------
def test_zero_pages_go_to_the_zero_page_first(mk):
    tr = mk([{(0, 1): 0, (0, 2): 0, (0, 3): "a", (0, 4): "a"}] * 2)
    r = run(tr)
    # the batch runs newest first: page 4 ("a") -> unstable, page 3 merges with it, pages 2, 1 -> zero page
    assert col(r, "pages_zero_sharing") == [0, 2]
    assert col(r, "pages_sharing") == [0, 3]  # 1 PTE replaced by the KSM page + 2 zero-page PTEs
    assert col(r, "pages_shared") == [0, 1]
    assert col(r, "stable_nodes") == [0, 2]
    assert col(r, "frames_saved") == [0, 3] and col(r, "oracle_saved") == [3, 3]
    assert col(r, "rmap_items") == [4, 1]  # only the KSM page's item is left
    assert r.table["u_zero_checks"].sum() == 2 and r.table["u_sampled_hashes"].sum() == 4


def test_sampled_hash_collision_counts_as_merge_without_merging(mk):
    tr = mk([{(0, 1): "x", (1, 1): "y"}] * 2, samples={"x": 7, "y": 7})
    r = run(tr)
    assert r.extras["policy"]["sampled_hash"] == "from trace"
    assert col(r, "collision_merges") == [0, 1]
    assert col(r, "pages_shared") == [0, 1] and col(r, "stable_nodes") == [0, 2]
    assert col(r, "pages_sharing") == [0, 0]  # no PTE was replaced
    assert col(r, "merges") == [0, 0] and col(r, "frames_saved") == [0, 0]
    fixed = run(tr, params={"collision_counts_as_merge": 0})
    assert col(fixed, "collision_merges") == [0, 0] and col(fixed, "pages_shared") == [0, 0]
    assert col(fixed, "rescan_list") == [0, 1]  # the failed merge is a TRY
    plain = run(mk([{(0, 1): "x", (1, 1): "y"}] * 2))  # the same pages, no sampled hash recorded
    assert plain.extras["policy"]["sampled_hash"] == "modelled collision-free"
    assert col(plain, "collision_merges") == [0, 0] and col(plain, "pages_unshared") == [0, 2]


def test_zero_hash_collision(mk):
    # "z" is not all-zero but has the zero page's sampled hash: the quirk leaves it write-protected, unmerged
    tr = mk([{(0, 1): "z", (0, 2): "z", (0, 3): 0}] * 2, samples={"z": 5, 0: 5})
    r = run(tr)
    assert col(r, "collision_merges") == [0, 2] and col(r, "frames_saved") == [0, 1]
    assert col(r, "pages_zero_sharing") == [0, 1] and col(r, "pages_shared") == [0, 0]
    fixed = run(tr, params={"collision_counts_as_merge": 0})
    assert col(fixed, "collision_merges") == [0, 0]
    assert col(fixed, "frames_saved") == [0, 2] and col(fixed, "pages_shared") == [0, 1]


def test_recheck_finds_a_changed_page_and_the_head_only_quirk_misses_one(mk):
    # 10 distinct pages in the unstable tree; n = 1 so each wake-up takes 3 new pages (newest first)
    # and the checksum list is u2 u1 u0 u5 u4 u3 u8 u7 u6 u9.  U >= n, so need = 10*100/1000 = 1 and
    # the recheck examines need+2 = 3 entries from the head: u2 u1 u0 -- never u9.
    base = {(0, v): f"u{v}" for v in range(10)}
    s1 = dict(base)
    s1[(0, 0)] = "changed0"
    s1[(0, 9)] = "changed9"
    s2 = dict(s1)
    s2[(1, 0)] = "u9"  # equal to page 9's *old* content: PKSM still finds page 9 under it
    s2[(1, 1)] = "u0"
    tr = mk([base, base, s1, s1, s2, s2], interval=1.0)
    p = {"pages_to_scan": 1, "sleep_millisecs": 100, "period_seconds": 1}
    r = run(tr, params=p)
    assert col(r, "collision_merges") == [0, 0, 0, 0, 0, 1]  # the stale page 9, never rechecked
    assert col(r, "frames_saved") == [0] * 6
    rot = run(tr, params={**p, "recheck_rotate": 1})
    assert col(rot, "collision_merges") == [0] * 6
    assert col(rot, "pages_unshared")[-1] == 12


def test_recheck_moves_a_changed_unstable_page_to_the_rescan_list(mk):
    s0 = {(0, 1): "a"}
    s1 = {(0, 1): "b"}
    s2 = {(0, 1): "b", (1, 1): "a"}
    tr = mk([s0, s1, s2, s2], interval=1.0)
    r = run(tr, params={"sleep_millisecs": 500})
    # U = 1 < n: the whole list is re-hashed every wake-up; the change is found, page 1 is re-filed
    # under "b", and the new "a" page finds nothing stale
    assert col(r, "collision_merges") == [0, 0, 0, 0]
    assert col(r, "pages_unshared") == [0, 1, 1, 2]
    # wake-ups every ~544 ms (HZ 250): per interval, one processing hash + one recheck hash per wake-up
    assert r.table["u_sampled_hashes"].to_list() == [0, 3, 2, 5]


def test_fork_shared_page_is_one_item_and_merges_all_its_mappings(mk):
    # the fork-shared page F is processed first (newest first), goes into the unstable tree, and
    # the scanned page x becomes the KSM page: the rmap walk replaces both of F's PTEs
    s = {(0, 1): "x", (1, 1): {"c": "x", "frame": "F"}, (2, 1): {"c": "x", "frame": "F"}}
    tr = mk([s, s])
    r = run(tr)
    assert col(r, "rmap_items")[0] == 2  # the fork-shared frame is one physical page
    assert col(r, "frames_saved") == [0, 1] and col(r, "oracle_saved") == [1, 1]
    assert col(r, "pages_sharing") == [0, 2]  # the rmap walk replaced both of F's PTEs


def test_cow_of_a_merged_page_and_track_cow_pages(mk):
    s0 = {(0, 1): "a", (1, 1): "a", (2, 1): "b"}
    s1 = {(0, 1): "b", (1, 1): "a", (2, 1): "b"}  # page (0,1) is written: a COW break
    tr = mk([s0, s0, s1, s1, s1])
    r = run(tr)
    assert col(r, "cow_breaks") == [0, 0, 1, 0, 0]
    # the COW copy is not tracked: it never merges with the other "b" page
    assert col(r, "frames_saved") == [0, 1, 0, 0, 0]
    # pksm_unmap_sharing_page: the page had 2 mappings > _mapcount 1, so the COW does not decrement
    assert col(r, "pages_sharing") == [0, 1, 1, 1, 1]
    t = run(tr, params={"track_cow_pages": 1})
    assert col(t, "frames_saved") == [0, 1, 0, 1, 1]


def test_del_list_and_rmap_items(mk):
    s0 = {(0, v): f"p{v}" for v in range(4)}
    s1 = {(0, 0): "p0"}  # three pages unmapped after pksmd put them in the unstable tree
    tr = mk([s0, s1, s1], interval=1.0)
    r = run(tr)
    # freed tracked pages go through the del list: rmap_items drops when pksmd drains it
    assert col(r, "rmap_items") == [4, 4, 1]
    assert col(r, "pages_unshared") == [0, 4, 1]
    # freed while still on the new list: freed at once (no pksmd wake-up before the frees)
    r2 = run(tr, params={"sleep_millisecs": 2000}, start_s=1.5)
    assert col(r2, "rmap_items") == [4, 1, 1] and r2.table["u_rmap_frees"].sum() == 0


# --- delayed PKSM -------------------------------------------------------------------------------------
def _rewritten_trace(mk):
    """Two equal pages; one of them is rewritten every snapshot for a while, then settles."""
    snaps = []
    for s in range(14):
        snaps.append({(0, 1): "same", (1, 1): "same" if s < 1 or s > 4 else f"w{s}", (2, 1): "stable"})
    return mk(snaps, interval=0.05)


def test_a_page_rewritten_within_its_probation_is_never_merged(mk):
    snaps = [{(0, 1): "x", (1, 1): "x"}, {(0, 1): "x", (1, 1): "y"}, {(0, 1): "x", (1, 1): "y"}]
    tr = mk(snaps, interval=0.1)
    plain = run(tr, "pksm")
    assert col(plain, "merges") == [0, 1, 0] and col(plain, "cow_breaks") == [0, 1, 0]
    d = run(tr, "pksm-delay", {"probation_passes": 10})
    assert col(d, "merges") == [0, 0, 0] and col(d, "cow_breaks") == [0, 0, 0]
    assert col(d, "probation_changed")[-1] == 1
    t = run(tr, "pksm-delay", {"probation_passes": 0, "probation_seconds": 1.0})
    assert col(t, "merges") == [0, 0, 0] and col(t, "probation_ended")[-1] == 0


def test_probation_ends_after_n_passes(mk):
    tr = mk([{(0, 1): "x", (1, 1): "x"}] * 3, interval=0.1)
    d = run(tr, "pksm-delay", {"probation_passes": 3, "sleep_millisecs": 20})
    # wake-ups at 0, 24, 48, 72 ms (20 ms at HZ 250): three probation visits, the fourth makes them candidates
    assert col(d, "probation_ended") == [0, 2, 2] and col(d, "frames_saved") == [0, 1, 1]
    assert d.table["merge_latency_sum_s"][1] == pytest.approx(0.072, abs=0.002)


def test_on_change_restart_versus_keep(mk):
    snaps = [{(0, 1): "x", (1, 1): "x"}, {(0, 1): "x", (1, 1): "y"}] + [{(0, 1): "x", (1, 1): "x"}] * 6
    tr = mk(snaps, interval=0.1)
    p = {"probation_passes": 8, "sleep_millisecs": 20}
    restart = run(tr, "pksm-delay", {**p, "on_change": "restart"})
    keep = run(tr, "pksm-delay", {**p, "on_change": "keep"})
    assert col(restart, "probation_changed")[-1] == 1 and col(keep, "probation_changed")[-1] == 1
    assert restart.summary["merge_latency_mean_s"] > keep.summary["merge_latency_mean_s"]


def test_pages_that_die_during_probation(mk):
    snaps = [{(0, v): "x" for v in range(4)}, {(0, 0): "x"}, {(0, 0): "x"}]
    tr = mk(snaps, interval=0.1)
    d = run(tr, "pksm-delay", {"probation_passes": 20})
    assert col(d, "probation_died") == [0, 3, 3] and col(d, "rmap_items") == [4, 1, 1]


def test_delay_report(mk):
    tr = _rewritten_trace(mk)
    rep = delay_report(tr, {"probation_passes": 6, "sleep_millisecs": 10})
    assert rep["cow_breaks_avoided"] == rep["cow_breaks_pksm"] - rep["cow_breaks_delay"] > 0
    # here the delay even saves more: plain PKSM merged the page before its rewrites, and the COW
    # copy is never tracked again; the delayed page merged once it had settled
    assert rep["frames_saved_mean_lost"] == rep["frames_saved_mean_pksm"] - rep["frames_saved_mean_delay"] < 0
    assert rep["params"]["probation_passes"] == 6
    assert set(rep) >= {"cpu_seconds_avoided", "frames_saved_final_lost", "probation_ended", "pksm", "pksm_delay"}


# --- the oracle bound on a static trace ------------------------------------------------------------------
def test_static_trace_reaches_the_oracle(mk):
    rnd = random.Random(3)
    s = {}
    for p in range(3):
        for v in range(40):
            s[(p, v)] = rnd.choice([0, "a", "b", "c", f"u{p}{v}"])
    s[(3, 0)] = {"c": "a", "frame": "fork"}
    s[(0, 99)] = {"c": "a", "frame": "fork"}
    tr = mk([s] * 4, interval=0.5)
    for pol in ("pksm", "pksm-delay"):
        r = run(tr, pol)
        assert col(r, "frames_saved")[-1] == col(r, "oracle_saved")[-1] > 0


# --- parameters ---------------------------------------------------------------------------------------------
def test_unknown_parameters_are_rejected():
    from ksmtrace.replay import make_policy

    with pytest.raises(PolicyParamError):
        make_policy("pksm", {"pages_to_skan": 1})
    with pytest.raises(PolicyParamError):
        make_policy("pksm-delay", {"on_change": "ignore"})
    with pytest.raises(PolicyParamError):
        make_policy("pksm", {"probation_passes": 2})  # a pksm-delay parameter


def test_every_parameter_changes_a_result(mk):
    many = mk(gen(5, npages=60, nsnap=12), interval=0.03, samples=samples_for(1))
    rewritten = _rewritten_trace(mk)
    recheck = {(0, v): f"u{v}" for v in range(10)}
    r1 = dict(recheck)
    r1[(0, 9)] = "changed9"
    r2 = dict(r1)
    r2[(1, 0)] = "u9"
    recheck_tr = mk([recheck, recheck, r1, r1, r2, r2], interval=1.0)
    rp = {"pages_to_scan": 1, "sleep_millisecs": 100, "period_seconds": 1}
    cases = [
        ("pksm", many, {"pages_to_scan": 2}, {"pages_to_scan": 20}),
        ("pksm", many, {"sleep_millisecs": 5, "pages_to_scan": 3}, {"sleep_millisecs": 9, "pages_to_scan": 3}),
        ("pksm", recheck_tr, {**rp, "period_seconds": 1}, {**rp, "period_seconds": 100}),
        ("pksm", recheck_tr, rp, {**rp, "recheck_rotate": 1}),
        ("pksm", many, {}, {"collision_counts_as_merge": 0}),
        ("pksm", many, {}, {"track_cow_pages": 1}),
        ("pksm-delay", rewritten, {"probation_passes": 1}, {"probation_passes": 6}),
        ("pksm-delay", rewritten, {"probation_passes": 0}, {"probation_passes": 0, "probation_seconds": 0.2}),
        ("pksm-delay", rewritten, {"probation_passes": 4, "on_change": "restart"}, {"probation_passes": 4, "on_change": "keep"}),
    ]
    for pol, tr, a, b in cases:
        ta = run(tr, pol, a, check_reference=False).table
        tb = run(tr, pol, b, check_reference=False).table
        assert not ta.equals(tb), (pol, a, b)


# --- pksm_rmap_walk visits every VMA of the page's anon_vma ----------------------------------------------
def _walk_runs(mk, snaps, start_s=0.0, **kw):
    tr = mk(snaps, interval=0.05, **kw)
    p = {"pages_to_scan": 10, "sleep_millisecs": 10}
    on = run(tr, "pksm", p, start_s=start_s)
    off = run(tr, "pksm", {**p, "anon_vma_walk": 0}, start_s=start_s)
    return on.table.row(on.table.height - 1, named=True), off.table.row(off.table.height - 1, named=True)


def test_a_fork_child_that_copied_the_page_makes_pksm_drop_it(mk):
    """The parent's page (vpn 5, "x") was forked, and the child wrote its copy before pksmd first
    ran.  The parent's page is still on the parent VMA's anon_vma, whose tree holds the child's
    VMA; there the PTE maps the copy, so write_protect_page fails and PKSM drops the parent's page
    for good (after making it a KSM page: its own PTE came first in the walk): it never merges with
    the equal page of process 2.  Without the anon_vma walk it merges."""
    vmas = {p: [(0, 16)] for p in range(3)}
    forked = {(0, 5): {"c": "x", "frame": "F"}, (1, 5): {"c": "x", "frame": "F"}, (2, 9): "x"}
    diverged = {(0, 5): "x", (1, 5): "child", (2, 9): "x"}
    snaps = [forked, diverged] + [diverged] * 4
    on, off = _walk_runs(mk, snaps, start_s=0.06, vmas=vmas, procs={1: {"ppid": 1000}})
    assert off["frames_saved"] == 1 and off["pages_sharing"] == 1
    assert on["frames_saved"] == 0 and on["pages_sharing"] == 0
    # on: the parent's item dropped, process 2's waits in the unstable tree; off: the merged pair's
    # KSM page keeps one item (the tree page's went with its last mapping)
    assert on["rmap_items"] == off["rmap_items"] == 1 and on["pages_unshared"] == 1 and off["pages_shared"] == 1


def test_a_tree_page_of_a_fork_family_is_merged_in_part(mk):
    """The same family, but the parent's page is the *tree* page of a two-page merge (pksmd saw it
    first): the walk over it replaces the parent's PTE (its VMA comes first) and then fails at the
    child's: the scanned page is dropped, the parent's PTE stays on the new KSM page (a frame saved
    that PKSM no longer tracks), as in ``try_to_merge_two_pages``."""
    vmas = {p: [(0, 16)] for p in range(3)}
    forked = {(0, 5): {"c": "x", "frame": "F"}, (1, 5): {"c": "x", "frame": "F"}, (2, 9): "y"}
    diverged = {(0, 5): "x", (1, 5): "child", (2, 9): "y", (2, 5): "x"}
    on, off = _walk_runs(mk, [forked, diverged] + [diverged] * 4, vmas=vmas, procs={1: {"ppid": 1000}})
    assert on["frames_saved"] == off["frames_saved"] == 1
    assert (on["pages_shared"], on["rmap_items"]) == (0, 1) and (off["pages_shared"], off["rmap_items"]) == (1, 2)


def test_a_page_of_a_split_vma_is_dropped(mk):
    """mprotect split the VMA [0, 32) in two; both halves share its anon_vma.  The walk of a page
    in the upper half visits the lower half first (page_address_in_vma fails): DROP, nothing done.
    Equal pages in another process merge only without the anon_vma walk."""
    s0 = {(0, 2): "a", (1, 1): "b"}
    s1 = {**s0, (0, 20): "x", (1, 3): "x"}
    vmas = [{0: [(0, 32)], 1: [(0, 8)]}] + [{0: [(0, 16), (16, 32)], 1: [(0, 8)]}] * 5
    on, off = _walk_runs(mk, [s0] + [s1] * 5, vmas=vmas)
    assert off["frames_saved"] == 1 and on["frames_saved"] == 0


def test_stack_pages_are_dropped(mk):
    """vma_can_enter refuses VM_GROWSDOWN: the walk of a [stack] page ends at its first VMA: DROP."""
    snap = {(0, 3): "x", (1, 3): "x"}
    vmas = {0: [{"start": 0, "end": 8, "path": "[stack]"}], 1: [(0, 8)]}
    on, off = _walk_runs(mk, [snap] * 6, vmas=vmas)
    assert off["frames_saved"] == 1 and on["frames_saved"] == 0
    # without a VMA table the walk visits exactly the page's mappings
    plain_on, plain_off = _walk_runs(mk, [snap] * 6)
    assert plain_on["frames_saved"] == plain_off["frames_saved"] == 1
