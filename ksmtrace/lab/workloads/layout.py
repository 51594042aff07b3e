"""The phase-stepped known-layout helper: ``python -m ksmtrace.lab.workloads.layout [options]``.

Options: ``--unique 256 --dup 192 --templates 16 --zero 128 --rewrite 64 --unmap 64 --seed 0``
(pages per region, see :class:`~ksmtrace.lab.workloads.known.LayoutParams`), ``--thp``,
``--peer`` (map only region B, for cross-process duplicates) and ``--parent PID`` (exit at
once unless that is our parent).  Regions A, B, C, R, X are mapped in this order, each its
own mmap (MAP_PRIVATE|MAP_ANONYMOUS, MADV_MERGEABLE), and completely filled.

Protocol: first ``READY <json>`` (the ``layout`` reply), then one JSON line per stdin line:

* ``layout``: ``{"ok", "cmd", "pid", "role", "seed", "page_size", "generation",
  "regions": [{"name", "kind", "start", "pages", "contents"}], "unmapped": [{"name",
  "start", "pages"}], "child": null | {"pid", "writes", "regions": [...]}, "expected":
  {"pages_total", "contents", "distinct", "duplicate_pages", "zero_pages"}}`` where
  ``expected`` covers this process and its child; ``contents`` are ``[key, count]`` pairs
  (``"zero"``, ``"t<k>"``, ``"u"``, or ``"u:<owner>:<region>.<page>:<gen>"`` for unique content
  shared with the child).
* ``rewrite``: region R gets new unique content (generation 1, 2, ...):
  ``{"ok", "cmd", "generation", "pages"}``.  The child's R is unaffected.
* ``unmap``: munmap region X: ``{"ok", "cmd", "unmapped": {"name", "start", "pages"}}``.
  A child keeps its own X mapping.
* ``fork``: fork a child that shares every page copy-on-write (equal PFNs) and idles;
  ``{"ok", "cmd", "pid"}``.  The child dies with this process (PR_SET_PDEATHSIG) and when
  its command pipe closes.  One child at most.
* ``write-child N``: the child rewrites its first N pages of region A with child-specific
  unique content and acknowledges before the reply: ``{"ok", "cmd", "pages",
  "generation"}``.
* ``quit``: ``{"ok", "cmd"}``, then the child is stopped and reaped and the helper exits 0.

A failing command answers ``{"ok": false, "cmd", "error"}``; the helper keeps running.
SIGTERM/SIGINT/SIGHUP or stdin EOF also stop the child and end the helper.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import signal
import sys

import numpy as np

from ksmtrace.errors import WorkloadError
from ksmtrace.lab.workloads import procs
from ksmtrace.lab.workloads.content import PAGE_SIZE, UNIQUE, contents_of, summarize, tagged_cells
from ksmtrace.lab.workloads.known import OWNER_CHILD, REGIONS, LayoutParams
from ksmtrace.lab.workloads.memory import Region

COMMANDS = ("layout", "rewrite", "unmap", "fork", "write-child N", "quit")
_ACK_TIMEOUT = 30.0


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop


class Child:
    """The parent's handle on the forked child: pid, command pipe, ack pipe, expected cells."""

    def __init__(self, pid: int, cmd_w: int, ack_r: int, cells: dict[str, np.ndarray],
                 starts: dict[str, int]):
        self.pid = pid
        self.cmd_w = cmd_w
        self.ack_r = ack_r
        self.cells = cells
        self.starts = starts
        self.writes = 0

    def close(self) -> None:
        for fd in (self.cmd_w, self.ack_r):
            try:
                os.close(fd)
            except OSError:
                pass
        procs.reap_children([self.pid])


