"""The ``uksm`` policy: its rules checked against notes/uksm-spec.md's hand-derived numbers and
behaviours, the readable runtime on both engines and the numba kernel equal on generated traces with
VMA changes and sampled-hash collisions, and the strength walk."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmtrace.engine.api import RunContext
from ksmtrace.engine.cost import default_cost_model
from ksmtrace.engine.fast import FastEngine
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.uksm import UKSM
from ksmtrace.policies.uksm import rules as R
from ksmtrace.policies.uksm.runtime import UksmRuntime
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from tests.policies._helpers import _first_diff


# --- the governor's arithmetic (uksm-spec §2.1, computed there from the appendix's formulas) ---------------------
SPEC_TABLE = {  # governor: (real ratios, quotas per wake-up at EMA 500 ns and a 100 ms sleep)
    "full": ((20, 40, 2375, 9500), (400, 803, 62291, 3800000)),
    "medium": ((20, 30, 1250, 5000), (400, 601, 28570, 200000)),
    "low": ((10, 20, 1000, 2000), (200, 400, 22222, 50000)),
    "quiet": ((10, 20, 40, 75), (200, 400, 803, 1511)),
}
SPEC_SAMPLED = {"full": (4000, 4000, 95000, 95000), "medium": (4000, 3000, 100000, 100000),
                "low": (3000, 4000, 200000, 100000), "quiet": (4000, 4000, 8000, 15000)}


@pytest.mark.parametrize("governor", list(R.GOVERNORS))
def test_quotas_and_steps_match_the_spec_table(governor):
    ratios, covers, max_cpu = R.GOVERNORS[governor]
    rg = np.zeros((4, R.N_RCOLS), np.int64)
    rg[:, R.R_RATIO] = ratios
    rg[:, R.R_COVER] = covers
    rg[:, R.R_PAGES] = 10**7  # a rung this large: step = pages // sampled
    sleep_j = R.msecs_to_jiffies(100, 250)
    assert sleep_j == 25
    ema, sj = R.calc_scan_pages(rg, 500, sleep_j, sleep_j, 1, max_cpu, 250)
    assert (ema, sj) == (500, 25)
    real, quotas = SPEC_TABLE[governor]
    assert [R.real_ratio(c, max_cpu) for c in ratios] == list(real)
    assert rg[:, R.R_QUOTA].tolist() == list(quotas)
    assert rg[:, R.R_STEP].tolist() == [10**7 // s for s in SPEC_SAMPLED[governor]]


def test_raw_negative_ratio_gives_step_one_and_ema_rules():
    assert R.calc_step(200, 10**6, -2500, 500) == 1  # quirk Q3: the unsigned wrap
    assert R.calc_step(200, 10**6, 2375, 500) == 10**6 // 95000
    assert R.calc_step(0, 10**6, 20, 500) == 1  # cover 0: full scan
    assert R.ema(6000, 500) == 1000  # a burst above 10x doubles
    assert R.ema(600, 500) == 520
    rg = np.zeros((4, R.N_RCOLS), np.int64)
    rg[:, R.R_RATIO] = (20, 40, -2500, -10000)
    rg[:, R.R_COVER] = (1000, 500, 200, 50)
    assert R.calc_scan_pages(rg, 200000, 25, 25, 3, 95, 250)[0] == 500  # EMA above 100 us: reset
    assert R.calc_scan_pages(rg, 800, 25, 25, 256, 95, 250)[0] == 500  # every 256 eval rounds
    assert R.calc_scan_pages(rg, 800, 50, 25, 8, 95, 250)[1] == 25  # sleep restored every 8
    # the sleep after a wake-up keeps the busiest rung's duty cycle, at most 1 s
    assert R.sleep_after_scan(25, 0, 9500, 250) == 25
    assert R.jiffies_to_msecs(R.sleep_after_scan(25, 400 << 20, 20, 250), 250) == 1000
    assert R.sleep_after_scan(25, 100 << 20, 2375, 250) == R.msecs_to_jiffies(100 * 7625 // 2375, 250)


# --- the strength walk (uksm-spec §8.5) --------------------------------------------------------------------------
def walk(RS, rounds, pos, neg, fsr0=1, scanned=1000):
    """``rounds`` hash rounds with these benefit sums; full_scans counts from ``fsr0`` + 1."""
    seen = []
    for k in range(rounds):
        RS[R.RS_POS] += pos
        RS[R.RS_NEG] += neg
        RS[R.RS_SCANNED_LAST] -= scanned  # (scanned pages since the last adjustment)
        R.rshash_adjust(RS, 0, fsr0 + 1 + k)
        seen.append(int(R.strength_words(RS)))
    return seen


def test_walk_goes_down_without_collisions_and_up_when_they_dominate():
    RS = R.new_walk(64, ladder=False)
    assert walk(RS, 8, pos=960_000, neg=0) == [64, 64, 64, 63, 61, 57, 49, 33]  # NEW->STILL, 2 quiet, GO_DOWN
    # neg_ratio 95 > 90: GO_UP, delta restarted after the reversal (full_scans past the probe at 10)
    assert walk(RS, 8, pos=1_000_000, neg=950_000, fsr0=20) == [34, 36, 40, 48, 64, 96, 128, 160]


def test_ladder_walk_moves_one_recorded_strength_per_step():
    RS = R.new_walk(64, ladder=True)
    assert walk(RS, 7, pos=960_000, neg=0) == [64, 64, 64, 32, 16, 8, 8]
    assert walk(RS, 5, pos=1_000_000, neg=950_000, fsr0=20) == [16, 32, 64, 128, 256]


def test_obscure_probe_at_the_tenth_full_scan():
    RS = R.new_walk(64, ladder=False)
    RS[R.RS_POS] = 1000
    R.rshash_adjust(RS, 10, 2)  # NEW -> STILL
    RS[R.RS_POS] = 1000
    RS[R.RS_NEG] = 100
    R.rshash_adjust(RS, 20, 10)  # (fully_scanned_round & 0xFF) == 10: OBSCURE -> TRYDOWN
    assert RS[R.RS_STATE] == R.TRYDOWN and RS[R.RS_S] == 63


def test_snap_levels():
    lv = [R.snap_level(s, 0) for s in (1, 8, 11, 12, 45, 46, 63, 64, 700, 1034)]
    assert [R.LADDER[k] for k in lv] == [8, 8, 8, 16, 32, 64, 64, 64, 512, 1024]
    assert R.LADDER[R.snap_level(63, 1)] == 32 and R.LADDER[R.snap_level(63, 2)] == 64


# --- white-box: drive the readable runtime visit by visit ------------------------------------------------------------
def runtime_on(tr, **params):
    prep = tr.prepare("anon")
    eng = FastEngine(prep)
    ctx = RunContext(prep=prep, engine=eng, timing_ps=default_cost_model().timing_ps(), hz=250, start_ns=0, seed=1)
    return UksmRuntime(UKSM(params).params, ctx), eng


def first_snapshot(rt, eng):
    eng.apply_snapshot(0, 0)
    rt.on_snapshot(0, 0)
    rt.enter_all_slots()
    return [s for s in rt.slots if s.rung == 0]


@pytest.mark.parametrize("bug", [True, False])
def test_pair_merge_latency_of_the_unstable_count_bug(mk, bug):
    """uksm-spec §6.5: with the kernel's count bug, two equal pages A (visited first) and B merge at
    A's next visit after B's first; with the count kept, at B's first visit."""
    tr = mk([{(0, 0): "x", (0, 1): "x"}], vmas=[{0: [(0, 2)]}])
    rt, eng = runtime_on(tr, unstable_count_bug=bug)
    (slot,) = first_snapshot(rt, eng)
    firsts, merged_at = [], None
    for v in range(12):
        i = slot.pages_scanned
        rt.scan_vma_one_page(slot)
        page = slot.perm.get(i, i)  # the page index this visit took
        if page not in firsts:
            firsts.append(page)
        if slot.pages_scanned == slot.pages:  # (judge_slot would start the next cycle)
            slot.pages_scanned = 0
        if eng.page_is_ksm(0):
            merged_at = (v, page)
            break
    assert merged_at is not None and len(firsts) == 2
    a, b = firsts
    if not bug:
        assert merged_at == (1, b)  # B's first visit
    else:
        assert merged_at[0] >= 2 and merged_at[1] == a  # A's next visit after B's first
        assert (rt.unshared, rt.shared, rt.sharing) == (0, 1, 1)


