"""The engine's ground truth, the trace preparation and the reference == fast equivalence."""
import numpy as np
import pytest

from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.trace.prepared import EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE

ENGINES = ["reference", "fast"]


def test_baselines_count_frames_not_hashes(tmp_path):
    snap = {
        (0, 0): {"c": "a", "frame": "F"},  # fork-shared: one frame for two pages
        (1, 0): {"c": "a", "frame": "F"},
        (0, 1): "a",  # a third copy in its own frame
        (0, 2): 0,  # two zero-filled private pages
        (0, 3): 0,
        (0, 4): {"c": 0, "zero_page": True},  # maps the kernel zero page: no frame, never scanned
        (0, 5): "u",
    }
    tr = make_trace(tmp_path / "t", [snap])
    p = tr.prepare("recorded", cache=False)
    assert p.base_pages[0] == 6  # the zero-page mapping is not a candidate
    assert p.base_frames[0] == 5  # F, a, 0, 0, u
    assert p.oracle_frames[0] == 2  # a, u (zero pages map the zero page)
    assert p.oracle_saved[0] == 3
    assert p.zero_filled[0] == 2
    assert p.zero_page_mapped[0] == 1
    # naive: 7 present pages, 3 distinct hashes (a, zero, u)
    assert p.hash_dup_pages[0] == 4


def test_event_classification(tmp_path):
    s0 = {(0, 0): "a", (0, 1): "b", (0, 2): "c", (0, 3): "d", (0, 4): {"c": "e", "thp": "T"}, (0, 5): {"c": "k", "ksm": True}}
    s1 = {
        (0, 0): "a",  # unchanged: no event
        (0, 1): "B",  # written
        (0, 3): {"c": "d", "mergeable": False},  # still mapped, no longer mergeable: unmerge
        (0, 4): "e",  # THP split by someone else: membership only
        (0, 5): "k",  # stopped being a real-kernel KSM page with the same content: a write
        (0, 6): "n",  # new
    }  # (0, 2) gone
    tr = make_trace(tmp_path / "t", [s0, s1])
    p = tr.prepare("recorded", cache=False)
    sl = p.events(1)
    got = {int(pg): int(k) for pg, k in zip(p.ev_pg[sl], p.ev_kind[sl])}
    vpn = {int(v): i for i, v in enumerate(p.page_vpn)}
    assert got == {vpn[1]: EV_WRITE, vpn[2]: EV_GONE, vpn[3]: EV_UNMERGE, vpn[4]: EV_THP, vpn[5]: EV_WRITE, vpn[6]: EV_APPEAR}
    # under scope anon the non-mergeable page stays a candidate: no unmerge event
    pa = tr.prepare("anon", cache=False)
    sla = pa.events(1)
    assert vpn[3] not in set(pa.ev_pg[sla].tolist())


def test_real_ksm_pages_are_not_grouped_as_one_frame(tmp_path):
    """Pages the real kernel had merged share a PFN, but the replay simulates merging itself."""
    snap = {(0, v): {"c": "a", "ksm": True, "frame": "K"} for v in range(4)}
    tr = make_trace(tmp_path / "t", [snap])
    p = tr.prepare("recorded", cache=False)
    assert p.base_frames[0] == 4 and p.oracle_saved[0] == 3


def _gap_trace(path, gap_page, after, run=1):
    """Snapshot 1 lacks page (0, 1): the capture dropped it while the real KSM remapped it (its
    frame freed between the pagemap and the kpageflags reads); at snapshot 2 it shows ``after``."""
    base = {(0, 0): "a", (0, 1): gap_page, (0, 2): "a", (0, 3): 0}
    s1 = {k: v for k, v in base.items() if k != (0, 1)}
    s2 = {**base, (0, 1): after}
    gt = [[{"run": run, "use_zero_pages": 1}]] * 4
    return make_trace(path, [base, s1, s2, s2], ground_truth=gt, host={"kernel_release": "6.18.1"})


def test_pages_the_capture_dropped_while_ksm_remapped_them_are_kept(tmp_path):
    """A page absent for one snapshot between a present row and a row that shows the real KSM's
    remap (a KSM page of the same content, or the zero page after a zero-filled page) was there
    all along: no GONE/APPEAR events, the baseline counts it, and the replay's use_zero_pages
    merges it as the kernel did (the ksm_zero_pages deficit of `validate --workload zero`)."""
    zero = _gap_trace(tmp_path / "z", 0, {"c": 0, "zero_page": True})
    p = zero.prepare("recorded", cache=False)
    assert p.base_pages.tolist() == [4, 4, 4, 4]
    pg1 = int(np.flatnonzero(p.page_vpn == 1)[0])
    assert pg1 not in p.ev_pg[p.off[1]:].tolist()  # no event after snapshot 0
    r = replay(zero, "ksm", {"use_zero_pages": 1, "pages_to_scan": 100, "sleep_millisecs": 10}, hz=0)
    assert r.table["ksm_zero_pages"][-1] == 2
    ksm = _gap_trace(tmp_path / "k", "a", {"c": "a", "ksm": True})
    assert ksm.prepare("recorded", cache=False).base_pages.tolist() == [4, 4, 4, 4]
    # without the real KSM running, or when it reappears as something else, the page really went
    assert _gap_trace(tmp_path / "n", 0, {"c": 0, "zero_page": True}, run=0).prepare("recorded", cache=False).base_pages.tolist() == [4, 3, 3, 3]
    assert _gap_trace(tmp_path / "o", "a", "b").prepare("recorded", cache=False).base_pages.tolist() == [4, 3, 4, 4]


