"""What ``ksmtrace validate`` runs under real KSM: the built-in workload generators and real programs.

Every source is started with :func:`start_source` and returns a :class:`Running` object: it is
ready (its memory is mergeable and, for generators, filled), it names the process trees to
capture, ``check()`` raises :class:`~ksmtrace.errors.WorkloadError` if it died, and ``stop()`` ends
every process it started (by pid; idempotent; also on interpreter exit).

Sources (``--workload NAME``, parameters with ``-w key=value``):

* the generators of :mod:`ksmtrace.lab.workloads` (``static``, ``rewrite``, ``zero``, ``forkdiverge``,
  ``churn``), deterministic and seeded;
* ``vms``: N QEMU guests (``-accel tcg``, ``mem-merge=on``: QEMU marks guest RAM mergeable)
  booting the same Debian kernel and initramfs, from ``sample-traces/vm`` (run its ``prepare.sh``
  first).  Capture and KSM start as soon as every guest's RAM is mergeable, so KSM sees the boot.
  Parameters: ``guests`` (3), ``mem`` (MiB, 256), ``cache`` (prepare.sh's cache dir), ``append``.
* ``prefork``: a pre-fork HTTP server pool — gunicorn with ``workers`` sync workers and
  ``--preload``, serving a small WSGI app that imports a good part of the standard library and
  builds a ~``table_mb`` MiB table before forking — under a load generator (``rate`` requests/s).
  gunicorn is not a ksmtrace dependency: give its executable with ``gunicorn=PATH`` (the bench
  installs it into a temporary venv).  The server runs with prctl(PR_SET_MEMORY_MERGE) so all
  its anonymous memory is mergeable (inherited across fork and exec).
* ``command``: any command line (``--command CMD``), through ``sh -c``; by default with
  prctl(PR_SET_MEMORY_MERGE) (``merge_any=0`` to rely on the program's own madvise), ready after
  ``warmup`` seconds (2).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from ksmtrace.errors import WorkloadError

PR_SET_MEMORY_MERGE = 67
PR_SET_PDEATHSIG = 1

#: workloads whose real dynamics involve timing races (fork, mmap churn, guests, servers): their
#: goal is "within the real run-to-run spread plus 10%" rather than exact agreement
RACY = {"forkdiverge", "churn", "vms", "prefork", "command"}
PROGRAMS = ("vms", "prefork", "command")


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _merge_any_preexec(parent: int, merge_any: bool):
    """preexec_fn: die with the parent, optionally make all anonymous memory mergeable."""

    def setup() -> None:
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        if merge_any and libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
            os.write(2, b"prctl(PR_SET_MEMORY_MERGE) failed: kernel older than 6.4?\n")
            os._exit(126)

    return setup


def _kill_tree(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM) if _own_group(p) else p.terminate()
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL) if _own_group(p) else p.kill()
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def _own_group(p: subprocess.Popen) -> bool:
    try:
        return os.getpgid(p.pid) == p.pid
    except ProcessLookupError:
        return False


def mergeable(pid: int) -> bool:
    """The process has a mergeable VMA or merge-any (from /proc/PID/ksm_stat)."""
    from ksmtrace_tracers.procinfo import read_ksm_stat

    st = read_ksm_stat(pid) or {}
    return bool(st.get("ksm_mergeable") or st.get("ksm_merge_any"))


def other_mergeable(exclude: set[int]) -> list[str]:
    """``"pid comm"`` of every process with mergeable memory that is not in ``exclude`` (or a
    descendant of it)."""
    from ksmtrace.lab.workloads import procs as P
    from ksmtrace_tracers.procinfo import list_pids, read_stat

    ex = set(exclude) | set(P.descendants(exclude))
    ex.add(os.getpid())
    out = []
    for pid in list_pids():
        if pid in ex or not mergeable(pid):
            continue
        st = read_stat(pid)
        out.append(f"{pid} {st.comm if st is not None else '?'}")
    return out


class cpu_neighbours:
    """Context manager: ``n`` CPU-bound processes (``while 1: pass``, nice 0, on any CPU) beside a
    run, the "second CPU-bound process" of the fidelity goals: they die with this process and are
    killed (by pid) on exit.  ``pids`` lists them."""

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "cpu_neighbours":
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen([sys.executable, "-c", "while 1: pass"], stdin=subprocess.DEVNULL,
                                                   preexec_fn=_merge_any_preexec(os.getpid(), False)))
        except BaseException:
            _kill_tree(self.procs, grace=0.0)
            raise
        return self

    def __exit__(self, *exc) -> None:
        _kill_tree(self.procs, grace=0.0)
        self.procs = []


class Running:
    """A started workload source (see the module docstring)."""

    name = ""
    racy = False

    def roots(self) -> list[int]:
        """Pids whose process trees the capture follows."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise WorkloadError if the workload died."""

    def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class GeneratorRun(Running):
    """A :mod:`ksmtrace.lab.workloads` generator."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        from ksmtrace.lab.workloads import get_workload

        self.name = name
        self.racy = name in RACY
        self.workload = get_workload(name, **params)
        self.params = params
        self.run = self.workload.start()

    def roots(self) -> list[int]:
        return [p.pid for p in self.run._popen]

    def check(self) -> None:
        self.run.check()

    def stop(self) -> None:
        self.run.stop()

    def describe(self) -> dict[str, Any]:
        import dataclasses

        return {"name": self.name, "kind": "generator", "params": dataclasses.asdict(self.workload.params),
                "pids": self.run.pids}


# --------------------------------------------------------------------------------------------
def vm_scripts_dir(given: str | None = None) -> Path:
    if given:
        return Path(given)
    env = os.environ.get("KSMTRACE_VM_SCRIPTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "sample-traces" / "vm"


def _load_boot_guests(scripts: Path):
    path = scripts / "boot_guests.py"
    if not path.is_file():
        raise WorkloadError(f"{path}: missing (the vms workload needs sample-traces/vm; give -w scripts=DIR)")
    spec = importlib.util.spec_from_file_location("ksmtrace_boot_guests", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


class VmRun(Running):
    """N QEMU/TCG guests booting the same kernel; ready when every guest's RAM is mergeable."""

    name = "vms"
    racy = True

    def __init__(self, guests: int = 3, mem: int = 256, cache: str | None = None, append: str = "",
                 scripts: str | None = None, timeout: float = 60.0) -> None:
        bg = _load_boot_guests(vm_scripts_dir(scripts))
        self.bg = bg
        cache_dir = Path(cache) if cache else bg.default_cache_dir()
        kernel, initrd = cache_dir / "vmlinuz", cache_dir / "initramfs.cpio.gz"
        for f in (kernel, initrd):
            if not f.is_file():
                raise WorkloadError(f"{f}: missing; run sample-traces/vm/prepare.sh first")
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            raise WorkloadError("qemu-system-x86_64 not found; run sample-traces/vm/prepare.sh first")
        self.params = {"guests": int(guests), "mem": int(mem), "append": append}
        self.manifest = bg.read_manifest(cache_dir)
        self.log_dir = Path(tempfile.mkdtemp(prefix="ksmtrace-vms-"))
        self.procs: list[subprocess.Popen] = []
        self._stopped = False
        self.t_spawn = time.monotonic()
        try:
            for i in range(int(guests)):
                log = self.log_dir / f"guest-{i}.log"
                log.write_bytes(b"")
                cmd = bg.qemu_command(i, int(mem), kernel.resolve(), initrd.resolve(), log, qemu=qemu, append=append)
                err = open(self.log_dir / f"guest-{i}.qemu-stderr", "wb")
                try:
                    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_merge_any_preexec(os.getpid(), False))
                finally:
                    err.close()
                p.log_path = str(log)
                self.procs.append(p)
            deadline = time.monotonic() + timeout
            while not all(mergeable(p.pid) for p in self.procs):
                self.check()
                if time.monotonic() > deadline:
                    raise WorkloadError(f"QEMU guests did not mark their RAM mergeable within {timeout:g} s (logs in {self.log_dir})")
                time.sleep(0.01)
            self.ready_s = time.monotonic() - self.t_spawn
        except BaseException:
            self.stop()
            raise

    def roots(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check(self) -> None:
        for i, p in enumerate(self.procs):
            rc = p.poll()
            if rc is not None and not self._stopped:
                tail = self.bg._failure_detail(p) if hasattr(self.bg, "_failure_detail") else ""
                raise WorkloadError(f"QEMU guest {i} (pid {p.pid}) exited with status {rc}" + (f": {tail}" if tail else ""))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.bg.stop_guests(self.procs)

    def describe(self) -> dict[str, Any]:
        boot = []
        for p in self.procs:
            try:
                text = Path(p.log_path).read_text(errors="replace")
            except OSError:
                text = ""
            boot.append("KSMTRACE-GUEST-READY" in text)
        return {"name": self.name, "kind": "program", "params": self.params, "pids": self.roots(),
                "ready_s": getattr(self, "ready_s", None), "booted": boot,
                "kernel_package": self.manifest.get("kernel_package"),
                "kernel_package_version": self.manifest.get("kernel_package_version"),
                "qemu_package_version": self.manifest.get("qemu_package_version")}


# --------------------------------------------------------------------------------------------
PREFORK_APP = textwrap.dedent(
    '''
    """ksmtrace prefork workload: a WSGI app that imports a good part of the standard library and
    builds a deterministic table before gunicorn forks its workers (--preload)."""
    import os, json, random, hashlib
    import email.parser, email.policy, http.cookies, urllib.parse, xml.etree.ElementTree, xml.dom.minidom
    import decimal, fractions, statistics, sqlite3, csv, difflib, textwrap, string, re, zlib, base64
    import asyncio, concurrent.futures, logging.handlers, argparse, pickle, unittest, ipaddress, uuid
    import calendar, datetime, heapq, bisect, collections, itertools, functools, pprint, shlex

    TABLE_MB = float(os.environ.get("KSMTRACE_PREFORK_TABLE_MB", "24"))
    _rng = random.Random(5)
    # ~TABLE_MB MiB of Python objects: half repeated (dups), half unique
    _rows = int(TABLE_MB * 1024 * 1024 / 400)
    TEMPLATES = ["".join(_rng.choice(string.ascii_letters) for _ in range(200)) for _ in range(64)]
    TABLE = {}
    for i in range(_rows):
        TABLE[i] = (TEMPLATES[i % 64] if i % 2 else hashlib.sha256(str(i).encode()).hexdigest() * 3, i, float(i))

    def app(environ, start_response):
        q = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        k = int(q.get("k", ["0"])[0]) % max(1, _rows)
        # touch a slice of the table: reference counts dirty the (fork-shared) pages
        vals = [TABLE[(k + j * 7919) % _rows] for j in range(200)]
        body = json.dumps({"k": k, "n": len(vals), "s": sum(v[1] for v in vals)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PreforkRun(Running):
    """gunicorn (pre-fork, --preload) under a steady HTTP load from a thread of this process."""

    name = "prefork"
    racy = True

    def __init__(self, gunicorn: str | None = None, workers: int = 4, rate: float = 50.0, table_mb: float = 24.0,
                 seed: int = 0, timeout: float = 60.0, merge_any: bool = True) -> None:
        exe = gunicorn or shutil.which("gunicorn")
        if not exe or not Path(exe).exists():
            raise WorkloadError(
                "the prefork workload needs gunicorn, which is not a ksmtrace dependency: install it into a venv "
                "(python3 -m venv /tmp/g && /tmp/g/bin/pip install gunicorn) and pass -w gunicorn=/tmp/g/bin/gunicorn"
            )
        self.params = {"workers": int(workers), "rate": float(rate), "table_mb": float(table_mb), "seed": int(seed),
                       "gunicorn": str(exe), "merge_any": bool(merge_any)}
        self.dir = Path(tempfile.mkdtemp(prefix="ksmtrace-prefork-"))
        (self.dir / "ksmtrace_prefork_app.py").write_text(PREFORK_APP)
        self.port = _free_port()
        self._stopped = False
        self._stop_load = threading.Event()
        self.requests = 0
        self.errors = 0
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", KSMTRACE_PREFORK_TABLE_MB=str(table_mb))
        cmd = [str(exe), "--preload", "-w", str(int(workers)), "-k", "sync", "-b", f"127.0.0.1:{self.port}",
               "--chdir", str(self.dir), "--log-level", "warning", "ksmtrace_prefork_app:app"]
        self.stderr = open(self.dir / "gunicorn.log", "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True,
                                     preexec_fn=_merge_any_preexec(os.getpid(), merge_any))
        self.t_spawn = time.monotonic()
        try:
            from ksmtrace.lab.workloads import procs as P

            deadline = time.monotonic() + timeout
            while True:
                self.check()
                if self._get(0) and len(P.descendants([self.proc.pid])) >= int(workers):
                    break
                if time.monotonic() > deadline:
                    raise WorkloadError(f"gunicorn did not serve within {timeout:g} s (log {self.dir / 'gunicorn.log'})")
                time.sleep(0.1)
            self.ready_s = time.monotonic() - self.t_spawn
            self._thread = threading.Thread(target=self._load, args=(int(seed),), daemon=True, name="ksmtrace-prefork-load")
            self._thread.start()
        except BaseException:
            self.stop()
            raise

    def _get(self, k: int) -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", f"/?k={k}")
            r = c.getresponse()
            r.read()
            c.close()
            return r.status == 200
        except OSError:
            return False

    def _load(self, seed: int) -> None:
        import random

        rng = random.Random(seed)
        period = 1.0 / max(self.params["rate"], 0.1)
        nxt = time.monotonic()
        while not self._stop_load.is_set():
            ok = self._get(rng.randrange(1 << 30))
            self.requests += 1
            self.errors += 0 if ok else 1
            nxt += period
            self._stop_load.wait(max(0.0, nxt - time.monotonic()))

    def roots(self) -> list[int]:
        return [self.proc.pid]

    def check(self) -> None:
        rc = self.proc.poll()
        if rc is not None and not self._stopped:
            try:
                tail = [ln for ln in (self.dir / "gunicorn.log").read_text(errors="replace").splitlines() if ln.strip()][-1:]
            except OSError:
                tail = []
            raise WorkloadError(f"gunicorn exited with status {rc}" + (f": {tail[0]}" if tail else ""))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_load.set()
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join(timeout=5)
        _kill_tree([self.proc])
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "program", "params": self.params, "pids": self.roots(),
                "ready_s": getattr(self, "ready_s", None), "requests": self.requests, "errors": self.errors}


# --------------------------------------------------------------------------------------------
class CommandRun(Running):
    """An arbitrary command (``sh -c``), by default with merge-any; ready after ``warmup`` s."""

    name = "command"
    racy = True

    def __init__(self, command: str, merge_any: bool = True, warmup: float = 2.0) -> None:
        if not command or not command.strip():
            raise WorkloadError("--command needs a command line")
        self.params = {"command": command, "merge_any": bool(merge_any), "warmup": float(warmup)}
        self._stopped = False
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_merge_any_preexec(os.getpid(), merge_any))
        try:
            deadline = time.monotonic() + float(warmup)
            while time.monotonic() < deadline:
                self.check()
                time.sleep(0.05)
            self.check()
        except BaseException:
            self.stop()
            raise

    def roots(self) -> list[int]:
        return [self.proc.pid]

    def check(self) -> None:
        rc = self.proc.poll()
        if rc is not None and not self._stopped:
            self.log.seek(0)
            tail = [ln for ln in self.log.read().decode(errors="replace").splitlines() if ln.strip()][-1:]
            raise WorkloadError(f"the command exited with status {rc} during the run" + (f": {tail[0]}" if tail else ""))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        _kill_tree([self.proc])
        self.log.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "program", "params": self.params, "pids": self.roots()}


# --------------------------------------------------------------------------------------------
def source_names() -> list[str]:
    from ksmtrace.lab.workloads import WORKLOADS

    return sorted(WORKLOADS) + ["vms", "prefork"]


def start_source(name: str, params: dict[str, Any] | None = None, command: str | None = None) -> Running:
    """Start workload ``name`` (or ``command`` when given) and return it ready."""
    params = dict(params or {})
    if command is not None:
        kw = _typed(params, {"merge_any": bool, "warmup": float}, "command")
        return CommandRun(command, **kw)
    if name == "vms":
        kw = _typed(params, {"guests": int, "mem": int, "cache": str, "append": str, "scripts": str, "timeout": float}, name)
        return VmRun(**kw)
    if name == "prefork":
        kw = _typed(params, {"gunicorn": str, "workers": int, "rate": float, "table_mb": float, "seed": int,
                             "timeout": float, "merge_any": bool}, name)
        return PreforkRun(**kw)
    from ksmtrace.lab.workloads import WORKLOADS

    if name not in WORKLOADS:
        raise WorkloadError(f"unknown workload {name!r}; known: {', '.join(source_names())} (or --command CMD)")
    return GeneratorRun(name, params)


def _typed(params: dict[str, Any], types: dict[str, type], name: str) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if k not in types:
            raise WorkloadError(f"unknown parameter {k!r} for workload {name!r}; known: {', '.join(types)}")
        tp = types[k]
        try:
            if tp is bool and isinstance(v, str):
                out[k] = v.strip().lower() in ("1", "true", "yes", "on")
            else:
                out[k] = tp(v)
        except (TypeError, ValueError):
            raise WorkloadError(f"parameter {k}={v!r} of workload {name!r} must be a {tp.__name__}") from None
    return out


def describe_sources() -> str:
    return json.dumps(source_names())
