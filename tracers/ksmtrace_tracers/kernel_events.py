"""The kernel-events recorder: the kernel's own record of what KSM did and of every write fault
of the targets, in the ``ksm_events`` and ``faults`` tables (``docs/trace-format.md``).

Two private tracefs instances (:mod:`.tracefs`; never the global buffer), both on the
``mono`` trace clock, so every event's time is CLOCK_MONOTONIC like the snapshots' times:

* ``...-ksm``: the ``ksm:*`` tracepoints (scan start/stop, enter/exit, merges, removals, the
  advisor) of every process — ksmd scans them all;
* ``...-faults``: ``exceptions:page_fault_user`` with the filter ``error_code & 2`` (the x86 write
  bit), only for the targets' threads: ``set_event_pid`` holds their thread ids and ``event-fork``
  adds every thread or child they start, so a child forked between two snapshots is followed from
  its first instruction.  A write to a write-protected page — a KSM page, a page a fork shares,
  the zero page — faults, and that fault is the COW break; snapshots only see its result.

Each instance has a bounded buffer per CPU (``--kernel-events-buffer`` KiB); a reader thread
drains the per-CPU ``trace_pipe_raw`` files every 20 ms and decodes them in numba
(:mod:`.ringbuf`).  Events that were overwritten or dropped are counted from the per-CPU
``stats`` (and pages that say events were lost) into each snapshot's log line and the summary.
Events go to the snapshot whose interval holds them (previous ``t_end_ns`` < t <= ``t_end_ns``).

It is on by default when it can be: root, tracefs (mounted at /sys/kernel/tracing when it is not
mounted at all, and unmounted again at the end) and the events.  Otherwise the capture goes on
without it and says why — in the manifest and as a note on stderr.  The instances are removed on
every exit path (the capture's close, an exception, SIGINT/SIGTERM through the session, interpreter
exit); an instance left by a SIGKILLed capture is removed when the next capture starts.
"""
from __future__ import annotations

import atexit
import errno
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ksmtrace.trace import schema as S
from ksmtrace_tracers import procinfo as P
from ksmtrace_tracers import ringbuf
from ksmtrace_tracers import tracefs as T
from ksmtrace_tracers.options import CaptureOptions
from ksmtrace_tracers.session import RecorderBase, SnapshotContext

FAULT_EVENT = ("exceptions", "page_fault_user")
WRITE_BIT = 2
PRESENT_BIT = 1
DRAIN_INTERVAL = 0.02
_SLOTS = 256  # sub-buffers read per decode pass

# ksm_events columns taken from a tracepoint field of the same name (pointers become ids)
_KSM_NUMERIC = ("pfn", "err", "seq", "rmap_entries", "scan_time", "pages_to_scan", "cpu_percent")
_KSM_POINTERS = ("mm", "rmap_item")


