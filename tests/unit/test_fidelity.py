"""ksmtrace.fidelity without the kernel: metrics, ground-truth loading, the refined replay, the trace
subsampler, the goals, the settings presets, the prepare rule for real zero-page merges, and the
`fidelity` command's errors."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.errors import KsmtraceError
from ksmtrace.fidelity import metrics as M
from ksmtrace.fidelity.compare import _RefinedTrace, fidelity, refine_prepared
from ksmtrace.fidelity.goals import evaluate_goals, rewrite_period
from ksmtrace.fidelity.groundtruth import (FidelityError, ksm_params, load_ground_truth, profile_for_release,
                                           range_walk_for_release)
from ksmtrace.fidelity.interval import meets_goals, recommend
from ksmtrace.fidelity.subsample import subsample_trace
from ksmtrace.fidelity.settings import SETTINGS, resolve_settings
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace


# --- metrics -----------------------------------------------------------------------------------
def test_step_hold_and_nrmse():
    t = np.array([0.0, 1.0, 2.0])
    v = np.array([0.0, 10.0, 20.0])
    assert M.step_hold(t, v, [0.5, 1.0, 1.9, 5.0, -1.0]).tolist() == [0.0, 10.0, 10.0, 20.0, 0.0]
    assert M.nrmse([0, 10, 20], [0, 10, 20]) == 0.0
    assert M.nrmse([0, 10, 30], [0, 10, 20]) == pytest.approx(np.sqrt(100 / 3) / 20)
    assert M.nrmse([0, 0], [0, 0]) == 0.0
    assert M.nrmse([1, 0], [0, 0]) is None


def test_time_to_fraction_interpolates():
    t = [0.0, 1.0, 2.0, 3.0]
    v = [0, 50, 100, 100]
    assert M.time_to_fraction(t, v, 0.9) == pytest.approx(1.8)
    assert M.time_to_fraction(t, v, 0.9, t_from=0.5) == pytest.approx(1.3)
    assert M.time_to_fraction(t, [0, 0, 0, 0]) is None
    assert M.time_to_fraction([0, 1], [10, 10]) == 0.0


def test_spread_and_within():
    assert M.spread_band([100, 110], 0.10) == pytest.approx((89.5, 120.5))
    assert M.within(101, 100, 0.01) and not M.within(102.5, 100, 0.01)
    assert M.within(1, 0, 0.01, floor=1.0) and not M.within(2, 0, 0.01, floor=1.0)
    assert M.relative_error(110, 100) == pytest.approx(0.1) and M.relative_error(1, 0) is None


def test_profile_for_release():
    assert profile_for_release("6.18.44-fc-v669") == "6.12"
    assert profile_for_release("6.12.0") == "6.12"
    assert profile_for_release("6.11.3") == "6.11"
    assert profile_for_release("6.8.0-40-generic") == "6.10"
    assert profile_for_release("4.4.0") == "3.18"
    assert profile_for_release(None) == "6.12"


def test_range_walk_for_release():
    assert range_walk_for_release("6.18.44-fc-v669") and range_walk_for_release("6.19.0")
    assert range_walk_for_release("6.12.59") and not range_walk_for_release("6.12.58-generic")
    assert range_walk_for_release("5.10.249") and not range_walk_for_release("5.10.248")
    assert not range_walk_for_release("6.11.3") and not range_walk_for_release("6.17.0")
    assert range_walk_for_release(None)  # unknown: the newest kernel


# --- ground truth --------------------------------------------------------------------------------
def _gt_row(run, t_extra=0, **kw):
    row = {"run": run, "pages_to_scan": 500, "sleep_millisecs": 10, "smart_scan": 0, "use_zero_pages": 1,
           "max_page_sharing": 64, "stable_node_chains_prune_millisecs": 2000, "advisor_mode": "none",
           "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0, "pages_volatile": 0, "full_scans": 7,
           "pages_scanned": 1000, "pages_skipped": 10, "ksm_zero_pages": 0, "cow_ksm": 500, "ksmd_cpu_ns": 10**9}
    row.update(kw)
    return row


def _dup_snaps(n=8):
    return [{**{(0, v): ("t" if v < 6 else f"u{v}") for v in range(12)}, **{(1, v): ("t" if v < 6 else 0) for v in range(12)}}
            for _ in range(n)]


def _gt_trace(path, runs=(0, 1, 1, 1, 1, 1, 1, 1), **host):
    gt = []
    for s, r in enumerate(runs):
        gt.append([_gt_row(r, pages_sharing=10 * s, pages_shared=1 if s else 0, full_scans=7 + s, pages_scanned=1000 + 40 * s,
                           cow_ksm=500, ksmd_cpu_ns=10**9 + s * 10**6)])
    return make_trace(path, _dup_snaps(len(runs)), interval=0.1, ground_truth=gt,
                      host={"kernel_release": "6.18.1", **host})


def test_no_ground_truth_is_a_clear_error(tmp_path):
    tr = make_trace(tmp_path / "t", _dup_snaps(3), interval=0.1)
    with pytest.raises(FidelityError, match="no ground truth"):
        fidelity(tr)
    r = CliRunner().invoke(cli, ["fidelity", str(tmp_path / "t")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no ground truth" in lines[0] and "ksmtrace validate" in lines[0]


def test_ksm_never_ran_is_an_error(tmp_path):
    tr = _gt_trace(tmp_path / "t", runs=(0, 0, 0))
    with pytest.raises(FidelityError, match="never ran"):
        load_ground_truth(tr)


def test_ground_truth_start_settings_and_rebasing(tmp_path):
    tr = _gt_trace(tmp_path / "t")
    gt = load_ground_truth(tr)
    assert gt.start_s == pytest.approx(0.05) and not gt.start_exact  # midpoint of the 0 -> 1 samples
    assert any("inferred" in w for w in gt.warnings)
    assert gt.column("full_scans")[0] == 0 and gt.final("full_scans") == 7
    assert gt.final("cow_ksm") == 0 and gt.final("ksmd_cpu_ns") == 7 * 10**6
    p = ksm_params(gt)
    assert p == {"profile": "6.12", "range_walk": True, "pages_to_scan": 500, "sleep_millisecs": 10, "smart_scan": False, "use_zero_pages": True,
                 "max_page_sharing": 64, "stable_node_chains_prune_millisecs": 2000, "advisor_mode": "none"}
    assert ksm_params(gt, {"profile": "6.10"})["profile"] == "6.10"
    # an exact start recorded by validate wins
    tr.manifest["validate"] = {"run_start_ns": tr.t0_ns + 30_000_000}
    gt = load_ground_truth(tr)
    assert gt.start_exact and gt.start_s == pytest.approx(0.03)


def test_ksmd_stretch_from_a_plain_capture(tmp_path):
    """A capture records ksmd's run-queue wait in every ground-truth sample (format 2), so fidelity
    stretches the daemon's clock without a validate record; version-1 traces have no stretch."""
    runs = (0, 1, 1, 1, 1, 1)
    gt_rows = [[_gt_row(r, ksmd_cpu_ns=10**9 + s * 10**6, ksmd_wait_ns=5 * 10**8 + s * 3 * 10**6)] for s, r in enumerate(runs)]
    tr = make_trace(tmp_path / "t", _dup_snaps(len(runs)), interval=0.1, ground_truth=gt_rows, host={"kernel_release": "6.18.1"})
    gt = load_ground_truth(tr)
    # from the first sample at or after KSM's start (snapshot 1) to the last: run 4 ms, wait 12 ms
    assert gt.ksmd_stretch() == pytest.approx((4 + 12) / 4)
    assert load_ground_truth(_gt_trace(tmp_path / "no-wait")).ksmd_stretch() is None  # samples without the wait