def test_a_third_copy_merges_at_its_first_visit(mk):
    tr = mk([{(0, 0): "x", (0, 1): "x", (0, 2): "x"}], vmas=[{0: [(0, 3)]}])
    rt, eng = runtime_on(tr, unstable_count_bug=False)
    (slot,) = first_snapshot(rt, eng)
    for _ in range(3):  # one cycle: the pair merges, the third copy meets the stable node
        rt.scan_vma_one_page(slot)
    assert all(eng.page_is_ksm(p) for p in range(3))
    assert (rt.shared, rt.sharing) == (1, 2)


def test_holes_cost_quota_and_zero_pages_go_to_the_zero_page(mk):
    tr = mk([{(0, 0): 0, (0, 5): "a"}], vmas=[{0: [(0, 10)]}])
    rt, eng = runtime_on(tr)
    (slot,) = first_snapshot(rt, eng)
    for _ in range(10):
        rt.scan_vma_one_page(slot)
    u = dict(zip(__import__("ksmtrace.engine.cost", fromlist=["UNIT_NAMES"]).UNIT_NAMES, rt.units()))
    assert u["addresses_walked"] == 8 and u["pages_visited"] == 2
    assert eng.frame(0) == 0 and rt.zero_pages == 1 and slot.merged == 1
    assert rt.pages_scanned == 2 and slot.fsr == rt.fsr  # the cycle completed


