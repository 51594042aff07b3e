"""The --freeze watchdog: ``python -m ksmtrace_tracers.watchdog FD``.

A tiny separate process (its own session, so a terminal's Ctrl-C does not reach it) that holds
the read end of a pipe from the capture process.  The capture writes one line per action *before*
it acts:

* ``S <pid> <start_ticks>``: about to SIGSTOP this process;
* ``G <cgroup dir>``: about to write 1 to this cgroup's cgroup.freeze;
* ``C``: everything was resumed.

When the pipe reaches EOF — the capture process exited, normally or not, even by SIGKILL — every
process and cgroup still listed is resumed (SIGCONT, only if the pid still has the same start
time; ``cgroup.freeze`` = 0), and the watchdog exits.  It ignores SIGINT, SIGTERM and SIGHUP.
"""
from __future__ import annotations

import os
import signal
import sys


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def resume(stopped: dict[int, int], cgroups: set[str]) -> None:
    for pid, start in stopped.items():
        if _start_ticks(pid) == start:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
    for cg in cgroups:
        try:
            with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
                f.write("0")
        except OSError:
            pass


def main(argv: list[str]) -> int:
    # a capture under --nice/--sched-idle must still be resumed promptly on a busy host
    try:
        if os.sched_getscheduler(0) == os.SCHED_IDLE:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    fd = int(argv[0])
    stopped: dict[int, int] = {}
    cgroups: set[str] = set()
    buf = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            parts = raw.decode("utf-8", "replace").split(" ", 1)
            if parts[0] == "S" and len(parts) == 2:
                pid, start = parts[1].split()
                stopped[int(pid)] = int(start)
            elif parts[0] == "G" and len(parts) == 2:
                cgroups.add(parts[1])
            elif parts[0] == "C":
                stopped.clear()
                cgroups.clear()
    resume(stopped, cgroups)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
