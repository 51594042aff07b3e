"""``ksmtrace capture`` and ``ksmtrace info`` as a user runs them: bad arguments, Ctrl-C, SIGTERM, a
full disk, damaged traces.  Every failure is one line on stderr, a non-zero exit, no traceback;
the trace stays readable wherever it should."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from ksmtrace.errors import TraceError, TraceVersionError
from ksmtrace.trace.reader import open_trace

from tests._capture_util import Target, assert_one_line_error, committed, needs_root, popen_cli, read_every_table, run_cli, wait_until

pytestmark = [pytest.mark.live, needs_root]


def _free_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_help_has_an_example():
    for cmd in ("capture", "info"):
        res = run_cli([cmd, "--help"])
        assert res.returncode == 0 and "Example:" in res.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-p", "PID_FREE"], "no such process"),
        (["--name", "(["], "bad regular expression"),
        (["--name", "^no-such-process-[0-9]{30}$"], "no process matches"),
        (["-p", "2"], "kernel thread"),
        ([], "no targets"),
        (["-p", "SELF", "--count", "0"], "--count must be >= 1"),
        (["-p", "SELF", "--interval", "0"], "--interval must be > 0"),
        (["--cgroup", "/no/such/cgroup"], "no such cgroup"),
        (["-p", "SELF", "--tracer", "nope"], "no tracer named 'nope'"),
    ],
)
def test_bad_arguments_one_line(tmp_path, args, needle):
    with Target(random_pages=4, zero_pages=0) as t:
        args = [str(_free_pid()) if a == "PID_FREE" else str(t.pid) if a == "SELF" else a for a in args]
        res = run_cli(["capture", *args, "-o", str(tmp_path / "t")])
    line = assert_one_line_error(res, needle)
    assert line.startswith("ksmtrace: error:")
    assert not (tmp_path / "t").exists()  # nothing created for a bad command line


def test_output_must_be_new_or_empty(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("x")
    with Target(random_pages=4, zero_pages=0) as t:
        res = run_cli(["capture", "-p", str(t.pid), "--count", "1", "-o", str(tmp_path / "t")])
    assert_one_line_error(res, "not an empty directory")


def test_capture_then_info_text_and_json(tmp_path):
    out = tmp_path / "t"
    with Target(random_pages=64, zero_pages=16) as t:
        pid = t.pid
        res = run_cli(["capture", "-p", str(pid), "--count", "3", "--interval", "0.05", "--json", "-o", str(out)])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["snapshots"] == 3 and summary["end_reason"] == "count reached (3 snapshots)"
    assert summary["exit_status"] == 0 and summary["gib_per_s"] > 0
    res = run_cli(["info", str(out)])
    assert res.returncode == 0, res.stderr
    for word in ("snapshots", "distinct contents", "B per page-snapshot", "saved(frames)", "saved(hash-only)", "coverage"):
        assert word in res.stdout
    info = json.loads(run_cli(["info", str(out), "--json"]).stdout)
    assert info["snapshots"] == 3 and info["has"]["pfns"] and info["has"]["ground_truth"]
    assert info["per_snapshot"][0]["zero_filled"] >= 16
    assert info["process_list"][0]["pid"] == pid and 0 < info["process_list"][0]["coverage"] <= 1.01
    with Target(random_pages=4, zero_pages=0) as t:
        res = run_cli(["capture", "-p", str(t.pid), "--count", "1", "-q", "-o", str(tmp_path / "q")],
                      env={"KSMTRACE_PROGRESS": "1"})
    assert res.returncode == 0 and res.stderr == ""  # --quiet: no progress, nothing on stderr


@pytest.mark.parametrize("sig,word,status", [(signal.SIGINT, "interrupted (SIGINT)", 0), (signal.SIGTERM, "terminated (SIGTERM)", 0),
                                             (signal.SIGINT, "interrupted (SIGINT)", 130)])
def test_signal_mid_run_leaves_a_valid_trace(tmp_path, sig, word, status):
    out = tmp_path / "t"
    with Target(random_pages=256, zero_pages=0) as t:
        extra = ["--count", "100000"] if status else []  # cut short a bounded capture: 128+signal
        p = popen_cli(["capture", "-p", str(t.pid), "--interval", "0.05", "--freeze", "-o", str(out), *extra])
        try:
            assert wait_until(lambda: committed(out) >= 3, 30)
            p.send_signal(sig)
            stdout, stderr = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == status, stderr
        assert "Traceback" not in stderr
        if status:
            assert len([ln for ln in stderr.splitlines() if ln.strip()]) == 1 and word in stderr
        assert word in stdout
        assert Path(f"/proc/{t.pid}").exists()
        st = Path(f"/proc/{t.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert st in ("S", "R")  # --freeze: never left stopped
    tr = open_trace(out)
    assert tr.manifest["complete"] and tr.manifest["end_reason"].startswith(word)
    assert tr.n_snapshots >= 3
    read_every_table(out)


def test_disk_full_ends_cleanly(tmp_path):
    mnt = Path(tempfile.mkdtemp(prefix="ksmtrace-tmpfs-", dir=tmp_path))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "t"
        with Target(random_pages=2048, zero_pages=0, churn=0.01) as t:
            res = run_cli(["capture", "-p", str(t.pid), "--interval", "0.05", "--count", "500", "-o", str(out)], timeout=120)
        line = assert_one_line_error(res, "disk full")
        assert "complete snapshot" in line
        n = committed(out)
        assert n >= 1
        tables = read_every_table(out)
        tr = open_trace(out)
        assert tr.n_snapshots == n and tables["pages"]["snap"].max() == n - 1
        assert not (out / ".reserve").exists()
        assert tr.manifest["end_reason"].startswith("error:") and "disk full" in tr.manifest["end_reason"]
        # no file of the failed snapshot is left behind
        for table in ("pages", "processes", "vmas"):
            names = sorted(p.name for p in (out / table).iterdir())
            assert names == [f"snap-{i:06d}.parquet" for i in range(n)], names
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


@pytest.fixture
def small_trace(tmp_path):
    out = tmp_path / "t"
    with Target(random_pages=32, zero_pages=4, churn=0.01) as t:
        res = run_cli(["capture", "-p", str(t.pid), "--count", "3", "--interval", "0.05", "-q", "-o", str(out)])
    assert res.returncode == 0, res.stderr
    return out


def test_truncated_parquet_file(small_trace):
    f = small_trace / "pages" / "snap-000001.parquet"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    res = run_cli(["info", str(small_trace)])
    assert_one_line_error(res, "snap-000001.parquet")
    # refused when the trace is opened: the snapshot log recorded the file's size
    with pytest.raises(TraceError, match="snap-000001.parquet: .* bytes, but the snapshot log recorded"):
        open_trace(small_trace)


def test_unknown_format_version(small_trace):
    m = small_trace / "manifest.json"
    d = json.loads(m.read_text())
    d["format_version"] = 99
    m.write_text(json.dumps(d))
    res = run_cli(["info", str(small_trace)])
    assert_one_line_error(res, "format version 99 is not supported")
    with pytest.raises(TraceVersionError):
        open_trace(small_trace)


def test_not_a_trace(tmp_path):
    assert_one_line_error(run_cli(["info", str(tmp_path / "missing")]), "no such trace")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(["info", str(tmp_path / "empty")]), "missing manifest")
