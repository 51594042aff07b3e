"""Process plumbing shared by the workload processes and the code that starts them:
parent-death signal, stop-signal waiting, /proc queries and careful termination by pid.

/proc is parsed in one place, :mod:`ksmtrace_tracers.procinfo` (the capture's parser); the
queries here are thin views of it."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time

from ksmtrace_tracers import procinfo

PR_SET_PDEATHSIG = 1

#: Signals that ask a workload process to stop; they are blocked and consumed synchronously.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

_libc = None


def _prctl(option: int, arg: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` when the parent (the thread that forked us) dies.

    Returns False if the parent is already gone (``os.getppid()`` differs from
    ``expected_parent``), in which case the caller should exit."""
    _prctl(PR_SET_PDEATHSIG, int(sig))
    return expected_parent is None or os.getppid() == expected_parent


def block_stop_signals() -> None:
    """Block the stop signals so they stay pending until :func:`wait_stop` consumes them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def wait_stop(timeout: float | None) -> bool:
    """Sleep up to ``timeout`` seconds (forever if None); True as soon as a stop signal arrives.

    Needs :func:`block_stop_signals` first."""
    if timeout is None:
        signal.sigwait(STOP_SIGNALS)
        return True
    return signal.sigtimedwait(STOP_SIGNALS, max(0.0, timeout)) is not None


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, starttime)`` of a process from /proc/PID/stat, or None if it is gone."""
    st = procinfo.read_stat(pid)
    return None if st is None else (st.state, st.ppid, st.start_ticks)


def is_running(pid: int, starttime: int | None = None) -> bool:
    """True if ``pid`` exists, is not a zombie and (if given) has this start time."""
    st = procinfo.read_stat(pid)
    if st is None or st.zombie:
        return False
    return starttime is None or st.start_ticks == starttime


def descendants(pids) -> list[int]:
    """Live (non-zombie) descendants of ``pids``, found by parent pid in /proc/*/stat
    (/proc/PID/task/*/children needs CONFIG_PROC_CHILDREN, which many kernels lack)."""
    children = procinfo.ppid_map()
    out: set[int] = set()
    for pid in pids:
        out |= procinfo.descendants(pid, children)
    return sorted(out)


def signal_pid(pid: int, sig: int, starttime: int | None = None) -> bool:
    """Send ``sig`` to ``pid`` if it is still the same running process; True if sent."""
    if not is_running(pid, starttime):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def reap_children(pids, grace: float = 3.0) -> None:
    """SIGTERM our own child processes ``pids``, wait ``grace`` seconds, SIGKILL the rest,
    and reap them all (waitpid)."""
    pending = set(pids)
    for pid in pending:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    killed = False
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                pending.discard(pid)
        if not pending:
            break
        if not killed and time.monotonic() > deadline:
            for pid in pending:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = True
        time.sleep(0.01)
