"""The ksm policy, rule by rule, on tiny hand-built traces with the kernel's expected numbers.

Every test runs both engines (reference and fast) and expects the same numbers from each.  The
daemon's clock is made exact: a zero-cost timing model and hz=0, so ksmd wakes precisely every
``sleep_millisecs``; snapshots (identical unless the test changes a page) are placed between
wake-ups to read the counters at chosen moments.
"""
import pytest

from ksmtrace.engine.cost import DEFAULT_NS, CostModel
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace

ZERO = CostModel(ns={u: 0.0 for u in DEFAULT_NS}, name="zero")
ENGINES = ["reference", "fast"]


def run(tmp_path, snaps, params, times, engine, cost=ZERO, name="t", procs=None, vmas=None):
    tr = make_trace(tmp_path / name, snaps, times=times, procs=procs, vmas=vmas)
    return replay(tr, "ksm", params, engine=engine, timing_cost=cost, hz=0)


def col(res, name):
    return res.table[name].to_list()


@pytest.mark.parametrize("engine", ENGINES)
def test_identical_pages_merge_in_second_full_scan_611(tmp_path, engine):
    """6.11: two identical never-written pages merge in the second full scan, not the first.

    4 pages, pages_to_scan=4: wake 0 (t=0) visits all 4 (first visits: volatile); wake 1 (10 ms)
    finds the end of the list: full_scans=1 and the rest of the budget is lost; wake 2 (20 ms)
    starts scan 2 and merges.  Snapshots at 0, 5, 15, 25 ms read the counters in between.
    """
    page = {(0, 0): "a", (0, 1): "b", (0, 2): "a", (0, 3): "c"}
    res = run(tmp_path, [page] * 4, {"pages_to_scan": 4, "sleep_millisecs": 10}, [0, 0.005, 0.015, 0.025], engine)
    assert col(res, "full_scans") == [0, 0, 1, 1]
    assert col(res, "pages_scanned") == [0, 4, 4, 8]  # wake 1 scanned nothing: budget lost
    assert col(res, "pages_sharing") == [0, 0, 0, 1]
    assert col(res, "pages_shared") == [0, 0, 0, 1]
    assert col(res, "frames_saved") == [0, 0, 0, 1]
    assert col(res, "pages_volatile") == [0, 4, 4, 0]
    # 'b' and 'c' sit in the unstable tree after scan 2
    assert col(res, "pages_unshared") == [0, 0, 0, 2]


@pytest.mark.parametrize("engine", ENGINES)
def test_first_visit_merge_610_but_not_611(tmp_path, engine):
    """A new page equal to an existing KSM page merges on its first visit under 6.10 (stable
    search before the checksum), but needs a second, unchanged visit under 6.11."""
    base = {(0, 0): "a", (0, 1): "a"}
    later = dict(base)
    later[(1, 0)] = "a"
    snaps = [base, base, later, later, later]
    times = [0, 0.025, 0.035, 0.045, 0.055]
    p = {"pages_to_scan": 10, "sleep_millisecs": 10}
    r610 = run(tmp_path, snaps, {**p, "profile": "6.10"}, times, engine, name="a")
    r611 = run(tmp_path, snaps, {**p, "profile": "6.11"}, times, engine, name="b")
    # by 25 ms both have merged the first pair (scans at 0 and 10 ms)
    assert col(r610, "pages_sharing")[1] == 1 and col(r611, "pages_sharing")[1] == 1
    # the new page appears at 35 ms; its mm is inserted behind the cursor (at the tail, the
    # cursor being at the list head between scans) and first visited by the 40 ms scan
    assert col(r610, "pages_sharing")[3] == 2  # 6.10: merged at its first visit (40 ms)
    assert col(r611, "pages_sharing")[3] == 1  # 6.11: first visit only records the checksum
    assert col(r611, "pages_sharing")[4] == 2  # ... and merges at the second (50 ms)


