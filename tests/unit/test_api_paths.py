"""Every library entry point takes a trace's path or an opened trace, and gives the same answer."""
from __future__ import annotations

import pytest

from ksmtrace.errors import KsmtraceError
from ksmtrace.testing.scenarios import library_trace
from ksmtrace.trace.reader import open_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("api") / "t"
    library_trace(p)
    return p


def test_replay_and_compare(trace_path):
    from ksmtrace.replay import compare, replay

    a = replay(str(trace_path), "ksm", {"pages_to_scan": 10})
    b = replay(open_trace(trace_path), "ksm", {"pages_to_scan": 10})
    assert a.table.equals(b.table)
    assert [r.policy for r in compare(trace_path, ["oracle", "pksm"])] == ["oracle", "pksm"]


def test_analyses(trace_path):
    from ksmtrace.analysis.breakdown import breakdown
    from ksmtrace.analysis.delay import delay_report
    from ksmtrace.trace.info import trace_info

    assert breakdown(trace_path).equals(breakdown(open_trace(trace_path)))
    assert trace_info(trace_path)["snapshots"] == trace_info(open_trace(trace_path))["snapshots"]
    assert delay_report(trace_path, {"probation_passes": 2})["params"]["probation_passes"] == 2


def test_sweep_takes_an_opened_trace(trace_path, tmp_path):
    from ksmtrace.sweep import sweep

    t = sweep(open_trace(trace_path), "ksm", {"pages_to_scan": [5, 50]}, tmp_path / "s", workers=1)
    assert t.height == 2


def test_fidelity_needs_ground_truth_not_a_particular_type(trace_path):
    from ksmtrace.fidelity import FidelityError, fidelity

    with pytest.raises(FidelityError, match="no ground truth"):
        fidelity(str(trace_path))


def test_anything_else_is_one_clear_error():
    from ksmtrace.replay import replay

    with pytest.raises(KsmtraceError, match="expected a trace"):
        replay(42, "ksm")
