"""A user's first capture: two plain processes (no madvise, no prctl), then every answer on it.
Nothing undefined is printed, the scope is chosen (anon) and said why, JSON is strict, and doctor
names the missing opt-in as what would unlock the saving."""
from __future__ import annotations

import json
import re

import pytest

from tests._capture_util import Target, needs_root, run_cli

pytestmark = [pytest.mark.live, needs_root]

UNDEFINED = re.compile(r"\b(None|nan|NaN|inf)\b")
ZERO_PAGES = 64


def _strict(text: str):
    def bad(c):
        raise ValueError(c)
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "t"
    with Target(random_pages=256, zero_pages=ZERO_PAGES) as a, Target(random_pages=256, zero_pages=ZERO_PAGES) as b:
        res = run_cli(["capture", "-p", str(a.pid), "-p", str(b.pid), "--count", "3", "--interval", "0.3", "-q",
                       "-o", str(path)], timeout=120)
    assert res.returncode == 0, res.stderr
    return path


def _ok(args, timeout=300):
    res = run_cli([str(a) for a in args], timeout=timeout)
    assert res.returncode == 0, res.stderr
    assert not UNDEFINED.findall(res.stdout), res.stdout
    return res.stdout


def test_compare_and_breakdown_choose_the_anon_scope(capture):
    out = _ok(["compare", capture, "--policies", "oracle,ksm,pksm,hashtable"])
    assert "scope anon: no traced page is in a mergeable VMA" in out
    rows = _strict(_ok(["compare", capture, "--policies", "oracle,ksm,pksm,hashtable", "--json"]))["rows"]
    assert rows[0]["oracle_saved_mean"] >= ZERO_PAGES  # the zero-filled pages of the two processes, at least
    assert all(r["pct_of_oracle"] is None or r["pct_of_oracle"] <= 100.0 for r in rows)
    assert len({r["oracle_saved_mean"] for r in rows}) == 1
    _ok(["breakdown", capture])
    _strict(_ok(["breakdown", capture, "--scope", "recorded", "--json"]))


def test_doctor_names_the_missing_opt_in(capture):
    d = _strict(_ok(["doctor", capture, "--json"]))
    nm = next(f for f in d["findings"] if f["class"] == "not_mergeable")
    assert d["findings"][0]["class"] == "not_mergeable"
    assert nm["unlock_frames_final"] >= ZERO_PAGES and "PR_SET_MEMORY_MERGE" in nm["fix"]
    assert sum(1 for p in d["processes"] if not p["mergeable"]) == 2
    assert "not_mergeable" in _ok(["doctor", capture])


def test_frontier_and_advise(capture, tmp_path):
    out = _ok(["frontier", capture, "--grid", "coarse", "-o", tmp_path / "fr", "--no-plots"])
    assert "Saving at a matched CPU budget" in out
    _strict((tmp_path / "fr" / "frontier.json").read_text())
    out = _ok(["advise", capture, "--cpu-budget", "5", "-o", tmp_path / "adv"])
    assert "must opt in" in out and "VERDICT:" in out
    _strict((tmp_path / "adv" / "advise.json").read_text())
