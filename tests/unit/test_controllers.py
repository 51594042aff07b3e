"""Controllers (ksmtrace.controllers): each one's rule on hand-built traces against numbers worked out
here from its source's rules, and the run-time parameter changes on the ksm policy (the kernel's
sysfs semantics: a sleep_millisecs write wakes a sleeping ksmd, pages_to_scan is refused while the
advisor owns it, run=0 stops scanning and keeps what is merged)."""
from __future__ import annotations

import numpy as np
import pytest

from ksmtrace.controllers import ControlState, get_controller, parse_controller, parse_memory_size
from ksmtrace.controllers.kubevirt import KubeVirt
from ksmtrace.controllers.ksmtuned import Ksmtuned
from ksmtrace.engine.clock import next_wake
from ksmtrace.engine.cost import CostModel
from ksmtrace.errors import KsmtraceError, PolicyParamError
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KSMTRACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "prep-cache"))


def state(**kw) -> ControlState:
    base = dict(t_s=0.0, snap=0, host_kib=0, rss_kib=0, used_kib=0, free_kib=0, saved_kib=0, running=True,
                params={"pages_to_scan": 100, "sleep_millisecs": 20}, counters={"pages_to_scan": 100})
    base.update(kw)
    return ControlState(**base)


# --- ksmtuned: the script's rules -----------------------------------------------------------------
def test_ksmtuned_sleep_and_threshold_follow_the_script():
    k = Ksmtuned()
    # sleep=$[KSM_SLEEP_MSEC * 16 * 1024 * 1024 / total], at least 10
    assert k.sleep_ms(16 * 1024 * 1024) == 10  # 16 GiB: the baseline
    assert k.sleep_ms(1024 * 1024) == 160  # 1 GiB sleeps 16x longer
    assert k.sleep_ms(3 * 1024 * 1024) == 53  # integer division: 167772160 / 3145728 = 53.3
    assert k.sleep_ms(64 * 1024 * 1024) == 10  # 2.5 -> at least 10
    # thres=$[total * KSM_THRES_COEF / 100], at least KSM_THRES_CONST (2048 KiB)
    assert k.thres_kib(1024 * 1024) == 209715
    assert k.thres_kib(8192) == 2048
    assert Ksmtuned({"thres_coef": 50}).thres_kib(1000) == 2048 and Ksmtuned({"thres_coef": 50}).thres_kib(10000) == 5000


def test_ksmtuned_adjust_stops_boosts_and_decays():
    total = 1024 * 1024  # 1 GiB: thres 209715
    k = Ksmtuned()
    # committed + thres < total and free > thres: stop
    assert k.step(state(host_kib=total, rss_kib=500_000, free_kib=600_000)) == {"run": 0}
    assert k.npages == 0
    # committed + thres >= total: start; free < thres: boost from npages=0 -> 300
    assert k.step(state(host_kib=total, rss_kib=900_000, free_kib=150_000)) == {"pages_to_scan": 300, "sleep_millisecs": 160, "run": 1}
    assert k.step(state(host_kib=total, rss_kib=900_000, free_kib=150_000))["pages_to_scan"] == 600
    # free >= thres (but committed high): decay by 50
    assert k.step(state(host_kib=total, rss_kib=900_000, free_kib=209715))["pages_to_scan"] == 550
    for _ in range(5):
        k.step(state(host_kib=total, rss_kib=900_000, free_kib=10))
    assert k.npages == 1250  # KSM_NPAGES_MAX
    for _ in range(40):
        k.step(state(host_kib=total, rss_kib=900_000, free_kib=900_000))
    assert k.npages == 64  # KSM_NPAGES_MIN
    # the first decay from npages=0 is clamped up to the minimum
    assert Ksmtuned().step(state(host_kib=total, rss_kib=900_000, free_kib=300_000))["pages_to_scan"] == 64


def test_ksmtuned_ticks_every_interval_after_sleeping_first():
    assert Ksmtuned({"monitor_interval": 60}).ticks(200) == [60, 120, 180]
    assert Ksmtuned({"monitor_interval": 60}).ticks(59) == []
    assert Ksmtuned().initial_run() and not Ksmtuned({"ksm_service": 0}).initial_run()