def test_each_cycle_is_a_fresh_random_permutation(mk):
    tr = mk([{(0, v): f"u{v}" for v in range(16)}], vmas=[{0: [(0, 16)]}])
    rt, eng = runtime_on(tr)
    (slot,) = first_snapshot(rt, eng)
    cycles = []
    for _ in range(3):
        seen = []
        for _ in range(16):
            i = slot.pages_scanned
            rt.scan_vma_one_page(slot)
            seen.append(slot.perm.get(i, i))
        slot.pages_scanned = 0
        cycles.append(seen)
    assert all(sorted(c) == list(range(16)) for c in cycles)
    assert cycles[0] != cycles[1] != cycles[2]


def judge_log(rt):
    log = []
    orig = rt.judge_slot

    def spy(slot):
        r0, full = slot.rung, slot.pages_scanned == slot.pages
        orig(slot)
        log.append((slot.sid, r0, slot.rung, full))

    rt.judge_slot = spy
    return log


def drive(rt, eng, prep, until_s=None):
    times = prep.times_ns
    for s in range(prep.n_snaps):
        eng.apply_snapshot(s, int(times[s]))
        rt.on_snapshot(s, int(times[s]))
        rt.run_until(int(times[s + 1]) if s + 1 < prep.n_snaps else int(times[s]) + 2_000_000_000)


def test_duplicates_climb_the_ladder_one_rung_per_pass_and_a_full_cycle_drops_to_rung_0(mk):
    """uksm-spec §10.7: a VMA full of new duplicates is promoted one rung per pass while its passes
    merge >= 10 % of their visits; when it completes its cycle it goes back to rung 0."""
    n = 400
    snaps = [{**{(0, v): f"c{v}" for v in range(n)}, **{(1, v): f"c{v}" for v in range(n)}}] * 6
    tr = mk(snaps, interval=0.5, vmas=[{0: [(0, n)], 1: [(0, n)]}] * 6)
    rt, eng = runtime_on(tr, eval_intervals="20,20,20,20", hash_adapt=False)
    log = judge_log(rt)
    drive(rt, eng, tr.prepare("anon"))
    ups = [(a, b) for _, a, b, full in log if b == a + 1]
    assert (0, 1) in ups and (1, 2) in ups  # one rung at a time
    assert all(b <= a + 1 for _, a, b, _ in log)
    assert any(full and a > 0 and b == 0 for _, a, b, full in log)  # the cycle ends at rung 0
    assert rt.RG[1:, R.R_PAGES].sum() == 0  # all merged: nothing left above rung 0
    assert eng.counters()["frames_in_use"] == n


