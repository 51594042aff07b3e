"""tracefs: find (or mount) it, and private trace instances that are always removed.

A capture never touches the global trace buffer: it records into its own instances under
``<tracefs>/instances/``, named ``ksmtrace-<pid>-<start ticks>-<purpose>`` so that the next capture
can tell an instance whose capture died (SIGKILL) from one in use, and remove it
(:func:`clean_stale`).  :class:`Instance` sets the instance's clock, buffer size, events, filters
and pid list, opens the per-CPU ``trace_pipe_raw`` files, reads the per-CPU ``stats`` (events
overwritten or dropped) and removes the instance (events off, files closed, ``rmdir``).

When tracefs is not mounted anywhere, root mounts it at its standard place, /sys/kernel/tracing
(what systemd does at boot), and undoes that at the end unless someone else is using it.  Which
capture mounted it is written down in /run (:func:`claim_mount`), so a mount left by a capture that
was killed is unmounted by the next capture that ends after it (:func:`release_mount`); a tracefs
that something else mounted is never unmounted.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
MOUNT_MARKER = Path("/run/ksmtrace-tracefs.mount")
INSTANCE_PREFIX = "ksmtrace-"
_INSTANCE_RE = re.compile(r"^ksmtrace-(\d+)-(\d+)-[a-z_]+$")


class TracefsError(Exception):
    """tracefs or one of its files is missing or refuses a setting (the message says which)."""


# --- the mount ------------------------------------------------------------------------------------
def find_tracefs() -> Path | None:
    """Where tracefs is mounted (the standard /sys/kernel/tracing first), or None."""
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "tracefs":
                    found.append(Path(parts[1].replace("\\040", " ")))
    except OSError:
        return None
    for p in found:
        if p == TRACEFS:
            return p
    return found[0] if found else None


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def mount(where: Path = TRACEFS) -> Path:
    """Mount tracefs at ``where`` (root only)."""
    if _libc().mount(b"nodev", str(where).encode(), b"tracefs", 0, None) != 0:
        e = ctypes.get_errno()
        raise TracefsError(f"cannot mount tracefs at {where}: {os.strerror(e)}")
    return where


def unmount(where: Path) -> bool:
    """Unmount tracefs mounted by :func:`mount`; False (and it stays) when someone uses it."""
    return _libc().umount2(str(where).encode(), 0) == 0


def _me() -> str:
    from ksmtrace_tracers.procinfo import read_stat

    st = read_stat(os.getpid())
    return f"{os.getpid()} {st.start_ticks if st else 0}"


def _owner_alive(text: str) -> bool:
    from ksmtrace_tracers.procinfo import read_stat

    try:
        pid, start = (int(x) for x in text.split()[:2])
    except ValueError:
        return False
    st = read_stat(pid)
    return st is not None and st.start_ticks == start and not st.zombie


def claim_mount(where: Path, mounted_now: bool) -> bool:
    """Whether this capture is to unmount tracefs at ``where`` when it ends: it just mounted it, or
    the capture that mounted it (the /run marker) is dead.  Writes the marker in both cases."""
    if where != TRACEFS:
        return False
    if not mounted_now:
        try:
            owner = MOUNT_MARKER.read_text()
        except OSError:
            return False  # mounted by something else: never ours to unmount
        if _owner_alive(owner):
            return False
    try:
        MOUNT_MARKER.write_text(_me() + "\n")
    except OSError:
        return mounted_now
    return True


def release_mount(where: Path) -> bool:
    """At the end of a capture that claimed the mount: unmount it unless it is in use (then the
    marker stays, and a later capture unmounts it).  True when it is gone."""
    try:
        owner = MOUNT_MARKER.read_text()
    except OSError:
        owner = _me()
    if owner.split()[:2] != _me().split() and _owner_alive(owner):
        return False  # another live capture took it over
    if not unmount(where) and find_tracefs() == where:
        return False
    try:
        MOUNT_MARKER.unlink()
    except OSError:
        pass
    return True


# --- events -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class EventFormat:
    """One event's id and field layout, from ``events/<system>/<name>/format``."""

    system: str
    name: str
    id: int
    fields: dict[str, Field]


_FIELD_RE = re.compile(r"field:(.+?);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);")


