"""``ksmtrace demo``: the library (ksmtrace.demo) and the command, on a shipped sample trace: it leads
with the frontier, compares the policies at one CPU budget, sets the simulated ksm's counters
beside the kernel's counters of the same name, and keeps the Delay study."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.demo import CORE_POLICIES, PLOT_KINDS, format_report, run_demo

TRACE = "prefork"  # the smallest replay of the three; the default (vm) is exercised by the CLI test


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(TRACE, out, probation_passes=(0, 2, 8), level="coarse")


def test_demo_leads_with_the_frontier(demo):
    fr = demo.frontier
    assert fr is not None and set(fr.policies) == set(CORE_POLICIES) - {"oracle"}
    assert "oracle" not in fr.runs["policy"].to_list()  # the ceiling, never a point
    text = format_report(demo)
    assert text.index("The frontier") < text.index("at its best setting within")
    assert "≤ 1 % CPU" in text and "80 % of oracle" in text


def test_demo_compares_the_policies_at_one_budget(demo):
    labels = [r["label"] for r in demo.rows]
    assert labels == list(CORE_POLICIES)
    oracle = demo.rows[0]
    assert oracle["pct_of_oracle"] == 100.0
    for r in demo.rows[1:]:
        if r.get("run_id") is None:
            continue
        assert r["cpu_pct"] <= demo.budget_pct + 1e-9  # within the matched budget
        assert r["frames_saved_mean"] <= oracle["frames_saved_mean"] + 1e-9
        # the best of the policy's runs within the budget
        runs = demo.frontier.policy_runs(r["policy"])
        within = runs.filter(runs["cpu_pct"] <= demo.budget_pct)
        assert r["pct_of_oracle"] == pytest.approx(within["pct_of_oracle"].max(), abs=0.06)
    assert {r.spec["scope"] for r in demo.results} == {demo.trace_facts["scope"]}  # one scope for all


def test_demo_sets_kernel_counters_beside_simulated_counters(demo):
    """The sample ran the real KSM: ksm is replayed as captured (the same inference fidelity uses)
    and only counters of the same name stand side by side."""
    from ksmtrace.fidelity import fidelity
    from ksmtrace.samples import open_sample

    rk = demo.real_ksm
    assert rk and rk["settings"]["pages_to_scan"] == 1000 and rk["start_s"] > 0
    rep = fidelity(open_sample(TRACE))
    assert rk["start_s"] == rep.start_s and rk["profile"] == rep.params["profile"] == "6.12"
    by = {c["counter"]: c for c in rk["counters"]}
    assert by["pages_sharing"]["kernel"] == rep.row("pages_sharing")["real_final"]
    assert by["pages_sharing"]["simulated"] == rep.row("pages_sharing")["sim_final"]
    assert "frames_saved" not in by


def test_demo_delay_sweep(demo):
    ns = [r["probation_passes"] for r in demo.sweep_rows]
    assert ns == [0, 2, 8]
    from ksmtrace.replay import replay
    from ksmtrace.samples import open_sample

    pksm = replay(open_sample(TRACE), "pksm", scope=demo.trace_facts["scope"])
    # probation_passes=0 is plain PKSM, exactly
    assert demo.sweep_rows[0]["frames_saved_mean"] == round(pksm.summary["frames_saved_mean"], 1)
    assert demo.sweep_rows[0]["cow_breaks"] == pksm.summary["cow_breaks"]
    assert demo.sweep_rows[0]["cow_breaks_avoided"] == 0


def test_demo_writes_plots_tables_and_results(demo):
    from pathlib import Path

    out = Path(demo.out_dir)
    for kind in PLOT_KINDS:
        p = Path(demo.plots[kind])
        assert p.parent == out and p.suffix == ".png" and p.stat().st_size > 10_000
    assert (out / "comparison.csv").read_text().startswith("label,policy,")
    assert len((out / "delay-sweep.csv").read_text().splitlines()) == 4
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    s = json.loads(text)
    assert s["trace"] == TRACE and len(s["rows"]) == len(demo.rows)
    assert s["frontier"]["at_budget"] and s["frontier"]["to_reach"]
    assert (out / "frontier.csv").exists() and (out / "sweep-pksm-delay" / "sweep.csv").exists()


def test_demo_report_text(demo):
    text = format_report(demo)
    for word in ("oracle", "pksm-delay N=8", "COW breaks", "timeline", "frontier-cpu", "Next:", "ksmtrace capture",
                 "ksmtrace sweep", "ksmtrace frontier", "ksmtrace advise", "ksmtrace doctor", "ksmtrace replay",
                 "frames_saved ="):
        assert word in text
    assert "None" not in text and "nan" not in text.replace("nanos", "")


def test_demo_cli_json_and_quiet(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--trace", TRACE, "-o", str(tmp_path / "d"), "--probation", "0,1",
                                 "--grid", "coarse", "--no-plots", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert [x["probation_passes"] for x in obj["delay_sweep"]] == [0, 1]
    assert obj["plots"] == {} and obj["next_steps"]


def test_demo_cli_list():
    r = CliRunner().invoke(cli, ["demo", "--list"])
    assert r.exit_code == 0
    for n in ("vm", "python-sci", "prefork"):
        assert n in r.output


def test_demo_cli_errors(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--trace", "no-such-sample", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no sample trace 'no-such-sample'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["demo", "--probation", "1,x", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2


@pytest.mark.slow
def test_demo_default_command_end_to_end(tmp_path):
    """The README's first command: `ksmtrace demo` (default trace vm, default output directory)."""
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "demo", "--quiet"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trace 'vm'" in r.stdout and "Next:" in r.stdout
    for kind in PLOT_KINDS:
        assert (tmp_path / "ksmtrace-demo" / f"{kind}.png").exists()