@pytest.mark.parametrize("engine", ENGINES)
def test_unstable_tree_is_empty_at_the_start_of_each_full_scan(tmp_path, engine):
    """y (proc 0) turns into x's content after both were put in the unstable tree.  In the next
    scan y is volatile and x re-enters the (new) tree; in the scan after that y is visited first
    and does NOT find x (inserted in the previous scan, the tree was reset), so the merge happens
    only when x is visited, one batch later (pages_to_scan=1)."""
    s0 = {(0, 0): "b", (1, 0): "a"}
    s1 = {(0, 0): "a", (1, 0): "a"}
    # wakes every 10 ms, one page per wake: scan k visits y at 30k ms (+0/10) and x at +10 ms
    # scan 1: y 0, x 10, end 20 | scan 2: y 30, x 40, end 50 | y changes at 55 ms
    # scan 3: y 60 (volatile), x 70 (inserted) , end 80 | scan 4: y 90 (inserted: no x), x 100 (merge)
    times = [0, 0.055, 0.095, 0.105]
    res = run(tmp_path, [s0, s1, s1, s1], {"pages_to_scan": 1, "sleep_millisecs": 10}, times, engine)
    assert col(res, "full_scans") == [0, 2, 3, 3]
    assert col(res, "pages_sharing") == [0, 0, 0, 1]
    # at 95 ms y has just been inserted into the new tree (x's entry from scan 3 is stale)
    assert col(res, "pages_unshared")[2] == 2  # y now + x's stale item from scan 3 (lazy)


@pytest.mark.parametrize("engine", ENGINES)
def test_smart_scan_skips_by_age(tmp_path, engine):
    """A page that never merges is processed P P P P S P S S P S S S S P S*8 P (kernel's skip_age)."""
    page = {(0, 0): "lonely"}
    n = 24
    times = [0.0] + [0.005 + 0.010 * i for i in range(n)]
    res = run(tmp_path, [page] * (n + 1), {"pages_to_scan": 100, "sleep_millisecs": 10}, times, engine)
    scanned = col(res, "pages_scanned")
    skipped = col(res, "pages_skipped")
    pattern = "".join("P" if scanned[i + 1] > scanned[i] else "S" for i in range(n) if scanned[i + 1] + skipped[i + 1] > scanned[i] + skipped[i])
    assert pattern == "PPPPSPSSPSSSSP" + "S" * 8 + "P" + "S"  # 24 visits
    off = run(tmp_path, [page] * (n + 1), {"pages_to_scan": 100, "sleep_millisecs": 10, "smart_scan": 0}, times, engine, name="off")
    assert col(off, "pages_skipped")[-1] == 0 and col(off, "pages_scanned")[-1] == n


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("copies,shared,sharing,unshared,chains,dups", [
    (257, 1, 255, 1, 0, 0),  # the 257th copy finds the only KSM page full and waits alone
    (258, 2, 256, 0, 1, 2),  # with a partner it starts a new dup: a chain of two
])
def test_max_page_sharing_chains(tmp_path, engine, copies, shared, sharing, unshared, chains, dups):
    page = {(0, v): "same" for v in range(copies)}
    res = run(tmp_path, [page] * 3, {"pages_to_scan": 1000, "sleep_millisecs": 10}, [0, 0.015, 0.035], engine)
    last = res.table.row(2, named=True)
    assert (last["pages_shared"], last["pages_sharing"], last["pages_unshared"]) == (shared, sharing, unshared)
    assert (last["stable_node_chains"], last["stable_node_dups"]) == (chains, dups)
    assert last["frames_saved"] == sharing  # each KSM page saves its mappings minus one
    assert last["oracle_saved"] == copies - 1


@pytest.mark.parametrize("engine", ENGINES)
def test_chain_collapse_rule_610_and_611(tmp_path, engine):
    """max_page_sharing=2, five equal pages: two full dups A (pages 0, 1) and B (2, 3) in a chain.
    Pages 0 and 1 are written (A goes stale) and later page 2 (B drops below the limit).
    6.11+ (``hlist_is_singular_node``) collapses the chain into a plain node at the first lookup
    after A is pruned; up to 6.10 (``prune_stale_stable_nodes && nr == 1``) the chain of one full
    dup stays (``stable_node_dup_any``), and collapses only in a pruning lookup that finds the
    single dup below the limit.  Frames are the same either way."""
    a = {(0, v): "a" for v in range(5)}
    w = {**a, (0, 0): "x0", (0, 1): "x1"}
    w2 = {**w, (0, 2): "x2"}
    snaps, times = [a, a, w, w, w2, w2], [0, 0.035, 0.037, 0.075, 0.077, 0.115]
    p = {"pages_to_scan": 100, "sleep_millisecs": 10, "max_page_sharing": 2}
    got = {}
    for prof in ("6.11", "6.10"):
        for prune in (2000, 0):
            r = run(tmp_path, snaps, {**p, "profile": prof, "stable_node_chains_prune_millisecs": prune}, times, engine,
                    name=f"{prof}-{prune}")
            got[prof, prune] = (col(r, "stable_node_chains"), col(r, "stable_node_dups"), col(r, "frames_saved"))
    assert got["6.11", 2000] == got["6.11", 0] == ([0, 1, 1, 0, 0, 0], [0, 2, 2, 0, 0, 0], [0, 2, 1, 1, 0, 1])
    assert got["6.10", 2000] == ([0, 1, 1, 1, 1, 1], [0, 2, 2, 1, 1, 1], [0, 2, 1, 1, 0, 1])
    assert got["6.10", 0] == ([0, 1, 1, 1, 1, 0], [0, 2, 2, 1, 1, 0], [0, 2, 1, 1, 0, 1])


