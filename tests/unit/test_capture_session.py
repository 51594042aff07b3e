"""The backend-neutral capture session: any recorder plugs in, every snapshot is all or nothing,
recorders are closed on every path, and a killed capture's leftovers are cleaned at the next
capture into its directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from ksmtrace.errors import CaptureError
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import open_trace
from ksmtrace.tracer import Tracer, load_tracer
from ksmtrace_tracers.options import CaptureOptions
from ksmtrace_tracers.session import RESERVE_FILE, RecorderBase, Session, SnapshotContext


class Fake(RecorderBase):
    """A backend that records no memory: an empty pages table and one processes row per target."""

    name = "fake"

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def manifest(self):
        return {"capture": {"fake": True}, "host": {"fake_host": 1}}

    def start(self, session):
        self.calls.append("start")

    def begin(self, ctx):
        self.calls.append(f"begin {ctx.snap}")

    def read(self, ctx: SnapshotContext):
        self.calls.append(f"read {ctx.snap} {len(ctx.members)}")

    def end(self, ctx):
        self.calls.append(f"end {ctx.snap}")
        if ctx.snap == self.fail_at:
            self.fail_at = None  # once
            raise RuntimeError("backend failed")
        rows = [dict(snap=ctx.snap, proc=ctx.proc_for(m), pid=m.pid, ppid=0, start_ticks=m.start_ticks, comm=m.comm,
                     cmdline="", cgroup="", uid=0, state="ok", rss_pages=0, anon_pages=0, captured_pages=0,
                     mergeable=False, merge_any=False, t_read_ns=ctx.t0) for m in ctx.members]
        ctx.stats["fake_rows"] = len(rows)
        return {"pages": S.PAGES_SCHEMA.empty_table(), "processes": pa.Table.from_pylist(rows, schema=S.PROCESSES_SCHEMA)}

    def commit(self, ctx, ok):
        self.calls.append(f"commit {ctx.snap} {ok}")

    def close(self):
        self.calls.append("close")
        return {"fake_final": 42}


class FakeSession(Session):
    tracer_info = {"name": "fake", "version": "0"}
    recorder: Fake

    def __init__(self, *a, fail_at=None, **kw):
        self._fail_at = fail_at
        super().__init__(*a, **kw)

    def _recorders(self):
        self.recorder = Fake(self._fail_at)
        return [self.recorder]


def test_any_recorder_plugs_into_the_session(tmp_path, sleeper):
    out = tmp_path / "t"
    with FakeSession(out, sleeper.pid, CaptureOptions(), fail_at=1) as s:
        s.snapshot()
        with pytest.raises(RuntimeError, match="backend failed"):
            s.snapshot()  # undone: the trace keeps snapshot 0 only
        st = s.snapshot()
        assert st["snap"] == 1 and st["fake_rows"] == 1 and st["read_ns"] >= 0
        rec = s.recorder
    assert rec.calls == ["start", "begin 0", "read 0 1", "end 0", "commit 0 True",
                         "begin 1", "read 1 1", "end 1", "commit 1 False",
                         "begin 1", "read 1 1", "end 1", "commit 1 True", "close"]
    tr = open_trace(out)
    assert tr.n_snapshots == 2 and tr.manifest["complete"] and tr.manifest["fake_final"] == 42
    assert tr.capture["fake"] is True and tr.host["fake_host"] == 1
    procs = tr.read_table("processes")
    assert procs["proc"].to_list() == [0, 0]  # one incarnation, one proc id in every snapshot
    assert not (out / RESERVE_FILE).exists()


def test_recorders_are_closed_when_setup_fails(tmp_path, sleeper):
    class Broken(Fake):
        def start(self, session):
            raise CaptureError("cannot start")

    class S2(FakeSession):
        def _recorders(self):
            self.recorder = Broken()
            return [self.recorder]

    made = []
    orig = S2._recorders

    def spy(self):
        r = orig(self)
        made.append(self.recorder)
        return r

    S2._recorders = spy
    with pytest.raises(CaptureError, match="cannot start"):
        S2(tmp_path / "t", sleeper.pid, CaptureOptions())
    assert made and made[0].calls[-1] == "close"


def test_the_procfs_tracer_offers_the_tracer_surface():
    t = load_tracer("procfs")
    assert isinstance(t, Tracer) and t.name == "procfs"
    opts = t.options(output="x", targets=t.targets(pids=[1]), count=1)
    assert isinstance(opts, CaptureOptions)


_KILLED = r"""
import os, sys
from ksmtrace_tracers.options import CaptureOptions
from tests.unit.test_capture_session import FakeSession
s = FakeSession(sys.argv[1], int(sys.argv[2]), CaptureOptions())
for _ in range(int(sys.argv[3])):
    s.snapshot()
print("ready", flush=True)
sys.stdin.read()
"""


def _killed_capture(out, pid, snapshots):
    """A capture SIGKILLed after ``snapshots`` snapshots: its trace, .reserve and all."""
    p = subprocess.Popen([sys.executable, "-c", _KILLED, str(out), str(pid), str(snapshots)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert p.stdout.readline().strip() == "ready"
        # while it runs, the directory is locked: nobody cleans it or captures into it
        with pytest.raises(CaptureError, match="not an empty directory"):
            FakeSession(out, pid, CaptureOptions())
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()
    assert (out / RESERVE_FILE).exists() and not json.loads((out / "manifest.json").read_text())["complete"]


def test_a_killed_capture_is_cleaned_at_the_next_capture_into_its_directory(tmp_path, sleeper):
    # nothing committed: the leftovers are removed and the directory is used
    out = tmp_path / "t0"
    _killed_capture(out, sleeper.pid, 0)
    with FakeSession(out, sleeper.pid, CaptureOptions()) as s:
        s.snapshot()
    assert open_trace(out).n_snapshots == 1 and not (out / RESERVE_FILE).exists()
    # committed snapshots: the .reserve goes, the trace stays, the capture is refused
    out = tmp_path / "t2"
    _killed_capture(out, sleeper.pid, 2)
    (out / "pages" / ".snap-000002.parquet.tmp").write_bytes(b"half")
    with pytest.raises(CaptureError, match="cut short by a killed capture .2 complete snapshot"):
        FakeSession(out, sleeper.pid, CaptureOptions())
    assert not (out / RESERVE_FILE).exists() and not (out / "pages" / ".snap-000002.parquet.tmp").exists()
    assert open_trace(out).n_snapshots == 2
    # a directory with anything else in it is never touched
    other = tmp_path / "other"
    other.mkdir()
    (other / RESERVE_FILE).write_text("mine")
    with pytest.raises(CaptureError, match="not an empty directory"):
        FakeSession(other, sleeper.pid, CaptureOptions())
    assert (other / RESERVE_FILE).read_text() == "mine"
