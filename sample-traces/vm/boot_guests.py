#!/usr/bin/env python3
"""Boot N small QEMU/TCG guests (Debian kernel + busybox initramfs) for ksmtrace.

Run ``sample-traces/vm/prepare.sh`` first; it fills the cache directory with
``vmlinuz``, ``initramfs.cpio.gz`` and ``manifest.json``.

Command line::

    boot_guests.py [-n 3] [--mem 256] [--cache DIR] [--timeout 120] [--duration S]

starts the guests, waits until every guest printed ``KSMTRACE-GUEST-READY`` on
its serial console, prints one JSON line (``"event": "ready"``, with the QEMU
pids and per-guest boot times) and keeps running until SIGTERM/SIGINT/SIGHUP
(or ``--duration`` seconds), then stops every guest it started (by pid) and
waits for it.  Later stdout lines are JSON too (``"work-done"`` once every
guest finished filling its memory, ``"stopped"`` at the end).  On any failure
all guests are stopped and a one-line error goes to stderr (exit status 1).

Library use::

    from boot_guests import start_guests, stop_guests
    procs = start_guests(3, 256, cache_dir, timeout=120)
    try:
        ...  # procs[i].pid, procs[i].boot_s, procs[i].log_path
    finally:
        stop_guests(procs)

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

READY_MARKER = b"KSMTRACE-GUEST-READY"
WORK_DONE_MARKER = b"KSMTRACE-GUEST-WORK-DONE"
DEFAULT_N = 3
DEFAULT_MEM_MB = 256
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MACHINE = "pc"
# Quiet kernel; panic=-1 + -no-reboot makes QEMU exit at once if the guest panics.
BASE_APPEND = "console=ttyS0 quiet panic=-1"

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc oddities
    _LIBC = None


class GuestBootError(RuntimeError):
    """A guest could not be started or did not become ready; all guests were stopped."""


def default_cache_dir() -> Path:
    env = os.environ.get("KSMTRACE_VM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "ksmtrace" / "vm"


def read_manifest(cache_dir: Path | str) -> dict:
    try:
        return json.loads((Path(cache_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGKILL the guest if its parent dies (even by SIGKILL)."""

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # parent already gone before prctl took effect
            os._exit(1)

    return setup


def _chardev_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # QEMU option syntax escapes commas by doubling


def qemu_command(
    index: int,
    mem_mb: int,
    kernel: Path,
    initrd: Path,
    log_path: Path,
    *,
    qemu: str = "qemu-system-x86_64",
    machine: str = DEFAULT_MACHINE,
    accel: str = "tcg",
    append: str = "",
    extra_args: Sequence[str] = (),
) -> list[str]:
    cmdline = f"{BASE_APPEND} ksmtrace.id={index} {append}".strip()
    return [
        qemu,
        "-name", f"ksmtrace-guest-{index}",
        "-accel", accel,
        "-machine", f"{machine},mem-merge=on",
        "-m", f"{mem_mb}M",
        "-smp", "1",
        "-no-reboot",
        "-nodefaults",
        "-display", "none",
        "-monitor", "none",
        "-nic", "none",
        "-chardev", f"file,id=ser0,path={_chardev_path(log_path)}",
        "-serial", "chardev:ser0",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", cmdline,
        *extra_args,
    ]


