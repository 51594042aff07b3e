"""Per-process metadata from /proc: stat, status, cmdline, cgroup and ksm_stat.

Every reader returns ``None`` when the process is gone (or became a zombie, which has no memory),
never raises for that: a target that exits is an ordinary event of a capture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

PF_KTHREAD = 0x00200000  # task->flags bit of kernel threads (/proc/PID/stat field 9)

_GONE = (FileNotFoundError, ProcessLookupError)


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_ticks: int  # field 22: start time in clock ticks since boot
    pgrp: int = 0
    session: int = 0

    @property
    def session_leader(self) -> bool:
        return self.session == self.pid

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X", "x")

    @property
    def stopped(self) -> bool:
        return self.state in ("T", "t")


def read_stat(pid: int) -> Stat | None:
    """Parse /proc/PID/stat (the comm may contain spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except _GONE:
        return None
    except OSError:
        return None
    try:
        lp = data.index(b"(")
        rp = data.rindex(b")")
        comm = data[lp + 1 : rp].decode("utf-8", "replace")
        fields = data[rp + 2 :].split()
        return Stat(pid, comm, fields[0].decode(), int(fields[1]), int(fields[6]), int(fields[19]), int(fields[2]), int(fields[3]))
    except (ValueError, IndexError):
        return None


def read_cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except _GONE:
        return None
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def read_cgroup(pid: int) -> str | None:
    """The cgroup v2 path (``0::/...`` line), else the v1 lines joined with ``;``."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except _GONE:
        return None
    except OSError:
        return ""
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return ";".join(lines)


@dataclass(frozen=True)
class Status:
    uid: int
    rss_pages: int
    anon_pages: int


def read_status(pid: int) -> Status | None:
    """uid (real), VmRSS and RssAnon in 4 KiB pages from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except _GONE:
        return None
    except OSError:
        return None
    uid = 0
    rss = anon = 0
    for line in text.splitlines():
        if line.startswith("Uid:"):
            parts = line.split()
            if len(parts) > 1:
                uid = int(parts[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) // 4
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1]) // 4
    return Status(uid, rss, anon)


def read_tgid(tid: int) -> int | None:
    """The thread group (process) id of a thread, from /proc/TID/status (None when it is gone)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_ksm_stat(pid: int) -> dict | None:
    """/proc/PID/ksm_stat as a dict (ints and yes/no booleans); None if missing or gone."""
    try:
        with open(f"/proc/{pid}/ksm_stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    out: dict = {}
    for line in text.splitlines():
        key, _, value = line.replace(":", " ").partition(" ")
        value = value.strip()
        if not key:
            continue
        if value in ("yes", "no"):
            out[key] = value == "yes"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                continue
    return out


def read_switches(pid: int) -> dict[str, int] | None:
    """``nr_voluntary_switches`` and ``nr_involuntary_switches`` from /proc/PID/sched."""
    try:
        with open(f"/proc/{pid}/sched", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k in ("nr_voluntary_switches", "nr_involuntary_switches"):
            try:
                out[k] = int(v)
            except ValueError:
                continue
    return out


def ancestors(pid: int | None = None) -> dict[int, str]:
    """pid -> comm of every ancestor of ``pid`` (default: this process), parent first, up to init
    (a wrapper such as ``sudo`` or ``timeout``, the shell, the terminal, ...)."""
    out: dict[int, str] = {}
    st = read_stat(os.getpid() if pid is None else pid)
    while st is not None and st.ppid > 0 and st.ppid not in out:
        parent = read_stat(st.ppid)
        if parent is None:
            break
        out[parent.pid] = parent.comm
        st = parent
    return out


def list_pids() -> list[int]:
    """Every pid in /proc (processes, not threads)."""
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def ppid_map() -> dict[int, list[int]]:
    """parent pid -> live child pids, from every /proc/*/stat (zombies left out)."""
    children: dict[int, list[int]] = {}
    for pid in list_pids():
        st = read_stat(pid)
        if st is not None and not st.zombie:
            children.setdefault(st.ppid, []).append(pid)
    return children


def descendants(root: int, children: dict[int, list[int]]) -> set[int]:
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def task_children(pid: int) -> list[int] | None:
    """Children of ``pid`` from /proc/PID/task/*/children (None when the kernel lacks
    CONFIG_PROC_CHILDREN, or the process is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out: list[int] = []
    found = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
            found = True
        except FileNotFoundError:
            continue
        except OSError:
            continue
    return out if found else None