@pytest.mark.parametrize("engine", ENGINES)
def test_holes_in_mergeable_vmas_are_walked_without_the_range_walk(tmp_path, engine):
    """Before f5548c318d65 ksmd looks up every 4 KiB address of a mergeable VMA with an anon_vma:
    a 1000-page VMA holding 2 pages costs 998 extra lookups per full scan (a VMA with no anonymous
    page has no anon_vma and is skipped whole); with the range walk (6.18, 6.12.59+) none, and the
    clock, driven by the work, runs the next scan sooner."""
    page = {(0, 10): "a", (0, 11): "b"}
    vmas = {0: [(0, 1000), (5000, 6000)]}
    times = [0, 0.015, 0.035]
    p = {"pages_to_scan": 100, "sleep_millisecs": 10}
    old = run(tmp_path, [page] * 3, p, times, engine, vmas=vmas, name="old")
    new = run(tmp_path, [page] * 3, {**p, "range_walk": 1}, times, engine, vmas=vmas, name="new")
    assert col(old, "full_scans") == col(new, "full_scans") == [0, 2, 4]  # one scan per wake-up
    assert [a - b for a, b in zip(col(old, "u_addresses_walked"), col(new, "u_addresses_walked"))] == [0, 2 * 998, 2 * 998]
    # priced at 26 ns an address (the shipped cost model), the holes slow each scan down
    slow = run(tmp_path, [page] * 3, p, times, engine, cost=None, vmas=vmas, name="oldc")
    fast = run(tmp_path, [page] * 3, {**p, "range_walk": 1}, times, engine, cost=None, vmas=vmas, name="newc")
    assert slow.table["daemon_busy_s"].sum() > fast.table["daemon_busy_s"].sum()


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_pages_with_and_without_use_zero_pages(tmp_path, engine):
    page = {(0, v): 0 for v in range(5)}
    page[(0, 9)] = "x"
    times = [0, 0.015, 0.025]
    off = run(tmp_path, [page] * 3, {"pages_to_scan": 100, "sleep_millisecs": 10}, times, engine, name="off")
    r = off.table.row(1, named=True)  # after scan 2: the zero pages are one ordinary KSM page
    assert (r["pages_shared"], r["pages_sharing"], r["ksm_zero_pages"], r["frames_saved"]) == (1, 4, 0, 4)
    on = run(tmp_path, [page] * 3, {"pages_to_scan": 100, "sleep_millisecs": 10, "use_zero_pages": 1}, times, engine, name="on")
    r1, r2 = on.table.row(1, named=True), on.table.row(2, named=True)
    assert (r1["pages_shared"], r1["pages_sharing"], r1["ksm_zero_pages"], r1["frames_saved"]) == (0, 0, 5, 5)
    assert r1["rmap_items"] == 6 and r1["pages_volatile"] == 5  # zero-mapped items linger ...
    assert r2["rmap_items"] == 1  # ... until the cursor passes their (now zero-page) addresses
    assert r2["general_profit"] == 5 * 4096 - 1 * 64
    assert r2["oracle_saved"] == 5 == r2["frames_saved"]


