"""A capture that knows its own cost (issue 10 item 2): its CPU time and the read window of every
snapshot are in the trace, --nice/--sched-idle apply to every thread and worker and are undone at
the end, and ksmd's run-queue wait is sampled with the ground truth."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ksmtrace.errors import CaptureError
from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers.options import CaptureOptions

from tests.unit.test_capture_session import FakeSession


def test_cpu_time_and_read_window_of_every_snapshot(tmp_path, sleeper):
    out = tmp_path / "t"
    with FakeSession(out, sleeper.pid, CaptureOptions()) as s:
        for _ in range(3):
            s.snapshot()
            sum(range(200_000))  # CPU between snapshots counts in the next one
        summary = s.close()
    log = [json.loads(line) for line in (out / "snapshots.jsonl").read_text().splitlines()]
    for e in log:
        assert e["t_end_ns"] > e["t_ns"] and e["read_ns"] == e["t_end_ns"] - e["t_ns"]
        assert 0 <= e["read_cpu_ns"] <= e["cpu_ns"]
    assert log[1]["cpu_ns"] > 1_000_000  # the busy loop before snapshot 1
    assert summary["capture_cpu_seconds"] == pytest.approx(sum(e["cpu_ns"] for e in log) / 1e9)
    assert open_trace(out).manifest["summary"]["capture_cpu_seconds"] > 0


_PRIORITY = textwrap.dedent(
    """
    import json, os, sys, threading
    from ksmtrace_tracers.options import CaptureOptions
    from tests.unit.test_capture_session import FakeSession
    def state():
        tids = os.listdir("/proc/self/task")
        return sorted({(os.getpriority(os.PRIO_PROCESS, int(t)), os.sched_getscheduler(int(t))) for t in tids})
    before = state()
    s = FakeSession(sys.argv[1], int(sys.argv[2]), CaptureOptions(nice=7, sched_idle=True))
    s.snapshot()
    during = state()
    s.close()
    print(json.dumps({"before": before, "during": during, "after": state(), "manifest": json.load(open(sys.argv[1] + "/manifest.json"))["capture"]}))
    """
)


def test_nice_and_sched_idle_apply_to_every_thread_and_are_undone(tmp_path, sleeper):
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    res = subprocess.run([sys.executable, "-c", _PRIORITY, str(tmp_path / "t"), str(sleeper.pid)], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["during"] == [[7, os.SCHED_IDLE]]  # every thread of the process
    assert d["after"] == d["before"] != d["during"]
    assert d["manifest"]["nice"] == 7 and d["manifest"]["sched_policy"] == "idle"


def test_nice_out_of_range(tmp_path):
    with pytest.raises(CaptureError, match="--nice must be between -20 and 19"):
        CaptureOptions(nice=20).validate()
