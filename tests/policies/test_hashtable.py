"""The ``hashtable`` (VMware ESX-style) policy: each rule on a hand-built trace, reference == fast
on random traces, at or below the oracle, and every parameter doing something."""
from __future__ import annotations

import random

import pytest

from ksmtrace.errors import PolicyParamError
from ksmtrace.replay import make_policy
from tests.policies._helpers import col, gen, run

UNCAPPED = {"pages_per_second": 0, "process_pages_per_second": 0}


def ht(tr, params=None, **kw):
    return run(tr, "hashtable", params, **kw)


RANDOM_PARAMS = [
    {"pages_per_second": 500, "process_pages_per_second": 200, "sleep_millisecs": 5},
    {**UNCAPPED, "sleep_millisecs": 7, "zero_page": 0},
    {"pages_per_second": 300, "process_pages_per_second": 0, "sleep_millisecs": 3, "bytes_per_entry": 32},
]


@pytest.mark.parametrize("seed", range(4))
def test_reference_equals_fast_and_below_oracle(mk, seed):
    tr = mk(gen(seed), interval=0.03)
    for params in RANDOM_PARAMS:
        res = ht(tr, params, seed=seed)
        t = res.table
        assert (t["frames_saved"] <= t["oracle_saved"]).all()
        assert res.summary["contract_violations"] == 0
        assert (t["table_entries"] == t["hint_entries"] + t["shared_entries"]).all()
        assert (t["table_bytes"] == t["table_entries"] * params.get("bytes_per_entry", 16)).all()


def test_a_hint_that_still_matches_is_merged(mk):
    s = {(0, 1): "x", (1, 1): "x", (2, 1): "y"}
    r = ht(mk([s, s]), UNCAPPED)
    # the first "x" page seen becomes a hint; the second re-hashes it, compares, and shares
    assert col(r, "frames_saved") == [0, 1]
    assert col(r, "shared_entries") == [0, 1] and col(r, "hint_entries") == [0, 1]  # "y" stays a hint
    assert col(r, "table_entries") == [0, 2] and col(r, "table_bytes") == [0, 32]
    assert col(r, "shared_refs") == [0, 2]
    u = r.table
    assert u["u_full_hashes"].to_list() == [0, 4]  # 3 pages + the hint's re-hash
    assert u["u_memcmp_pages"].to_list() == [0, 1]
    assert u["u_write_protects"].to_list() == [0, 2]  # the hint page and the new sharer


def test_a_hint_that_changed_is_rehashed_not_merged(mk):
    s0 = {(0, 1): "x"}
    s1 = {(0, 1): "y", (1, 1): "x"}  # the hint page was rewritten; a new "x" page appears
    r = ht(mk([s0, s1, s1], interval=1.0), {**UNCAPPED, "sleep_millisecs": 1000})
    # wake-up 2 starts with process 1 (round robin): its "x" page finds the hint, re-hashes the
    # hint page (now "y"): stale, replaced; then page (0, 1) is re-hinted under "y"
    assert col(r, "stale_hints") == [0, 0, 1]
    assert col(r, "merges") == [0, 0, 0] and col(r, "frames_saved") == [0, 0, 0]
    assert col(r, "hint_entries") == [0, 1, 2] and col(r, "cow_breaks") == [0, 0, 0]
    assert r.table["u_memcmp_pages"].sum() == 0


def test_cow_decrements_the_count_eagerly(mk):
    s0 = {(0, 1): "x", (1, 1): "x", (2, 1): "x"}
    s1 = {(0, 1): "w", (1, 1): "x", (2, 1): "x"}  # a write to a shared page
    s2 = {(0, 1): "w"}  # the other two sharers go away
    r = ht(mk([s0, s0, s1, s2]), UNCAPPED)
    assert col(r, "shared_refs") == [0, 3, 2, 0]
    assert col(r, "shared_entries") == [0, 1, 1, 0]
    assert col(r, "cow_breaks") == [0, 0, 1, 0]
    assert r.table["u_fault_table_ops"].to_list() == [0, 0, 1, 2]
    assert r.cpu_seconds() == pytest.approx(r.table["daemon_busy_s"].sum())  # fault work is not daemon CPU


