"""One workload process: ``python -m ksmtrace.lab.workloads.worker '<json spec>'``.

Spec (JSON object)::

    {"workload": "rewrite",          # a name in ksmtrace.lab.workloads.WORKLOADS
     "params": {"period": 1.0},      # workload parameters (defaults for the missing ones)
     "proc": 0,                      # logical process number (default 0)
     "parent": 1234,                 # optional: exit at once unless os.getppid() is this pid
     "log": false,                   # optional: print an EVENT line per performed step
     "barrier": false}               # optional: after READY, wait for "GO <t0>" on stdin

Protocol on stdout:

* ``READY {"pid", "proc", "workload", "t0", "page_size", "regions": [{"region", "start",
  "pages"}]}`` once every page is mapped and filled; ``t0`` is ``time.monotonic()`` at that
  moment and every step offset counts from it — unless ``"barrier": true``: then the worker
  waits for a line ``GO <t0>`` on stdin and counts from that ``t0`` (the parent sends every
  worker the same one once all are READY, so that processes that took different times to fill
  their memory still perform their steps together; EOF on stdin counts from the READY time).
* with ``"log": true`` only, one ``EVENT {"pid", "proc", "index", "t", "at", "description",
  "pages", ...}`` line after each performed step (``t`` planned and ``at`` actual offset;
  ``mapped``/``unmapped`` region lists; a fork adds ``child_pid``, ``child_proc`` and
  ``regions``).  Forked children print their EVENT lines on the same stdout.

The process runs its steps until SIGTERM/SIGINT/SIGHUP, or until ``duration`` ends, then exits
0 after stopping and reaping the children it forked.  It receives SIGTERM when its parent dies
(PR_SET_PDEATHSIG), and so do the children it forks.  Exit status 2: bad spec (one line on
stderr).
"""
from __future__ import annotations

import json
import os
import sys
import time

from ksmtrace.errors import WorkloadError
from ksmtrace.lab.workloads import procs
from ksmtrace.lab.workloads.model import FORK, MAP, UNMAP, WRITE, Step
from ksmtrace.lab.workloads.memory import Region
from ksmtrace.lab.workloads.content import PAGE_SIZE

_SPEC_KEYS = {"workload", "params", "proc", "parent", "log", "barrier"}


def parse_spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"worker spec is not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(spec, dict) or "workload" not in spec:
        raise WorkloadError('worker spec must be a JSON object with at least "workload"')
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise WorkloadError(f"unknown worker spec key {unknown[0]!r}; "
                            f"known: {', '.join(sorted(_SPEC_KEYS))}")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise WorkloadError('worker spec "params" must be a JSON object')
    return {"workload": spec["workload"], "params": params, "proc": int(spec.get("proc", 0)),
            "parent": spec.get("parent"), "log": bool(spec.get("log", False)),
            "barrier": bool(spec.get("barrier", False))}