class _LogWatcher:
    """Incrementally reads a guest's serial log and records marker lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.seen: dict[bytes, tuple[float, str]] = {}

    def poll(self, markers: Sequence[bytes]) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        now = time.monotonic()
        for raw in lines:
            line = raw.strip(b"\r\x00 ")
            for m in markers:
                if m not in self.seen and line.startswith(m):
                    self.seen[m] = (now, line.decode(errors="replace"))


def _guest_uptime(line: str) -> float | None:
    for tok in line.split():
        if tok.startswith("uptime="):
            try:
                return float(tok[len("uptime="):])
            except ValueError:
                return None
    return None


def _last_lines(path: object, k: int) -> list[str]:
    try:
        text = Path(str(path)).read_text(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()][-k:]


def _failure_detail(proc: subprocess.Popen) -> str:
    """Last QEMU stderr lines, else the last serial console lines (e.g. a kernel panic)."""
    lines = _last_lines(getattr(proc, "stderr_path", ""), 2)
    if not lines:
        console = _last_lines(getattr(proc, "log_path", ""), 200)
        panic = [ln for ln in console if "Kernel panic" in ln]
        lines = ["console: " + ln for ln in (panic[:1] or console[-2:])]
    return "; ".join(lines)[:400]


def stop_guests(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every still-running guest (by pid), wait, SIGKILL stragglers, reap all."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    for p in procs:
        while True:
            try:
                p.wait()
                break
            except KeyboardInterrupt:  # never leave a child behind
                continue
        fh = getattr(p, "_ksmtrace_stderr", None)
        if fh is not None and not fh.closed:
            fh.close()


def start_guests(
    n: int = DEFAULT_N,
    mem_mb: int = DEFAULT_MEM_MB,
    cache_dir: Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    log_dir: Path | str | None = None,
    qemu: str | None = None,
    machine: str = DEFAULT_MACHINE,
    accel: str = "tcg",
    append: str = "",
    extra_args: Sequence[str] = (),
    wait_work_done: bool = False,
    stop_check: Callable[[], bool] | None = None,
    kill_on_parent_exit: bool = True,
) -> list[subprocess.Popen]:
    """Start ``n`` guests and wait until each printed the ready marker.

    Returns the Popen objects (in guest order).  Each carries extra attributes:
    ``guest_index``, ``log_path``, ``stderr_path``, ``cmd``, ``boot_s`` (seconds
    from spawning that QEMU to its ready marker), ``guest_uptime_s`` (guest's
    /proc/uptime at the marker), ``work_done_s`` (only if ``wait_work_done``).

    On failure, timeout, or when ``stop_check()`` returns true, every guest
    started so far is stopped and GuestBootError is raised; any other exception
    (e.g. KeyboardInterrupt) also stops the guests before propagating.
    With ``kill_on_parent_exit`` the guests get PR_SET_PDEATHSIG=SIGKILL, so
    they die with the calling *thread*; call from a long-lived thread.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kernel, initrd = cache / "vmlinuz", cache / "initramfs.cpio.gz"
    for f in (kernel, initrd):
        if not f.is_file():
            raise GuestBootError(f"{f} missing; run sample-traces/vm/prepare.sh {cache}")
    qemu_bin = qemu or shutil.which("qemu-system-x86_64")
    if not qemu_bin:
        raise GuestBootError("qemu-system-x86_64 not found; run sample-traces/vm/prepare.sh")
    if log_dir is None:
        log_dir = cache / "logs" / time.strftime(f"run-%Y%m%d-%H%M%S-{os.getpid()}")
    logs = Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)

    procs: list[subprocess.Popen] = []
    watchers: list[_LogWatcher] = []
    started: list[float] = []
    try:
        for i in range(n):
            log_path = logs / f"guest-{i}.log"
            err_path = logs / f"guest-{i}.qemu-stderr"
            log_path.write_bytes(b"")
            cmd = qemu_command(i, mem_mb, kernel.resolve(), initrd.resolve(), log_path,
                               qemu=qemu_bin, machine=machine, accel=accel,
                               append=append, extra_args=extra_args)
            err = open(err_path, "wb")
            t0 = time.monotonic()
            try:
                p = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                    start_new_session=True,  # terminal ^C goes to us, we stop the guests
                    preexec_fn=_child_setup(os.getpid()) if kill_on_parent_exit else None,
                )
            except BaseException:
                err.close()
                raise
            p.guest_index = i
            p.log_path = str(log_path)
            p.stderr_path = str(err_path)
            p.cmd = cmd
            p._ksmtrace_stderr = err
            procs.append(p)
            watchers.append(_LogWatcher(log_path))
            started.append(t0)

        markers = (READY_MARKER, WORK_DONE_MARKER)
        wanted = WORK_DONE_MARKER if wait_work_done else READY_MARKER
        deadline = time.monotonic() + timeout
        while True:
            for p, w in zip(procs, watchers):
                w.poll(markers)
            if all(wanted in w.seen for w in watchers):
                break
            for p, w in zip(procs, watchers):
                rc = p.poll()
                if rc is not None:
                    w.poll(markers)
                    if wanted not in w.seen:
                        tail = _failure_detail(p)
                        raise GuestBootError(
                            f"guest {p.guest_index} (pid {p.pid}) exited with status {rc} "
                            f"before {wanted.decode()}" + (f": {tail}" if tail else "")
                            + f" (serial log {w.path})")
            if stop_check is not None and stop_check():
                raise GuestBootError("interrupted by signal while waiting for the guests")
            if time.monotonic() > deadline:
                late = [str(p.guest_index) for p, w in zip(procs, watchers) if wanted not in w.seen]
                raise GuestBootError(
                    f"guest(s) {','.join(late)} did not print {wanted.decode()} within "
                    f"{timeout:g} s (serial logs in {logs})")
            time.sleep(0.02)

        for p, w, t0 in zip(procs, watchers, started):
            t_ready, line = w.seen[READY_MARKER]
            p.boot_s = round(t_ready - t0, 3)
            p.guest_uptime_s = _guest_uptime(line)
            if WORK_DONE_MARKER in w.seen:
                p.work_done_s = round(w.seen[WORK_DONE_MARKER][0] - t0, 3)
            p._watcher = w
            p._t0 = t0
        return procs
    except BaseException:
        stop_guests(procs)
        raise


