"""``ksmtrace demo``: the library (ksmtrace.demo) and the command, on a shipped sample trace."""
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
    return run_demo(TRACE, out, probation_passes=(0, 2, 8))


def test_demo_replays_every_core_policy(demo):
    labels = [r["label"] for r in demo.rows]
    assert labels[: len(CORE_POLICIES)] == list(CORE_POLICIES)
    oracle = demo.rows[0]
    assert oracle["pct_of_oracle"] == 100.0
    for r in demo.rows:
        assert r["frames_saved_mean"] <= oracle["frames_saved_mean"] + 1e-9
        assert r["cpu_seconds"] >= 0 and r["cow_breaks"] >= 0


def test_demo_uses_the_real_ksm_settings(demo):
    """The sample ran the real KSM: the demo replays ksm with the kernel's settings from when it started."""
    rk = demo.real_ksm
    assert rk and rk["settings"]["pages_to_scan"] == 1000 and rk["start_s"] > 0
    as_captured = [r for r in demo.rows if r["label"] == "ksm (as captured)"]
    assert len(as_captured) == 1
    assert as_captured[0]["params"]["pages_to_scan"] == 1000
    assert rk["pages_sharing"] > 0


def test_demo_delay_sweep(demo):
    ns = [r["probation_passes"] for r in demo.sweep_rows]
    assert ns == [0, 2, 8]
    pksm = next(r for r in demo.rows if r["label"] == "pksm")
    # probation_passes=0 is plain PKSM, exactly
    assert demo.sweep_rows[0]["frames_saved_mean"] == pksm["frames_saved_mean"]
    assert demo.sweep_rows[0]["cow_breaks"] == pksm["cow_breaks"]
    assert demo.sweep_rows[0]["cow_breaks_avoided"] == 0


def test_demo_writes_plots_tables_and_results(demo):
    from pathlib import Path

    out = Path(demo.out_dir)
    for kind in PLOT_KINDS:
        p = Path(demo.plots[kind])
        assert p.parent == out and p.suffix == ".png" and p.stat().st_size > 10_000
    assert (out / "comparison.csv").read_text().startswith("label,policy,")
    assert len((out / "delay-sweep.csv").read_text().splitlines()) == 4
    s = json.loads((out / "summary.json").read_text())
    assert s["trace"] == TRACE and len(s["rows"]) == len(demo.rows)
    assert len(list((out / "results").glob("*.json"))) == len(demo.rows)
    assert (out / "sweep-pksm-delay" / "sweep.csv").exists()


def test_demo_report_text(demo):
    text = format_report(demo)
    for word in ("oracle", "pksm-delay N=8", "COW breaks", "timeline", "Next:", "ksmtrace capture", "ksmtrace sweep",
                 "ksmtrace compare", "ksmtrace replay", "frames_saved ="):
        assert word in text


def test_demo_cli_json_and_quiet(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--trace", TRACE, "-o", str(tmp_path / "d"), "--probation", "0,1",
                                 "--no-plots", "--json", "--quiet"])
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
