"""The host's real KSM: read /sys/kernel/mm/ksm, change settings safely, and always put them back.

>>> from ksmtrace.lab import kernelksm as K
>>> K.read_all()["pages_to_scan"]
100
>>> with K.ksm_settings(pages_to_scan=5000, sleep_millisecs=10, run=1):
...     K.wait_for(lambda: K.read("pages_sharing") > 0, timeout=30)
>>> # every setting is back as found (run too), whatever happened inside the block

:class:`ksm_settings` saves every writable setting first and restores every one that differs on
exit — normal exit, exceptions, KeyboardInterrupt, and SIGTERM (converted to :class:`Terminated`
while the block runs).  Ordering rules it follows (kernel 6.x, ``mm/ksm.c``):

* ``max_page_sharing`` and ``merge_across_nodes`` can only change while no page is merged (the
  kernel answers EBUSY otherwise): it writes ``run=2`` (unmerge everything) first, waits until
  ``pages_shared == 0``, then writes them;
* writing ``advisor_mode`` resets ``pages_to_scan`` (and with the scan-time advisor active,
  ``pages_to_scan`` cannot be written at all), so ``advisor_mode`` goes before ``pages_to_scan``;
* ``run`` is written last; on exit, if the block left pages merged and ``run`` was not 1 before,
  everything is unmerged (``run=2``) before ``run`` goes back to what it was.

Blocks in different processes are serialised by a lock file (``/run/lock/ksmtrace-kernelksm.lock``)
so two test runs cannot interleave their changes.
"""
from __future__ import annotations

import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ksmtrace.errors import KernelError
from ksmtrace_tracers import ksmsysfs

KSM_DIR = ksmsysfs.KSM_DIR
RUN_STOP, RUN_MERGE, RUN_UNMERGE = 0, 1, 2

#: settings the kernel refuses to change while pages are merged (EBUSY)
NEEDS_UNMERGE = ("merge_across_nodes", "max_page_sharing")
#: the order settings are written in (``run`` always last)
APPLY_ORDER = (
    "merge_across_nodes",
    "max_page_sharing",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "pages_to_scan",
    "sleep_millisecs",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "smart_scan",
)
LOCK_PATHS = ("/run/lock/ksmtrace-kernelksm.lock", "/tmp/ksmtrace-kernelksm.lock")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived inside a :class:`ksm_settings` block."""


# --- reading (the one KSM sysfs reader lives with the capture code) ------------------------------
available = ksmsysfs.available
read = ksmsysfs.read
read_all = ksmsysfs.read_all
ksmd_pid = ksmsysfs.ksmd_pid


def writable_settings() -> list[str]:
    """Names of the writable KSM files, in the order :class:`ksm_settings` applies them."""
    names = []
    for p in KSM_DIR.iterdir():
        try:
            if p.stat().st_mode & stat.S_IWUSR:
                names.append(p.name)
        except OSError:
            continue
    order = {n: i for i, n in enumerate(APPLY_ORDER)}
    names.sort(key=lambda n: (n == "run", order.get(n, len(order)), n))
    return names


def settings() -> dict[str, int | str]:
    """The current value of every writable setting."""
    allv = read_all()
    return {n: allv[n] for n in writable_settings() if n in allv}


def settled_settings() -> dict[str, int | str]:
    """:func:`settings` read under the settings lock: the settings as the last
    :class:`ksm_settings` block left them.  Other runs on the host change the settings in their
    own locked blocks, so a plain read can catch one of them in the middle."""
    with ksm_settings() as ks:
        return dict(ks.saved)


def write(name: str, value: int | str) -> None:
    try:
        with open(KSM_DIR / name, "w") as f:
            f.write(str(value))
    except FileNotFoundError:
        raise KernelError(f"{KSM_DIR / name}: no such KSM setting") from None
    except OSError as exc:
        hint = ""
        if exc.errno == 16:
            hint = " (pages are still merged: unmerge with run=2 first)"
        elif name == "pages_to_scan" and exc.errno == 22:
            hint = " (not writable while advisor_mode is scan-time)"
        raise KernelError(f"{KSM_DIR / name}: cannot write {value!r}: {exc.strerror}{hint}") from None


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (returns True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def ksmd_cpu_ns() -> int | None:
    """ksmd's CPU time in ns (first field of /proc/<ksmd>/schedstat)."""
    sched = ksmsysfs.schedstat(ksmd_pid())
    return sched[0] if sched else None


def vmstat(name: str) -> int | None:
    return ksmsysfs.vmstat((name,))[name]


def cow_ksm() -> int | None:
    """/proc/vmstat cow_ksm: COW copies of KSM pages since boot."""
    return vmstat("cow_ksm")


