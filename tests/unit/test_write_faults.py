"""Recorded write faults replayed at their time (``--writes faults``, issue 10 item 4), against
expectations worked out by hand from the kernel's rules (do_wp_page: a write to a KSM page copies it
and counts COW_KSM; to the zero page allocates a page; to a frame a fork shares copies it), on every
engine and runtime face."""
from __future__ import annotations

import pytest

from ksmtrace.errors import KsmtraceError
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from ksmtrace.trace.faults import fault_writes

FACES = [("reference", "readable"), ("fast", "readable"), ("fast", "kernel")]
KSM = {"pages_to_scan": 100, "sleep_millisecs": 20}

#: two processes with one equal page each, unchanged over four snapshots 1 s apart: ksmd (20 ms
#: sleeps) merges them within its first few wake-ups and merges the page again from the stable
#: tree within a few more after each COW break
SAME = [{(0, 10): "a", (1, 10): "a"}] * 4
#: write faults on process 0's page with the same bytes: at 10 ms (before any merge: no COW),
#: 0.5, 1.5, 2.5 s (merged again each time: one COW each), and two 10 us apart at 2.7 s (ksmd cannot
#: merge it again in between: one COW for the two)
SAME_FAULTS = [(0.01, 0, 10), (0.5, 0, 10), (1.5, 0, 10), (2.5, 0, 10), (2.7, 0, 10), (2.70001, 0, 10)]


@pytest.fixture(scope="module")
def same(tmp_path_factory):
    d = tmp_path_factory.mktemp("same")
    return make_trace(d / "faults", SAME, interval=1.0, faults=SAME_FAULTS), make_trace(d / "plain", SAME, interval=1.0)


@pytest.mark.parametrize("engine,runtime", FACES)
@pytest.mark.parametrize("policy", ["ksm", "oracle"])
def test_a_merged_page_rewritten_with_the_same_bytes(same, policy, engine, runtime):
    faults, plain = same
    params = KSM if policy == "ksm" else None
    r = replay(faults, policy, params, engine=engine, runtime=runtime)
    # interval (0,1]: faults at 0.01 (not merged yet for ksm; merged at once by the oracle, which
    # merges at the snapshot) and 0.5; (1,2]: 1.5; (2,3]: 2.5, 2.7, 2.70001
    expect = [0, 1, 1, 2] if policy == "ksm" else [0, 2, 1, 3]
    assert r.table["cow_breaks"].to_list() == expect
    assert r.table["cow_ksm"][-1] == sum(expect) and r.table["cow_zero"][-1] == 0
    assert r.table["frames_saved"][-1] == 1  # merged again after the last write
    assert r.extras["writes"] == {"mode": "faults", "recorded": 6, "unknown_page": 0, "applied": 6}
    assert r.spec["writes"] == "faults"
    # the same trace without its faults table, or replayed without it: no write, no COW
    for other in (replay(plain, policy, params, engine=engine, runtime=runtime),
                  replay(faults, policy, params, engine=engine, runtime=runtime, writes="snapshots")):
        assert other.table["cow_breaks"].sum() == 0
        assert "writes" not in other.extras and "writes" not in other.spec


def test_the_daemon_sees_the_write_at_its_time(tmp_path):
    """A fault 5 ms after the snapshot breaks COW 5 ms after it; ksmd merges the page again well
    before the next snapshot, so that snapshot sees it merged (snapshots alone never unmerge it)."""
    snaps = [{(0, 10): "a", (1, 10): "a"}] * 3
    tr = make_trace(tmp_path / "t", snaps, interval=1.0, faults=[(1.005, 1, 10)])
    r = replay(tr, "ksm", KSM)
    assert r.table["cow_breaks"].to_list() == [0, 0, 1]
    assert r.table["frames_saved"].to_list() == [0, 1, 1]
    assert r.table["merges"].to_list()[2] == 1  # the merge again, in the interval of the fault


@pytest.mark.parametrize("engine,runtime", FACES)
def test_a_fault_and_the_change_the_next_snapshot_shows_are_one_write(tmp_path, engine, runtime):
    """Page (0,10) goes from "a" to "b" at snapshot 2, with faults at 1.5 s and 1.6 s: the first
    fault breaks COW and carries the new content; the second writes a page of its own (no COW);
    the snapshot's change is not a second break."""
    snaps = [{(0, 10): "a", (1, 10): "a"}, {(0, 10): "a", (1, 10): "a"}, {(0, 10): "b", (1, 10): "a"},
             {(0, 10): "b", (1, 10): "a"}]
    tr = make_trace(tmp_path / "t", snaps, interval=1.0, faults=[(1.5, 0, 10), (1.6, 0, 10)])
    plain = make_trace(tmp_path / "p", snaps, interval=1.0)
    r = replay(tr, "ksm", KSM, engine=engine, runtime=runtime)
    assert r.table["cow_breaks"].to_list() == [0, 0, 1, 0]
    assert r.table["frames_saved"].to_list() == [0, 1, 0, 0]
    assert r.table["merges"].to_list()[2] == 0  # "b" is unique: nothing to merge it with after the write
    p = replay(plain, "ksm", KSM, engine=engine, runtime=runtime)  # without faults: the break at the snapshot
    assert p.table["cow_breaks"].to_list() == [0, 0, 1, 0]
    w = fault_writes(tr, tr.prepare("recorded"))
    assert w.cid.tolist()[1] == -1 and w.cid.tolist()[0] >= 0  # the first fault carries the new content