@pytest.mark.parametrize("engine", ENGINES)
def test_write_to_a_zero_merged_page_is_not_cow_ksm(tmp_path, engine):
    """use_zero_pages: a write to a page KSM mapped to the zero page allocates a fresh page; the
    kernel counts COW_KSM only for KSM folios (do_wp_page: ``folio && folio_test_ksm(folio)``), so
    cow_ksm stays 0 and the write is counted in cow_zero; ksm_zero_pages drops at once."""
    zeros = {(0, v): 0 for v in range(3)}
    written = {**zeros, (0, 1): "x"}
    p = {"pages_to_scan": 100, "sleep_millisecs": 10, "use_zero_pages": 1}
    res = run(tmp_path, [zeros, zeros, written, written], p, [0, 0.015, 0.017, 0.025], engine)
    assert col(res, "ksm_zero_pages") == [0, 3, 2, 2]
    assert col(res, "cow_breaks") == [0, 0, 0, 0]
    assert col(res, "cow_ksm") == [0, 0, 0, 0]
    assert col(res, "cow_zero") == [0, 0, 1, 1]
    assert res.summary["cow_zero"] == 1 and res.summary["cow_breaks"] == 0
    # the same pages merged into an ordinary KSM page (use_zero_pages=0): the write is a KSM COW
    off = run(tmp_path, [zeros, zeros, written, written], {**p, "use_zero_pages": 0}, [0, 0.015, 0.017, 0.025],
              engine, name="off")
    assert col(off, "cow_ksm") == [0, 0, 1, 1] and col(off, "cow_zero") == [0, 0, 0, 0]


@pytest.mark.parametrize("engine", ENGINES)
def test_write_to_merged_page_is_one_cow_and_counters_wait_for_the_scanner(tmp_path, engine):
    a = {(0, 0): "a", (0, 1): "a", (0, 2): "u"}
    b = {(0, 0): "a", (0, 1): "written", (0, 2): "u"}
    # scans at 0 and 10 ms merge the pair; the write lands at 15 ms; the next scan is at 20 ms
    res = run(tmp_path, [a, a, b, b], {"pages_to_scan": 100, "sleep_millisecs": 10}, [0, 0.012, 0.015, 0.025], engine)
    assert col(res, "cow_breaks") == [0, 0, 1, 0]
    assert col(res, "cow_ksm") == [0, 0, 1, 1]
    assert col(res, "frames_saved") == [0, 1, 0, 0]  # the engine knows at once
    assert col(res, "pages_sharing") == [0, 1, 1, 0]  # ksmd only when it revisits the page
    assert col(res, "pages_shared") == [0, 1, 1, 1]  # the KSM page keeps its last mapping


@pytest.mark.parametrize("engine", ENGINES)
def test_fork_child_joins_the_scan_list_at_fork_time(tmp_path, engine):
    """ksm_fork puts a child of a registered mm on the list at fork time, behind the cursor as it
    is then.  A (4 pages) and B (4) are scanned one mm per wake-up (pages_to_scan=4, every 20 ms):
    A at 0, B at 20, end of scan at 40, A at 60, ... C forks from A at 30 ms (cursor on B: the list
    becomes A C B) and first shows in the snapshot at 70 ms.  At fork time it is scanned at 80 ms and
    the scan ends at 120; registered at the snapshot instead (cursor on A: C A B) B comes at 80, the
    scan ends at 100 and C waits until 120."""
    a = {(0, v): f"a{v}" for v in range(4)}
    b = {(1, v): f"b{v}" for v in range(4)}
    c = {(2, v): f"c{v}" for v in range(4)}
    snaps = [{**a, **b}, {**a, **b, **c}, {**a, **b, **c}, {**a, **b, **c}]
    times = [0, 0.07, 0.09, 0.11]
    p = {"pages_to_scan": 4, "sleep_millisecs": 20, "smart_scan": 0}
    fork = run(tmp_path, snaps, p, times, engine, procs={2: {"ppid": 1000, "start": 3}}, name="fork")
    snap = run(tmp_path, snaps, p, times, engine, procs={2: {"ppid": 1000}}, name="snap")  # starts at 70 ms
    assert col(fork, "rmap_items") == [0, 8, 12, 12] and col(snap, "rmap_items") == [0, 8, 8, 8]
    assert col(fork, "full_scans") == [0, 1, 1, 1] and col(snap, "full_scans") == [0, 1, 1, 2]
    # a child of a process that is not registered (its parent is not in the trace) waits for the snapshot
    orphan = run(tmp_path, snaps, p, times, engine, procs={2: {"ppid": 77, "start": 3}}, name="orphan")
    assert col(orphan, "rmap_items") == col(snap, "rmap_items")


