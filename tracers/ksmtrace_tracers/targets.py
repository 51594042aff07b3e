"""Target selection: which processes a snapshot captures.

Selectors (any combination; the targets of a snapshot are their union):

* ``pids``: fixed processes.  Each is identified by (pid, start time) at the start, so a reused
  pid is never mistaken for the target.
* ``names``: regular expressions searched in the comm and in the command line, re-evaluated at
  every snapshot (new matching processes join).
* ``trees``: a process and all its descendants, re-scanned at every snapshot (children born
  during the capture join).  Children come from /proc/PID/task/*/children when the kernel has
  CONFIG_PROC_CHILDREN, else from the parent pids of /proc/*/stat.  A descendant stays a target
  when it is re-parented (its parent died).
* ``cgroups``: cgroup v2 directories (absolute paths, or paths relative to the cgroup2 mount);
  the processes of the cgroup and of its descendant cgroups, re-read at every snapshot.
* ``all``: every user process with anonymous memory (RssAnon > 0).

Kernel threads, zombies, ksmtrace itself and its own helper processes (the --freeze watchdog,
--workers processes) are never targets.  ``--name`` and ``--all`` never select ksmtrace's
ancestors either (``sudo``, ``timeout``, the shell that started it): ``sudo ksmtrace capture --name
qemu`` captures qemu, not sudo.  Other children of the capturing process are targets (a test
captures the workload it started), and so is an ancestor named explicitly with --pid/--tree.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ksmtrace.errors import TargetError
from ksmtrace_tracers import procinfo as P


@dataclass(frozen=True)
class TargetSpec:
    """What to capture (the CLI's --pid/--name/--tree/--cgroup/--all)."""

    pids: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    trees: tuple[int, ...] = ()
    cgroups: tuple[str, ...] = ()
    all: bool = False

    @classmethod
    def of(cls, targets: Any) -> "TargetSpec":
        """Accept a TargetSpec, a pid, an iterable of pids, or a dict of the fields."""
        if isinstance(targets, TargetSpec):
            return targets
        if isinstance(targets, int):
            return cls(pids=(targets,))
        if isinstance(targets, dict):
            return cls(
                pids=tuple(int(p) for p in targets.get("pids", ())),
                names=tuple(targets.get("names", ())),
                trees=tuple(int(p) for p in targets.get("trees", ())),
                cgroups=tuple(str(c) for c in targets.get("cgroups", ())),
                all=bool(targets.get("all", False)),
            )
        if isinstance(targets, Iterable):
            return cls(pids=tuple(int(p) for p in targets))
        raise TypeError(f"targets: expected TargetSpec, pid or pids, got {type(targets).__name__}")

    @property
    def empty(self) -> bool:
        return not (self.pids or self.names or self.trees or self.cgroups or self.all)

    @property
    def fixed(self) -> bool:
        """Only fixed processes were asked for (--pid, --tree): when they are all gone nothing
        can join any more, so the capture ends."""
        return bool(self.pids or self.trees) and not (self.names or self.cgroups or self.all)

    def describe(self) -> dict[str, Any]:
        return {
            "pids": list(self.pids),
            "names": list(self.names),
            "trees": list(self.trees),
            "cgroups": list(self.cgroups),
            "all": self.all,
        }


@dataclass(frozen=True)
class Member:
    """One target process at one snapshot."""

    pid: int
    start_ticks: int
    comm: str = ""
    cgroup_dir: str | None = None  # selected through --cgroup: frozen with cgroup.freeze

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)


def cgroup2_mount() -> Path | None:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def resolve_cgroup(path: str) -> Path:
    """A cgroup v2 directory from an absolute directory or a path inside the hierarchy."""
    p = Path(path)
    if p.is_absolute() and (p / "cgroup.procs").exists():
        return p
    mount = cgroup2_mount()
    if mount is not None:
        q = mount / str(path).lstrip("/")
        if (q / "cgroup.procs").exists():
            return q
    where = f" (cgroup2 is mounted at {mount})" if mount else " (no cgroup2 hierarchy is mounted)"
    raise TargetError(f"--cgroup {path}: no such cgroup v2 directory{where}")


def cgroup_pids(directory: Path) -> set[int]:
    """Processes of a cgroup and of every descendant cgroup."""
    out: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        if "cgroup.procs" not in filenames:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


