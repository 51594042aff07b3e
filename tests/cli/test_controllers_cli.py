"""Controllers and safe presets from the command line, end to end: `replay --controller`,
`ksmtrace controllers` (table, JSON, figure), `frontier --restrict`; on a sample trace and on a
capture-like trace of processes without mergeable memory; bad input is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from tests.cli.test_answers import assert_defined, plain, strict  # noqa: F401  (plain: a fixture)
from tests.unit.test_restrict import hand


def run(args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def one_line_error(r, *words):
    assert r.exit_code != 0
    err = r.stderr.strip()
    assert err.startswith("ksmtrace: error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_replay_with_a_controller_prints_and_records_its_trajectory(plain):
    r = run(["replay", plain, "--controller", "ksmtuned:monitor_interval=1", "--host-memory", "1M"])
    assert_defined(r.output)
    assert "controller ksmtuned on a 1 MiB host" in r.output and "adjustments" in r.output
    out = strict(run(["replay", plain, "--controller", "ksmtuned:monitor_interval=1", "--host-memory", "1M", "--json"]).output)
    assert out["spec"]["controller"]["name"] == "ksmtuned" and out["spec"]["host_kib"] == 1024
    r = run(["replay", plain, "--controller", "scan-time", "--json"])
    assert strict(r.output)["spec"]["params"]["advisor_mode"] == "scan-time"


def test_controller_errors_are_one_line(plain):
    one_line_error(run(["replay", plain, "--controller", "ksmtuned"], ok=False), "needs the host's memory size")
    one_line_error(run(["replay", plain, "--host-memory", "1G"], ok=False), "give --controller too")
    one_line_error(run(["replay", plain, "--controller", "ksmtune", "--host-memory", "1G"], ok=False), "unknown controller")
    one_line_error(run(["replay", plain, "--controller", "ksmtuned", "--host-memory", "lots"], ok=False), "memory size")
    one_line_error(run(["replay", plain, "-P", "pksm", "--controller", "kubevirt", "--host-memory", "1G"], ok=False), "pksm")
    one_line_error(run(["replay", plain, "--controller", "ksmtuned:npages_min=9,npages_max=1", "--host-memory", "1G"], ok=False),
                   "npages_min")
    one_line_error(run(["controllers", plain], ok=False), "--host-memory")


def test_controllers_command_on_a_trace_without_mergeable_memory(plain, tmp_path):
    out_dir = tmp_path / "out"
    r = run(["controllers", plain, "--host-memory", "2M", "--controller", "ksmtuned:monitor_interval=1",
             "--controller", "kubevirt:interval=1", "--controller", "scan-time", "--grid", "coarse", "-o", out_dir])
    assert_defined(r.output)
    assert "best static within its CPU" in r.output and "cheapest static saving as much" in r.output
    assert "scope anon" in r.output
    data = strict((out_dir / "controllers.json").read_text())
    assert [c["name"] for c in data["controllers"]] == ["ksmtuned", "kubevirt", "scan-time"]
    assert (out_dir / "controllers.png").stat().st_size > 10_000
    assert any((out_dir / "controllers").glob("*.json")) and any((out_dir / "ksm").glob("*.json"))
    # a second call reuses the static runs and gives the same numbers
    again = strict(run(["controllers", plain, "--host-memory", "2M", "--controller", "ksmtuned:monitor_interval=1",
                        "--controller", "kubevirt:interval=1", "--controller", "scan-time", "--grid", "coarse", "-o", out_dir,
                        "--json"]).output)
    assert again["controllers"] == data["controllers"]


def test_controllers_command_on_the_prefork_sample(tmp_path):
    r = run(["controllers", "sample-traces/prefork", "--host-memory", "300M", "--controller", "ksmtuned:monitor_interval=5",
             "--controller", "scan-time", "--grid", "coarse", "--json"])
    data = strict(r.output)
    for c in data["controllers"]:
        # the static settings it is held against really are what they claim, among the sweep's runs
        if c["static_at_cpu_cpu_pct"] is not None:
            assert c["static_at_cpu_cpu_pct"] <= c["cpu_pct"] * (1 + 1e-9)
        if c["static_for_saving_pct_of_oracle"] is not None:
            assert c["static_for_saving_pct_of_oracle"] >= c["pct_of_oracle"] * (1 - 1e-9)
    scan = [c for c in data["controllers"] if c["name"] == "scan-time"][0]
    assert scan["pct_of_oracle"] > 10 and scan["pages_to_scan_max"] > scan["pages_to_scan_min"]


def test_frontier_under_a_preset(plain, tmp_path):
    full = strict(run(["frontier", plain, "--policies", "ksm", "--grid", "coarse", "--json"]).output)
    zero = strict(run(["frontier", plain, "--policies", "ksm", "--grid", "coarse", "--restrict", "zero-pages", "--json"]).output)
    assert zero["restrict"] == "zero-pages" and full["restrict"] is None
    assert zero["oracle_saved_mean_frames"] <= full["oracle_saved_mean_frames"]
    assert all(r["run_id"] not in {x["run_id"] for x in full["runs"]} for r in zero["runs"])
    r = run(["frontier", plain, "--policies", "ksm", "--grid", "coarse", "--restrict", "zero-pages"])
    assert "every run obeys the safe preset zero-pages" in r.output


def test_presets_on_replay_compare_and_breakdown(tmp_path):
    hand(tmp_path / "t", n=4)
    runner = CliRunner()
    res = runner.invoke(cli, ["replay", str(tmp_path / "t"), "-P", "oracle", "--restrict", "same-domain", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["spec"]["restrict"] == "same-domain:user-cgroup" and out["summary"]["frames_saved_final"] == 3
    res = runner.invoke(cli, ["replay", str(tmp_path / "t"), "-P", "oracle", "-p", "restrict=windows", "--json"])
    assert json.loads(res.stdout)["summary"]["frames_saved_final"] == 5
    res = runner.invoke(cli, ["replay", str(tmp_path / "t"), "-P", "oracle", "--restrict", "windows", "-p", "restrict=zero-pages"])
    assert res.exit_code != 0 and res.stderr.strip().startswith("ksmtrace: error:") and "disagree" in res.stderr
    res = runner.invoke(cli, ["replay", str(tmp_path / "t"), "--restrict", "same-dom"])
    assert res.exit_code != 0 and len(res.stderr.strip().splitlines()) == 1 and "unknown restriction" in res.stderr
    # compare: one policy under every preset, side by side
    res = runner.invoke(cli, ["compare", str(tmp_path / "t"), "--policies", "oracle,ksm:pages_to_scan=50;sleep_millisecs=1",
                              "--presets", "all", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    by = {(r["policy"], r["restrict"]): r for r in rows}
    assert by[("oracle", None)]["frames_saved_final"] == 7
    assert by[("oracle", "same-domain:user-cgroup")]["frames_saved_final"] == 3
    assert by[("oracle", "read-only")]["pct_of_unrestricted_oracle"] == pytest.approx(100 / 7, abs=0.1)
    assert by[("ksm:pages_to_scan=50;sleep_millisecs=1", "same-domain:user-cgroup")]["exposed_merges"] == 0
    assert by[("ksm:pages_to_scan=50;sleep_millisecs=1", None)]["exposed_merges"] > 0
    res = runner.invoke(cli, ["compare", str(tmp_path / "t"), "--policies", "oracle", "--presets", "all"])
    assert res.exit_code == 0 and "restrict" in res.stdout and "%unrestricted" in res.stdout
    res = runner.invoke(cli, ["breakdown", str(tmp_path / "t"), "--json"])
    row = json.loads(res.stdout)["rows"][0]
    assert (row["same_domain_saved"], row["windows_saved"], row["same_process_saved"], row["read_only_saved"]) == (3, 5, 2, 1)
    assert np.isclose(json.loads(res.stdout)["summary"]["pct_of_oracle"]["read_only_saved"], 100 / 7, atol=0.1)