class Helper:
    def __init__(self, params: LayoutParams, peer: bool):
        self.params = params
        self.role = "peer" if peer else "main"
        self.regions: dict[str, Region] = {}
        self.kinds: dict[str, str] = {}
        self.cells: dict[str, np.ndarray] = {}
        self.unmapped: list[dict] = []
        self.generation = 0
        self.child: Child | None = None
        for name, _, kind in REGIONS:
            if peer and name != "B":
                continue
            n = params.pages(name)
            if n == 0:
                continue
            region = Region(n, thp=params.thp, name=name)
            cells = params.initial_cells(name)
            region.write(params.seed, None, cells)
            self.regions[name], self.cells[name], self.kinds[name] = region, cells, kind

    # --- replies ------------------------------------------------------------------------------

    def _region_list(self, cells: dict[str, np.ndarray], starts: dict[str, int]) -> list[dict]:
        return [{"name": name, "kind": self.kinds[name], "start": starts[name],
                 "pages": len(c), "contents": contents_of([c])}
                for name, c in cells.items()]

    def describe(self) -> dict:
        starts = {name: r.start for name, r in self.regions.items()}
        everything = list(self.cells.values())
        child = None
        if self.child is not None:
            everything += list(self.child.cells.values())
            child = {"pid": self.child.pid, "writes": self.child.writes,
                     "regions": self._region_list(self.child.cells, self.child.starts)}
        return {"ok": True, "cmd": "layout", "pid": os.getpid(), "role": self.role,
                "seed": self.params.seed, "page_size": PAGE_SIZE,
                "generation": self.generation,
                "regions": self._region_list(self.cells, starts),
                "unmapped": list(self.unmapped), "child": child,
                "expected": summarize(contents_of(everything))}

    # --- commands -----------------------------------------------------------------------------

    def handle(self, line: str) -> dict:
        words = line.split()
        cmd = words[0]
        if self.role == "peer" and cmd not in ("layout", "quit"):
            raise WorkloadError(f"{cmd!r} is not available in peer mode (only layout, quit)")
        if cmd == "layout" and len(words) == 1:
            return self.describe()
        if cmd == "rewrite" and len(words) == 1:
            return self.rewrite()
        if cmd == "unmap" and len(words) == 1:
            return self.unmap()
        if cmd == "fork" and len(words) == 1:
            return self.fork()
        if cmd == "write-child" and len(words) == 2:
            try:
                n = int(words[1])
            except ValueError:
                raise WorkloadError(f"write-child needs a page count, got {words[1]!r}") \
                    from None
            return self.write_child(n)
        if cmd == "quit" and len(words) == 1:
            return {"ok": True, "cmd": "quit"}
        raise WorkloadError(f"unknown command {line.strip()!r}; commands: "
                            f"{', '.join(COMMANDS)}")

    def rewrite(self) -> dict:
        if "R" not in self.regions:
            raise WorkloadError("there is no region R (started with --rewrite 0)")
        self.generation += 1
        n = self.regions["R"].pages
        cells = tagged_cells(UNIQUE, 0, 3, np.arange(n), self.generation)
        self.regions["R"].write(self.params.seed, None, cells)
        self.cells["R"] = cells
        return {"ok": True, "cmd": "rewrite", "generation": self.generation, "pages": n}

    def unmap(self) -> dict:
        if "X" not in self.regions:
            raise WorkloadError("region X is already unmapped (or was never mapped)")
        region = self.regions.pop("X")
        del self.cells["X"]
        info = {"name": "X", "start": region.start, "pages": region.pages}
        region.close()
        self.unmapped.append(info)
        return {"ok": True, "cmd": "unmap", "unmapped": info}

    def fork(self) -> dict:
        if self.child is not None:
            raise WorkloadError(f"a child is already forked (pid {self.child.pid})")
        cmd_r, cmd_w = os.pipe()
        ack_r, ack_w = os.pipe()
        sys.stdout.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 0
            try:
                os.close(cmd_w)
                os.close(ack_r)
                code = self.child_main(parent, cmd_r, ack_w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(ack_w)
        self.child = Child(pid, cmd_w, ack_r, {k: v.copy() for k, v in self.cells.items()},
                           {name: r.start for name, r in self.regions.items()})
        return {"ok": True, "cmd": "fork", "pid": pid}

    def child_main(self, parent: int, cmd_r: int, ack_w: int) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if not procs.die_with_parent(parent):
            return 0
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        writes = 0
        with os.fdopen(cmd_r, "r") as commands:
            for line in commands:
                words = line.split()
                if len(words) != 2 or words[0] != "write":
                    os.write(ack_w, b"error\n")
                    continue
                n = int(words[1])
                writes += 1
                cells = tagged_cells(UNIQUE, OWNER_CHILD, 0, np.arange(n), writes)
                self.regions["A"].write(self.params.seed, np.arange(n), cells)
                os.write(ack_w, f"ok {n}\n".encode())
        return 0

    def write_child(self, n: int) -> dict:
        if self.child is None:
            raise WorkloadError("no child: send 'fork' first")
        if "A" not in self.child.cells:
            raise WorkloadError("there is no region A (started with --unique 0)")
        size = len(self.child.cells["A"])
        if not 1 <= n <= size:
            raise WorkloadError(f"write-child needs 1..{size} pages, got {n}")
        try:
            os.write(self.child.cmd_w, f"write {n}\n".encode())
        except OSError as exc:
            raise WorkloadError(f"child {self.child.pid} is gone: {exc}") from None
        ready, _, _ = select.select([self.child.ack_r], [], [], _ACK_TIMEOUT)
        answer = os.read(self.child.ack_r, 256).decode() if ready else ""
        if not answer.startswith("ok"):
            raise WorkloadError(f"child {self.child.pid} did not acknowledge the write "
                                f"({answer.strip() or 'no answer'})")
        self.child.writes += 1
        self.child.cells["A"][:n] = tagged_cells(UNIQUE, OWNER_CHILD, 0, np.arange(n),
                                                 self.child.writes)
        return {"ok": True, "cmd": "write-child", "pages": n, "generation": self.child.writes}

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
            self.child = None


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str]) -> tuple[LayoutParams, bool, int | None]:
    ap = argparse.ArgumentParser(prog="python -m ksmtrace.lab.workloads.layout",
                                 description="Phase-stepped known memory layout for capture "
                                             "tests; commands on stdin: "
                                             + ", ".join(COMMANDS))
    for f in dataclasses.fields(LayoutParams):
        if f.type in (bool, "bool"):
            ap.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            ap.add_argument(f"--{f.name}", type=int, default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})")
    ap.add_argument("--peer", action="store_true",
                    help="map only region B (same templates), for cross-process duplicates")
    ap.add_argument("--parent", type=int, default=None,
                    help="exit at once unless this pid is our parent")
    args = ap.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(LayoutParams)}
    return LayoutParams(**values), args.peer, args.parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    helper = None
    try:
        params, peer, parent = parse_args(argv)
        if not procs.die_with_parent(parent):
            return 0
        helper = Helper(params, peer)
        ready = helper.describe()
        del ready["ok"], ready["cmd"]
        _emit("READY " + json.dumps(ready, separators=(",", ":")))
        while True:
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            cmd = line.split()[0]
            try:
                reply = helper.handle(line)
            except WorkloadError as exc:
                reply = {"ok": False, "cmd": cmd, "error": str(exc)}
            _emit(json.dumps(reply, separators=(",", ":")))
            if cmd == "quit" and reply["ok"]:
                break
        return 0
    except _Stop:
        return 0
    except WorkloadError as exc:
        print(f"ksmtrace known-layout helper: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:
        return 0
    finally:
        if helper is not None:
            # Signals must not interrupt the reaping of the child.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            helper.close()


if __name__ == "__main__":
    sys.exit(main())