def read_format(root: Path, system: str, name: str) -> EventFormat | None:
    """The format of ``system:name`` under tracefs ``root`` (None when the kernel lacks it)."""
    d = root / "events" / system / name
    try:
        text = (d / "format").read_text()
        event_id = int((d / "id").read_text())
    except (OSError, ValueError):
        return None
    fields = {}
    for m in _FIELD_RE.finditer(text):
        decl = m.group(1).strip()
        fname = re.sub(r"\[.*\]$", "", decl.split()[-1]).lstrip("*")
        fields[fname] = Field(fname, int(m.group(2)), int(m.group(3)), m.group(4) == "1")
    return EventFormat(system, name, event_id, fields)


def subbuf_size(root: Path) -> int:
    """Bytes of one ring-buffer sub-buffer (the unit trace_pipe_raw returns)."""
    try:
        return int((root / "buffer_subbuf_size_kb").read_text()) * 1024
    except (OSError, ValueError):
        return os.sysconf("SC_PAGE_SIZE")


# --- instances -----------------------------------------------------------------------------------
def instance_name(purpose: str) -> str:
    """``ksmtrace-<pid>-<start ticks>-<purpose>``: names this process incarnation."""
    from ksmtrace_tracers.procinfo import read_stat

    st = read_stat(os.getpid())
    return f"{INSTANCE_PREFIX}{os.getpid()}-{st.start_ticks if st else 0}-{purpose}"


def clean_stale(root: Path) -> list[str]:
    """Remove the instances of captures that died without removing them (their pid is gone or
    belongs to another process now); returns their names."""
    from ksmtrace_tracers.procinfo import read_stat

    removed = []
    try:
        names = os.listdir(root / "instances")
    except OSError:
        return removed
    for name in names:
        m = _INSTANCE_RE.match(name)
        if m is None:
            continue
        st = read_stat(int(m.group(1)))
        if st is not None and st.start_ticks == int(m.group(2)) and not st.zombie:
            continue  # its capture is alive
        inst = Instance.__new__(Instance)
        inst.path, inst.fds, inst.removed = root / "instances" / name, [], False
        if inst.remove():
            removed.append(name)
    return removed


class Instance:
    """A private trace instance: ``Instance(root, name)`` creates it; :meth:`remove` deletes it."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / "instances" / name
        self.fds: list[int] = []
        self.removed = False
        try:
            os.mkdir(self.path)
        except FileExistsError:
            raise TracefsError(f"{self.path}: already exists") from None
        except OSError as exc:
            raise TracefsError(f"cannot create trace instance {self.path}: {exc.strerror}") from None

    def write(self, rel: str, value: str, append: bool = False) -> None:
        """Write a setting (``append``: add to a list such as set_event_pid instead of replacing it)."""
        p = self.path / rel
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            fd = os.open(p, flags)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise TracefsError(f"{p}: cannot write {value[:60]!r}: {exc.strerror}") from None

    def read(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def open_cpus(self) -> list[tuple[int, int]]:
        """(cpu, fd) of every per-CPU ``trace_pipe_raw``, opened non-blocking."""
        out = []
        for d in sorted(self.path.glob("per_cpu/cpu*"), key=lambda p: int(p.name[3:])):
            fd = os.open(d / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self.fds.append(fd)
            out.append((int(d.name[3:]), fd))
        return out

    def stats(self) -> dict[str, int]:
        """Summed over CPUs: events ``overrun`` (overwritten before they were read), ``dropped``
        (lost because the buffer was full), ``commit_overrun`` and ``read``."""
        tot = {"overrun": 0, "dropped": 0, "commit_overrun": 0, "read": 0}
        keys = {"overrun": "overrun", "dropped events": "dropped", "commit overrun": "commit_overrun", "read events": "read"}
        for d in self.path.glob("per_cpu/cpu*"):
            try:
                text = (d / "stats").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                k, _, v = line.partition(":")
                if k.strip() in keys:
                    try:
                        tot[keys[k.strip()]] += int(v.split()[0])
                    except (ValueError, IndexError):
                        pass
        return tot

    def remove(self) -> bool:
        """Events off, files closed, instance removed.  Idempotent; True when it is gone."""
        if self.removed:
            return True
        for rel, v in (("tracing_on", "0"), ("events/enable", "0")):
            try:
                with open(self.path / rel, "w") as f:
                    f.write(v)
            except OSError:
                pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        for _ in range(50):
            try:
                os.rmdir(self.path)
                self.removed = True
                return True
            except FileNotFoundError:
                self.removed = True
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return False
                time.sleep(0.02)  # a reader of ours is still closing
        return False
