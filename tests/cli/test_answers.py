"""The answers from the command line, end to end: `frontier`, `advise` and `doctor` on every sample
trace and on a capture-like trace of processes without mergeable memory; one truth across commands
(strict JSON, one scope chosen with its reason, one kernel profile and KSM start, no None or nan
printed); bad input is one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from ksmtrace.analysis.frontier import DEFAULT_POLICIES
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.samples import sample_names, sample_path
from ksmtrace.testing.scenarios import plain_processes_trace

UNDEFINED = re.compile(r"\b(None|nan|NaN|inf)\b")


def strict(text: str):
    """JSON that a strict parser accepts (no NaN, no Infinity)."""
    def bad(c):
        raise ValueError(f"not strict JSON: {c}")
    return json.loads(text, parse_constant=bad)


def run(args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def assert_defined(text: str):
    found = UNDEFINED.findall(text)
    assert not found, f"undefined values printed: {found}"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "t"
    plain_processes_trace(path)
    return path


# --- a capture of processes without mergeable memory -------------------------------------------------
def test_compare_counts_every_policy_over_the_same_pages(plain):
    r = run(["compare", plain, "--policies", "oracle,ksm,pksm,hashtable"])
    assert_defined(r.output)
    assert "scope anon: no traced page is in a mergeable VMA" in r.output
    assert "saves 180.0 frames" in r.output and "saves 0.0" not in r.output
    rows = strict(run(["compare", plain, "--policies", "oracle,ksm,pksm,hashtable", "--json"]).output)["rows"]
    assert rows[0]["pct_of_oracle"] == 100.0
    assert all(x["pct_of_oracle"] is None or x["pct_of_oracle"] <= 100.0 for x in rows)
    assert {x["oracle_saved_mean"] for x in rows} == {180.0}  # one oracle for every policy
    csv = run(["compare", plain, "--policies", "oracle,ksm", "--csv"]).output
    assert "nan" not in csv.lower()
    # the recorded scope, asked for: nothing to save, said as such
    r = run(["compare", plain, "--policies", "oracle,pksm", "--scope", "recorded"])
    assert "a perfect dedup (the oracle) saves nothing" in r.output
    assert_defined(r.output)
    strict(run(["compare", plain, "--policies", "oracle,pksm", "--scope", "recorded", "--json"]).output)


def test_breakdown_and_replay(plain):
    r = run(["breakdown", plain])
    assert_defined(r.output)
    assert "duplicates 40.0% of frames" in r.output and "scope anon" in r.output
    r = run(["breakdown", plain, "--scope", "recorded"])
    assert_defined(r.output)
    assert "no candidate pages in this scope" in r.output
    strict(run(["breakdown", plain, "--scope", "recorded", "--json"]).output)
    r = run(["replay", plain, "--policy", "ksm"])
    assert_defined(r.output)
    assert "ksm profile 6.12: the traced kernel is 6.18.44" in r.output
    obj = strict(run(["replay", plain, "--policy", "pksm", "--json"]).output)
    assert obj["spec"]["scope"] == "anon" and "no traced page" in obj["scope_reason"]


def test_frontier_advise_doctor_and_demo(plain, tmp_path):
    r = run(["frontier", plain, "--grid", "coarse", "-o", tmp_path / "fr"])
    assert_defined(r.output)
    assert "Saving at a matched CPU budget" in r.output and "scope anon" in r.output
    assert (tmp_path / "fr" / "frontier-cpu.png").exists() and (tmp_path / "fr" / "frontier-cow.png").exists()
    obj = strict((tmp_path / "fr" / "frontier.json").read_text())
    assert obj["oracle_saved_mean_frames"] == 180.0
    r = run(["advise", plain, "--cpu-budget", "5", "--plot", tmp_path / "a.png"])
    assert_defined(r.output)
    assert "must opt in" in r.output and (tmp_path / "a.png").exists()
    strict(run(["advise", plain, "--json", "--no-attribution"]).output)
    r = run(["doctor", plain])
    assert_defined(r.output)
    assert "not_mergeable" in r.output and "PR_SET_MEMORY_MERGE" in r.output
    strict(run(["doctor", plain, "--json"]).output)
    r = run(["demo", "--trace", plain, "-o", tmp_path / "demo", "--grid", "coarse", "--probation", "0,2", "--no-plots"])
    assert_defined(r.output)
    strict((tmp_path / "demo" / "summary.json").read_text())


# --- every sample trace --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sample_names())
def test_frontier_on_every_sample(name, tmp_path):
    text = run(["frontier", sample_path(name), "--grid", "coarse", "--no-plots", "-o", tmp_path]).output
    assert_defined(text)
    assert "Saving at a matched CPU budget" in text and "CPU needed to keep 50 / 80 / 95 %" in text
    obj = strict((tmp_path / "frontier.json").read_text())
    assert {r["policy"] for r in obj["runs"]} == set(DEFAULT_POLICIES)
    n = len(DEFAULT_POLICIES)
    assert len(obj["at_budget"]) == n * 3 and len(obj["to_reach"]) == n * 3
    assert obj["scope"] == "recorded"
    assert any("profile 6.12" in n for n in obj["notes"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sample_names())
def test_advise_on_every_sample(name, tmp_path):
    text = run(["advise", sample_path(name), "-o", tmp_path]).output
    assert_defined(text)
    assert "Confidence: the replay of ksm as the kernel ran it" in text and "VERDICT:" in text
    obj = strict((tmp_path / "advise.json").read_text())
    assert obj["verdict"] in ("go", "no-go")
    assert obj["settings"]["pages_to_scan"] >= 1 and obj["expected"]["cpu_pct"] <= 1.0
    assert obj["confidence"]["source"] == "fidelity"  # every sample has ground truth
    assert obj["attribution"] and all(a["verdict"] for a in obj["attribution"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sample_names())
def test_doctor_on_every_sample(name):
    from ksmtrace.samples import open_sample

    obj = strict(run(["doctor", sample_path(name), "--json"]).output)
    prep = open_sample(name).prepare("recorded")
    assert obj["candidates"]["oracle_saved_mean"] == pytest.approx(float(prep.oracle_saved.mean()))
    assert obj["cannot_tell"] and obj["findings"]
    assert_defined(run(["doctor", sample_path(name)]).output)


# --- one truth --------------------------------------------------------------------------------------------
def test_one_kernel_profile_and_start_for_demo_replay_and_fidelity():
    from ksmtrace.demo import real_ksm
    from ksmtrace.fidelity import fidelity
    from ksmtrace.samples import open_sample

    tr = open_sample("vm")
    rep = fidelity(tr)
    rk = real_ksm(tr)
    obj = strict(run(["replay", sample_path("vm"), "--as-captured", "--json"]).output)
    assert rep.start_s == rk["start_s"] == obj["spec"]["start_ns"] / 1e9
    assert rep.start_exact and rk["start_source"].startswith("recorded")
    assert rep.params["profile"] == rk["profile"] == obj["spec"]["params"]["profile"] == "6.12"
    assert obj["spec"]["params"]["pages_to_scan"] == rk["settings"]["pages_to_scan"] == 1000
    info = json.loads((sample_path("vm") / "capture.json").read_text())
    assert rep.start_s == pytest.approx(info["ksm_started_after_snapshot0_s"])


@pytest.mark.parametrize("args,needle", [
    (["frontier", "{t}", "--policies", "ksm,nope"], "unknown policy 'nope'"),
    (["frontier", "{t}", "--budgets", "0,1"], "numbers > 0"),
    (["advise", "{t}", "--cpu-budget", "-1"], "CPU budget"),
    (["advise", "{missing}"], "no such trace"),
    (["doctor", "{missing}"], "no such trace"),
    (["replay", "{t}", "--policy", "pksm", "--as-captured"], "replays the ksm policy"),
    (["replay", "{t}", "--as-captured"], "needs a trace captured while the real KSM ran"),
])
def test_bad_input_is_one_line(plain, tmp_path, args, needle):
    args = [a.format(t=plain, missing=tmp_path / "missing") for a in args]
    r = subprocess.run([sys.executable, "-m", "ksmtrace"] + args, capture_output=True, text=True)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