def unmerge_all(timeout: float = 120.0) -> None:
    """Write run=2 (unmerge every KSM page, stop ksmd) and wait until nothing is shared."""
    write("run", RUN_UNMERGE)
    if not wait_for(lambda: read("pages_shared") == 0 and read("pages_sharing") == 0, timeout):
        raise KernelError(f"KSM did not unmerge within {timeout:g} s (pages_shared={read('pages_shared')})")


# --- changing settings ---------------------------------------------------------------------------------
class _Lock:
    def __init__(self, timeout: float) -> None:
        self.fd: int | None = None
        for path in LOCK_PATHS:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                break
            except OSError:
                continue
        if self.fd is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise KernelError(f"another process holds the KSM settings lock ({LOCK_PATHS[0]}) for over {timeout:g} s")
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ksm_settings:
    """Context manager: apply KSM setting changes, restore everything on exit.

    ``ksm_settings(pages_to_scan=5000, sleep_millisecs=10, run=1)``.  Unknown or read-only names
    raise KernelError before anything is written.  ``unmerge_on_exit`` (default True) unmerges the
    pages merged inside the block when ``run`` was not 1 before it.  ``saved`` holds the settings
    found; ``applied`` the changes in the order written.
    """

    def __init__(self, *, unmerge_on_exit: bool = True, unmerge_timeout: float = 120.0, lock_timeout: float = 300.0, **changes: int | str) -> None:
        self.changes = changes
        self.unmerge_on_exit = unmerge_on_exit
        self.unmerge_timeout = unmerge_timeout
        self.lock_timeout = lock_timeout
        self.saved: dict[str, int | str] = {}
        self.applied: list[tuple[str, int | str]] = []
        self._lock: _Lock | None = None
        self._old_term = None
        self._entered = False

    # -- enter ---------------------------------------------------------------------------------
    def __enter__(self) -> "ksm_settings":
        if not available():
            raise KernelError(f"{KSM_DIR}: missing (kernel without CONFIG_KSM)")
        if os.geteuid() != 0:
            raise KernelError("changing KSM settings needs root")
        writable = writable_settings()
        for name in self.changes:
            if name not in writable:
                raise KernelError(f"{name!r} is not a writable KSM setting (settings: {', '.join(writable)})")
        self._lock = _Lock(self.lock_timeout)
        try:
            self.saved = settings()
            self._install_term()
            self._entered = True
            self._apply()
        except BaseException:
            self._exit()
            raise
        return self

    def _install_term(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            raise Terminated("SIGTERM")

        self._old_term = signal.signal(signal.SIGTERM, on_term)

    def _apply(self) -> None:
        ch = dict(self.changes)
        if any(n in ch and str(ch[n]) != str(self.saved.get(n)) for n in NEEDS_UNMERGE):
            unmerge_all(self.unmerge_timeout)
            self.applied.append(("run", RUN_UNMERGE))
        order = [n for n in writable_settings() if n in ch and n != "run"]
        for name in order:
            write(name, ch[name])
            self.applied.append((name, ch[name]))
        if "run" in ch:
            write("run", ch["run"])
            self.applied.append(("run", ch["run"]))

    # -- exit ---------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        self._exit()

    def restore(self) -> None:
        """Write back every saved setting that differs now (safe order; see the module doc)."""
        saved = self.saved
        if not saved:
            return
        now = settings()
        differs = [n for n in saved if str(now.get(n)) != str(saved[n])]
        if not differs:
            return
        errors: list[str] = []
        merged = (read("pages_shared") or 0) != 0 or (read("pages_sharing") or 0) != 0
        need_unmerge = any(n in NEEDS_UNMERGE for n in differs) or (
            self.unmerge_on_exit and merged and str(saved.get("run")) != str(RUN_MERGE)
        )
        if need_unmerge:
            try:
                unmerge_all(self.unmerge_timeout)
            except KernelError as e:
                errors.append(str(e))
        for name in [n for n in writable_settings() if n in differs and n != "run"]:
            try:
                write(name, saved[name])
            except KernelError as e:
                errors.append(str(e))
        if "run" in saved and str(read("run")) != str(saved["run"]):
            try:
                write("run", saved["run"])
            except KernelError as e:
                errors.append(str(e))
        if errors:
            raise KernelError("could not restore KSM settings: " + "; ".join(errors))

    def _exit(self) -> None:
        old_mask = None
        try:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        except (ValueError, OSError):
            pass
        try:
            if self._entered:
                self.restore()
        finally:
            self._entered = False
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
                self._old_term = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
