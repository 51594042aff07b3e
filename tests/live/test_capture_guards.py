"""Capture guards (issue 9 item 7): --freeze refuses what must not be stopped, --all --freeze is
refused, --name never picks ksmtrace's own wrappers, and a target that cannot be read is an error
naming it — never an empty trace with exit status 0."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ksmtrace.trace.reader import open_trace
from ksmtrace_tracers.freeze import FreezeGuard
from ksmtrace_tracers.targets import Member

from tests._capture_util import MARK, Target, assert_one_line_error, needs_root, proc_state, run_cli

pytestmark = [pytest.mark.live, needs_root]
NOBODY = 65534


def test_all_freeze_is_refused(tmp_path):
    res = run_cli(["capture", "--all", "--freeze", "--freeze-unsafe", "--count", "1", "-o", str(tmp_path / "t")])
    assert_one_line_error(res, "--all --freeze is refused")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("who,needle", [("parent", "ancestor of ksmtrace"), ("init", "init/systemd")])
def test_freeze_refuses_ancestors_and_init(tmp_path, who, needle):
    pid = os.getpid() if who == "parent" else 1  # pytest is the CLI's parent
    res = run_cli(["capture", "-p", str(pid), "--freeze", "--count", "1", "-o", str(tmp_path / "t")])
    line = assert_one_line_error(res, f"refusing to stop pid {pid}", needle, "--freeze-unsafe")
    assert line.startswith("ksmtrace: error:")
    assert not (tmp_path / "t").exists()


def test_freeze_refuses_session_leaders_unless_unsafe(tmp_path):
    t = Target(random_pages=16, zero_pages=0)
    t.args = t.args  # started in its own session below
    p = subprocess.Popen(t.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().startswith("READY")
        res = run_cli(["capture", "-p", str(p.pid), "--freeze", "--count", "1", "-o", str(tmp_path / "t")])
        assert_one_line_error(res, f"refusing to stop pid {p.pid}", "session leader")
        res = run_cli(["capture", "-p", str(p.pid), "--freeze", "--freeze-unsafe", "--count", "1", "-q", "-o", str(tmp_path / "u")])
        assert res.returncode == 0, res.stderr
        assert proc_state(p.pid) in ("S", "R")  # resumed
        assert open_trace(tmp_path / "u").capture["freeze_unsafe"] is True
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


_NOBODY_TARGET = ("import os, sys; os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534); "
                  "print('READY', flush=True); sys.stdin.read()")


def test_freeze_refuses_other_users_processes(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", _NOBODY_TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("READY")
        res = run_cli(["capture", "-p", str(p.pid), "--freeze", "--count", "1", "-o", str(tmp_path / "t")])
        assert_one_line_error(res, f"refusing to stop pid {p.pid}", f"another user (uid {NOBODY}")
        # run through sudo by that user, the process is the user's own
        res = run_cli(["capture", "-p", str(p.pid), "--freeze", "--count", "1", "-q", "-o", str(tmp_path / "s")],
                      env={"SUDO_UID": str(NOBODY)})
        assert res.returncode == 0, res.stderr
        assert proc_state(p.pid) in ("S", "R")
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def test_a_target_joining_later_is_not_stopped_when_refused():
    guard = FreezeGuard()
    a = Member(11, 1, "a")
    b = Member(12, 1, "b", cgroup_dir="/sys/fs/cgroup/x")
    c = Member(13, 1, "c", cgroup_dir="/sys/fs/cgroup/x")
    guard._refused = {a.key: "it is sshd", b.key: None, c.key: None}
    notes = []
    assert guard.allowed([a, b, c], notes.append) == [b, c]  # the cgroup is frozen as a whole
    assert notes == ["--freeze: not stopping pid 11 (a), which joined the targets: it is sshd"]
    guard._refused[c.key] = "it is a session leader (a login shell, terminal or daemon)"
    out = guard.allowed([a, b, c], notes.append)
    assert out == [Member(12, 1, "b", None)]  # its cgroup holds a refused process: stopped one by one
    assert FreezeGuard(unsafe=True).allowed([a, b], None) == [a, b]


def test_name_never_matches_ksmtrace_or_its_wrappers(tmp_path):
    tag = f"{MARK}-{os.getpid()}-wrapped"
    with Target(random_pages=8, zero_pages=0, tag=tag) as t:
        # `timeout` (and ksmtrace itself) carry the tag in their command lines
        env = dict(os.environ, KSMTRACE_PROGRESS="0")
        res = subprocess.run(["timeout", "120", sys.executable, "-m", "ksmtrace", "capture", "--name", tag, "--count", "1",
                              "--json", "-o", str(tmp_path / "t")], capture_output=True, text=True, timeout=150, env=env)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["processes"] == 1
        assert open_trace(tmp_path / "t").read_table("processes")["pid"].to_list() == [t.pid]


_AS_NOBODY = r"""
import os, sys
from ksmtrace.cli import main
import ksmtrace.cli.capture, ksmtrace_tracers.procfs, ksmtrace_tracers.capture  # noqa: F401  (before dropping privileges)
import difflib, pyarrow.parquet, gzip, socket  # noqa: F401,E401
from ksmtrace_tracers.hashing import PageHasher
PageHasher(1)  # compile the keyed hash now: this host's stdlib is not readable by nobody
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
main(sys.argv[1:])
"""


def test_a_target_that_cannot_be_read_is_an_error_naming_it():
    d = Path(tempfile.mkdtemp(prefix="ksmtrace-nobody-"))
    try:
        os.chown(d, NOBODY, NOBODY)
        with Target(random_pages=8, zero_pages=0) as t:  # root's process, read by nobody
            pid = t.pid
            res = subprocess.run([sys.executable, "-c", _AS_NOBODY, "capture", "-p", str(pid), "--count", "1",
                                  "-o", str(d / "t")], capture_output=True, text=True, timeout=120,
                                 env=dict(os.environ, KSMTRACE_PROGRESS="0"))
        assert_one_line_error(res, f"--pid {pid}: cannot read the memory of", "permission denied")
        assert not (d / "t").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)