def test_cows_of_merged_pages_count_against_their_vma_and_thrashing_demotes(mk):
    """A write to a merged page is a pages_cowed of its VMA's slot; a pass whose COWs exceed
    thrash_threshold % of its merges has a dedup ratio of 0 and demotes the slot."""
    n = 64
    same = {**{(0, v): f"t{v}" for v in range(n)}, **{(1, v): f"t{v}" for v in range(n)}}
    written = {**same, **{(1, v): f"w{v}" for v in range(0, n, 2)}}
    tr = mk([same, same, written], interval=1.0, vmas=[{0: [(0, n)], 1: [(0, n)]}] * 3)
    prep = tr.prepare("anon")
    rt, eng = runtime_on(tr, hash_adapt=False)
    for s in (0, 1):
        eng.apply_snapshot(s, int(prep.times_ns[s]))
        rt.on_snapshot(s, int(prep.times_ns[s]))
        rt.run_until(int(prep.times_ns[s + 1]))
    assert all(eng.page_is_ksm(p) for p in range(2 * n))
    slot1 = next(x for x in rt.slots if rt.T.proc[x.sid] == 1)
    cowed0 = slot1.cowed
    eng.apply_snapshot(2, int(prep.times_ns[2]))
    rt.on_snapshot(2, int(prep.times_ns[2]))
    assert slot1.cowed - cowed0 == n // 2
    for thrash, promoted in ((50, False), (0, True)):
        rt.p = UKSM({"thrash_threshold": thrash}).params
        slot1.merged, slot1.cowed, slot1.this_sampled, slot1.pages_scanned = 10, 6, 20, 5
        r0 = slot1.rung
        rt.judge_slot(slot1)
        assert (slot1.rung == min(r0 + 1, 3)) == promoted
        if not promoted:
            assert slot1.rung == max(r0 - 1, 0)


# --- the contract: reference == fast == kernel on generated traces with VMA changes and collisions ----------------
CONTENTS = [0, "a", "b", "c", "d", "e", "nz"]
COLLIDE = {"a": ("g", 32), "b": ("g", 16), "c": ("g", 8), "nz": (0, 16)}