@pytest.mark.parametrize("engine,runtime", FACES)
def test_zero_page_and_fork_shared_frames(tmp_path, engine, runtime):
    """A write to a page ksm mapped to the zero page (use_zero_pages) allocates a page: cow_zero,
    not cow_ksm.  A write to a frame a fork shares copies it: a frame more, no COW_KSM."""
    snaps = [{(0, 10): 0, (0, 11): "u"}] * 3
    tr = make_trace(tmp_path / "z", snaps, interval=1.0, faults=[(1.5, 0, 10)])
    r = replay(tr, "ksm", {**KSM, "use_zero_pages": True}, engine=engine, runtime=runtime)
    assert r.table["cow_ksm"].to_list() == [0, 0, 0]
    assert r.table["cow_zero"].to_list() == [0, 0, 1]
    shared = {"c": "a", "frame": "F"}
    fork = [{(0, 10): shared, (9, 10): shared}] * 3
    tr = make_trace(tmp_path / "f", fork, interval=1.0, procs={9: {"ppid": 1000}}, faults=[(1.5, 9, 10)])
    r = replay(tr, "ksm", KSM, engine=engine, runtime=runtime, start_s=100.0)  # ksmd never runs
    assert r.table["frames_in_use"].to_list() == [1, 1, 2]
    assert r.table["cow_ksm"][-1] == 0 and r.table["cow_zero"][-1] == 0


def test_which_faults_are_writes(tmp_path):
    """Only protection write faults on pages of the trace, between its first and last snapshot."""
    faults = [(0.5, 0, 10), {"t": 0.6, "proc": 0, "vpn": 10, "present": False}, (0.7, 0, 99), (1.2, 7, 10),
              (2.5, 0, 10)]
    tr = make_trace(tmp_path / "t", SAME[:3], interval=1.0, faults=faults)
    w = fault_writes(tr, tr.prepare("recorded"))
    assert w.t_ns.tolist() == [500_000_000] and w.until_ns.tolist() == [1_000_000_000]
    assert w.recorded == 4 and w.unknown == 2  # (2.5 s is after the last snapshot: in no snapshot's table)
    r = replay(tr, "ksm", KSM)
    assert r.extras["writes"]["applied"] == 1


def test_write_mode_errors_and_run_ids(tmp_path, same):
    faults, plain = same
    with pytest.raises(KsmtraceError, match="no faults table"):
        replay(plain, "ksm", writes="faults")
    with pytest.raises(KsmtraceError, match="unknown write mode"):
        replay(faults, "ksm", writes="sometimes")
    a, b = replay(faults, "ksm"), replay(faults, "ksm", writes="snapshots")
    assert a.run_id != b.run_id and a.spec["options"]["writes"] == "faults" and "writes" not in b.spec["options"]
    empty = make_trace(tmp_path / "e", SAME, interval=1.0, faults=[])
    e = replay(empty, "ksm", KSM)
    p = replay(plain, "ksm", KSM)
    assert e.table.equals(p.table)  # a faults table with no fault: exactly the replay without one


def test_cli_writes_option(same):
    from click.testing import CliRunner

    from ksmtrace.cli import cli

    faults, plain = same
    r = CliRunner().invoke(cli, ["replay", str(plain.path), "--writes", "faults", "--quiet"])
    assert r.exit_code != 0 and r.output.strip().startswith("ksmtrace: error:") and "no faults table" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["replay", str(faults.path), "-p", "pages_to_scan=100", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "writes: 6 recorded write faults replayed at their time" in r.output
    r = CliRunner().invoke(cli, ["compare", str(faults.path), "--policies", "oracle,ksm", "--writes", "snapshots",
                                 "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    import json

    assert all(row["cow_breaks"] == 0 for row in json.loads(r.output)["rows"])


@pytest.mark.parametrize("policy", ["pksm", "pksm-delay"])
def test_a_policy_without_fault_writes_takes_the_writes_at_the_snapshots(same, policy):
    """PKSM keeps its own view of each page and learns of writes from the snapshots' events: on a
    trace with faults it replays exactly as without them (auto), and refuses --writes faults."""
    from ksmtrace.errors import KsmtraceError

    faults, plain = same
    a, b = replay(faults, policy), replay(plain, policy)
    assert "writes" not in a.spec and a.table.drop("t_s").equals(b.table.drop("t_s"))
    with pytest.raises(KsmtraceError, match="does not model write faults"):
        replay(faults, policy, writes="faults")
