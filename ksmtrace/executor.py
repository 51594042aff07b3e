"""Executors: where the independent runs of sweeps, comparisons and fleet jobs execute.

>>> from ksmtrace.executor import make_executor
>>> with make_executor("local", workers=4) as ex:          # or "dask", or "dask://HOST:PORT"
...     for done in ex.run(some_module.function, tasks):   # as each task completes
...         done.index, done.value, done.error

A task is a picklable, module-level function applied to one picklable argument.  Tasks are
independent and idempotent (a replay names its result by run id; a fleet task writes files named by
its inputs), so where they run never changes what they produce: a sweep gives the same table on
every executor.  Two implementations:

``local`` (:class:`LocalExecutor`, the default)
    ``workers`` worker processes on this machine, started with ``spawn``.  Each worker puts itself
    in a process group of its own (a Ctrl-C at the terminal reaches only the parent, which stops
    the workers) and asks the kernel to SIGKILL it when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``), so a SIGKILLed sweep leaves no worker behind.  ``workers=1``
    runs the tasks in this process, one after another.
``dask`` (:class:`DaskExecutor`, the optional ``ksmtrace[dask]`` extra)
    Dask distributed: ``dask`` starts an in-process local cluster of ``workers`` single-threaded
    worker processes and shuts it down with the executor; ``dask://HOST:PORT`` (or
    ``tcp://HOST:PORT``) connects to a running scheduler, whose workers must see the same paths
    (traces and output directories on shared storage, see ``docs/executors.md``).

Every task's exception is handed back as ``Done.error`` (the caller decides what is fatal); a
worker that dies in the middle of a task (killed, out of memory) raises :class:`WorkerLost`.
Leaving the ``with`` block on any path stops the workers: tasks not started are cancelled, tasks
in flight are lost (their finished results stay wherever they were written).
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ksmtrace.errors import KsmtraceError

EXECUTORS = ("local", "dask")


class ExecutorError(KsmtraceError):
    """An executor cannot be started or reached."""


class WorkerLost(ExecutorError):
    """A worker died while it ran a task (killed, or out of memory)."""


@dataclass
class Done:
    """One finished task: its index in the submitted sequence and its value, or its error."""

    index: int
    value: Any = None
    error: BaseException | None = None


class Executor:
    """Runs independent tasks; use as a context manager so that its workers are always stopped."""

    name = "executor"
    workers = 1

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Done]:
        """Apply ``fn`` to every task, yielding each :class:`Done` as it completes (any order)."""
        raise NotImplementedError

    def warm(self) -> bool:
        """True when tasks run in worker processes on this machine that share its disk caches."""
        return False

    def close(self) -> None:
        """Stop the workers (idempotent)."""

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- local worker processes ------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a worker: leave the parent's process group and be SIGKILLed when the parent dies.

    ``PR_SET_PDEATHSIG`` fires when the thread that started this process exits; the parent may
    already be gone by the time it is set, so check the parent pid afterwards."""
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - already a group leader
        pass
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would stop us
        os._exit(1)


def _worker_main(conn, parent_pid: int) -> None:  # pragma: no cover - runs in worker processes
    die_with_parent(parent_pid)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, fn, arg = msg
        try:
            out = (index, fn(arg), None)
        except BaseException as exc:  # handed back to the parent; it decides what is fatal
            out = (index, None, exc)
        try:
            conn.send(out)
        except Exception as exc:  # an unpicklable value or exception
            conn.send((index, None, ExecutorError(f"task {index}: its result cannot be sent back ({exc})")))