@st.composite
def vma_traces(draw):
    nproc = draw(st.integers(1, 3))
    nsnap = draw(st.integers(2, 6))
    snaps, vmas = [], []
    layout = {p: [(0, 8), (8, 20), (40, 48)] for p in range(nproc)}
    for s in range(nsnap):
        if s and draw(st.booleans()):  # a VMA changes: split, grow, vanish or appear
            p = draw(st.integers(0, nproc - 1))
            op = draw(st.integers(0, 3))
            v = list(layout[p])
            if op == 0 and v:
                a, b = v.pop(0)
                v += [(a, (a + b) // 2), ((a + b) // 2, b)] if b - a > 1 else [(a, b)]
            elif op == 1 and v:
                a, b = v.pop()
                v.append((a, b + 6))
            elif op == 2 and v:
                v.pop(draw(st.integers(0, len(v) - 1)))
            else:
                v.append((60, 70))
            layout[p] = sorted(set(v))
        pages = {}
        for p in range(nproc):
            for a, b in layout[p]:
                for vpn in range(a, b):
                    if draw(st.integers(0, 3)):
                        pages[(p, vpn)] = draw(st.sampled_from(CONTENTS)) if draw(st.integers(0, 4)) else f"u{s}-{p}-{vpn}"
            pages[(p, 100)] = "a"  # outside every VMA: never scanned
        snaps.append(pages)
        vmas.append({p: list(layout[p]) + [(100, 101, "rd wr mr mw me gd")] for p in range(nproc)})
    return snaps, vmas


PARAM_SETS = [
    {"sleep_millisecs": 20},
    {"sleep_millisecs": 5, "eval_intervals": "1,1,1,1", "unstable_count_bug": False, "hash_walk": "ladder"},
    {"sleep_millisecs": 10, "hash_strength": 8, "snap": "floor", "memcmp_cost": 5000, "thrash_threshold": 0},
    {"sleep_millisecs": 5, "cpu_governor": "quiet", "hash_strength": 16, "hash_adapt": False, "abundant_threshold": 0},
]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tv=vma_traces(), pi=st.integers(0, len(PARAM_SETS) - 1), seed=st.integers(0, 3))
def test_kernel_and_readable_agree_with_vmas_and_collisions(tmp_path_factory, tv, pi, seed):
    snaps, vmas = tv
    tr = make_trace(tmp_path_factory.mktemp("u") / "t", snaps, interval=0.05, strengths=True, collisions=COLLIDE, vmas=vmas)
    params = PARAM_SETS[pi]
    ref = replay(tr, "uksm", params, engine="reference", seed=seed)
    kern = replay(tr, "uksm", params, engine="fast", runtime="kernel", seed=seed)
    assert ref.table.equals(kern.table), _first_diff(ref.table, kern.table)
    assert ref.procs.equals(kern.procs)
    assert (ref.table["frames_saved"] <= ref.table["oracle_saved"]).all()


def test_collisions_are_accounted_at_weak_strengths(mk):
    """Different contents with one sampled hash at strength 8 meet in the trees: hash_max work and
    false zero-page matches cost CPU there, none at 1024."""
    snaps = [{**{(p, v): f"g{v % 6}" for p in range(3) for v in range(30)},
              **{(p, 40 + v): f"nz{v}" for p in range(3) for v in range(5)}}] * 8
    tr = mk(snaps, interval=0.2, strengths=True, vmas=[{p: [(0, 64)] for p in range(3)}] * 8,
            collisions={**{f"g{i}": ("g", 8) for i in range(6)}, **{f"nz{i}": (0, 8) for i in range(5)}})
    weak = replay(tr, "uksm", {"hash_strength": 8, "hash_adapt": False})
    strong = replay(tr, "uksm", {"hash_strength": 1024, "hash_adapt": False})
    assert weak.summary["zero_hash_false"] > 0 and strong.summary["zero_hash_false"] == 0
    assert weak.table["u_zero_checks"].sum() > strong.table["u_zero_checks"].sum()
    assert weak.summary["frames_saved_final"] == strong.summary["frames_saved_final"] == weak.summary["oracle_saved_final"]
    assert weak.summary["contract_violations"] == 0


def test_a_trace_without_vmas_or_fingerprints_still_replays(mk):
    tr = mk([{(0, 1): "a", (0, 2): "a", (1, 7): "a", (0, 5000): "b", (1, 5000): "b"}] * 4, interval=0.5)
    r = replay(tr, "uksm")
    assert r.extras["policy"]["slots"] == "synthesised from page addresses"
    assert r.extras["policy"]["slot_instances"] == 4  # proc 0's pages split at the 1024-page gap
    assert r.extras["policy"]["sampled_hash"] == "modelled collision-free"
    assert r.summary["frames_saved_final"] == r.summary["oracle_saved_final"]


@pytest.mark.parametrize("bad", [{"cpu_ratios": "1,2,3"}, {"cpu_ratios": "0,1,2,3"}, {"cpu_ratios": "1,2,3,10000"},
                                 {"eval_intervals": "1,2,x,4"}, {"hash_strength": 48}, {"cpu_governor": "turbo"},
                                 {"sleep_millisecs": 0}])
def test_bad_parameters_are_one_clear_error(bad):
    with pytest.raises(PolicyParamError):
        UKSM(bad)
