"""``--freeze``: stop the targets only while a snapshot is read, and always resume them.

Not every process may be stopped: :class:`FreezeGuard` refuses ksmtrace's own ancestors (stopping
the shell or ``sudo`` that waits for ksmtrace), session leaders (shells, terminals, daemons),
init/systemd, sshd and other users' processes unless ``--freeze-unsafe`` is given, and a cgroup
that holds ksmtrace itself is never frozen.  ``--all --freeze`` is refused outright.

Targets selected through ``--cgroup`` are frozen with the cgroup v2 freezer (``cgroup.freeze``
= 1, waiting for ``frozen 1`` in ``cgroup.events``); other targets get SIGSTOP, and the snapshot
waits until every thread shows state ``T``.  A target that was already stopped by someone else
is left alone (and not resumed).  Resuming happens

* in the ``finally`` of the snapshot (normal end, errors, the second Ctrl-C),
* in ksmtrace's SIGINT/SIGTERM handlers (:meth:`Freezer.thaw` is idempotent), and
* by the watchdog process (:mod:`ksmtrace_tracers.watchdog`) if ksmtrace itself dies, even by
  SIGKILL: every stop is announced on a pipe the watchdog reads *before* it is done, and the
  watchdog resumes whatever is still announced when the pipe reaches EOF.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from ksmtrace.errors import CaptureError, TargetError
from ksmtrace_tracers import procinfo as P

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _threads_stopped(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone: nothing left to wait for
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        state = data[data.rindex(b")") + 2 : data.rindex(b")") + 3]
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


def _cgroup_frozen(cg: str) -> bool:
    try:
        with open(os.path.join(cg, "cgroup.events")) as f:
            for line in f:
                if line.startswith("frozen "):
                    return line.split()[1] == "1"
    except OSError:
        return True
    return False


def invoking_uid() -> int:
    """The user ksmtrace acts for: ``SUDO_UID`` when root runs it through sudo, else the real uid."""
    if os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"])
    return os.getuid()


class FreezeGuard:
    """Which targets ``--freeze`` may stop (see the module docstring)."""

    def __init__(self, unsafe: bool = False) -> None:
        self.unsafe = unsafe
        self.ancestors = P.ancestors()
        self.uid = invoking_uid()
        self._refused: dict[tuple[int, int], str | None] = {}

    def refusal(self, pid: int) -> str | None:
        """Why ``pid`` must not be stopped, or None."""
        st = P.read_stat(pid)
        if pid == 1 or (st is not None and st.comm in ("systemd", "init")):
            return "it is init/systemd"
        if pid in self.ancestors:
            return f"it is an ancestor of ksmtrace ({self.ancestors[pid]}): stopping it would stop the capture's own caller"
        if st is None:
            return None
        if st.comm.startswith("sshd"):
            return "it is sshd: stopping it can lock you out of the host"
        if st.session_leader:
            return "it is a session leader (a login shell, terminal or daemon)"
        status = P.read_status(pid)
        if status is not None and status.uid != self.uid:
            return f"it belongs to another user (uid {status.uid}; ksmtrace runs for uid {self.uid})"
        return None

    def _reason(self, m) -> str | None:
        if m.key not in self._refused:
            self._refused[m.key] = None if self.unsafe else self.refusal(m.pid)
        return self._refused[m.key]

    def check(self, members: Iterable, cgroup_dirs: Iterable = ()) -> None:
        """At the start: a target that must not be stopped is an error naming it; so is a cgroup
        that holds ksmtrace itself (freezing it would freeze the capture)."""
        for m in members:
            why = self._reason(m)
            if why is not None:
                raise TargetError(f"--freeze: refusing to stop pid {m.pid} ({m.comm}): {why}; "
                                  "give --freeze-unsafe to stop it anyway")
        own = _own_cgroup_dir()
        for cg in cgroup_dirs:
            if own is not None and (own == str(cg) or own.startswith(str(cg).rstrip("/") + "/")):
                raise TargetError(f"--freeze: cgroup {cg} holds ksmtrace itself; freezing it would freeze the capture")

    def allowed(self, members: list, note=None) -> list:
        """The members that may be stopped now (a target that joined later and must not be stopped
        is read without stopping it; ``note`` is told once).  A cgroup with such a member is not
        frozen as a whole: its other members are stopped one by one."""
        refused = [m for m in members if self._reason(m) is not None]
        if not refused:
            return list(members)
        bad_cgroups = {m.cgroup_dir for m in refused if m.cgroup_dir}
        out = []
        for m in members:
            if self._reason(m) is not None:
                if note is not None:
                    note(f"--freeze: not stopping pid {m.pid} ({m.comm}), which joined the targets: {self._reason(m)}")
                continue
            out.append(replace(m, cgroup_dir=None) if m.cgroup_dir in bad_cgroups else m)
        return out


def _own_cgroup_dir() -> str | None:
    """The cgroup v2 directory of this process."""
    from ksmtrace_tracers.targets import cgroup2_mount

    rel = P.read_cgroup(os.getpid())
    mount = cgroup2_mount()
    if not rel or mount is None or ";" in rel:
        return None
    return str(mount / rel.lstrip("/")).rstrip("/")


class Freezer:
    """Owns the watchdog and the set of targets currently stopped by this capture."""

    def __init__(self, wait_timeout: float = 2.0) -> None:
        self.wait_timeout = wait_timeout
        self.stopped: dict[int, int] = {}
        self.cgroups: list[str] = []
        self._w: int | None = None
        self.proc: subprocess.Popen | None = None
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        r, w = os.pipe()
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ksmtrace_tracers.watchdog", str(r)],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            os.close(r)
            os.close(w)
            raise CaptureError(f"--freeze: cannot start the watchdog process: {exc}") from None
        os.close(r)
        self._w = w

    @property
    def watchdog_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _send(self, line: str) -> None:
        if self._w is None:
            raise CaptureError("--freeze: the watchdog is closed")
        try:
            os.write(self._w, (line + "\n").encode())
        except OSError:
            raise CaptureError("--freeze: the watchdog process died; refusing to stop targets without it") from None

    # -------------------------------------------------------------------------------------
    def freeze(self, members: Iterable, cgroup_dirs: Iterable[str] = ()) -> None:
        """Stop ``members`` (objects with ``pid``, ``start_ticks``, ``cgroup_dir``) and wait."""
        cgs = sorted({str(c) for c in cgroup_dirs})
        for cg in cgs:
            self._send(f"G {cg}")
            self.cgroups.append(cg)
            try:
                with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
                    f.write("1")
            except OSError as exc:
                raise CaptureError(f"--freeze: cannot freeze cgroup {cg}: {exc.strerror}") from None
        for m in members:
            if m.cgroup_dir is not None and str(m.cgroup_dir) in cgs:
                continue
            if m.pid == 1:
                continue  # init cannot be stopped (the kernel drops SIGSTOP for it)
            st = P.read_stat(m.pid)
            if st is None or st.start_ticks != m.start_ticks or st.zombie or st.stopped:
                continue  # gone, or stopped by someone else: not ours to resume
            self._send(f"S {m.pid} {m.start_ticks}")
            self.stopped[m.pid] = m.start_ticks
            try:
                os.kill(m.pid, signal.SIGSTOP)
            except ProcessLookupError:
                self.stopped.pop(m.pid, None)
        deadline = time.monotonic() + self.wait_timeout
        waiting = list(self.stopped)
        while waiting and time.monotonic() < deadline:
            waiting = [p for p in waiting if not _threads_stopped(p)]
            if waiting:
                time.sleep(0.001)
        pending = list(cgs)
        while pending and time.monotonic() < deadline:
            pending = [c for c in pending if not _cgroup_frozen(c)]
            if pending:
                time.sleep(0.001)

    def thaw(self) -> None:
        """Resume everything this capture stopped.  Idempotent; SIGINT/SIGTERM are held off
        while it runs so a second signal cannot leave a target stopped."""
        if not self.stopped and not self.cgroups:
            return
        old = None
        try:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        except (ValueError, OSError):
            pass
        try:
            for pid, start in list(self.stopped.items()):
                st = P.read_stat(pid)
                if st is not None and st.start_ticks == start:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            for cg in self.cgroups:
                try:
                    with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
                        f.write("0")
                except OSError:
                    pass
            self.stopped.clear()
            self.cgroups.clear()
            try:
                self._send("C")
            except CaptureError:
                pass
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def close(self) -> None:
        self.thaw()
        if self._w is not None:
            os.close(self._w)
            self._w = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