class LocalExecutor(Executor):
    """``workers`` spawn-started worker processes on this machine (``1``: run in this process)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self._procs: list = []
        self._conns: list = []

    def warm(self) -> bool:
        return self.workers > 1

    def run(self, fn, tasks):
        tasks = list(tasks)
        if not tasks:
            return
        if self.workers == 1 or len(tasks) == 1:
            for i, t in enumerate(tasks):
                try:
                    value = fn(t)
                except Exception as exc:
                    yield Done(i, error=exc)
                else:
                    yield Done(i, value=value)
            return
        yield from self._run_pool(fn, tasks)

    def _start(self, n: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        while len(self._procs) < n:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, os.getpid()), daemon=True,
                            name=f"ksmtrace-worker-{len(self._procs)}")
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (for tests and diagnostics)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def _run_pool(self, fn, tasks):
        from multiprocessing.connection import wait

        self._start(min(self.workers, len(tasks)))
        pending = list(range(len(tasks)))[::-1]  # popped from the end: submission order
        busy: dict[int, int] = {}  # worker slot -> task index
        finished = 0

        def feed(slot: int) -> None:
            if pending:
                i = pending.pop()
                self._conns[slot].send((i, fn, tasks[i]))
                busy[slot] = i

        for slot in range(len(self._procs)):
            feed(slot)
        while finished < len(tasks):
            watch = [self._conns[s] for s in busy] + [self._procs[s].sentinel for s in busy]
            ready = wait(watch)
            for slot in list(busy):
                conn = self._conns[slot]
                if conn in ready or conn.poll():
                    try:
                        index, value, error = conn.recv()
                    except (EOFError, OSError):
                        raise WorkerLost(self._lost(slot, finished, len(tasks))) from None
                    del busy[slot]
                    finished += 1
                    feed(slot)
                    yield Done(index, value, error)
                elif self._procs[slot].sentinel in ready:
                    raise WorkerLost(self._lost(slot, finished, len(tasks)))

    def _lost(self, slot: int, finished: int, n: int) -> str:
        p = self._procs[slot]
        p.join(timeout=1)
        if p.exitcode is not None and p.exitcode < 0:
            how = f"killed by signal {-p.exitcode}: out of memory?"
        else:
            how = f"exit status {p.exitcode}"
        return f"a worker process died ({how}) after {finished} of {n} tasks"

    def close(self) -> None:
        procs, conns = self._procs, self._conns
        self._procs, self._conns = [], []
        for p, c in zip(procs, conns):
            try:
                c.send(None)
            except OSError:
                pass
        for p in procs:  # a worker in the middle of a task is stopped at once, with its process group
            if p.is_alive() and p.pid:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # pragma: no cover - ignores SIGTERM
                p.kill()
                p.join(timeout=10)
        for c in conns:
            c.close()


# --- Dask distributed ------------------------------------------------------------------------------
class DaskExecutor(Executor):
    """Tasks on a Dask distributed cluster: a local one started here (``address=None``) or a
    running scheduler (``tcp://HOST:PORT``)."""

    name = "dask"

    def __init__(self, address: str | None = None, workers: int | None = None, *, timeout_s: float = 30.0) -> None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ExecutorError("the dask executor needs Dask distributed: pip install 'ksmtrace[dask]'") from None
        import logging

        from distributed import Client, LocalCluster

        self._cluster = None
        self._client = None
        self.address = address
        try:
            if address is None:
                n = max(1, int(workers or os.cpu_count() or 1))
                self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                             dashboard_address=":0", silence_logs=logging.ERROR)
                self._client = Client(self._cluster, set_as_default=False)
                self.workers = n
            else:
                self._client = Client(address, timeout=timeout_s, set_as_default=False)
                self.workers = max(1, len(self._client.scheduler_info().get("workers", {})))
        except Exception as exc:
            self.close()
            where = address or "a local cluster"
            raise ExecutorError(f"dask: cannot start or reach {where} ({str(exc).splitlines()[0][:160]})") from None

    def describe(self) -> str:
        where = self.address or "local cluster"
        return f"dask {where} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def run(self, fn, tasks):
        import uuid

        from distributed import as_completed

        tasks = list(tasks)
        if not tasks:
            return
        token = uuid.uuid4().hex[:8]
        futures = [self._client.submit(fn, t, key=f"ksmtrace-{token}-{i}", pure=False, retries=0, priority=-i)
                   for i, t in enumerate(tasks)]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures, loop=self._client.loop):
                i = index[fut.key]
                try:
                    value = fut.result()
                except Exception as exc:
                    if type(exc).__name__ == "KilledWorker":
                        raise WorkerLost(f"a dask worker died while running task {i} ({exc})") from None
                    yield Done(i, error=exc)
                else:
                    yield Done(i, value=value)
        finally:
            self._client.cancel([f for f in futures if not f.done()])

    def close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass
        if cluster is not None:
            try:
                cluster.close()
            except Exception:  # pragma: no cover
                pass


def parse_executor(spec: str | None) -> tuple[str, str | None]:
    """``local`` / ``dask`` / ``dask://HOST:PORT`` (also ``tcp://HOST:PORT``) -> (kind, address)."""
    s = (spec or "local").strip()
    if s == "local":
        return "local", None
    if s == "dask":
        return "dask", None
    for prefix in ("dask://", "tcp://", "tls://"):
        if s.startswith(prefix):
            rest = s[len(prefix):]
            host, _, port = rest.rpartition(":")
            if not host or not port.isdigit():
                raise ExecutorError(f"executor {spec!r}: expected {prefix}HOST:PORT")
            scheme = "tls" if prefix == "tls://" else "tcp"
            return "dask", f"{scheme}://{host}:{port}"
    raise ExecutorError(f"unknown executor {spec!r} (use local, dask or dask://HOST:PORT)")


def make_executor(spec: str | Executor | None = None, workers: int | None = None) -> Executor:
    """An executor from a spec string (``local`` default, ``dask``, ``dask://HOST:PORT``)."""
    if isinstance(spec, Executor):
        return spec
    kind, address = parse_executor(spec)
    if kind == "local":
        return LocalExecutor(workers)
    return DaskExecutor(address, workers)