# --- KubeVirt: calculateNewRunSleepAndPages ---------------------------------------------------------
def test_kubevirt_rule_follows_the_handler():
    kv = KubeVirt()
    total = 16 * 1024 * 1024  # 16 GiB
    # sleep = 100 * 16 GiB / (total - available), at least 10
    assert kv.sleep_ms(total, 0) == 100
    assert kv.sleep_ms(total, total - 1024 * 1024) == 1600  # 1 GiB in use
    assert kv.sleep_ms(total, total // 2 - 1) == 199  # 200 * 8 GiB / (8 GiB + 1 KiB), rounded down
    assert kv.sleep_ms(total * 100, 0) == 10  # floor: sleepMsBaseline / 10
    # pressure: not float32(available) > float32(total) * 0.2
    assert kv.pressure(total, total // 5) and not kv.pressure(total, total // 5 + 1)
    # not running, no pressure: stays off
    assert kv.step(state(host_kib=total, free_kib=total // 2, running=False)) == {"run": 0}
    # not running, pressure: start with nPagesInit
    assert kv.step(state(host_kib=total, free_kib=1024, running=False)) == {
        "sleep_millisecs": 100 * 16 * 1024 * 1024 // (total - 1024), "pages_to_scan": 100, "run": 1}
    # running, pressure: boost from the kernel's pages_to_scan, at most nPagesMax
    assert kv.step(state(host_kib=total, free_kib=1024, counters={"pages_to_scan": 400}))["pages_to_scan"] == 700
    assert kv.step(state(host_kib=total, free_kib=1024, counters={"pages_to_scan": 1200}))["pages_to_scan"] == 1250
    # running, no pressure: decay; below nPagesMin it stops (only run is written)
    assert kv.step(state(host_kib=total, free_kib=total // 2, counters={"pages_to_scan": 400}))["pages_to_scan"] == 350
    assert kv.step(state(host_kib=total, free_kib=total // 2, counters={"pages_to_scan": 100})) == {"run": 0}


def test_kubevirt_spins_twice_at_start_then_every_3_minutes():
    assert KubeVirt().ticks(400) == [0.0, 0.0, 180.0, 360.0]
    assert not KubeVirt().initial_run()


# --- parsing -----------------------------------------------------------------------------------------
def test_parse_controller_and_memory_size():
    c = parse_controller("ksmtuned:monitor_interval=5,npages-boost=100")
    assert c.p.monitor_interval == 5.0 and c.p.npages_boost == 100
    assert get_controller("scan-time").needs_host_memory is False
    with pytest.raises(KsmtraceError, match="unknown controller"):
        parse_controller("ksmtune")
    with pytest.raises(PolicyParamError, match="unknown parameter"):
        parse_controller("ksmtuned:intervall=5")
    with pytest.raises(PolicyParamError, match="npages_min"):
        parse_controller("kubevirt:npages_min=500,npages_max=100")
    assert parse_memory_size("16G") == 16 * 1024 * 1024
    assert parse_memory_size("16GiB") == parse_memory_size("16g") == parse_memory_size(16 * 2**30)
    assert parse_memory_size("512M") == 512 * 1024 and parse_memory_size("0.5G") == 512 * 1024
    for bad in ("lots", "16X", "0G", "-1G"):
        with pytest.raises(KsmtraceError, match="memory size"):
            parse_memory_size(bad)


# --- replays with a controller ----------------------------------------------------------------------
def dup_trace(path, n_snaps=6, interval=1.0, pages=40):
    """Two processes with the same 40 pages (one of them all zero) that never change."""
    snap = {}
    for p in (0, 1):
        for v in range(pages):
            snap[(p, v)] = 0 if v == 0 else f"c{v}"
    return make_trace(path, [snap] * n_snaps, interval=interval)


def test_ksmtuned_replay_on_a_hand_trace(tmp_path):
    # 80 pages of RSS = 320 KiB.  Host 400 KiB: thres = max(80, 2048) = 2048, committed + thres > total
    # -> ksmtuned starts ksm; free (80 KiB at first) < thres -> boost: npages 0+7 = 7, then 14, 21, ...
    # sleep = 10 * 16 GiB / 400 KiB -> 419430 ms (it never wakes again after its first batch... unless
    # written); so give KSM_SLEEP_MSEC=0: sleep 0 -> at least 10 ms.
    tr = dup_trace(tmp_path / "t")
    res = replay(tr, "ksm", {"pages_to_scan": 1, "sleep_millisecs": 1000},
                 controller="ksmtuned:monitor_interval=1,sleep_msec=0,npages_boost=7,npages_min=1", host_memory="400K")
    t = res.table
    assert t["run"].to_list() == [1] * 6
    assert t["pages_to_scan"].to_list() == [1, 7, 14, 21, 28, 35]
    assert t["sleep_millisecs"].to_list() == [1000, 10, 10, 10, 10, 10]
    log = res.extras["controller"]["log"]
    assert [e["t_s"] for e in log] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert log[0]["writes"] == {"pages_to_scan": 7, "sleep_millisecs": 10, "run": 1}
    # free memory = host - (RSS - saved): rises as pages merge
    assert t["mem_used_kib"][0] == 320 and t["mem_free_kib"][0] == 80
    assert (t["mem_free_kib"] + t["mem_used_kib"] == 400).all()
    assert (t["mem_used_kib"] == 320 - 4 * t["frames_saved"]).all()
    # a big host: no pressure at all, ksmtuned stops ksm at its first adjustment and merges nothing more
    big = replay(tr, "ksm", {"pages_to_scan": 2}, controller="ksmtuned:monitor_interval=1", host_memory="1G")
    assert big.table["run"].to_list() == [1, 0, 0, 0, 0, 0]
    assert big.table["frames_saved"][1:].n_unique() == 1  # run=0 keeps what was merged
    assert big.table["u_wakeups"][2:].sum() == 0 and big.table["daemon_busy_s"][2:].sum() == 0


def test_kubevirt_replay_starts_ksm_under_pressure_and_stops_it_without(tmp_path):
    snap = {(p, v): (0 if v == 0 else f"c{v}") for p in (0, 1) for v in range(40)}
    alone = {k: v for k, v in snap.items() if k[0] == 0}
    tr = make_trace(tmp_path / "t", [snap] * 3 + [alone] * 3, interval=1.0)  # process 1 exits at 3 s
    # 320 KiB in use on a 330 KiB host: pressure.  Spin 1 starts KSM with nPagesInit=100, spin 2 (the
    # loop's first) boosts the kernel's 100 to 400; the sleep is 100 ms * 16 GiB / 320 KiB
    res = replay(tr, "ksm", controller="kubevirt:interval=2", host_memory="330K")
    t = res.table
    log = res.extras["controller"]["log"]
    assert [e["t_s"] for e in log] == [0.0, 0.0, 2.0, 4.0]
    assert log[0]["writes"] == {"sleep_millisecs": 100 * 16 * 1024 * 1024 // 320, "pages_to_scan": 100, "run": 1}
    assert log[1]["writes"]["pages_to_scan"] == 400
    assert t["run"][0] == 1 and t["pages_to_scan"][0] == 400
    # 2 s: still under pressure (ksmd's one batch at 0 s merged nothing: pages need two visits) -> 700;
    # 4 s: process 1 has exited, 160 KiB in use, 170 free > 66: no pressure -> decay to 650
    assert log[2]["writes"]["pages_to_scan"] == 700 and log[3]["writes"]["pages_to_scan"] == 650
    assert log[3]["writes"]["sleep_millisecs"] == 100 * 16 * 1024 * 1024 // 160
    assert t["pages_to_scan"].to_list() == [400, 400, 700, 700, 650, 650]
    # nPagesMin 660, nPagesMax 700: 660, 700 (capped), 700, then 650 < 660 at 4 s: KSM stops (only run is written)
    res = replay(tr, "ksm", controller="kubevirt:interval=2,npages_min=660,npages_init=660,npages_max=700",
                 host_memory="330K")
    assert res.extras["controller"]["log"][3]["writes"] == {"run": 0}
    assert res.table["run"].to_list() == [1, 1, 1, 1, 0, 0]
    # on a big host KSM is never started
    idle = replay(tr, "ksm", controller="kubevirt", host_memory="16G")
    assert idle.table["run"].to_list() == [0] * 6 and idle.table["frames_saved"].sum() == 0
    assert idle.summary["cpu_seconds"] == 0


def test_scan_time_controller_is_the_advisor_setting(tmp_path):
    tr = dup_trace(tmp_path / "t")
    a = replay(tr, "ksm", controller="scan-time:min_pages_to_scan=3")
    b = replay(tr, "ksm", {"advisor_mode": "scan-time", "advisor_min_pages_to_scan": 3})
    assert a.table.select(b.table.columns).equals(b.table)
    assert a.spec["params"]["advisor_mode"] == "scan-time"
    with pytest.raises(KsmtraceError, match="sets advisor_mode itself"):
        replay(tr, "ksm", {"advisor_mode": "none"}, controller="scan-time")


def test_a_controller_that_changes_nothing_leaves_the_run_as_it_was(tmp_path):
    """Splitting the daemon's work at the controller's ticks, and writes of the values already in
    force (no wake-up for an unchanged sleep_millisecs), change nothing."""
    tr = dup_trace(tmp_path / "t", n_snaps=8, interval=0.05)
    params = {"pages_to_scan": 3, "sleep_millisecs": 7}
    static = replay(tr, "ksm", params)
    from tests.differential.test_controls import Scripted

    script = ";".join(f"{t / 1000:g}:pages_to_scan=3/sleep_millisecs=7/run=1" for t in range(1, 380, 13))
    ctl = replay(tr, "ksm", params, controller=Scripted({"script": script}))
    assert ctl.table.select(static.table.columns).equals(static.table)
    assert static.run_id != ctl.run_id


def test_a_sleep_write_wakes_a_sleeping_ksmd_but_not_a_busy_one(tmp_path):
    from tests.differential.test_controls import Scripted

    tr = dup_trace(tmp_path / "t", n_snaps=3, interval=0.2, pages=400)
    hz = 250
    params = {"pages_to_scan": 2, "sleep_millisecs": 5000}
    # sleeping at 0.1 s: the write wakes ksmd at once; then it sleeps 10 ms after each batch
    woken = replay(tr, "ksm", params, controller=Scripted({"script": "0.1:sleep_millisecs=10"}))
    static = replay(tr, "ksm", params)
    assert static.table["u_wakeups"].to_list() == [0, 1, 0]  # at 0; the next would be after 5 s
    batch_ns = woken.table["daemon_busy_s"][1] * 1e9 / woken.table["u_wakeups"][1]
    t, wakes = int(0.1e9), 0
    while t < int(0.2e9):
        wakes += 1
        t = next_wake(t + int(round(batch_ns)), 10, hz)
    assert woken.table["u_wakeups"][1] == 1 + wakes
    # busy at the write (a batch of 2 visits at 10 ms each is running from 0 to 20 ms): ksmd sleeps
    # the new value after the batch, as if it had been set from the start
    slow = CostModel(ns={"pages_visited": 10_000_000})
    during = replay(tr, "ksm", params, timing_cost=slow, controller=Scripted({"script": "0.005:sleep_millisecs=10"}))
    from_start = replay(tr, "ksm", {**params, "sleep_millisecs": 10}, timing_cost=slow)
    assert during.table.select(from_start.table.columns).equals(from_start.table)


def test_pages_to_scan_is_refused_while_the_advisor_owns_it(tmp_path):
    from tests.differential.test_controls import Scripted

    tr = dup_trace(tmp_path / "t")
    res = replay(tr, "ksm", {"advisor_mode": "scan-time"}, controller=Scripted({"script": "1:pages_to_scan=7/sleep_millisecs=3"}))
    entry = res.extras["controller"]["log"][0]
    assert "pages_to_scan" in entry["refused"] and "EINVAL" in entry["refused"]["pages_to_scan"]
    assert res.table["sleep_millisecs"][1] == 3  # the rest of the write went through
    assert 7 not in res.table["pages_to_scan"].to_list()


def test_controller_errors_are_one_clear_message(tmp_path):
    from tests.differential.test_controls import Scripted

    tr = dup_trace(tmp_path / "t")
    with pytest.raises(KsmtraceError, match="needs the host's memory size"):
        replay(tr, "ksm", controller="ksmtuned")
    with pytest.raises(KsmtraceError, match="not of 'pksm'"):
        replay(tr, "pksm", controller="kubevirt", host_memory="1G")
    with pytest.raises(PolicyParamError, match="cannot change during a run"):
        replay(tr, "ksm", controller=Scripted({"script": "1:max_page_sharing=3"}))
    with pytest.raises(PolicyParamError, match="must be >= 1"):
        replay(tr, "ksm", controller=Scripted({"script": "1:pages_to_scan=0"}))


def test_run_ids_and_specs_record_the_controller(tmp_path):
    tr = dup_trace(tmp_path / "t")
    a = replay(tr, "ksm", controller="ksmtuned", host_memory="1G")
    b = replay(tr, "ksm", controller="ksmtuned", host_memory="2G")
    c = replay(tr, "ksm", controller="ksmtuned:npages_boost=100", host_memory="1G")
    plain = replay(tr, "ksm")
    assert len({a.run_id, b.run_id, c.run_id, plain.run_id}) == 4
    assert a.spec["controller"] == {"name": "ksmtuned", "params": a.spec["controller"]["params"]}
    assert a.spec["host_kib"] == 1024 * 1024
    assert "controller" not in plain.spec and "controller" not in plain.spec["options"]
    assert np.array_equal(plain.table["frames_saved"].to_numpy(), replay(tr, "ksm").table["frames_saved"].to_numpy())


# --- the comparison and its figure --------------------------------------------------------------------
def test_compare_controllers_and_figure(tmp_path):
    from matplotlib.colors import to_hex

    from ksmtrace import plot
    from ksmtrace.analysis.controllers import compare_controllers
    from ksmtrace.plot import palette
    from ksmtrace.testing.figures import layout_problems

    tr = dup_trace(tmp_path / "t", n_snaps=8, interval=0.5, pages=60)
    grid = {"pages_to_scan": [4, 16, 64], "sleep_millisecs": [10, 100]}
    cc = compare_controllers(tr, ["ksmtuned:monitor_interval=1,sleep_msec=0", "kubevirt:interval=1", "scan-time"], "2G",
                             tmp_path / "out", grid=grid)
    assert [r["name"] for r in cc.rows] == ["ksmtuned", "kubevirt", "scan-time"]
    runs = cc.frontier.policy_runs("ksm")
    assert runs.height == 6
    for r in cc.rows:
        res = cc.results[r["controller"]]
        assert r["run_id"] == res.run_id and r["cow_breaks"] == res.summary["cow_breaks"]
        # the static settings quoted are the best within the CPU / the cheapest for the saving, by brute force
        within = [x for x in runs.to_dicts() if x["cpu_pct"] <= r["cpu_pct"] * (1 + 1e-9)]
        if within:
            assert r["static_at_cpu_pct_of_oracle"] == max(x["pct_of_oracle"] for x in within)
        else:
            assert r["static_at_cpu_settings"] is None
        enough = [x for x in runs.to_dicts() if x["pct_of_oracle"] >= r["pct_of_oracle"] * (1 - 1e-9)]
        if enough:
            assert r["static_for_saving_cpu_pct"] == min(x["cpu_pct"] for x in enough)
    # on a 2 GiB host with 480 KiB in use, KubeVirt never starts KSM and ksmtuned stops it at 1 s
    kv = cc.rows[1]
    assert kv["pct_of_oracle"] == 0 and kv["cpu_pct"] == 0 and kv["running_pct"] == 0
    assert cc.rows[0]["running_pct"] == pytest.approx(100 * 2 / 8)
    text = cc.text()
    assert "best static within its CPU" in text and "nan" not in text and "None" not in text
    fig = plot.controllers(cc)
    assert layout_problems(fig) == []
    ax = fig.axes[0]
    for r in cc.rows:
        pts = [c for c in ax.collections if c.get_gid() == f"controller:{r['controller']}"]
        assert len(pts) == 1
        st = palette.controller_style(r["name"])
        assert to_hex(pts[0].get_facecolor()[0]) == st.color
    lines = {ln.get_gid(): ln for a in fig.axes for ln in a.get_lines()}
    stopped = lines["pages:kubevirt:interval=1"].get_ydata()
    assert np.isnan(np.asarray(stopped, float)).all()  # a gap while ksmd is stopped
    assert len([g for g in lines if g and g.startswith("static:")]) == len({r["static_at_cpu_run_id"] for r in cc.rows
                                                                           if r["static_at_cpu_run_id"]})
