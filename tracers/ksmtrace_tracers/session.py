"""The backend-neutral capture session: one trace directory, snapshots committed all or nothing.

A session owns what every capture backend shares, so a backend only says what it records:

* the trace directory: created private, locked while the capture runs (``flock`` on the
  directory), with a ``.reserve`` file that makes room for the final manifest on a full disk; the
  leftovers of a capture that was killed (SIGKILL) are cleaned at the next capture into it;
* the targets (:class:`~ksmtrace_tracers.targets.TargetSet`), resolved at every snapshot, and
  ``--freeze`` (targets held only while a snapshot is read, always resumed);
* the snapshot cycle — begin → read (targets held) → end → one atomic commit of every recorder's
  tables → commit or discard — and its statistics: the read window (``t_ns``, ``t_end_ns``), the
  pause, and the capture's own CPU time (``cpu_ns`` since the previous commit, ``read_cpu_ns``
  within the read window: every thread of the capture and its worker processes);
* its priority: ``--nice`` and ``--sched-idle`` for every thread and worker, restored at the end;
* the end: :meth:`Session.close` (manifest complete, end reason), the SIGINT/SIGTERM loop
  (:func:`run_session`), a full disk (the failing snapshot is undone, the trace keeps the others).

A backend is a :class:`Recorder`: the procfs page reader (``pages``, ``processes``, ``vmas``,
``ksm_stat``), the ground-truth sampler (``ksm``) and the kernel-events recorder (``faults``,
``ksm_events``) today; an eBPF or CRIU-image backend would be one more recorder.  Process
incarnations get their trace-unique ``proc`` ids from the session (:meth:`SnapshotContext.proc_for`),
so every recorder's tables join on them.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa

from ksmtrace.errors import CaptureError
from ksmtrace.outputs import check_output_dir
from ksmtrace.progress import ProgressFn, make as make_progress
from ksmtrace.trace import schema as S
from ksmtrace.trace.writer import SNAPSHOT_LOG, TraceWriter, default_host_facts, dir_bytes
from ksmtrace_tracers.ksmsysfs import schedstat
from ksmtrace_tracers.options import CaptureOptions
from ksmtrace_tracers.targets import Member, TargetSet, TargetSpec

PAGE = 4096
RESERVE_FILE = ".reserve"
RESERVE_BYTES = 128 * 1024


# --- what a backend implements ------------------------------------------------------------------
@dataclass
class SnapshotContext:
    """One snapshot in progress, as the recorders see it."""

    snap: int
    keyframe: bool
    t0: int  # CLOCK_MONOTONIC ns at the start
    procs: dict[tuple[int, int], int]  # (pid, start_ticks) -> proc of every committed incarnation
    next_proc: int
    members: list[Member] = field(default_factory=list)  # the targets resolved for this snapshot
    t_read_end: int = 0  # CLOCK_MONOTONIC ns when the read window closed
    stats: dict[str, Any] = field(default_factory=dict)  # goes into the snapshot's log line
    new_procs: dict[tuple[int, int], int] = field(default_factory=dict)
    seen: set[tuple[int, int]] = field(default_factory=set)

    def proc_for(self, m: Member) -> int:
        """The trace-unique ``proc`` id of a process incarnation captured in this snapshot (a
        new one is given on first sight and kept only if the snapshot commits)."""
        self.seen.add(m.key)
        p = self.procs.get(m.key)
        if p is None:
            p = self.new_procs.get(m.key)
            if p is None:
                p = self.next_proc + len(self.new_procs)
                self.new_procs[m.key] = p
        return p

    def proc_of_pid(self, pid: int) -> int | None:
        """The ``proc`` of the incarnation of ``pid`` captured in (or before) this snapshot."""
        for table in (self.new_procs, self.procs):
            for (p, _), proc in table.items():
                if p == pid:
                    return proc
        return None


class Recorder(Protocol):
    """A capture backend plugged into a :class:`Session`.

    ``manifest()`` gives its part of the manifest (``{"host": {...}, "capture": {...}}``);
    ``check_targets(members, session)`` runs before anything is created and raises
    :class:`~ksmtrace.errors.TargetError` for targets the backend cannot record;
    ``start(session)`` runs once the trace exists; per snapshot ``begin`` (before the targets are
    held), ``read`` (while they are held: the read window), ``end`` (returns this snapshot's tables)
    and ``commit(ctx, ok)`` (``ok`` False: the snapshot was undone; forget what ``end`` handed
    over); ``summary()`` adds to the capture summary; ``close()`` releases everything — threads,
    processes, kernel objects — and may return fields for the final manifest.  ``close`` runs on
    every path, also when ``start`` never ran or failed.
    """

    name: str

    def manifest(self) -> dict[str, dict[str, Any]]: ...

    def check_targets(self, members: list[Member], session: "Session") -> None: ...

    def start(self, session: "Session") -> None: ...

    def begin(self, ctx: SnapshotContext) -> None: ...

    def read(self, ctx: SnapshotContext) -> None: ...

    def end(self, ctx: SnapshotContext) -> dict[str, pa.Table]: ...

    def commit(self, ctx: SnapshotContext, ok: bool) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def close(self) -> dict[str, Any]: ...


class RecorderBase:
    """Do-nothing defaults for the :class:`Recorder` hooks a backend does not need."""

    name = "recorder"

    def manifest(self) -> dict[str, dict[str, Any]]:
        return {}

    def check_targets(self, members: list[Member], session: "Session") -> None:
        return None

    def start(self, session: "Session") -> None:
        return None

    def begin(self, ctx: SnapshotContext) -> None:
        return None

    def read(self, ctx: SnapshotContext) -> None:
        return None

    def end(self, ctx: SnapshotContext) -> dict[str, pa.Table]:
        return {}

    def commit(self, ctx: SnapshotContext, ok: bool) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> dict[str, Any]:
        return {}


# --- the session ----------------------------------------------------------------------------------
class Session:
    """A capture in progress: one trace directory, snapshots taken on demand.

    Subclasses give the tracer's identity (``tracer_info``) and build the recorders
    (:meth:`_recorders`).  Raises :class:`~ksmtrace.errors.TargetError` when a target does not
    exist or nothing matches, :class:`~ksmtrace.errors.CaptureError` for a bad option or output;
    nothing is created on disk in either case.
    """

    tracer_info: dict[str, Any] = {}

    def __init__(
        self,
        output: str | os.PathLike | None = None,
        targets: Any = None,
        options: CaptureOptions | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> None:
        opts = options or CaptureOptions()
        if output is not None:
            opts = replace(opts, output=output)
        if targets is not None:
            opts = replace(opts, targets=targets)
        if opts.hold_frozen_s == 0.0 and os.environ.get("KSMTRACE_TEST_HOLD_FROZEN"):
            opts = replace(opts, hold_frozen_s=float(os.environ["KSMTRACE_TEST_HOLD_FROZEN"]))
        opts.validate()
        if opts.output is None:
            raise CaptureError("no output directory given (-o DIR)")
        if opts.targets is None:
            raise CaptureError("no targets: give --pid, --name, --tree, --cgroup or --all")
        self.options = opts
        self.output = Path(opts.output)
        self.progress = make_progress(progress)
        self.closed = False
        self.end_reason: str | None = None
        self.recorders: list[Recorder] = []
        self.freezer = None
        self.guard = None
        self.writer: TraceWriter | None = None
        self.notes: list[str] = []
        self._reserve = self.output / RESERVE_FILE
        self._procs: dict[tuple[int, int], int] = {}
        self._next_proc = 0
        self.totals = {"snapshots": 0, "seconds": 0.0, "read_seconds": 0.0, "pause_ns_max": 0, "pause_ns_total": 0, "cpu_ns": 0}
        self._priority: Priority | None = None
        self._cpu_mark = 0
        self.last_stats: dict[str, Any] | None = None
        self._old_term = _terminate_as_exception()
        try:
            self._setup()
        except BaseException:
            try:
                self._release()
            finally:
                self._restore_term()
            raise

    # --- setup -------------------------------------------------------------------------------
    def _recorders(self) -> list[Recorder]:
        """The backends of this session, in the order their hooks run."""
        raise NotImplementedError

    def note(self, text: str) -> None:
        """Something the user should know (a degraded feature...): kept for the manifest and
        told once, through ``options.notify`` or as ``ksmtrace: note: ...`` on stderr.  Notes made
        while the capture is being set up are told once it has started (a capture that fails to
        start says only why)."""
        if text in self.notes:
            return
        self.notes.append(text)
        if self.writer is not None:
            self._tell(text)

    def _tell(self, text: str) -> None:
        if self.options.notify is not None:
            self.options.notify(text)
        else:
            print(f"ksmtrace: note: {text}", file=sys.stderr, flush=True)

    def _setup(self) -> None:
        opts = self.options
        out = self.output
        if opts.nice is not None or opts.sched_idle:
            # before any worker forks or thread starts: they inherit it
            self._priority = Priority(opts.nice, opts.sched_idle)
        self._cpu_mark = self.cpu_ns()
        self.spec = TargetSpec.of(opts.targets)
        if opts.freeze and self.spec.all:
            # an option conflict: refused before any process is looked at (on a host where --all
            # matches nothing the user would otherwise be told only that)
            raise CaptureError("--all --freeze is refused: it would stop every process of the host (shells, sshd, "
                               "ksmtrace's own caller); freeze chosen targets (--pid, --tree, --name, --cgroup)")
        self.targets = TargetSet(self.spec)
        members = self.targets.first()
        if opts.freeze:
            from ksmtrace_tracers.freeze import FreezeGuard

            self.guard = FreezeGuard(opts.freeze_unsafe)
            self.guard.check(members, self.targets.cgroup_dirs)

        # processes first (a worker pool forks before any thread or the watchdog exists)
        self.recorders = self._recorders()
        for r in self.recorders:
            r.check_targets(members, self)
        # ours and nobody else's to write (ksmtrace.outputs), then new, empty or a killed capture's
        check_output_dir(out, what="trace directory")
        check_output(out)
        if opts.freeze:
            from ksmtrace_tracers.freeze import Freezer

            self.freezer = Freezer()
            if self.freezer.watchdog_pid is not None:
                self.targets.helpers.add(self.freezer.watchdog_pid)

        host = default_host_facts()
        capture: dict[str, Any] = {
            "interval_s": opts.interval,
            "duration_s": opts.duration,
            "count": opts.count,
            "targets": self.spec.describe(),
            "fixed_targets": self.spec.fixed,
            "freeze": opts.freeze,
            "freeze_unsafe": opts.freeze_unsafe,
            "keyframe_every": opts.keyframe_every,
            "nice": opts.nice,
            "sched_policy": "idle" if opts.sched_idle else "other",
        }
        pages_schema = None
        for r in self.recorders:
            part = r.manifest()
            host.update(part.get("host", {}))
            capture.update(part.get("capture", {}))
            pages_schema = getattr(r, "pages_schema", None) or pages_schema
        self.writer = TraceWriter(
            out,
            host=host,
            capture=capture,
            tracer=dict(self.tracer_info),
            command_line=list(opts.command_line) if opts.command_line is not None else list(sys.argv),
            pages_schema=pages_schema,
        )
        make_reserve(self._reserve)
        early = list(self.notes)
        for r in self.recorders:
            r.start(self)
        for text in early:
            self._tell(text)
        if self.notes:
            self.writer.update_manifest(notes=list(self.notes))

    # --- one snapshot ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Take and commit one snapshot; returns its statistics.

        Raises CaptureError when the disk is full (the snapshot is discarded; the trace keeps
        every earlier one)."""
        if self.closed or self.writer is None:
            raise CaptureError("the capture is closed")
        opts = self.options
        snap = len(self.writer.committed)
        keyframe = snap == 0 or (opts.keyframe_every > 0 and snap % opts.keyframe_every == 0)
        ctx = SnapshotContext(snap, keyframe, time.monotonic_ns(), self._procs, self._next_proc)
        cpu0 = self.cpu_ns()
        n_notes = len(self.notes)
        for r in self.recorders:
            r.begin(ctx)
        ctx.members = self.targets.resolve()
        pause_ns = 0
        t_freeze = 0
        try:
            if self.freezer is not None:
                t_freeze = time.monotonic_ns()
                stop = self.guard.allowed(ctx.members, self.note)
                self.freezer.freeze(stop, [m.cgroup_dir for m in stop if m.cgroup_dir])
            for r in self.recorders:
                r.read(ctx)
            if self.freezer is not None and opts.hold_frozen_s > 0:
                time.sleep(opts.hold_frozen_s)
        finally:
            if self.freezer is not None:
                self.freezer.thaw()
                pause_ns = time.monotonic_ns() - t_freeze
        ctx.t_read_end = time.monotonic_ns()
        ctx.stats.update(read_ns=ctx.t_read_end - ctx.t0, pause_ns=pause_ns, read_cpu_ns=self.cpu_ns() - cpu0)
        done = False
        try:
            tables: dict[str, pa.Table] = {}
            for r in self.recorders:
                tables.update(r.end(ctx))
            cpu = self.cpu_ns()
            ctx.stats["cpu_ns"] = cpu - self._cpu_mark  # since the previous commit: every thread, every worker
            try:
                entry = self.writer.commit_snapshot(snap, ctx.t0, ctx.t_read_end, tables, keyframe=keyframe, stats=ctx.stats)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CaptureError(
                        f"{self.output}: disk full ({exc.strerror}) while writing snapshot {snap}; "
                        f"the trace keeps the {snap} complete snapshot(s)"
                    ) from None
                raise CaptureError(f"{self.output}: cannot write snapshot {snap}: {exc.strerror or exc}") from None
            done = True
        finally:
            for r in self.recorders:
                r.commit(ctx, done)
        # committed: adopt the new process incarnations, forget the ones no longer captured
        self._procs = {k: v for k, v in self._procs.items() if k in ctx.seen}
        self._procs.update(ctx.new_procs)
        self._next_proc += len(ctx.new_procs)
        self._cpu_mark = cpu
        if len(self.notes) != n_notes:
            self._update_manifest(notes=list(self.notes))
        seconds = (time.monotonic_ns() - ctx.t0) / 1e9
        tt = self.totals
        tt["snapshots"] += 1
        tt["seconds"] += seconds
        tt["read_seconds"] += (ctx.t_read_end - ctx.t0) / 1e9
        tt["pause_ns_max"] = max(tt["pause_ns_max"], pause_ns)
        tt["pause_ns_total"] += pause_ns
        tt["cpu_ns"] += ctx.stats["cpu_ns"]
        out = dict(ctx.stats, snap=snap, keyframe=keyframe, seconds=seconds, t_ns=ctx.t0, t_end_ns=ctx.t_read_end,
                   bytes=sum(f["bytes"] for f in entry["files"].values()))
        self.last_stats = out
        return out

    def cpu_ns(self) -> int:
        """CPU time used so far by the capture: every thread of this process (the reads, the
        ground-truth and kernel-event threads) and every helper process (--workers)."""
        total = time.process_time_ns()
        for pid in getattr(getattr(self, "targets", None), "helpers", ()):
            st = schedstat(pid)
            if st is not None:
                total += st[0]
        return total

    def _update_manifest(self, **fields: Any) -> None:
        try:
            self.writer.update_manifest(**fields)  # type: ignore[union-attr]
        except OSError:
            pass  # best effort: the snapshot log alone keeps the trace valid

    # --- end -------------------------------------------------------------------------------------
    @property
    def n_snapshots(self) -> int:
        return len(self.writer.committed) if self.writer is not None else 0

    def all_targets_gone(self) -> bool:
        return self.targets.all_gone()

    def summary(self) -> dict[str, Any]:
        tt = self.totals
        out: dict[str, Any] = {
            "output": str(self.output),
            "snapshots": self.n_snapshots,
            "end_reason": self.end_reason,
            "capture_seconds": tt["seconds"],
            "capture_cpu_seconds": tt["cpu_ns"] / 1e9,
            "max_pause_ms": tt["pause_ns_max"] / 1e6 if self.options.freeze else None,
            "fixed_targets": self.spec.fixed if hasattr(self, "spec") else None,
        }
        for r in self.recorders:
            out.update(r.summary())
        size = dir_bytes(self.output) if self.writer is not None else 0
        pages = out.get("pages")
        out["trace_bytes"] = size
        out["bytes_per_page_snapshot"] = (size / pages) if pages else None
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def close(self, reason: str = "closed") -> dict[str, Any]:
        """Finish the trace (manifest: complete, end_reason, the snapshot list, what the
        recorders add) and release everything (targets resumed, helpers and kernel objects
        gone).  Idempotent."""
        if self.closed:
            return self.summary()
        old = None
        try:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        except (ValueError, OSError):
            pass
        try:
            self.closed = True
            self.end_reason = reason
            final = self._release()
            if self.writer is not None:
                try:
                    os.unlink(self._reserve)  # room for the final manifest, even on a full disk
                except OSError:
                    pass
                summary = self.summary()
                full = dict(
                    final,
                    snapshots=[
                        {"snap": e["snap"], "t_ns": e["t_ns"], "t_end_ns": e["t_end_ns"], "keyframe": e["keyframe"]}
                        for e in self.writer.committed
                    ],
                    summary={k: v for k, v in summary.items() if k not in ("output", "trace_bytes", "bytes_per_page_snapshot")},
                )
                if self.notes:
                    full["notes"] = list(self.notes)
                try:
                    self.writer.update_manifest(complete=True, end_reason=reason, **full)
                except OSError:
                    try:  # the snapshot list is also in snapshots.jsonl: drop it if space is short
                        self.writer.manifest.pop("snapshots", None)
                        self.writer.manifest.pop("summary", None)
                        self.writer.update_manifest(complete=True, end_reason=reason, **final)
                    except OSError:
                        pass  # snapshots.jsonl alone still makes a valid trace
                if self.writer.open:
                    self.writer.abandon()  # (complete=True already let go of the directory)
            return self.summary()
        finally:
            self._restore_term()
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _restore_term(self) -> None:
        if self._old_term is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_term)
            except ValueError:
                pass
            self._old_term = None

    def _release(self) -> dict[str, Any]:
        """Resume the targets and close every recorder (each one, whatever the others do);
        returns the recorders' fields for the final manifest."""
        final: dict[str, Any] = {}
        errors: list[BaseException] = []
        if self.freezer is not None:
            try:
                self.freezer.close()
            except BaseException as exc:  # keep releasing the rest
                errors.append(exc)
            finally:
                self.freezer = None
        for r in self.recorders:
            try:
                final.update(r.close() or {})
            except BaseException as exc:
                errors.append(exc)
        if self._priority is not None:
            self._priority.restore()
            self._priority = None
        if errors:
            raise errors[0]
        return final

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("closed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close(f"error: {exc_type.__name__}: {exc}")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a session was open in a program that did not handle SIGTERM."""


def _terminate_as_exception():
    """While a session is open, a SIGTERM that would kill the process outright (no handler) is
    raised as :class:`Terminated` instead, so the session still closes (targets resumed, trace
    instances removed, manifest written).  Returns the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_term(signum, frame):
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    return signal.SIG_DFL


# --- priority ------------------------------------------------------------------------------------
class Priority:
    """``--nice``/``--sched-idle`` for every thread of this process (Linux keeps both per thread;
    threads and processes started later inherit them), undone by :meth:`restore`."""

    def __init__(self, nice: int | None, idle: bool) -> None:
        self.saved: dict[int, tuple[int, int]] = {}
        for tid in _threads():
            try:
                self.saved[tid] = (os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid))
                if nice is not None:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                if idle:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:
                continue
            except PermissionError:
                self.restore()
                raise CaptureError(f"--nice {nice}: permission denied (only root may raise a priority)") from None

    def restore(self) -> None:
        for tid, (nice, policy) in self.saved.items():
            try:
                if os.sched_getscheduler(tid) != policy:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                pass  # the thread is gone, or an unprivileged user may not raise it back
        self.saved.clear()


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


# --- the trace directory --------------------------------------------------------------------------
_LEFTOVER_TOP = {S.MANIFEST, SNAPSHOT_LOG, RESERVE_FILE, "." + S.MANIFEST + ".tmp"}


def check_output(out: Path) -> None:
    """Refuse an output that is not a new or empty directory — except the leftovers of a killed
    capture (SIGKILL, power loss): its ``.reserve`` and half-written files are removed, and when it
    committed no snapshot at all the directory is emptied and used."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CaptureError(f"{out}: output exists and is not an empty directory")
    if not any(out.iterdir()):
        return
    committed = killed_capture(out)
    if committed is None:
        raise CaptureError(f"{out}: output exists and is not an empty directory")
    clean_leftovers(out, everything=committed == 0)
    if committed:
        raise CaptureError(
            f"{out}: holds a trace cut short by a killed capture ({committed} complete snapshot(s); "
            "its leftovers were removed); choose another output directory"
        )


def killed_capture(out: Path) -> int | None:
    """The number of committed snapshots when ``out`` is the trace of a capture that died without
    closing it (manifest ``complete: false`` and no capture holds the directory lock); else None."""
    try:
        manifest = json.loads((out / S.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != S.FORMAT_NAME or manifest.get("complete") is not False:
        return None
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None  # a live capture holds it
    finally:
        os.close(fd)
    try:
        return (out / SNAPSHOT_LOG).read_bytes().count(b"\n")
    except OSError:
        return 0


def clean_leftovers(out: Path, everything: bool) -> None:
    """Remove a killed capture's ``.reserve`` and temporary files; with ``everything`` (it committed
    nothing), every file the writer creates.  Never touches a file the writer does not make."""
    for name in os.listdir(out):
        p = out / name
        if name in (RESERVE_FILE, "." + S.MANIFEST + ".tmp") or (everything and name in _LEFTOVER_TOP):
            try:
                p.unlink()
            except OSError:
                pass
        elif name in S.TABLES and p.is_dir() and not p.is_symlink():
            for f in os.listdir(p):
                if f.endswith(".parquet.tmp") or (everything and f.startswith("snap-") and f.endswith(".parquet")):
                    try:
                        (p / f).unlink()
                    except OSError:
                        pass
            if everything:
                try:
                    p.rmdir()
                except OSError:
                    pass


def make_reserve(path: Path) -> None:
    """A private placeholder file deleted at close, so the final manifest can be written even
    when the disk filled up during the capture."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
    finally:
        os.close(fd)


# --- the loop ------------------------------------------------------------------------------------
class CaptureAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: abandon the snapshot in progress."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def run_session(
    make_session: Callable[..., Session],
    options: CaptureOptions,
    progress: ProgressFn | None = None,
    *,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Capture snapshots every ``options.interval`` seconds until ``count``/``duration`` is reached,
    fixed targets are all gone, or SIGINT/SIGTERM arrives; return the summary.

    The first SIGINT/SIGTERM finishes the snapshot in progress and ends the capture; a second one
    discards the snapshot in progress.  Either way the trace is valid and its manifest says why it
    ended.  ``summary["exit_status"]`` is 0, or 128+signal when a signal cut short a capture that
    had a --count or --duration.  A full disk raises CaptureError after closing the trace.
    """
    prog = make_progress(progress)
    signals: list[int] = []
    stop = threading.Event()
    box: list[Session] = []

    def handler(signum, frame):
        signals.append(signum)
        stop.set()
        if len(signals) >= 2:
            if box and box[0].freezer is not None:
                box[0].freezer.thaw()
            raise CaptureAborted(signum)

    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {}
    if in_main:
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, handler)
    try:
        cap = make_session(options=options, progress=prog)
        box.append(cap)
        opts = cap.options
        reason = None
        exit_status = 0
        try:
            t_start = None
            k = 0
            while True:
                if stop.is_set():
                    break
                st = cap.snapshot()
                if t_start is None:
                    t_start = st["t_ns"] / 1e9
                k += 1
                if on_snapshot is not None:
                    on_snapshot(st)
                present = st.get("present", 0)
                rate = present * PAGE / 2**30 / st["seconds"] if st["seconds"] > 0 else 0.0
                prog(k, opts.count or 0, f"snapshot {k}: {present:,} pages, {st.get('rows', 0):,} rows, {rate:.2f} GiB/s")
                if opts.count is not None and k >= opts.count:
                    reason = f"count reached ({k} snapshots)"
                    break
                if cap.spec.fixed and cap.all_targets_gone():
                    reason = "all targets exited"
                    break
                now = time.monotonic()
                j = int((now - t_start) / opts.interval) + 1
                next_t = t_start + j * opts.interval
                if opts.duration is not None and next_t - t_start > opts.duration + 1e-6:
                    reason = f"duration reached ({opts.duration:g} s)"
                    break
                if stop.wait(max(0.0, next_t - time.monotonic())):
                    break
            if reason is None and signals:
                reason = ("interrupted" if signals[0] == signal.SIGINT else "terminated") + f" ({_SIGNAL_NAMES.get(signals[0], signals[0])})"
                if opts.count is not None or opts.duration is not None:
                    exit_status = 128 + signals[0]
            summary = cap.close(reason or "stopped")
        except CaptureAborted as exc:
            name = _SIGNAL_NAMES.get(exc.signum, str(exc.signum))
            reason = ("interrupted" if signals[0] == signal.SIGINT else "terminated") + f" ({name} twice; the snapshot in progress was discarded)"
            summary = cap.close(reason)
            exit_status = 128 + signals[0]
        except CaptureError as exc:
            cap.close(f"error: {exc}")
            raise
        except BaseException as exc:
            cap.close(f"error: {type(exc).__name__}: {exc}")
            raise
    finally:
        if in_main:
            for s, h in old_handlers.items():
                signal.signal(s, h)
    if summary["snapshots"] == 0 and exit_status == 0:
        exit_status = 128 + (signals[0] if signals else 1)
    summary["exit_status"] = exit_status
    summary["all_targets_exited"] = reason == "all targets exited"
    return summary


__all__ = [
    "CaptureAborted",
    "Recorder",
    "RecorderBase",
    "Session",
    "SnapshotContext",
    "run_session",
    "check_output",
    "clean_leftovers",
    "killed_capture",
    "make_reserve",
]