def test_wall_clock_charges_the_wait_where_ksmd_waits(tmp_path):
    """With validate's time slices and preemptions, ksmd's run-queue wait goes to every wake-up
    (drawn per wake-up), every preemption (in proportion to the CPU time) and every full-scan start
    (the wake-up after lru_add_drain_all); a plain capture's run and wait only allow the
    proportional stretch; no wait, no change."""
    from ksmtrace.engine.cost import resolve_cost_model
    from ksmtrace.fidelity.groundtruth import wall_clock_model

    base = resolve_cost_model(None)
    tr = _gt_trace(tmp_path / "t")
    assert wall_clock_model(load_ground_truth(tr), base) is base
    # 0.2 s CPU, 0.8 s wait in 400 time slices (2 ms each), 20 of them after a preemption
    tr.manifest["validate"] = {"run_start_ns": tr.t0_ns + 30_000_000,
                               "ksmd_sched_start": {"run_ns": 10**9, "wait_ns": 10**9, "timeslices": 100,
                                                    "nr_voluntary_switches": 90, "nr_involuntary_switches": 9},
                               "ksmd_sched_end": {"run_ns": 12 * 10**8, "wait_ns": 18 * 10**8, "timeslices": 500,
                                                  "nr_voluntary_switches": 470, "nr_involuntary_switches": 29}}
    gt = load_ground_truth(tr)
    assert gt.ksmd_sched()["timeslices"] == 400 and gt.ksmd_stretch() == pytest.approx(5.0)
    m = wall_clock_model(gt, base)
    w, per_cpu = 2e6, 1 + 20 / 2e8 * 2e6  # 1.2: a preemption's 2 ms every 10 ms of CPU
    for u in ("pages_visited", "checksums", "memcmp_pages"):
        assert m.ns[u] == pytest.approx(base.ns[u] * per_cpu)
    assert m.ns["wakeups"] == pytest.approx(base.ns["wakeups"] * per_cpu) and m.wake_wait_ns == pytest.approx(w)
    assert m.ns["scan_starts"] == pytest.approx(base.ns["scan_starts"] * per_cpu + w)
    assert "2 ms per time slice" in m.name
    # the same run and wait without the time slices: stretched in proportion, x (0.2 + 0.8) / 0.2
    for k in ("timeslices", "nr_voluntary_switches", "nr_involuntary_switches"):
        del tr.manifest["validate"]["ksmd_sched_start"][k]
    p = wall_clock_model(load_ground_truth(tr), base)
    assert p.ns["wakeups"] == pytest.approx(5 * base.ns["wakeups"]) and p.ns["pages_visited"] == pytest.approx(5 * base.ns["pages_visited"])
    assert p.wake_wait_ns == 0