def test_zero_pages(mk):
    s = {(0, 1): 0, (0, 2): 0, (1, 1): 0, (1, 2): "a"}
    tr = mk([s, s])
    r = ht(tr, UNCAPPED)
    assert col(r, "zero_pages") == [0, 3] and col(r, "frames_saved") == [0, 3] and col(r, "oracle_saved") == [3, 3]
    assert col(r, "table_entries") == [0, 1]  # only the "a" hint: zero pages need no entry
    z = ht(tr, {**UNCAPPED, "zero_page": 0})
    assert col(z, "zero_pages") == [0, 0] and col(z, "frames_saved") == [0, 2]
    assert col(z, "shared_entries") == [0, 1] and col(z, "shared_refs") == [0, 3]


def test_rate_caps(mk):
    s = {(p, v): f"c{v}" for p in range(3) for v in range(10)}
    tr = mk([s] * 4, interval=1.0)
    base = {"sleep_millisecs": 1000}
    per = ht(tr, {**base, "pages_per_second": 0, "process_pages_per_second": 2})
    assert col(per, "pages_scanned") == [0, 6, 12, 18]  # 2 per process per wake-up, one wake-up a second
    tot = ht(tr, {**base, "pages_per_second": 5, "process_pages_per_second": 0})
    assert col(tot, "pages_scanned") == [0, 5, 10, 15]
    both = ht(tr, {**base, "pages_per_second": 5, "process_pages_per_second": 1})
    assert col(both, "pages_scanned") == [0, 3, 6, 9]
    frac = ht(tr, {"sleep_millisecs": 250, "pages_per_second": 6, "process_pages_per_second": 0})
    assert col(frac, "pages_scanned") == [0, 6, 12, 18]  # 1.5 pages per wake-up, carried over


def test_random_scan_order_is_seeded(mk):
    s = {(0, v): f"c{v % 7}" for v in range(60)}
    tr = mk([s] * 6, interval=1.0)
    p = {"pages_per_second": 0, "process_pages_per_second": 10, "sleep_millisecs": 1000}
    a = ht(tr, p, seed=1)
    b = ht(tr, p, seed=1)
    c = ht(tr, p, seed=2)
    assert a.table.equals(b.table)
    assert not a.table.equals(c.table)


def test_static_trace_reaches_the_oracle(mk):
    rnd = random.Random(3)
    s = {}
    for p in range(3):
        for v in range(40):
            s[(p, v)] = rnd.choice([0, "a", "b", "c", f"u{p}{v}"])
    s[(3, 0)] = {"c": "a", "frame": "fork"}
    s[(0, 99)] = {"c": "a", "frame": "fork"}
    r = ht(mk([s] * 4, interval=0.5), UNCAPPED)
    assert col(r, "frames_saved")[-1] == col(r, "oracle_saved")[-1] > 0


def test_unknown_parameters_are_rejected():
    with pytest.raises(PolicyParamError):
        make_policy("hashtable", {"pages_per_sec": 1})
    with pytest.raises(PolicyParamError):
        make_policy("hashtable", {"sleep_millisecs": 0})


def test_every_parameter_changes_a_result(mk):
    tr = mk(gen(7, npages=60, nsnap=10), interval=0.1)
    p = {"sleep_millisecs": 20, "pages_per_second": 2000, "process_pages_per_second": 1000}
    cases = [
        ({**p, "pages_per_second": 2000}, {**p, "pages_per_second": 200}),
        ({**p, "process_pages_per_second": 1000}, {**p, "process_pages_per_second": 100}),
        ({**p, "sleep_millisecs": 20}, {**p, "sleep_millisecs": 50}),
        ({**p, "bytes_per_entry": 16}, {**p, "bytes_per_entry": 24}),
        ({**p, "zero_page": 1}, {**p, "zero_page": 0}),
    ]
    for a, b in cases:
        assert not ht(tr, a, check_reference=False).table.equals(ht(tr, b, check_reference=False).table), (a, b)
