"""Same virtual address first (issue 11 item 3): ksm and pksm compare a page with the pages at the
same virtual address in its related processes before any tree search; the oracle's
same_address_only bounds what that can save.  Both engines agree on every table (helpers.run)."""
import json

import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.engine.cost import DEFAULT_NS, CostModel
from tests.policies._helpers import col, run

ZERO = CostModel(ns={u: 0.0 for u in DEFAULT_NS}, name="zero")
P = {"pages_to_scan": 100, "sleep_millisecs": 10, "smart_scan": 0}


def _trace(mk):
    """A parent (proc 0) and its child (1) hold 'a' at vpn 5, a stranger (2) too; a process (3)
    holds 'a' at vpn 105, offset 5 of a VMA of the same path and length as theirs."""
    snap = {(0, 5): "a", (1, 5): "a", (2, 5): "a", (3, 105): "a", (0, 9): "u0", (1, 9): "u1", (2, 9): "u2", (3, 109): "u3"}
    vmas = {0: [{"start": 0, "end": 16, "path": "/x"}], 1: [{"start": 0, "end": 16, "path": "/x"}],
            2: [{"start": 0, "end": 16, "path": "/x"}], 3: [{"start": 100, "end": 116, "path": "/x"}]}
    return mk([snap] * 4, times=[0, 0.015, 0.025, 0.035], procs={1: {"ppid": 1000}}, vmas=vmas)


def test_ksm_compares_same_address_pages_before_the_trees(mk):
    """6.11, four copies of 'a': the second visit of proc 0's page (scan 2, at 10 ms) passes the
    gate; with the shortcut it merges at once with the first related page that holds 'a', and the
    later copies join that KSM page (related ones through the shortcut, the others as stable
    hits); without it, the unstable tree pairs them.  The merges are the same; the cost is not:
    every visit compares with each related page (a lookup in another mm and a memcmp, counted as
    an unstable node visit), the unique pages at vpn 9 included, so the wider the key — the child
    only (family), every process at vpn 5 (any), the same offset of a same-path same-length VMA
    (vma) — the more compares."""
    tr = _trace(mk)
    off = run(tr, "ksm", P, timing_cost=ZERO, hz=0)
    assert col(off, "pages_sharing") == [0, 3, 3, 3]
    visits = [off.units_total()["unstable_node_visits"]]
    for key in ("family", "any", "vma"):
        on = run(tr, "ksm", {**P, "same_address_first": 1, "same_address_key": key}, timing_cost=ZERO, hz=0)
        assert col(on, "pages_sharing") == [0, 3, 3, 3] and on.table["merges"].sum() == 3
        visits.append(on.units_total()["unstable_node_visits"])
    assert visits == [18, 22, 35, 54]


def test_pksm_and_oracle_same_address(mk):
    tr = _trace(mk)
    for key, bound in (("family", 1), ("any", 2), ("vma", 3)):
        o = run(tr, "oracle", {"same_address_only": 1, "same_address_key": key})
        assert col(o, "frames_saved") == [bound] * 4
        assert (o.table["frames_saved"] <= o.table["oracle_saved"]).all()
    full = run(tr, "oracle")
    assert col(full, "frames_saved") == [3] * 4
    p0 = run(tr, "pksm", {"pages_to_scan": 10, "sleep_millisecs": 10})
    p1 = run(tr, "pksm", {"pages_to_scan": 10, "sleep_millisecs": 10, "same_address_first": 1, "same_address_key": "any"})
    # PKSM takes new pages newest first: proc 3's 'a' goes to the unstable tree; proc 2's then merges
    # with proc 0's through the shortcut (not with proc 3's), proc 1's joins that KSM page, and proc
    # 3's item, unchanged, is never looked at again (PKSM rechecks only changed unstable items):
    # the shortcut leaves it out.  Without it the unstable tree pairs proc 2 with proc 3.
    assert col(p0, "frames_saved")[-1] == 3 and col(p1, "frames_saved")[-1] == 2
    assert p1.units_total()["unstable_node_visits"] > 0 == p0.units_total()["unstable_node_visits"]


def test_zero_pages_merge_within_their_class_in_the_bound(mk):
    """same_address_only merges zero pages like any content within a class (no zero page)."""
    snap = {(0, 1): 0, (1, 1): 0, (0, 2): 0}
    tr = mk([snap], procs={1: {"ppid": 1000}})
    o = run(tr, "oracle", {"same_address_only": 1})
    assert col(o, "frames_saved") == [1] and col(o, "oracle_saved") == [3]


def test_cli_replay_with_the_same_address_parameters(mk):
    tr = _trace(mk)
    for args in (["--policy", "ksm", "-p", "same_address_first=1"], ["--policy", "oracle", "-p", "same_address_only=1"],
                 ["--policy", "pksm", "-p", "same_address_first=1", "-p", "same_address_key=vma"]):
        r = CliRunner().invoke(cli, ["replay", str(tr.path), *args, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["summary"]["frames_saved_final"] >= 1
    r = CliRunner().invoke(cli, ["replay", str(tr.path), "--policy", "ksm", "-p", "same_address_key=nope"])
    assert r.exit_code != 0 and "same_address_key" in r.output and "Traceback" not in r.output
