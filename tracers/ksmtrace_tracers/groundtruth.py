"""Ground truth: the host's real KSM counters, sampled while capturing.

One sample = every numeric ``/sys/kernel/mm/ksm/*`` file of the schema (``KSM_COUNTERS``; missing
files are null), ``advisor_mode`` (the selected one of ``[none] scan-time``), ``cow_ksm`` and
``ksm_swpin_copy`` from /proc/vmstat, and ksmd's CPU time and run-queue wait in ns (the first two
fields of /proc/<ksmd>/schedstat: how long ksmd ran, and how long it was runnable but waited for a
CPU — what a busy host, or the capture itself, cost it).  A sample is taken at the start of every snapshot and, with
``--ksm-sample-interval``, by a background thread in between; samples belong to the next snapshot
committed.  Per-process ``/proc/PID/ksm_stat`` is read by the capture loop.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pyarrow as pa

from ksmtrace.trace.schema import KSM_COUNTERS, KSM_SCHEMA
from ksmtrace_tracers import ksmsysfs
from ksmtrace_tracers.session import RecorderBase, SnapshotContext


class KsmSampler:
    """Takes ground-truth samples on demand and, optionally, from a background thread."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval
        self.ksmd = ksmsysfs.ksmd_pid()
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, Any]:
        t = time.monotonic_ns()
        files = ksmsysfs.read_files()
        row: dict[str, Any] = {"t_ns": t, "advisor_mode": files.get("advisor_mode")}
        if not isinstance(row["advisor_mode"], str):
            row["advisor_mode"] = None
        for name in KSM_COUNTERS:
            v = files.get(name)
            row[name] = v if isinstance(v, int) else None
        row.update(ksmsysfs.vmstat())
        sched = ksmsysfs.schedstat(self.ksmd)
        row["ksmd_cpu_ns"] = sched[0] if sched else None
        row["ksmd_wait_ns"] = sched[1] if sched else None
        return row

    def start(self) -> None:
        if self.interval and self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ksmtrace-ksm-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self.interval
        while not self._stop.wait(self.interval):
            row = self.sample()
            with self._lock:
                self._pending.append(row)

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append(row)

    def take(self) -> list[dict[str, Any]]:
        """Samples not yet given to a snapshot, oldest first."""
        with self._lock:
            rows, self._pending = self._pending, []
        return sorted(rows, key=lambda r: r["t_ns"])

    def give_back(self, rows: list[dict[str, Any]]) -> None:
        """A snapshot that was discarded returns its samples (they go to the next one)."""
        with self._lock:
            self._pending = rows + self._pending

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class GroundTruth(RecorderBase):
    """The recorder of the ``ksm`` table: a sample at the start of every snapshot, one right after
    its read window (the counters that go with the pages just read), and the background samples
    taken in between; a discarded snapshot hands its samples to the next one."""

    name = "ground_truth"

    def __init__(self, interval: float | None = None) -> None:
        self.sampler = KsmSampler(interval)
        self._rows: list[dict[str, Any]] = []

    def manifest(self) -> dict[str, dict[str, Any]]:
        return {"capture": {"ground_truth": True, "ksm_sample_interval_s": self.sampler.interval}}

    def start(self, session) -> None:
        self.sampler.start()

    def begin(self, ctx: SnapshotContext) -> None:
        self.sampler.add(self.sampler.sample())

    def end(self, ctx: SnapshotContext) -> dict[str, pa.Table]:
        self.sampler.add(self.sampler.sample())
        self._rows = self.sampler.take()
        return {"ksm": pa.Table.from_pylist([dict(r, snap=ctx.snap) for r in self._rows], schema=KSM_SCHEMA)}

    def commit(self, ctx: SnapshotContext, ok: bool) -> None:
        if not ok:
            self.sampler.give_back(self._rows)
        self._rows = []

    def close(self) -> dict[str, Any]:
        self.sampler.stop()
        return {}
