"""Helpers shared by the capture tests (imported by tests/live/ and tests/unit/test_capture_units.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = os.geteuid() == 0
HAVE_KSM = os.path.isdir("/sys/kernel/mm/ksm")

needs_root = pytest.mark.skipif(not ROOT, reason="live capture needs root (PFNs, kpageflags, reading other processes)")
needs_ksm = pytest.mark.skipif(not (ROOT and HAVE_KSM), reason="needs root and /sys/kernel/mm/ksm (CONFIG_KSM)")

MARK = "ksmtrace-capture-test-target"

_TARGET = textwrap.dedent(
    """
    import mmap, os, sys, time, signal
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    random_pages, zero_pages, churn = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    P = 4096
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    r = mmap.mmap(-1, max(1, random_pages) * P, flags=flags)
    for off in range(0, random_pages * P, 1 << 20):
        n = min(1 << 20, random_pages * P - off)
        r[off:off + n] = os.urandom(n)
    z = mmap.mmap(-1, max(1, zero_pages) * P, flags=flags)
    for off in range(0, zero_pages * P, P):
        z[off] = 0   # a write: a real zero-filled page, not the shared zero page
    print("READY", flush=True)
    if churn > 0:
        while True:
            for off in range(0, random_pages * P, P):
                r[off:off + 8] = os.urandom(8)
            time.sleep(churn)
    else:
        sys.stdin.read()
    """
)


class Target:
    """A target process with ``random_pages`` random and ``zero_pages`` zero-filled private pages.

    ``churn`` > 0: rewrites every random page, then sleeps ``churn`` seconds, forever.
    Killed (by pid) on exit; never left running."""

    def __init__(self, random_pages: int = 256, zero_pages: int = 64, churn: float = 0.0, tag: str = MARK) -> None:
        self.args = [sys.executable, "-c", _TARGET, str(random_pages), str(zero_pages), str(churn), tag]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Target":
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"test target failed to start: {line!r}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.stop()


def proc_state(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def wait_until(pred, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def run_cli(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, KSMTRACE_PROGRESS="0")
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "ksmtrace", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def popen_cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, KSMTRACE_PROGRESS="0")
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "ksmtrace", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def assert_one_line_error(res, *needles: str) -> str:
    """Non-zero exit, exactly one non-empty line on stderr, no traceback."""
    assert res.returncode != 0, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def committed(trace_dir: Path) -> int:
    try:
        return Path(trace_dir, "snapshots.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def read_every_table(path) -> dict:
    """Open a trace and read every table of every committed snapshot (raises on any bad file)."""
    from ksmtrace.trace import schema
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(path)
    tr.check()
    return {t: tr.read_table(t) for t in schema.TABLES}


def watchdogs() -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ksmtrace_tracers.watchdog" in cmd:
            out.append(int(name))
    return out


class TracefsView:
    """tracefs mounted at a private directory for the test to look at (the same instances as
    every other mount), unmounted afterwards.  While it exists, captures use it too."""

    def __init__(self) -> None:
        import tempfile

        from ksmtrace_tracers import tracefs

        self.path = Path(tempfile.mkdtemp(prefix="ksmtrace-test-tracefs-"))
        tracefs.mount(self.path)

    def instances(self, pid: int | None = None) -> list[str]:
        """The trace instances of the capture running as ``pid`` (default: this process) — other
        test runs on the host make instances of their own at the same time."""
        prefix = f"ksmtrace-{os.getpid() if pid is None else pid}-"
        return sorted(n for n in os.listdir(self.path / "instances") if n.startswith(prefix))

    def close(self) -> None:
        from ksmtrace_tracers import tracefs

        for _ in range(100):
            if tracefs.unmount(self.path):
                break
            time.sleep(0.05)
        try:
            self.path.rmdir()
        except OSError:
            pass


def settled_ksm_settings() -> dict:
    """The KSM settings as the last locked block left them, read under the settings lock: other
    test runs on this host change the settings in their own locked blocks, so a read outside the
    lock can catch one of theirs in the middle."""
    from ksmtrace.lab import kernelksm as K

    with K.ksm_settings() as ks:
        return dict(ks.saved)