class KernelEvents(RecorderBase):
    """Records ``faults`` and ``ksm_events`` (see the module docstring)."""

    name = "kernel_events"

    def __init__(self, opts: CaptureOptions, note: Callable[[str], None],
                 prev_state: Callable[[tuple[int, int]], dict[str, np.ndarray] | None]) -> None:
        self.options = opts
        self.note = note
        self.prev_state = prev_state
        self.buffer_kb = int(opts.kernel_events_buffer_kb)
        self.root: Path | None = None
        self.mounted: Path | None = None
        self.instances: dict[str, T.Instance] = {}
        self.cpus: list[tuple[str, int, int]] = []  # (instance, cpu, fd)
        self.formats: dict[int, T.EventFormat] = {}
        self.events: list[str] = []
        self.reason: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._faults: list[dict[str, np.ndarray]] = []
        self._ksm: list[dict[str, np.ndarray]] = []
        self._taken: tuple[list, list] = ([], [])
        self._ids: dict[str, dict[int, int]] = {k: {} for k in _KSM_POINTERS}
        self._tgid: dict[int, int] = {}
        self._traced: set[int] = set()
        self._missed_pages = 0
        self._lost_seen = 0
        self.totals = {"faults": 0, "ksm_events": 0, "lost": 0, "missed_pages": 0}
        self._page_size = 4096
        self._buf = np.zeros(0, np.uint8)
        self._atexit = False
        self.enabled = self._probe()

    # --- can it run here? ---------------------------------------------------------------------
    def _probe(self) -> bool:
        want = self.options.kernel_events
        if want is False:
            self.reason = "off (--no-kernel-events)"
            return False
        if os.geteuid() != 0:
            self.reason = "needs root (tracefs)"
            return self._off()
        given = self.options.tracefs or os.environ.get("KSMTRACE_TRACEFS")
        if given:
            root = Path(given)
        else:
            root = T.find_tracefs()
            mounted_now = False
            if root is None and T.TRACEFS.is_dir():
                try:
                    root = T.mount(T.TRACEFS)
                    mounted_now = True
                except T.TracefsError as exc:
                    self.reason = str(exc)
                    return self._off()
            if root is not None and T.claim_mount(root, mounted_now):
                self.mounted = root  # ours to unmount at the end (also when a killed capture mounted it)
        if root is None or not (root / "instances").is_dir():
            self.reason = f"no tracefs at {root or T.TRACEFS} (kernel without CONFIG_TRACING, or not mounted)"
            return self._off()
        self.root = root
        have, missing = [], []
        for name in S.KSM_EVENT_NAMES:
            fmt = T.read_format(root, "ksm", name)
            (have if fmt else missing).append(f"ksm:{name}")
            if fmt:
                self.formats[fmt.id] = fmt
        fmt = T.read_format(root, *FAULT_EVENT)
        (have if fmt else missing).append(":".join(FAULT_EVENT))
        if fmt:
            self.formats[fmt.id] = fmt
        if not have:
            self.reason = f"the kernel has none of the events ({', '.join(missing[:3])}, ...) under {root}/events"
            return self._off()
        if missing:
            self.note(f"kernel events: this kernel lacks {', '.join(missing)}; recording the others")
        self.events = have
        self._page_size = T.subbuf_size(root)
        self._buf = np.zeros(_SLOTS * self._page_size, np.uint8)
        return True

    def _off(self) -> bool:
        self.note(f"kernel events are not recorded: {self.reason}")
        return False

    def manifest(self) -> dict[str, dict[str, Any]]:
        ke: dict[str, Any] = {"enabled": self.enabled, "reason": self.reason}
        if self.enabled:
            ke.update(events=list(self.events), clock="mono", buffer_kb_per_cpu=self.buffer_kb,
                      fault_filter=f"error_code & {WRITE_BIT}", tracefs=str(self.root),
                      tracefs_mounted_by_capture=self.mounted is not None)
        return {"capture": {"kernel_events": ke}}

    # --- start ----------------------------------------------------------------------------------
    def start(self, session) -> None:
        if not self.enabled:
            return
        assert self.root is not None
        stale = T.clean_stale(self.root)
        if stale:
            self.note(f"removed {len(stale)} trace instance(s) left by a killed capture: {', '.join(stale)}")
        atexit.register(self._remove_instances)
        self._atexit = True
        try:
            ksm = [e for e in self.events if e.startswith("ksm:")]
            if ksm:
                inst = self._instance("ksm")
                for e in ksm:
                    inst.write(f"events/ksm/{e[4:]}/enable", "1")
            if ":".join(FAULT_EVENT) in self.events:
                inst = self._instance("faults")
                inst.write("options/event-fork", "1")
                self._trace_threads(self.targets_now(session))
                inst.write(f"events/{FAULT_EVENT[0]}/{FAULT_EVENT[1]}/filter", f"error_code & {WRITE_BIT}")
                inst.write(f"events/{FAULT_EVENT[0]}/{FAULT_EVENT[1]}/enable", "1")
            for kind, inst in self.instances.items():
                self.cpus.extend((kind, cpu, fd) for cpu, fd in inst.open_cpus())
        except (T.TracefsError, OSError) as exc:
            self.reason = f"cannot set up the trace instances: {exc}"
            self.note(f"kernel events are not recorded: {self.reason}")
            self.enabled = False
            self._remove_instances()
            session._update_manifest(capture=dict(session.writer.manifest["capture"],
                                                  kernel_events={"enabled": False, "reason": self.reason}))
            return
        self._thread = threading.Thread(target=self._run, name="ksmtrace-kernel-events", daemon=True)
        self._thread.start()

    @staticmethod
    def targets_now(session) -> list:
        return session.targets.resolve()

    def _instance(self, purpose: str) -> T.Instance:
        assert self.root is not None
        inst = T.Instance(self.root, T.instance_name(purpose))
        self.instances[purpose] = inst
        inst.write("trace_clock", "mono")
        inst.write("buffer_size_kb", str(self.buffer_kb))
        return inst

    def _trace_threads(self, members) -> None:
        """Add the threads of the targets to the fault instance's pid list (``event-fork`` adds the
        threads and children they start themselves; exited ones leave the list by themselves)."""
        inst = self.instances.get("faults")
        if inst is None:
            return
        new = []
        for m in members:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{m.pid}/task")]
            except OSError:
                continue
            for tid in tids:
                self._tgid[tid] = m.pid
                if tid not in self._traced:
                    new.append(tid)
        if new:
            inst.write("set_event_pid", " ".join(map(str, new)), append=True)
            self._traced.update(new)

    # --- reading ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL):
            try:
                self._drain()
            except Exception:  # keep draining; the snapshot's own drain reports errors
                continue

    def _drain(self) -> None:
        with self._lock:
            for kind, cpu, fd in self.cpus:
                while True:
                    lengths = np.zeros(_SLOTS, np.int64)
                    k = 0
                    while k < _SLOTS:
                        slot = memoryview(self._buf)[k * self._page_size : (k + 1) * self._page_size]
                        try:
                            got = os.readv(fd, [slot])
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno == errno.EINTR:
                                continue
                            break
                        if got <= 0:
                            break
                        lengths[k] = got
                        k += 1
                    if k:
                        self._decode(kind, cpu, lengths[:k])
                    if k < _SLOTS:
                        break

    def _decode(self, kind: str, cpu: int, lengths: np.ndarray) -> None:
        buf = self._buf
        cap = int(lengths.sum()) // 8 + 1  # the smallest data event is 8 bytes
        ts, off, ln, page = ringbuf.empty_outputs(cap)
        missed = np.zeros(len(lengths), np.int64)
        n = ringbuf.decode_pages(buf, self._page_size, lengths, ts, off, ln, page, missed)
        self._missed_pages += int((missed != 0).sum())
        if n == 0:
            return
        ts, off = ts[:n], off[:n]
        etype = ringbuf.gather(buf, off, 0, 2, False)
        pid = ringbuf.gather(buf, off, 4, 4, True)
        for eid in np.unique(etype).tolist():
            fmt = self.formats.get(eid)
            if fmt is None:
                continue
            sel = etype == eid
            o = off[sel]
            rows: dict[str, np.ndarray] = {"t_ns": ts[sel].copy(), "pid": pid[sel].astype(np.int64), "cpu": np.full(len(o), cpu, np.int64)}
            for name, f in fmt.fields.items():
                if name.startswith("common_"):
                    continue
                rows[name] = ringbuf.gather(buf, o, f.offset, f.size, f.signed).copy()
            if fmt.system == FAULT_EVENT[0]:
                self._faults.append(rows)
            else:
                rows["event"] = np.full(len(o), fmt.name, dtype=object)
                self._ksm.append(rows)

    # --- one snapshot ----------------------------------------------------------------------------
    def read(self, ctx: SnapshotContext) -> None:
        if self.enabled and "faults" in self.instances:
            try:
                self._trace_threads(ctx.members)
            except T.TracefsError as exc:
                self.note(f"kernel events: cannot follow new targets: {exc}")

    def end(self, ctx: SnapshotContext) -> dict[str, pa.Table]:
        if not self.enabled:
            return {}
        self._drain()
        with self._lock:
            faults, self._faults = _split(self._faults, ctx.t_read_end)
            ksm, self._ksm = _split(self._ksm, ctx.t_read_end)
            self._taken = (faults, ksm)
        lost = sum(inst.stats()["overrun"] + inst.stats()["dropped"] for inst in self.instances.values())
        new_lost = max(0, lost - self._lost_seen)
        self._lost_seen = lost
        tables = {"faults": self._fault_table(ctx, faults), "ksm_events": self._ksm_table(ctx, ksm)}
        ctx.stats["kernel_events"] = {"faults": tables["faults"].num_rows, "ksm_events": tables["ksm_events"].num_rows,
                                      "lost": new_lost, "missed_pages": self._missed_pages}
        if new_lost:
            self.note("kernel events: some events were lost because a trace buffer was full (each snapshot's "
                      f"kernel_events.lost counts them; a larger --kernel-events-buffer than {self.buffer_kb} KiB gives more room)")
        return tables

    def commit(self, ctx: SnapshotContext, ok: bool) -> None:
        if not self.enabled:
            return
        faults, ksm = self._taken
        self._taken = ([], [])
        if not ok:  # undone: its events go to the next snapshot
            with self._lock:
                self._faults = faults + self._faults
                self._ksm = ksm + self._ksm
            return
        st = ctx.stats.get("kernel_events", {})
        self.totals["faults"] += st.get("faults", 0)
        self.totals["ksm_events"] += st.get("ksm_events", 0)
        self.totals["lost"] += st.get("lost", 0)
        self.totals["missed_pages"] = self._missed_pages

    def _fault_table(self, ctx: SnapshotContext, parts: list[dict[str, np.ndarray]]) -> pa.Table:
        if not parts:
            return S.FAULTS_SCHEMA.empty_table()
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cols["t_ns"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        tid = cols["pid"]
        addr = cols["address"].astype(np.uint64)
        code = cols["error_code"].astype(np.uint64)
        vpn = addr >> np.uint64(12)
        tgid = np.array([self._tgid_of(int(t)) for t in tid.tolist()], np.int64) if len(tid) else np.zeros(0, np.int64)
        proc = np.full(len(tid), -1, np.int64)
        prev = np.full(len(tid), -1, np.int64)
        keys = {**{k: v for k, v in ctx.procs.items()}, **ctx.new_procs}
        by_pid = {}
        for key, pr in keys.items():
            by_pid[key[0]] = (key, pr)
        for pid_ in np.unique(tgid).tolist():
            got = by_pid.get(pid_)
            if got is None:
                continue
            key, pr = got
            sel = np.flatnonzero(tgid == pid_)
            proc[sel] = pr
            st = self.prev_state(key)
            if st is not None and len(st["vpn"]):
                i = np.searchsorted(st["vpn"], vpn[sel])
                i = np.minimum(i, len(st["vpn"]) - 1)
                hit = st["vpn"][i] == vpn[sel]
                prev[sel[hit]] = st["flags"][i[hit]]
        n = len(tid)
        return pa.table(
            {
                "snap": pa.array(np.full(n, ctx.snap, np.uint32)),
                "t_ns": pa.array(cols["t_ns"].astype(np.int64)),
                "proc": pa.array(proc, mask=proc < 0, type=pa.uint32()),
                "pid": pa.array(tgid.astype(np.uint32)),
                "tid": pa.array(tid.astype(np.uint32)),
                "vpn": pa.array(vpn),
                "address": pa.array(addr),
                "error_code": pa.array(code.astype(np.uint32)),
                "write": pa.array((code & np.uint64(WRITE_BIT)) != 0),
                "present": pa.array((code & np.uint64(PRESENT_BIT)) != 0),
                "prev_flags": pa.array(prev, mask=prev < 0, type=pa.uint32()),
                "cpu": pa.array(cols["cpu"].astype(np.uint16)),
            },
            schema=S.FAULTS_SCHEMA,
        )

    def _tgid_of(self, tid: int) -> int:
        pid = self._tgid.get(tid)
        if pid is None:
            status = P.read_tgid(tid)
            pid = status if status is not None else tid
            self._tgid[tid] = pid
        return pid

    def _ksm_table(self, ctx: SnapshotContext, parts: list[dict[str, np.ndarray]]) -> pa.Table:
        if not parts:
            return S.KSM_EVENTS_SCHEMA.empty_table()
        n = sum(len(p["t_ns"]) for p in parts)
        cols: dict[str, Any] = {}
        for name in S.KSM_EVENTS_SCHEMA.names:
            f = S.KSM_EVENTS_SCHEMA.field(name)
            if name == "snap":
                cols[name] = pa.array(np.full(n, ctx.snap, np.uint32))
                continue
            if name in ("t_ns", "event", "pid", "cpu"):
                cols[name] = pa.array(np.concatenate([p[name] for p in parts]).astype(
                    object if name == "event" else f.type.to_pandas_dtype()), type=f.type)
                continue
            vals, mask = [], []
            for p in parts:
                k = len(p["t_ns"])
                if name == "ksm_page" and "ksm_page" in p:
                    vals.append(p["ksm_page"] != 0)
                    mask.append(np.zeros(k, bool))
                elif name in _KSM_POINTERS and name in p:
                    vals.append(self._id(name, p[name]))
                    mask.append(np.zeros(k, bool))
                elif name in _KSM_NUMERIC and name in p:
                    vals.append(p[name])
                    mask.append(np.zeros(k, bool))
                else:
                    vals.append(np.zeros(k, f.type.to_pandas_dtype()))
                    mask.append(np.ones(k, bool))
            v = np.concatenate(vals).astype(f.type.to_pandas_dtype())
            cols[name] = pa.array(v, mask=np.concatenate(mask), type=f.type)
        table = pa.table(cols, schema=S.KSM_EVENTS_SCHEMA)
        return table.sort_by([("t_ns", "ascending")])

    def _id(self, kind: str, pointers: np.ndarray) -> np.ndarray:
        """Per-trace ids for kernel pointers, in order of first appearance (never the pointer)."""
        ids = self._ids[kind]
        out = np.empty(len(pointers), np.int64)
        for i, ptr in enumerate(pointers.tolist()):
            got = ids.get(ptr)
            if got is None:
                got = ids[ptr] = len(ids)
            out[i] = got
        return out

    # --- end ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        if not self.enabled:
            return {"kernel_events": None}
        return {"kernel_events": dict(self.totals)}

    def close(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._remove_instances()
        if self.mounted is not None:
            T.release_mount(self.mounted)  # stays mounted while another capture uses it
            self.mounted = None
        if not self.enabled:
            return {}
        return {"kernel_events": dict(self.totals, instances=sorted(i.path.name for i in self.instances.values()))}

    def _remove_instances(self) -> None:
        locked = self._lock.acquire(timeout=2)  # at interpreter exit the reader may hold it forever
        try:
            for inst in self.instances.values():
                inst.remove()
            self.cpus = []
        finally:
            if locked:
                self._lock.release()
        if self._atexit:
            atexit.unregister(self._remove_instances)
            self._atexit = False


def _split(parts: list[dict[str, np.ndarray]], t_end: int) -> tuple[list, list]:
    """(rows with t_ns <= t_end, the rest) of a list of column dicts."""
    now, later = [], []
    for p in parts:
        sel = p["t_ns"] <= t_end
        if sel.all():
            now.append(p)
        elif not sel.any():
            later.append(p)
        else:
            now.append({k: v[sel] for k, v in p.items()})
            later.append({k: v[~sel] for k, v in p.items()})
    return now, later