class TargetSet:
    """Resolves a :class:`TargetSpec` to live processes, snapshot after snapshot."""

    def __init__(self, spec: TargetSpec, exclude_self: bool = True) -> None:
        if spec.empty:
            raise TargetError("no targets: give --pid, --name, --tree, --cgroup or --all")
        self.spec = spec
        self.self_pid = os.getpid() if exclude_self else -1
        # --name/--all never pick ksmtrace's own wrappers (sudo, timeout, the shell)
        self.ancestors = set(P.ancestors()) if exclude_self else set()
        self._regexes = []
        for rx in spec.names:
            try:
                self._regexes.append(re.compile(rx))
            except re.error as exc:
                raise TargetError(f"--name {rx!r}: bad regular expression: {exc}") from None
        self._fixed: dict[int, int] = {}
        for pid in spec.pids:
            self._fixed[pid] = self._check_pid(pid, "--pid")
        self._roots: dict[int, int] = {}
        for pid in spec.trees:
            self._roots[pid] = self._check_pid(pid, "--tree")
        self._tree_members: set[tuple[int, int]] = set()
        self._cgroups: list[Path] = [resolve_cgroup(c) for c in spec.cgroups]
        self._ever: set[tuple[int, int]] = set()
        # ksmtrace's own helper processes (watchdog, workers): never targets
        self.helpers: set[int] = set()

    @staticmethod
    def _check_pid(pid: int, opt: str) -> int:
        st = P.read_stat(pid)
        if st is None or st.zombie:
            raise TargetError(f"{opt} {pid}: no such process")
        if st.kthread:
            raise TargetError(f"{opt} {pid}: is a kernel thread ({st.comm}) and has no user memory")
        return st.start_ticks

    @property
    def cgroup_dirs(self) -> list[Path]:
        return list(self._cgroups)

    def resolve(self) -> list[Member]:
        """The live targets now, sorted by pid."""
        found: dict[int, Member] = {}
        stats: dict[int, P.Stat] = {}
        children: dict[int, list[int]] | None = None
        if self._regexes or self.spec.all:
            for pid in P.list_pids():
                st = P.read_stat(pid)
                if st is not None:
                    stats[pid] = st
            children = {}
            for st in stats.values():
                if not st.zombie:
                    children.setdefault(st.ppid, []).append(st.pid)
        excluded = {self.self_pid} | set(self.helpers)

        def stat_of(pid: int) -> P.Stat | None:
            st = stats.get(pid)
            return st if st is not None else P.read_stat(pid)

        def add(pid: int, st: P.Stat | None = None, cgroup_dir: str | None = None) -> None:
            if pid in excluded:
                return
            st = st or stat_of(pid)
            if st is None or st.zombie or st.kthread:
                return
            old = found.get(pid)
            if old is not None and old.cgroup_dir is not None:
                return
            found[pid] = Member(pid, st.start_ticks, st.comm, cgroup_dir)

        for pid, start in self._fixed.items():
            st = stat_of(pid)
            if st is not None and st.start_ticks == start:
                add(pid, st)
        for root, start in self._roots.items():
            st = stat_of(root)
            members: set[int] = set()
            if st is not None and st.start_ticks == start and not st.zombie:
                members.add(root)
                kids = self._tree_children(root, children)
                if kids is None:
                    if children is None:
                        children = P.ppid_map()
                    members |= P.descendants(root, children)
                else:
                    members |= kids
            # descendants seen before stay targets after re-parenting
            for pid, start_t in list(self._tree_members):
                s2 = stat_of(pid)
                if s2 is None or s2.start_ticks != start_t or s2.zombie:
                    self._tree_members.discard((pid, start_t))
                else:
                    members.add(pid)
            for pid in members:
                s2 = stat_of(pid)
                if s2 is None:
                    continue
                if pid != root:
                    self._tree_members.add((pid, s2.start_ticks))
                add(pid, s2)
        for cg in self._cgroups:
            for pid in sorted(cgroup_pids(cg)):
                add(pid, cgroup_dir=str(cg))
        if self._regexes:
            for pid, st in stats.items():
                if pid in found or st.kthread or st.zombie or pid in self.ancestors:
                    continue
                cmd = P.read_cmdline(pid) or ""
                if any(rx.search(st.comm) or rx.search(cmd) for rx in self._regexes):
                    add(pid, st)
        if self.spec.all:
            for pid, st in stats.items():
                if pid in found or st.kthread or st.zombie or pid in excluded or pid in self.ancestors:
                    continue
                status = P.read_status(pid)
                if status is not None and status.anon_pages > 0:
                    add(pid, st)
        out = [found[p] for p in sorted(found)]
        self._ever.update(m.key for m in out)
        return out

    def _tree_children(self, root: int, children: dict[int, list[int]] | None) -> set[int] | None:
        """Descendants through /proc/PID/task/*/children (None: the kernel lacks it)."""
        if children is not None:
            return P.descendants(root, children)
        first = P.task_children(root)
        if first is None:
            return None
        out: set[int] = set()
        todo = list(first)
        while todo:
            pid = todo.pop()
            if pid in out:
                continue
            out.add(pid)
            todo.extend(P.task_children(pid) or ())
        return out

    def first(self) -> list[Member]:
        """Resolve once at the start; an empty result is an error (nothing to capture)."""
        members = self.resolve()
        if not members:
            what = []
            if self.spec.names:
                what.append("--name " + " ".join(repr(n) for n in self.spec.names))
            if self.spec.cgroups:
                what.append("--cgroup " + " ".join(self.spec.cgroups))
            if self.spec.all:
                what.append("--all: every user process with anonymous memory except ksmtrace and its callers")
            if self.spec.pids or self.spec.trees:
                what.append("--pid/--tree")
            raise TargetError(f"no process matches the targets ({'; '.join(what)})")
        return members

    def all_gone(self) -> bool:
        """For fixed targets: every fixed process (and every tree member) has exited."""
        for pid, start in list(self._fixed.items()) + list(self._roots.items()):
            st = P.read_stat(pid)
            if st is not None and st.start_ticks == start and not st.zombie:
                return False
        for pid, start in self._tree_members:
            st = P.read_stat(pid)
            if st is not None and st.start_ticks == start and not st.zombie:
                return False
        return True
