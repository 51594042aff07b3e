"""ksmtrace.calibrate: the NNLS solver, the grouped fit (recovers known costs), the hold-out split,
the microbenchmarks and the `calibrate` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ksmtrace.calibrate import GROUPS, RunData, evaluate, fit, nnls, split_holdout
from ksmtrace.lab.microbench import microbenchmark
from ksmtrace.cli import cli
from ksmtrace.engine.cost import UNIT_NAMES, CostModel
from ksmtrace.errors import KsmtraceError


def test_nnls_matches_unconstrained_when_feasible_and_clamps_otherwise():
    rng = np.random.default_rng(0)
    A = rng.random((40, 4))
    x_true = np.array([1.0, 2.0, 0.5, 3.0])
    assert np.allclose(nnls(A, A @ x_true), x_true, atol=1e-8)
    b = A @ np.array([1.0, -2.0, 0.5, 3.0])
    x = nnls(A, b)
    assert (x >= 0).all()
    # KKT: gradient is non-positive where x == 0 and ~0 where x > 0
    g = A.T @ (b - A @ x)
    assert np.all(g[x == 0] <= 1e-8) and np.allclose(g[x > 0], 0, atol=1e-6)


def _run(rng, scales, base, label, windows=8):
    units = rng.integers(0, 5000, size=(windows, len(UNIT_NAMES))).astype(float)
    ns = base.vector().copy()
    for g, s in scales.items():
        for u in GROUPS[g]:
            ns[UNIT_NAMES.index(u)] *= s
    from ksmtrace.engine.cost import DAEMON_MASK

    real = units @ np.where(DAEMON_MASK, ns, 0.0) / 1e9
    return RunData(trace=f"/x/{label}.trace", label=label, workload=label.split("-")[0], settings="fast",
                   units=units, real_cpu_s=real, duration_s=10.0)


def test_grouped_fit_recovers_scales_and_evaluates():
    rng = np.random.default_rng(1)
    base = CostModel()
    truth = {"page_visit": 4.0, "checksum": 1.5, "wakeup": 10.0, "scan_start": 0.5, "tree": 2.0, "merge": 3.0}
    runs = [_run(rng, truth, base, f"w{i}-r{j}") for i in range(3) for j in range(2)]
    model, scales = fit(runs, base)
    for g, s in truth.items():
        assert scales[g] == pytest.approx(s, rel=1e-6)
    ev = evaluate(model, runs)
    assert all(abs(r["rel_error"]) < 1e-6 for r in ev)
    assert model.ns["pages_visited"] == pytest.approx(base.ns["pages_visited"] * 4.0, rel=1e-3)
    assert model.ns["cow_copies"] == base.ns["cow_copies"]  # in no group: unchanged


def test_holdout_split_keeps_every_group_on_both_sides():
    rng = np.random.default_rng(2)
    runs = [_run(rng, {}, CostModel(), f"w{i}-r{j}") for i in range(3) for j in range(2)]
    for r in runs:
        r.workload = r.label.split("-")[0]
    train, hold = split_holdout(runs)
    assert len(train) == 3 and len(hold) == 3
    assert {r.workload for r in train} == {r.workload for r in hold}


def test_microbenchmark_is_plausible():
    m = microbenchmark(seconds=0.1)
    for u in ("checksums", "memcmp_pages", "page_copies", "jhash2_checksums", "sampled_hashes", "zero_checks"):
        assert 0 < m.ns[u] < 100_000, (u, m.ns[u])
    assert m.ns["sampled_hashes"] < m.ns["jhash2_checksums"]
    assert "microbenchmarks" in m.source


def test_calibrate_cli_writes_a_loadable_cost_file(tmp_path):
    out = tmp_path / "c.json"
    r = CliRunner().invoke(cli, ["calibrate", "-o", str(out), "--seconds", "0.1", "--json"])
    assert r.exit_code == 0, r.output
    model = CostModel.load(out)
    assert model.ns["checksums"] > 0 and json.loads(r.output)["output"] == str(out)


def test_calibrate_from_runs_needs_ground_truth(tmp_path):
    from ksmtrace.calibrate import fit_from_runs
    from ksmtrace.testing import make_trace

    make_trace(tmp_path / "t", [{(0, 1): "a", (0, 2): "a"}] * 3, interval=0.1)
    with pytest.raises(KsmtraceError, match="ground truth"):
        fit_from_runs([tmp_path])
    r = CliRunner().invoke(cli, ["calibrate", "--from-runs", str(tmp_path)])
    assert r.exit_code == 1 and "ground truth" in r.output


def test_calibrate_cli_argument_rules(tmp_path):
    r = CliRunner().invoke(cli, ["calibrate", "--from-runs"])
    assert r.exit_code == 2 and "at least one trace" in r.output
    r = CliRunner().invoke(cli, ["calibrate", str(tmp_path)])
    assert r.exit_code == 2 and "only read with --from-runs" in r.output