@pytest.mark.parametrize("engine", ENGINES)
def test_oracle_reaches_the_bound_exactly(scenarios, engine):
    for scen in ("mixed", "random-5", "random-6"):
        o = replay(scenarios(scen), "oracle", engine=engine)
        assert (o.table["frames_saved"] == o.table["oracle_saved"]).all()
        assert o.summary["merge_latency_p50_s"] == 0.0


@pytest.mark.parametrize("engine", ENGINES)
def test_cow_breaks_and_exposed_merges(tmp_path, engine):
    s0 = {(0, 0): "a", (1, 0): "a", (2, 0): "a"}
    s1 = {(0, 0): "a", (1, 0): "x", (2, 0): "a"}
    tr = make_trace(tmp_path / "t", [s0, s1], procs={2: {"cgroup": "/vm2"}})
    o = replay(tr, "oracle", engine=engine)
    assert o.table["cow_breaks"].to_list() == [0, 1]
    assert o.table["merges"].to_list() == [2, 0]
    assert o.table["exposed_merges"].to_list() == [1, 0]  # proc 2 is in another cgroup


@pytest.mark.parametrize("engine", ENGINES)
def test_writes_to_zero_mapped_pages_are_cow_zero_not_cow_ksm(tmp_path, engine):
    """The oracle maps zero pages to the zero page and merges the rest: a write to a zero-mapped
    page is counted in cow_zero, a write to a KSM page in cow_breaks/cow_ksm, an unmerge alike."""
    s0 = {(0, 0): 0, (0, 1): 0, (0, 2): "a", (1, 2): "a", (1, 3): 0}
    s1 = {(0, 0): "x", (0, 1): 0, (0, 2): "y", (1, 2): "a", (1, 3): {"c": 0, "mergeable": False}}
    tr = make_trace(tmp_path / "t", [s0, s1])
    o = replay(tr, "oracle", engine=engine)
    assert o.table["cow_breaks"].to_list() == [0, 1]
    assert o.table["cow_ksm"].to_list() == [0, 1]
    assert o.table["cow_zero"].to_list() == [0, 2]  # (0, 0) written, (1, 3) unmerged
    assert o.summary["cow_zero"] == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_thp_split_maps_zero_subpages_to_the_zero_page_on_612(tmp_path, engine):
    """KSM splits a THP before merging a subpage; since 6.12 the split maps the huge page's
    all-zero subpages to the shared zero page: memory saved that no KSM counter reports."""
    huge = {(0, v): {"c": (0 if v >= 4 else "t"), "thp": "H"} for v in range(16)}
    other = {(1, 0): "t"}
    snaps = [{**huge, **other}] * 4
    tr = make_trace(tmp_path / "t", snaps, interval=0.05)
    r612 = replay(tr, "ksm", {"profile": "6.12"}, engine=engine)
    r611 = replay(tr, "ksm", {"profile": "6.11"}, engine=engine)
    last612, last611 = r612.table.row(3, named=True), r611.table.row(3, named=True)
    assert last612["thp_zero_remapped"] == 12 and last611["thp_zero_remapped"] == 0
    assert last612["ksm_zero_pages"] == 0
    # 6.11 merges the twelve zero subpages into one KSM page (11 frames) and the 't' pages (4)
    assert last611["frames_saved"] == 11 + 4
    # 6.12: the split freed all twelve zero subpages; the 't' pages merge as before
    assert last612["frames_saved"] == 12 + 4
    assert last612["pages_sharing"] == 4 and last611["pages_sharing"] == 11 + 4

# reference == fast on generated traces, for every policy: tests/differential/test_runtimes.py


def test_wake_wait_is_an_exponential_wait_of_the_given_mean():
    """A busy host's wake-up wait (engine.clock.wake_wait): deterministic, 0 without a mean, and
    over any run of wake-ups the mean and spread of an exponential distribution."""
    from ksmtrace.engine.clock import wake_wait

    assert wake_wait(5, 0) == 0
    w = np.array([wake_wait(k, 3e6) for k in range(2000)], dtype=float)
    assert w.min() >= 0 and np.array_equal(w, [wake_wait(k, 3e6) for k in range(2000)])
    for part in (w[:200], w[1000:1400], w):
        assert part.mean() == pytest.approx(3e6, rel=0.05)
        assert np.median(part) == pytest.approx(3e6 * np.log(2), rel=0.05)  # the exponential's median
    assert (w > 4e6).mean() == pytest.approx(np.exp(-4 / 3), abs=0.01)  # a jiffy at HZ=250 and beyond


def test_a_busy_clock_slows_the_daemon_by_its_wake_up_waits(tmp_path):
    """The same trace replayed with a 3 ms wake-up wait (a jiffy is 4 ms): fewer wake-ups in the
    same time, and the same merges in the end."""
    import dataclasses

    from ksmtrace.engine.cost import default_cost_model
    from ksmtrace.replay import replay
    from ksmtrace.testing import make_trace

    snaps = [{(0, i): f"c{i % 7}" for i in range(64)} | {(1, i): f"c{i % 7}" for i in range(64)}] * 40
    tr = make_trace(tmp_path / "t", snaps, interval=0.05)
    p = {"pages_to_scan": 16, "sleep_millisecs": 20}
    idle = replay(tr, "ksm", p, hz=250)
    busy = replay(tr, "ksm", p, hz=250, timing_cost=dataclasses.replace(default_cost_model(), wake_wait_ns=3e6))
    n_idle, n_busy = int(idle.table["u_wakeups"].sum()), int(busy.table["u_wakeups"].sum())
    assert 0.75 * n_idle < n_busy < 0.95 * n_idle
    assert busy.table["pages_sharing"][-1] == idle.table["pages_sharing"][-1] > 0