@pytest.mark.parametrize("engine", ENGINES)
def test_advisor_new_pages_to_scan_after_a_full_scan(tmp_path, engine):
    """scan_time_advisor by hand.  1200 pages, advisor on (pages_to_scan starts at 500), a clock
    where each page visit costs 1 ms of ksmd CPU and nothing else costs anything, sleep 100 ms:
    batches at 0 s (500 visits, 0.5 s), 0.6 s (500, 0.5 s), 1.2 s (200 visits, then the end of
    the scan at 1.4 s).  scan_time = 1400 ms / 1000 = 1 s; cpu = 1200 ms -> cpu_percent = 120;
    factor = 200*100/1 = 20000; change = ewma(0, 100) = 30; pages = 500*100/20000*30/100 = 0;
    per_page_cost = 500/120 = 4; pages = min(0, 4*70) = 0 -> max(0, 4*10) = 40 -> min(40, 30000).
    """
    cost = CostModel(ns={**{u: 0.0 for u in DEFAULT_NS}, "pages_visited": 1e6}, name="visits")
    page = {(0, v): f"u{v}" for v in range(1200)}
    res = run(tmp_path, [page] * 3, {"sleep_millisecs": 100, "advisor_mode": "scan-time"}, [0, 1.1, 1.5], engine, cost=cost)
    assert col(res, "pages_to_scan") == [500, 500, 40]
    assert col(res, "full_scans") == [0, 0, 1]


@pytest.mark.parametrize("engine", ENGINES)
def test_fork_child_of_ksm_page_is_appended_beyond_the_limit(tmp_path, engine):
    """A KSM page reached through a forked mm is appended to its stable node (pages_sharing+1 per
    child page) even when the node is full, without a new merge (the kernel's bypass)."""
    parent = {(0, v): {"c": "same", "frame": ("p", v)} for v in range(3)}
    # the child's pages show the parent's PFNs; the parent's pages were merged away meanwhile,
    # so a fork now maps the parent's KSM page
    forked = {**parent, **{(1, v): {"c": "same", "frame": ("p", v)} for v in range(3)}}
    res = run(tmp_path, [parent, parent, forked, forked], {"pages_to_scan": 100, "sleep_millisecs": 10, "max_page_sharing": 3},
              [0, 0.012, 0.014, 0.025], engine)
    before, last = res.table.row(1, named=True), res.table.row(3, named=True)
    assert (before["pages_shared"], before["pages_sharing"], before["frames_saved"]) == (1, 2, 2)
    assert last["candidate_pages"] == 6 and last["merges"] == 0
    assert (last["pages_shared"], last["pages_sharing"], last["stable_node_chains"]) == (1, 5, 0)
    assert last["frames_saved"] == 2  # one frame for six mappings; without dedup three (fork)
    assert last["oracle_saved"] == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_oracle_bounds_ksm_at_every_snapshot(scenarios, engine):
    for scen in ("mixed", "random-3", "random-4"):
        k = replay(scenarios(scen), "ksm", {"pages_to_scan": 50}, engine=engine)
        o = replay(scenarios(scen), "oracle", engine=engine)
        assert (k.table["frames_saved"] <= o.table["frames_saved"]).all()
        assert (o.table["frames_saved"] == o.table["oracle_saved"]).all()


def test_daemon_takes_the_time_its_work_costs(tmp_path):
    """Aggressive settings scan slower than budget/sleep: with 1 ms per visit and 100 visits per
    wake, a 10 ms sleep gives one wake every 110 ms, not every 10 ms."""
    cost = CostModel(ns={**{u: 0.0 for u in DEFAULT_NS}, "pages_visited": 1e6}, name="visits")
    page = {(0, v): f"u{v}" for v in range(1000)}
    res = run(tmp_path, [page, page], {"pages_to_scan": 100, "sleep_millisecs": 10, "smart_scan": 0}, [0, 1.0], "fast", cost=cost)
    assert res.table["u_wakeups"][1] == 10  # 0, 110, ..., 990 ms
    assert res.table["pages_scanned"][1] == 1000


def test_jiffy_rounding_of_the_sleep(tmp_path):
    """At HZ=250 a 20 ms sleep lasts 20-24 ms (timer wheel rounding): 1 s holds 42-50 wakes, not 50."""
    page = {(0, 0): "a"}
    tr = make_trace(tmp_path / "j", [page, page], times=[0, 1.0])
    res = replay(tr, "ksm", {}, timing_cost=ZERO, hz=250)
    assert 41 <= res.table["u_wakeups"][1] <= 50
    assert res.table["u_wakeups"][1] == 42  # each sleep is exactly 6 jiffies from a tick boundary
