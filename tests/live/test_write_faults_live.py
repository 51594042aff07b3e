"""Writes the snapshots cannot see, against the real kernel (issue 10 item 4): ``samewrite`` rewrites
merged pages with the bytes they hold, under real KSM, captured with kernel events at 0.5 s and 1 s
intervals.  The replay with the recorded write faults (``--writes faults``) must count the kernel's
``cow_ksm`` within the issue's 5 %; from the snapshots alone it sees only the few breaks the
capture happens to catch as "no longer a KSM page".

Tolerance: the goal itself (5 %).  Measured with ``bench/write_faults.py`` beside other work (load
average 5.2-6.4 on 2 cores, i.e. more than a CPU-bound neighbour): errors -1.1 % to +3.2 % over six
runs at these intervals (docs/fidelity.md); from the snapshots alone 404-1,065 of ~5,200.
"""
from __future__ import annotations

import pytest

from ksmtrace.fidelity.compare import fidelity
from ksmtrace.lab import kernelksm as K
from ksmtrace.lab.validate import ValidateOptions, ground_truth_run
from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers import tracefs

from tests._capture_util import needs_ksm

pytestmark = [pytest.mark.live, pytest.mark.kernel_ksm, needs_ksm,
              pytest.mark.skipif(tracefs.find_tracefs() is None and not tracefs.TRACEFS.is_dir(), reason="needs tracefs")]

PARAMS = {"processes": 2, "pages": 2048, "period": 0.3, "rewrite_fraction": 0.1}
GOAL = 0.05


@pytest.mark.parametrize("interval", [0.5, 1.0])
def test_cow_breaks_of_same_byte_rewrites(tmp_path, interval):
    with K.ksm_settings() as ks:
        before = dict(ks.saved)
    opts = ValidateOptions(workload="samewrite", workload_params=dict(PARAMS), settings="fast", duration=6.0,
                           interval=interval, plot=False)
    ground_truth_run(opts, tmp_path / "t")
    with K.ksm_settings() as ks:
        assert dict(ks.saved) == before  # every KSM setting restored
    tr = open_trace(tmp_path / "t")
    assert tr.has_table("faults") and tr.manifest["kernel_events"]["lost"] == 0
    rep = fidelity(tr)  # the default: the faults table is used
    real, sim = rep.row("cow_ksm")["real_final"], rep.row("cow_ksm")["sim_final"]
    assert rep.result.spec["writes"] == "faults"
    assert real > 2000  # 18-19 rounds of ~290 merged pages rewritten
    assert abs(sim - real) <= GOAL * real, rep.text()
    faults = tr.read_table("faults").filter("present")
    assert faults.height >= real  # every COW break of a KSM page is a recorded fault
    snap = fidelity(tr, writes="snapshots").row("cow_ksm")["sim_final"]
    assert snap < 0.4 * real  # what the replay saw before: most of the breaks are invisible to snapshots
    # event by event (issue 10 item 5): the merges ksmd's tracepoints report against the replay's,
    # and the per-page time to merge within two real full-scan periods (measured: 0.07 and 0.01 s
    # apart at the median, periods 0.09-0.10 s, under load)
    e = rep.events
    assert e is not None and e["full_scans"]["real"] > 10
    m = e["merges"]
    assert abs(m["simulated"] - m["real"]) <= 0.05 * m["real"], m
    period = e["full_scans"]["real_period_s"]
    t = e["time_to_merge"]
    assert abs(t["sim_s"]["p50"] - t["real_s"]["p50"]) <= 2 * period, (t, period)
    assert e["full_scans"]["lateness_real_ms"]["p50"] >= 0  # the timer never fires early