# --------------------------------------------------------------------------- CLI

_stop_signal: int | None = None


def _on_signal(signum: int, _frame: object) -> None:
    global _stop_signal
    _stop_signal = signum


_stdout_ok = True


def _emit(obj: dict) -> None:
    """Print one JSON line; if the reader went away, keep running silently."""
    global _stdout_ok
    if not _stdout_ok:
        return
    try:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _stdout_ok = False
        try:  # keep the interpreter from complaining about stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--guests", type=int, default=DEFAULT_N, help="number of guests (3)")
    ap.add_argument("-m", "--mem", type=int, default=DEFAULT_MEM_MB, help="MiB per guest (256)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache dir from prepare.sh (default $KSMTRACE_VM_CACHE or "
                         "${XDG_CACHE_HOME:-~/.cache}/ksmtrace/vm)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help="seconds to wait for all ready markers (120)")
    ap.add_argument("--duration", type=float, default=None,
                    help="stop the guests after this many seconds (default: run until signalled)")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="serial/stderr logs (default CACHE/logs/run-<time>-<pid>)")
    ap.add_argument("--machine", default=DEFAULT_MACHINE, help="QEMU machine type (pc)")
    ap.add_argument("--qemu", default=None, help="QEMU binary (qemu-system-x86_64 on PATH)")
    ap.add_argument("--append", default="",
                    help="extra kernel command line, e.g. 'ksmtrace.shared_mb=64 ksmtrace.zero_mb=0'")
    ap.add_argument("--wait-work-done", action="store_true",
                    help="print the ready line only after every guest also printed "
                         "KSMTRACE-GUEST-WORK-DONE (memory filled)")
    args = ap.parse_args(argv)
    prog = "boot_guests.py"

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    cache = args.cache if args.cache is not None else default_cache_dir()
    t_start = time.monotonic()
    try:
        procs = start_guests(args.guests, args.mem, cache, args.timeout, log_dir=args.log_dir,
                             qemu=args.qemu, machine=args.machine, append=args.append,
                             wait_work_done=args.wait_work_done,
                             stop_check=lambda: _stop_signal is not None)
    except (GuestBootError, OSError, ValueError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1

    manifest = read_manifest(cache)
    rc = 0
    try:
        _emit({
            "event": "ready",
            "guests": len(procs),
            "mem_mb": args.mem,
            "pids": [p.pid for p in procs],
            "boot_s": [p.boot_s for p in procs],
            "all_ready_s": round(time.monotonic() - t_start, 3),
            "guest_uptime_s": [p.guest_uptime_s for p in procs],
            **({"work_done_s": [p.work_done_s for p in procs]} if args.wait_work_done else {}),
            "machine": args.machine,
            "accel": "tcg",
            "log_dir": str(Path(procs[0].log_path).parent),
            "kernel_package": manifest.get("kernel_package"),
            "kernel_package_version": manifest.get("kernel_package_version"),
            "qemu_package_version": manifest.get("qemu_package_version"),
        })
        work_done_reported = args.wait_work_done  # already in the ready line
        end = None if args.duration is None else time.monotonic() + args.duration
        while _stop_signal is None and (end is None or time.monotonic() < end):
            for p in procs:
                p._watcher.poll((WORK_DONE_MARKER,))
            if not work_done_reported and all(WORK_DONE_MARKER in p._watcher.seen for p in procs):
                work_done_reported = True
                _emit({"event": "work-done", "pids": [p.pid for p in procs],
                       "work_done_s": [round(p._watcher.seen[WORK_DONE_MARKER][0] - p._t0, 3)
                                       for p in procs]})
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                p = dead[0]
                tail = _failure_detail(p)
                print(f"{prog}: error: guest {p.guest_index} (pid {p.pid}) exited unexpectedly "
                      f"with status {p.returncode}" + (f": {tail}" if tail else ""),
                      file=sys.stderr)
                rc = 1
                break
            time.sleep(0.2)
    finally:
        stop_guests(procs)
    _emit({"event": "stopped", "pids": [p.pid for p in procs],
           "returncodes": [p.returncode for p in procs],
           "signal": signal.Signals(_stop_signal).name if _stop_signal else None})
    return rc


if __name__ == "__main__":
    sys.exit(main())
