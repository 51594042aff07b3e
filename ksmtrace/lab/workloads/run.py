"""Starting, watching and stopping the worker processes of a workload."""
from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ksmtrace.errors import WorkloadError
from ksmtrace.lab.workloads import procs
from ksmtrace.lab.workloads.content import PAGE_SIZE
from ksmtrace.lab.workloads.model import Event

#: Runs (anything with ``stop()``) not stopped yet; stopped at interpreter exit at the latest.
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:  # pragma: no cover - exercised at interpreter exit
    with _LIVE_LOCK:
        runs = list(_LIVE)
    for run in runs:
        run.stop()


def track(obj) -> None:
    """Remember an object with a ``stop()`` method until :func:`untrack`; stopped at exit."""
    with _LIVE_LOCK:
        _LIVE.add(obj)


def untrack(obj) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(obj)


def worker_env() -> dict[str, str]:
    """Environment of a workload process: this ksmtrace importable, one math thread."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def stderr_tail(f) -> str:
    """The last non-empty line a process wrote to its stderr file."""
    try:
        f.seek(0)
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except (OSError, ValueError):
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


class WorkloadRun:
    """Live processes of a started workload.

    ``pids`` lists every process pid (top-level workers, then forked children as their fork
    EVENT arrives), ``ready_time`` is ``time.monotonic()`` once all workers printed READY and
    ``t0[pid]`` the instant every worker counts its step offsets from: that same time, sent to
    them then (a start barrier; forked children inherit their parent's).  ``proc_pid[proc]`` maps logical process numbers to pids.
    Use as a context manager or call :meth:`stop`; runs left over are stopped at interpreter
    exit, and the workers die with the thread that started them (PR_SET_PDEATHSIG), so start
    them from a long-lived thread."""

    def __init__(self, workload):
        self.workload = workload
        self.ready_time: float | None = None
        self.t0: dict[int, float] = {}
        self.proc_pid: dict[int, int] = {}
        self._popen: list[subprocess.Popen] = []
        self._stderr: dict[int, object] = {}
        self._threads: list[threading.Thread] = []
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._forked: dict[int, int | None] = {}  # pid -> starttime
        self._regions: dict[int, dict[object, dict]] = {}
        self._log: list[dict] = []
        self._stopped = False

    # --- start --------------------------------------------------------------------------------

    @classmethod
    def launch(cls, workload, timeout: float = 30.0) -> "WorkloadRun":
        need = workload.max_pages() * PAGE_SIZE
        avail = available_bytes()
        if avail is not None and need > avail * 0.8:
            raise WorkloadError(f"workload {workload.name!r} needs {need >> 20} MiB but only "
                                f"{avail >> 20} MiB are available; lower its page counts")
        run = cls(workload)
        track(run)
        try:
            run._spawn_all(timeout)
        except BaseException:
            run.stop()
            raise
        return run

    def _spawn_all(self, timeout: float) -> None:
        env = worker_env()
        by_pid: dict[int, int] = {}
        for proc in self.workload.processes():
            spec = self.workload.spec(proc, parent=os.getpid(), log=True, barrier=True)
            err = tempfile.TemporaryFile()
            p = subprocess.Popen(
                [sys.executable, "-m", "ksmtrace.lab.workloads.worker",
                 json.dumps(spec, separators=(",", ":"))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                close_fds=True)
            self._popen.append(p)
            self._stderr[p.pid] = err
            by_pid[p.pid] = proc
            t = threading.Thread(target=self._reader, args=(p,), daemon=True,
                                 name=f"ksmtrace-workload-{p.pid}")
            t.start()
            self._threads.append(t)
        waiting = set(by_pid)
        deadline = time.monotonic() + timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkloadError(f"workload {self.workload.name!r}: {len(waiting)} "
                                    f"process(es) not READY after {timeout:g} s; raise the "
                                    f"timeout or lower the page counts")
            try:
                kind, pid, payload = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if kind == "READY":
                waiting.discard(pid)
                self.t0[pid] = float(payload["t0"])
                self.proc_pid[by_pid[pid]] = pid
            elif kind == "EOF" and pid in waiting:
                p = next(p for p in self._popen if p.pid == pid)
                rc = p.wait()
                tail = stderr_tail(self._stderr[pid])
                raise WorkloadError(f"workload {self.workload.name!r} process {by_pid[pid]} "
                                    f"exited with status {rc} before READY"
                                    + (f": {tail}" if tail else ""))
        # every worker counts its steps from the same instant, however long each took to fill
        # its memory (on a busy host READY lines came 0.6-0.8 s apart)
        t_go = time.monotonic()
        for p in self._popen:
            try:
                p.stdin.write(f"GO {t_go!r}\n".encode())
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            self.t0[p.pid] = t_go
        self.ready_time = t_go

    def _reader(self, p: subprocess.Popen) -> None:
        """Collect READY/EVENT lines of one worker (and of the children it forks)."""
        try:
            for raw in p.stdout:
                tag, _, rest = raw.decode("utf-8", "replace").strip().partition(" ")
                try:
                    payload = json.loads(rest) if rest else {}
                except json.JSONDecodeError:
                    continue
                if tag == "READY":
                    with self._lock:
                        self._regions[payload["pid"]] = {
                            r["region"]: r for r in payload.get("regions", [])}
                    self._queue.put(("READY", p.pid, payload))
                elif tag == "EVENT":
                    self._record_event(payload)
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(("EOF", p.pid, None))

    def _record_event(self, ev: dict) -> None:
        with self._lock:
            self._log.append(ev)
            regions = self._regions.setdefault(ev["pid"], {})
            for r in ev.get("unmapped", []):
                regions.pop(r["region"], None)
            for r in ev.get("mapped", []):
                regions[r["region"]] = r
            if "child_pid" in ev:
                child = ev["child_pid"]
                st = procs.proc_stat(child)
                self._forked[child] = st[2] if st else None
                self.proc_pid[ev["child_proc"]] = child
                self.t0[child] = self.t0.get(ev["pid"], 0.0)
                self._regions[child] = {r["region"]: r for r in ev.get("regions", [])}

    # --- observation --------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """All pids: the workers, then every forked child reported so far (live or not)."""
        with self._lock:
            return [p.pid for p in self._popen] + list(self._forked)

    def pids_now(self) -> list[int]:
        """Pids of the workload processes alive now (workers and their descendants, found
        through /proc even before their fork EVENT is read), sorted."""
        top = [p.pid for p in self._popen if p.poll() is None]
        live = set(p for p in top if procs.is_running(p))
        live.update(procs.descendants(live))
        with self._lock:
            forked = dict(self._forked)
        live.update(pid for pid, st in forked.items() if procs.is_running(pid, st))
        return sorted(live)

    @property
    def log(self) -> list[dict]:
        """EVENT payloads received so far, in arrival order."""
        with self._lock:
            return list(self._log)

    def regions(self) -> dict[int, list[dict]]:
        """Currently mapped regions per pid: ``{pid: [{"region", "start", "pages"}]}`` as
        reported by READY and the map/unmap/fork EVENT lines."""
        with self._lock:
            return {pid: [r for _, r in sorted(rs.items(), key=lambda kv: str(kv[0]))]
                    for pid, rs in self._regions.items()}

    def wait_for(self, predicate, timeout: float = 10.0, poll: float = 0.02) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout``; returns its last value."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def sleep_until(self, offset: float, pid: int | None = None) -> None:
        """Sleep until ``offset`` seconds after READY (of ``pid``, default: ``ready_time``)."""
        base = self.t0[pid] if pid is not None else self.ready_time
        delay = base + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def elapsed(self, pid: int | None = None) -> float:
        """Seconds since READY (of ``pid``, default: since ``ready_time``)."""
        base = self.t0[pid] if pid is not None else self.ready_time
        return time.monotonic() - base

    def check(self) -> None:
        """Raise WorkloadError if a worker exited (other than after ``duration``/``stop``)."""
        for p in self._popen:
            rc = p.poll()
            if rc is not None and not self._stopped:
                tail = stderr_tail(self._stderr.get(p.pid))
                raise WorkloadError(f"workload {self.workload.name!r} process {p.pid} exited "
                                    f"with status {rc}" + (f": {tail}" if tail else ""))

    def layout(self, t: float | None = None) -> dict:
        """:meth:`Workload.layout` with ``pid`` and region ``start`` addresses filled in
        (addresses from READY for ``t`` None, else the currently known ones)."""
        out = self.workload.layout(t)
        regions = self.regions()
        for entry in out["processes"]:
            pid = self.proc_pid.get(entry["proc"])
            entry["pid"] = pid
            known = {r["region"]: r for r in regions.get(pid, [])}
            for r in entry["regions"]:
                r["start"] = known.get(r["region"], {}).get("start")
        return out

    def memory(self, t: float | None = None):
        """:meth:`Workload.memory`: expected cells per logical process and region."""
        return self.workload.memory(t)

    def events(self, until: float | None = None) -> list[Event]:
        """:meth:`Workload.events` (offsets from each process's READY)."""
        return self.workload.events(until)

    # --- stop ---------------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every process, wait up to ``timeout`` s, SIGKILL what is left, reap."""
        if self._stopped:
            return
        self._stopped = True
        try:
            with self._lock:
                forked = dict(self._forked)
            for p in self._popen:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for pid, st in forked.items():
                procs.signal_pid(pid, signal.SIGTERM, st)
            deadline = time.monotonic() + timeout
            for p in self._popen:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            # Forked children are reaped by their worker; make sure none outlives it.
            while any(procs.is_running(pid, st) for pid, st in forked.items()):
                if time.monotonic() > deadline:
                    for pid, st in forked.items():
                        procs.signal_pid(pid, signal.SIGKILL, st)
                    break
                time.sleep(0.01)
            for t in self._threads:
                t.join(timeout=1.0)
            for p in self._popen:
                if p.stdout:
                    p.stdout.close()
            for f in self._stderr.values():
                f.close()
        finally:
            untrack(self)

    def __enter__(self) -> "WorkloadRun":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<WorkloadRun {self.workload.name} pids={self.pids} {state}>"