class Worker:
    """Maps the memory of one logical process, then performs its steps on schedule."""

    def __init__(self, spec: dict):
        from ksmtrace.lab.workloads import get_workload  # registry, after catalog import
        self.workload = get_workload(spec["workload"], **spec["params"])
        self.params = self.workload.params
        self.proc = spec["proc"]
        self.log = spec["log"]
        self.barrier = spec.get("barrier", False)
        initial = self.workload.initial()
        if self.proc not in initial:
            raise WorkloadError(f"workload {self.workload.name!r} has no process "
                                f"{self.proc} at start; it has {sorted(initial)}")
        self.cells = initial[self.proc]
        self.regions: dict[int, Region] = {}
        self.children: list[int] = []
        self.forked = False  # True in a child created by a fork step
        self.t0 = 0.0
        self.index = 0

    # --- output -------------------------------------------------------------------------------

    def emit(self, tag: str, payload: dict) -> None:
        try:
            sys.stdout.write(f"{tag} {json.dumps(payload, separators=(',', ':'))}\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            # Nobody reads any more: keep running silently.
            self.log = False
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except OSError:
                pass

    def describe_regions(self) -> list[dict]:
        return [r.describe() for _, r in sorted(self.regions.items())]

    # --- memory -------------------------------------------------------------------------------

    def map_region(self, region: int, cells) -> Region:
        r = Region(len(cells), thp=self.params.thp, name=region)
        self.regions[region] = r
        r.write(self.params.seed, None, cells)
        return r

    def perform(self, step: Step) -> dict:
        extra: dict = {}
        for op in step.ops:
            if op.action == WRITE:
                self.regions[op.region].write(self.params.seed, op.pages, op.cells)
            elif op.action == MAP:
                r = self.map_region(op.region, op.cells)
                extra.setdefault("mapped", []).append(r.describe())
            elif op.action == UNMAP:
                r = self.regions.pop(op.region)
                extra.setdefault("unmapped", []).append(r.describe())
                r.close()
            elif op.action == FORK:
                sys.stdout.flush()
                parent = os.getpid()
                pid = os.fork()
                if pid == 0:
                    self.become_child(op.child, parent)
                    return {}
                self.children.append(pid)
                extra.update(child_pid=pid, child_proc=op.child,
                             regions=self.describe_regions())
        return extra

    def become_child(self, proc: int, parent: int) -> None:
        self.forked = True
        self.proc = proc
        self.children = []
        self.index = 0
        if not procs.die_with_parent(parent):
            raise SystemExit(0)

    # --- main loop ----------------------------------------------------------------------------

    def wait_go(self) -> float | None:
        """The common ``t0`` from a ``GO <t0>`` line on stdin (the READY time on EOF or a bad
        line); None if a stop signal arrived first."""
        import select

        buf = b""
        while True:
            if procs.wait_stop(0.0):
                return None
            ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.05)
            if not ready:
                continue
            chunk = os.read(sys.stdin.fileno(), 256)
            buf += chunk
            if not chunk or b"\n" in buf:
                break
        try:
            tag, value = buf.split(b"\n", 1)[0].split()
            return float(value) if tag == b"GO" else self.t0
        except ValueError:
            return self.t0

    def sleep_until(self, offset: float) -> bool:
        """Wait until ``t0 + offset``; True if a stop signal arrived."""
        deadline = self.t0 + offset
        while True:
            remaining = deadline - time.monotonic()
            if procs.wait_stop(max(0.0, remaining)):
                return True
            if remaining <= 0 or time.monotonic() >= deadline:
                return False

    def run(self) -> int:
        for region, cells in sorted(self.cells.items()):
            self.map_region(region, cells)
        self.t0 = time.monotonic()
        self.emit("READY", {"pid": os.getpid(), "proc": self.proc,
                            "workload": self.workload.name, "t0": self.t0,
                            "page_size": PAGE_SIZE, "regions": self.describe_regions()})
        if self.barrier:
            go = self.wait_go()
            if go is None:
                return 0
            self.t0 = go
        for step in self.workload.steps():
            if step.proc != self.proc:
                continue
            if self.sleep_until(step.t):
                return 0
            proc_before = self.proc
            extra = self.perform(step)
            if self.proc != proc_before:  # we are the new child: our own steps come later
                continue
            self.index += 1
            if self.log:
                self.emit("EVENT", {"pid": os.getpid(), "proc": self.proc, "index": self.index,
                                    "t": step.t, "at": time.monotonic() - self.t0,
                                    "description": step.description, "pages": step.pages,
                                    **extra})
        if self.params.duration is None:
            procs.wait_stop(None)
        else:
            self.sleep_until(self.params.duration)
        return 0

    def close(self) -> None:
        procs.reap_children(self.children)
        self.children = []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    procs.block_stop_signals()
    worker = None
    code = 1
    try:
        if len(argv) != 1:
            raise WorkloadError("usage: python -m ksmtrace.lab.workloads.worker '<json spec>'")
        spec = parse_spec(argv[0])
        if not procs.die_with_parent(spec["parent"]):
            return 0  # the parent is already gone
        worker = Worker(spec)
        code = worker.run()
    except WorkloadError as exc:
        print(f"ksmtrace workload worker: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        if worker is None or not worker.forked:
            raise
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        if worker is not None:
            try:
                worker.close()
            finally:
                if worker.forked:  # never return into the parent's stack
                    try:
                        sys.stdout.flush()
                    finally:
                        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
