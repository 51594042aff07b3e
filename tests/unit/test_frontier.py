"""The frontier (ksmtrace.analysis.frontier) and the measures it rests on (analysis.measures): rate
grids read from each policy's Params, the oracle as the ceiling, each policy's front, the tables at
matched budgets and targets checked against the runs by brute force, the sustained-reach rule."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from ksmtrace.analysis import measures as M
from ksmtrace.analysis.frontier import frontier, rate_grid, settings_text
from ksmtrace.pareto import non_dominated
from ksmtrace.errors import KsmtraceError
from ksmtrace.replay import replay
from ksmtrace.testing.scenarios import library_trace
from ksmtrace.textfmt import dumps

GRIDS = {"ksm": {"pages_to_scan": [2, 8, 32], "sleep_millisecs": [20, 200]},
         "pksm": {"pages_to_scan": [2, 8, 32], "sleep_millisecs": [20, 200]},
         "hashtable": {"pages_per_second": [20, 200, 0], "process_pages_per_second": [0], "sleep_millisecs": [100]}}


@pytest.fixture(scope="module")
def fr(tmp_path_factory):
    base = tmp_path_factory.mktemp("frontier")
    tr = library_trace(base / "trace")
    return frontier(tr, ["ksm", "pksm", "hashtable"], base / "out", grids=GRIDS, budgets_pct=(0.05, 0.5, 5.0))


def test_rate_grids_come_from_the_policies_params():
    assert set(rate_grid("ksm")) == {"pages_to_scan", "sleep_millisecs"}
    assert set(rate_grid("pksm-delay")) == {"pages_to_scan", "sleep_millisecs"}
    g = rate_grid("hashtable")
    assert set(g) == {"pages_per_second", "process_pages_per_second", "sleep_millisecs"}
    assert 0 in g["pages_per_second"] and g["process_pages_per_second"] == [0]  # 0 = no cap: the top rate
    assert rate_grid("oracle") == {}
    assert set(rate_grid("uksm")) == {"max_cpu_percentage", "sleep_millisecs"}
    coarse, std = rate_grid("ksm", "coarse"), rate_grid("ksm")
    assert len(coarse["pages_to_scan"]) < len(std["pages_to_scan"])
    with pytest.raises(KsmtraceError, match="grid level"):
        rate_grid("ksm", "fine")
    assert settings_text({"pages_per_second": 0, "sleep_millisecs": 5}, ["pages_per_second"]) == "pages_per_second=0 (no cap)"


def test_every_grid_point_is_one_run_under_one_scope(fr):
    assert fr.policies == ["ksm", "pksm", "hashtable"]
    assert "oracle" not in fr.runs["policy"].to_list()  # the ceiling is not a point
    for pol, g in GRIDS.items():
        n = int(np.prod([len(v) for v in g.values()]))
        assert fr.policy_runs(pol).height == n
    assert {r.spec["scope"] for r in fr.results.values()} == {fr.scope} == {"recorded"}
    assert {r.spec["start_ns"] for r in fr.results.values()} == {0}
    assert fr.oracle.policy == "oracle" and fr.oracle_saved_mean == pytest.approx(fr.oracle.summary["oracle_saved_mean"])


def test_run_rows_are_the_measures_of_the_runs(fr):
    for row in fr.runs.iter_rows(named=True):
        r = fr.results[row["run_id"]]
        dur = float(r.table["t_s"][-1] - r.table["t_s"][0])
        assert row["cpu_pct"] == pytest.approx(100 * r.cpu_seconds() / dur)
        saved, oracle = r.table["frames_saved"].mean(), r.table["oracle_saved"].mean()
        assert row["pct_of_oracle"] == pytest.approx(100 * saved / oracle)
        assert row["cow_breaks"] == r.table["cow_breaks"].sum()
        assert json.loads(row["params"]) == {k: r.spec["params"][k] for k in json.loads(row["params"])}


def test_fronts_are_the_non_dominated_runs_of_each_policy(fr):
    for pol in fr.policies:
        d = fr.policy_runs(pol)
        y, cpu, cow = d["pct_of_oracle"].to_numpy(), d["cpu_pct"].to_numpy(), d["cow_breaks"].to_numpy().astype(float)
        assert d["on_cpu_front"].to_list() == non_dominated([y], [cpu]).tolist()
        assert d["on_cow_front"].to_list() == non_dominated([y], [cow]).tolist()
        # brute force: a front run is beaten by no run of the same policy
        for i, j in itertools.product(range(d.height), repeat=2):
            if d["on_cpu_front"][i] and i != j:
                assert not (y[j] >= y[i] and cpu[j] <= cpu[i] and (y[j] > y[i] or cpu[j] < cpu[i]))


def test_budget_table_is_the_best_run_within_each_budget(fr):
    rows = fr.budget_rows()
    assert len(rows) == len(fr.policies) * len(fr.budgets_pct)
    for r in rows:
        d = fr.policy_runs(r["policy"])
        within = [x for x in d.iter_rows(named=True) if x["cpu_pct"] <= r["budget_pct"]]
        if not within:
            assert r["pct_of_oracle"] is None and r["run_id"] is None
            continue
        assert r["pct_of_oracle"] == max(x["pct_of_oracle"] for x in within)
        assert r["cpu_pct"] <= r["budget_pct"]
        assert fr.saving_at(r["policy"], r["budget_pct"]) == r["pct_of_oracle"]
    # more budget never buys less
    for pol in fr.policies:
        vals = [r["pct_of_oracle"] for r in rows if r["policy"] == pol and r["pct_of_oracle"] is not None]
        assert vals == sorted(vals)


def test_target_table_is_the_cheapest_run_that_keeps_the_share(fr):
    for r in fr.target_rows():
        keeps = []
        for x in fr.policy_runs(r["policy"]).iter_rows(named=True):
            res = fr.results[x["run_id"]]
            saved, oracle = res.table["frames_saved"].to_numpy(), res.table["oracle_saved"].to_numpy()
            ok = saved >= r["target_pct"] / 100 * oracle
            if ok[-1]:  # kept to the end
                first = len(ok) - int(np.argmin(ok[::-1])) if not ok.all() else 0
                keeps.append((x["cpu_pct"], float(res.table["t_s"][first])))
        if not keeps:
            assert r["cpu_pct"] is None and r["reached_at_s"] is None
            continue
        cheapest = min(keeps)
        assert r["cpu_pct"] == pytest.approx(cheapest[0]) and r["reached_at_s"] == pytest.approx(cheapest[1])


def test_json_is_strict_and_text_has_no_undefined_values(fr):
    text = dumps(fr.to_json())
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    out = fr.text()
    assert "None" not in out and " nan" not in out.lower()
    assert "≤ 0.05 % CPU" in out and "95 % of oracle" in out


def test_sustained_reach_and_cpu_share():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    assert M.sustained_from(t, [False, True, True, True]) == 1.0
    assert M.sustained_from(t, [True, False, True, True]) == 2.0  # reached, lost, reached again: the last time
    assert M.sustained_from(t, [True, True, True, False]) is None  # lost at the end
    assert M.sustained_from(t, [True] * 4) == 0.0


def test_measures_of_a_replay(tmp_path):
    tr = library_trace(tmp_path / "t")
    r = replay(tr, "ksm", {"pages_to_scan": 5})
    dur = float(r.table["t_s"][-1])
    assert M.cpu_pct(r) == pytest.approx(100 * r.cpu_seconds() / dur)
    t50 = M.time_to_oracle_share(r, 50)
    ok = r.table["frames_saved"].to_numpy() >= 0.5 * r.table["oracle_saved"].to_numpy()
    assert t50 == M.sustained_from(r.table["t_s"].to_numpy(), ok)
    assert M.time_to_own_share(r, 100) == M.sustained_from(r.table["t_s"].to_numpy(),
                                                           r.table["frames_saved"].to_numpy() >= r.table["frames_saved"][-1])


def test_frontier_errors(tmp_path):
    tr = library_trace(tmp_path / "t", n=1)
    with pytest.raises(KsmtraceError, match="two snapshots"):
        frontier(tr, ["ksm"])
    tr2 = library_trace(tmp_path / "t2")
    with pytest.raises(KsmtraceError, match="unknown policy"):
        frontier(tr2, ["ksm", "nope"])
    with pytest.raises(KsmtraceError, match="no policies"):
        frontier(tr2, [])
