"""Capture while the real KSM merges the known-layout helper: F_KSM flags, shared PFNs and the
ground-truth tables show the merge; every KSM setting is restored afterwards."""
from __future__ import annotations

import polars as pl
import pytest

from ksmtrace.lab import kernelksm as K
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace
from ksmtrace.lab.workloads import KnownLayout
from ksmtrace_tracers import procinfo
from ksmtrace_tracers.capture import Capture, CaptureOptions
from ksmtrace_tracers.targets import TargetSpec

from tests._capture_util import needs_ksm

pytestmark = [pytest.mark.live, pytest.mark.kernel_ksm, needs_ksm]


def _merging(pids) -> int:
    return sum((procinfo.read_ksm_stat(p) or {}).get("ksm_merging_pages", 0) for p in pids)


def test_real_ksm_merge_is_captured(tmp_path):
    out = tmp_path / "ksm.trace"
    # B: 2 x 192 copies of 16 templates (main + peer); C: 128 zero-filled pages (merged into
    # one KSM page: use_zero_pages=0); A, R, X unique: never merged
    with KnownLayout(peer=True) as kl:
        pids = [kl.pid, kl.peer_pid]
        expect_merging = 192 * 2 + 128
        with Capture(out, TargetSpec(pids=tuple(pids)), CaptureOptions(scope="mergeable", ksm_sample_interval=0.05)) as cap:
            cap.snapshot()  # before: nothing merged
            with K.ksm_settings(pages_to_scan=5000, sleep_millisecs=10, use_zero_pages=0, run=1) as ks:
                assert K.wait_for(lambda: _merging(pids) >= expect_merging, timeout=60)
                # stable: no more change for a few scan intervals
                last = [-1]

                def stable():
                    now = _merging(pids)
                    same = now == last[0]
                    last[0] = now
                    return same

                assert K.wait_for(stable, timeout=30, interval=0.2)
                st = cap.snapshot()
        # restored on the way out (and unmerged): looked at under the settings lock, since other
        # test runs on this host change the settings in their own locked blocks
        with K.ksm_settings() as now:
            assert now.saved == ks.saved
        before = ks.saved
    assert st["changed"] == expect_merging
    tr = open_trace(out)
    s1 = tr.snapshot(1)
    ksm = s1.filter((pl.col("flags") & S.F_KSM) != 0)
    assert len(ksm) == expect_merging == _merging_from(tr, 1)
    assert ksm["pfn"].n_unique() == 16 + 1  # 16 template frames + 1 zero-content frame
    assert ((ksm["flags"].to_numpy() & S.F_EXCLUSIVE) == 0).all()
    # equal content <=> equal frame among the merged pages
    per_hash = ksm.group_by("hash").agg(pl.col("pfn").n_unique().alias("frames"))
    assert (per_hash["frames"] == 1).all() and len(per_hash) == 17
    assert len(s1.filter((pl.col("flags") & S.F_KSM) == 0)) == 256 + 64 + 64  # A, R, X of main: unique
    # the ground truth tables saw it too
    g = tr.read_table("ksm")
    assert g.height >= 2 and (g["snap"].unique().sort().to_list() == [0, 1])
    g1 = g.filter(pl.col("snap") == 1)
    assert g1["run"].max() == 1 and g1["pages_sharing"].max() >= expect_merging - 17
    assert g1["pages_to_scan"].max() == 5000 and g1["ksmd_cpu_ns"].max() > g["ksmd_cpu_ns"].min()
    # ksmd's run-queue wait, what fidelity needs to stretch the daemon's clock on a busy host
    assert g["ksmd_wait_ns"].null_count() == 0 and g["ksmd_wait_ns"].max() >= g["ksmd_wait_ns"].min() >= 0
    assert tr.host["ksm"]["run"] == before["run"]  # settings at the start, in the host facts


def _merging_from(tr, snap) -> int:
    ks = tr.read_table("ksm_stat").filter(pl.col("snap") == snap)
    return int(ks["ksm_merging_pages"].sum())
