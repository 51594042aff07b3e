"""The one reader of the host's KSM state: /sys/kernel/mm/ksm, /proc/vmstat and ksmd's scheduler
statistics.  The capture's ground-truth sampler (:mod:`.groundtruth`) and the live-host wing
(``ksmtrace.lab.kernelksm``, which also *changes* settings) both read through it.

* ``/sys/kernel/mm/ksm/*``: numbers as ``int``; a choice such as ``advisor_mode`` (``[none]
  scan-time``) as the selected value;
* ``/proc/vmstat``: ``cow_ksm`` (COW copies of KSM pages since boot) and ``ksm_swpin_copy``;
* ``/proc/<ksmd>/schedstat``: ksmd's CPU time, its **run-queue wait** (time runnable but not
  running: how much a busy host — or the capture itself — slowed it) and its timeslices.
"""
from __future__ import annotations

import os
from pathlib import Path

from ksmtrace.errors import KernelError

KSM_DIR = Path("/sys/kernel/mm/ksm")


def available() -> bool:
    """True when the kernel has KSM (CONFIG_KSM: /sys/kernel/mm/ksm exists)."""
    return KSM_DIR.is_dir()


def parse(text: str) -> int | str:
    """One sysfs value: an int, or the selected choice of ``[none] scan-time``."""
    text = text.strip()
    if "[" in text:
        return text[text.find("[") + 1 : text.find("]")]
    try:
        return int(text)
    except ValueError:
        return text


def read(name: str) -> int | str:
    """One KSM file; :class:`KernelError` when it is missing or unreadable."""
    try:
        return parse((KSM_DIR / name).read_text())
    except FileNotFoundError:
        raise KernelError(f"{KSM_DIR / name}: no such KSM file (kernel without CONFIG_KSM, or too old)") from None
    except OSError as exc:
        raise KernelError(f"{KSM_DIR / name}: cannot read: {exc.strerror}") from None


def read_files() -> dict[str, int | str]:
    """Every readable file of /sys/kernel/mm/ksm (empty when KSM is missing; never raises)."""
    out: dict[str, int | str] = {}
    try:
        names = sorted(os.listdir(KSM_DIR))
    except OSError:
        return out
    for name in names:
        try:
            with open(KSM_DIR / name) as f:
                out[name] = parse(f.read())
        except OSError:
            continue
    return out


def read_all() -> dict[str, int | str]:
    """Every readable file of /sys/kernel/mm/ksm; :class:`KernelError` when KSM is missing."""
    if not available():
        raise KernelError(f"{KSM_DIR}: missing (kernel without CONFIG_KSM)")
    return read_files()


def vmstat(keys: tuple[str, ...] = ("cow_ksm", "ksm_swpin_copy")) -> dict[str, int | None]:
    """The named /proc/vmstat counters (None where missing)."""
    out: dict[str, int | None] = {k: None for k in keys}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k in out:
                    out[k] = int(v)
    except OSError:
        pass
    return out


def ksmd_pid() -> int | None:
    """pid of the ``ksmd`` kernel thread (a child of kthreadd, pid 2)."""
    from ksmtrace_tracers.procinfo import list_pids, read_stat

    for pid in list_pids():
        st = read_stat(pid)
        if st is not None and st.comm == "ksmd" and st.ppid == 2:
            return pid
    return None


def schedstat(pid: int | None) -> tuple[int, int, int] | None:
    """``(run_ns, wait_ns, timeslices)`` of a task from /proc/PID/schedstat: time on the CPU, time
    waiting on a run queue, and the number of times it ran (None when unreadable)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait, slices = (int(x) for x in f.read().split()[:3])
    except (OSError, ValueError):
        return None
    return run, wait, slices