def test_already_running_warns(tmp_path):
    tr = _gt_trace(tmp_path / "t", runs=(1, 1, 1))
    gt = load_ground_truth(tr)
    assert gt.start_s == 0.0 and any("already running" in w for w in gt.warnings)


def test_fidelity_report_end_to_end(tmp_path):
    tr = _gt_trace(tmp_path / "t")
    rep = fidelity(tr, sim_step=0.02)
    names = [r["counter"] for r in rep.rows]
    assert names[:5] == ["pages_sharing", "pages_shared", "pages_unshared", "pages_volatile", "ksm_zero_pages"]
    assert "cow_ksm" in names and "ksmd_cpu_s" in names
    sh = rep.row("pages_sharing")
    assert sh["real_final"] == 70 and isinstance(sh["sim_final"], int)
    assert sh["t90_real"] is not None
    js = json.loads(json.dumps(rep.to_json()))
    assert js["params"]["pages_to_scan"] == 500 and js["counters"][0]["counter"] == "pages_sharing"
    assert "pages_sharing" in rep.text()
    # the simulated table is refined: more rows than snapshots, and one row per snapshot marked
    assert rep.sim.height > tr.n_snapshots
    assert rep.sim.filter(pl.col("snapshot") >= 0).height == tr.n_snapshots
    from ksmtrace.fidelity.plot import trajectories
    from ksmtrace.plot import save

    save(trajectories(rep), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    r = CliRunner().invoke(cli, ["fidelity", str(tmp_path / "t"), "--json", "--plot", str(tmp_path / "g.svg")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["counters"][0]["counter"] == "pages_sharing"


# --- refined replay ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixed", "random-3"])
def test_refined_replay_equals_plain_replay_at_snapshots(scenarios, name):
    tr = scenarios(name)
    params = {"pages_to_scan": 7, "sleep_millisecs": 3, "use_zero_pages": True}
    plain = replay(tr, "ksm", params, start_s=0.01)
    t_last = tr.times_ns[-1]
    rt = _RefinedTrace(tr, 7_000_000, [t + 3_000_000 for t in tr.times_ns] + [t_last + 20_000_000])
    fine = replay(rt, "ksm", params, start_s=0.01)
    assert fine.table.height > plain.table.height
    rows = fine.table[rt.index.tolist()]
    cols = ["t_s", "frames_saved", "oracle_saved", "candidate_pages", "cow_ksm", "pages_shared", "pages_sharing",
            "pages_unshared", "pages_volatile", "full_scans", "pages_scanned", "pages_skipped", "ksm_zero_pages"]
    for c in cols:
        assert rows[c].to_list() == plain.table[c].to_list(), c
    # the work done up to the last snapshot adds up to the same totals (the refined run goes on after it)
    upto = fine.table[: int(rt.index[-1]) + 1]
    for c in [c for c in plain.table.columns if c.startswith("u_")]:
        assert upto[c].sum() == plain.table[c].sum(), c
    assert fine.table["t_s"][-1] == pytest.approx((t_last + 20_000_000) / 1e9)


def test_refine_prepared_shapes(scenarios):
    prep = scenarios("mixed").prepare("recorded")
    ref, idx, grid = refine_prepared(prep, 10_000_000, [int(prep.times_ns[-1]) + 5_000_000])
    assert ref.n_snaps == len(ref.times_ns) == len(ref.off) - 1 == len(grid)
    assert grid[-1] == prep.times_ns[-1] + 5_000_000 and idx[-1] == len(grid) - 2
    assert (np.diff(ref.times_ns) > 0).all() and (ref.times_ns[idx] == prep.times_ns).all()
    assert sum(ref.off[i + 1] - ref.off[i] for i in idx) == prep.off[-1]
    assert (ref.base_frames[idx] == prep.base_frames).all()


# --- subsampling -----------------------------------------------------------------------------------------
def test_subsample_keeps_state_and_ground_truth(tmp_path, scenarios):
    src = make_trace(tmp_path / "src", [s for s in _dup_snaps(3)] + [{(0, 1): "x", (2, 5): "y"}] * 3 + _dup_snaps(3),
                     interval=0.1, ground_truth=[[_gt_row(1), _gt_row(1)] for _ in range(9)])
    for every in (1, 2, 3, 4):
        dst = subsample_trace(src, tmp_path / f"e{every}", every)
        dst.check()
        keep = list(range(0, src.n_snapshots, every))
        assert dst.n_snapshots == len(keep)
        for j, s in enumerate(keep):
            assert src.snapshot(s).equals(dst.snapshot(j)), (every, s)
            assert dst.snapshots[j]["t_ns"] == src.snapshots[s]["t_ns"]
        g = dst.read_table("ksm")
        assert g.height == 2 * (keep[-1] + 1)  # every sample up to the last kept snapshot
        assert dst.capture["subsampled"]["every"] == every
    mixed = scenarios("mixed")
    d = subsample_trace(mixed, tmp_path / "mixed4", 4)
    for j in range(d.n_snapshots):
        assert mixed.snapshot(4 * j).equals(d.snapshot(j))


def test_subsample_carries_soft_dirty(tmp_path):
    snaps = [{(0, 1): "a", (0, 2): "b"}, {(0, 1): {"c": "a", "soft_dirty": True}, (0, 2): "b"}, {(0, 1): "a", (0, 2): "b"}]
    src = make_trace(tmp_path / "sd", snaps, interval=0.1, capture={"soft_dirty": True})
    dst = subsample_trace(src, tmp_path / "sd2", 2)
    rows = dst.read_table("pages", [1])
    assert rows.height == 1 and rows["vpn"][0] == 1 and rows["op"][0] == S.OP_CHANGED
    assert rows["flags"][0] & S.F_SOFT_DIRTY


# --- the prepare rule for the real kernel's zero-page merges -----------------------------------------
def _zero_merge_trace(path, ground_truth):
    snaps = [{(0, 1): 0, (0, 2): 0, (0, 3): "u"},
             {(0, 1): {"c": 0, "zero_page": True}, (0, 2): 0, (0, 3): "u"},
             {(0, 1): {"c": 0, "zero_page": True}, (0, 2): {"c": 0, "zero_page": True}, (0, 3): "u"}]
    gt = [[_gt_row(1, use_zero_pages=1)] for _ in snaps] if ground_truth else None
    return make_trace(path, snaps, interval=0.1, ground_truth=gt)


def test_real_zero_page_merges_stay_candidates(tmp_path):
    with_gt = _zero_merge_trace(tmp_path / "a", True).prepare("recorded", cache=False)
    without = _zero_merge_trace(tmp_path / "b", False).prepare("recorded", cache=False)
    assert with_gt.base_pages.tolist() == [3, 3, 3]  # merged by the real kernel: still zero-filled candidates
    assert without.base_pages.tolist() == [3, 2, 1]  # otherwise: the pages went away (zero-page mapped)
    res = replay(_zero_merge_trace(tmp_path / "c", True), "ksm", {"use_zero_pages": True, "pages_to_scan": 10})
    assert res.table["ksm_zero_pages"][-1] == 2


# --- goals ------------------------------------------------------------------------------------------------
class _Rep:
    def __init__(self, rows, interval=0.25, period=0.1):
        self.rows = [dict(counter=k, **v) for k, v in rows.items()]
        self.interval_s = interval
        self.full_scan_period_s = period

    def row(self, name):
        for r in self.rows:
            if r["counter"] == name:
                return r
        raise KeyError(name)

    def value(self, name, key):
        return self.row(name).get(key)


def _rep(sharing=(1000, 1000), t90=(1.0, 1.05), scans=(40, 41), cow=(100, 103), cpu=(1.0, 1.1)):
    return _Rep({
        "pages_sharing": {"real_final": sharing[0], "sim_final": sharing[1], "t90_real": t90[0], "t90_sim": t90[1],
                          "real_mean": sharing[0] * 0.9, "sim_mean": sharing[1] * 0.9},
        "pages_shared": {"real_final": 64, "sim_final": 64},
        "ksm_zero_pages": {"real_final": 0, "sim_final": 0},
        "full_scans": {"real_final": scans[0], "sim_final": scans[1]},
        "cow_ksm": {"real_final": cow[0], "sim_final": cow[1]},
        "ksmd_cpu_s": {"real_final": cpu[0], "sim_final": cpu[1]},
    })


def test_goals_deterministic_pass_and_fail():
    ok = {g["goal"]: g["ok"] for g in evaluate_goals([_rep()], workload="rewrite", settings="fast", racy=False,
                                                     params={"period": 2.0})}
    assert all(ok.values()), ok
    bad = {g["goal"]: g["ok"] for g in evaluate_goals([_rep(sharing=(1000, 1020), t90=(1.0, 1.3), scans=(40, 43), cow=(100, 120),
                                                            cpu=(1.0, 1.5))],
                                                      workload="rewrite", settings="fast", racy=False, params={"period": 2.0})}
    assert not bad["final pages_sharing within 1%"] and bad["final pages_shared within 1%"]
    assert not bad["t90 of pages_sharing within one full-scan period"] and not bad["full_scans within ±1"]
    assert not bad["COW breaks within 5% of cow_ksm (interval < rewrite period)"] and not bad["ksmd CPU within 25%"]
    # the COW goal does not apply when the interval is not shorter than the rewrite period
    rows = evaluate_goals([_rep(cow=(100, 300))], workload="rewrite", settings="fast", racy=False, params={"period": 0.2})
    cow = [g for g in rows if g["goal"].startswith("COW")][0]
    assert cow["ok"] is None and "n/a" in cow["measured"]
    assert rewrite_period("zero", {"rezero_period": 4}) == 2.0 and rewrite_period("static", {}) is None


def test_goals_racy_spread():
    reps = [_rep(sharing=(1000, 1040)), _rep(sharing=(1100, 1060))]
    g = {x["goal"]: x["ok"] for x in evaluate_goals(reps, workload="churn", settings="fast", racy=True)}
    assert g["final pages_sharing within real spread + 10%"]
    reps = [_rep(sharing=(1000, 1300)), _rep(sharing=(1010, 1000))]
    g = {x["goal"]: x["ok"] for x in evaluate_goals(reps, workload="churn", settings="fast", racy=True)}
    assert not g["final pages_sharing within real spread + 10%"]
    one = evaluate_goals([_rep()], workload="vms", settings="fast", racy=True)
    assert one[0]["ok"] is None and "two real runs" in one[0]["measured"]


def test_interval_recommendation():
    rows = [dict(every=1, interval_s=0.1, sharing_real=100, sharing_sim=100, sharing_final_err=0.0, t90_err_scans=0.2,
                 cow_ratio=1.01, full_scan_period_s=0.3),
            dict(every=4, interval_s=0.4, sharing_real=100, sharing_sim=100, sharing_final_err=0.0, t90_err_scans=0.5,
                 cow_ratio=0.97, full_scan_period_s=0.3),
            dict(every=16, interval_s=1.6, sharing_real=100, sharing_sim=100, sharing_final_err=0.0, t90_err_scans=0.5,
                 cow_ratio=0.6, full_scan_period_s=0.3)]
    assert meets_goals(rows[0]) and meets_goals(rows[1]) and not meets_goals(rows[2])
    text = recommend(rows, rewrite_period=1.0)
    assert "at most every 0.4 s" in text and "0.4 x the rewrite period" in text and "COW breaks -40%" in text


# --- settings presets ------------------------------------------------------------------------------------
def test_settings_presets():
    assert resolve_settings("defaults") == SETTINGS["defaults"]
    assert SETTINGS["fast"]["pages_to_scan"] == 10 * SETTINGS["defaults"]["pages_to_scan"]
    assert {SETTINGS[k]["smart_scan"] for k in SETTINGS} == {0, 1}
    assert SETTINGS["zero"]["use_zero_pages"] == 1 and SETTINGS["chains"]["max_page_sharing"] < 256
    assert resolve_settings("fast", {"pages-to-scan": "77"})["pages_to_scan"] == 77
    with pytest.raises(KsmtraceError, match="unknown KSM setting"):
        resolve_settings("fast", {"bogus": 1})
    with pytest.raises(KsmtraceError, match="managed by validate"):
        resolve_settings("fast", {"run": 1})
    with pytest.raises(KsmtraceError, match="unknown settings"):
        resolve_settings("turbo")
    assert "pages_to_scan" not in resolve_settings("fast", {"advisor_mode": "scan-time"})


def test_validate_cli_rejects_bad_options_before_touching_ksm():
    r = CliRunner().invoke(cli, ["validate", "--settings", "turbo"])
    assert r.exit_code == 1 and "unknown settings" in r.output
    r = CliRunner().invoke(cli, ["validate", "-s", "run=1"])
    assert r.exit_code == 1 and "managed by validate" in r.output
    r = CliRunner().invoke(cli, ["validate", "--duration", "0"])
    assert r.exit_code == 1 and "--duration" in r.output


# --- event by event (ksm_events) ---------------------------------------------------------------------
def test_event_fidelity_from_the_tracepoints(tmp_path):
    """Counted by hand from the events below: sleep_millisecs=10 at HZ=250 (4 ms jiffies)."""
    events = [
        {"t": 0.105, "event": "ksm_start_scan", "seq": 0}, {"t": 0.130, "event": "ksm_stop_scan", "seq": 0},
        {"t": 0.1535, "event": "ksm_start_scan", "seq": 1}, {"t": 0.180, "event": "ksm_stop_scan", "seq": 1},
        {"t": 0.202, "event": "ksm_start_scan", "seq": 2},
        {"t": 0.120, "event": "ksm_merge_with_ksm_page", "rmap_item": 1, "err": 0, "ksm_page": True},
        {"t": 0.125, "event": "ksm_merge_with_ksm_page", "rmap_item": 2, "err": 0, "ksm_page": True},
        {"t": 0.250, "event": "ksm_merge_with_ksm_page", "rmap_item": 1, "err": 0, "ksm_page": True},  # again
        {"t": 0.260, "event": "ksm_merge_with_ksm_page", "rmap_item": 3, "err": 0, "ksm_page": False},  # stabilize
        {"t": 0.270, "event": "ksm_merge_with_ksm_page", "rmap_item": 4, "err": -14, "ksm_page": True},  # failed
    ]
    gt = [[_gt_row(r, full_scans=7)] for r in (0, 1, 1, 1, 1, 1, 1, 1)]
    tr = make_trace(tmp_path / "t", _dup_snaps(8), interval=0.1, ground_truth=gt, host={"kernel_release": "6.18.1"},
                    ksm_events=events)
    rep = fidelity(tr, sim_step=0.02)
    e = rep.events
    assert e["events"] == 10
    fs = e["full_scans"]
    assert fs["real"] == 2 and fs["real_end_s"] == pytest.approx([0.130, 0.180])
    # gaps 23.5 and 22 ms after the scans, minus the 10 ms sleep
    assert fs["lateness_real_ms"]["p50"] == pytest.approx(12.75) and fs["lateness_real_ms"]["max"] == pytest.approx(13.5)
    # the modelled sleep: 3 jiffies after the current one, firing at the next jiffy: from 130 ms
    # (jiffy 32) to 144 ms, from 180 ms (jiffy 45) to 196 ms: 4 and 6 ms late
    assert fs["lateness_model_ms"]["p50"] == pytest.approx(5.0) and fs["lateness_model_ms"]["max"] == pytest.approx(6.0)
    m = e["merges"]
    assert m["real"] == 3 and m["real_per_interval"] == [0, 2, 1, 0, 0, 0, 0]
    assert m["simulated"] == int(rep.result.table["merges"].sum()) == sum(m["sim_per_interval"])
    t = e["time_to_merge"]
    assert t["real_pages"] == 2 and t["real_s"]["max"] == pytest.approx(0.125 - rep.start_s)
    assert t["sim_pages"] == int((rep.result.first_merge_ns >= 0).sum()) > 0
    assert "ksm tracepoint hits" in rep.text() and "time to merge" in rep.text()
    js = json.loads(json.dumps(rep.to_json()))
    assert js["events"]["merges"]["real"] == 3 and "_arrays" not in js["events"]
    r = CliRunner().invoke(cli, ["fidelity", str(tmp_path / "t"), "--quiet", "--events-plot", str(tmp_path / "e.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_event_fidelity_needs_kernel_events(tmp_path):
    tr = _gt_trace(tmp_path / "t")
    assert fidelity(tr, sim_step=0.02).events is None
    r = CliRunner().invoke(cli, ["fidelity", str(tmp_path / "t"), "--quiet", "--events-plot", str(tmp_path / "e.png")])
    assert r.exit_code != 0 and r.output.strip().startswith("ksmtrace: error:") and "kernel events" in r.output
