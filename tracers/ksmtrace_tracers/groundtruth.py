"""Ground truth: the host's real KSM counters, sampled while capturing.

One sample = every numeric ``/sys/kernel/mm/ksm/*`` file of the schema (``KSM_COUNTERS``; missing
files are null), ``advisor_mode`` (the selected one of ``[none] scan-time``), ``cow_ksm`` and
``ksm_swpin_copy`` from /proc/vmstat, and ksmd's CPU time in ns (first field of
/proc/<ksmd>/schedstat).  A sample is taken at the start of every snapshot and, with
``--ksm-sample-interval``, by a background thread in between; samples belong to the next snapshot
committed.  Per-process ``/proc/PID/ksm_stat`` is read by the capture loop.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from ksmtrace.trace.schema import KSM_COUNTERS

KSM_DIR = "/sys/kernel/mm/ksm"


def ksm_available() -> bool:
    return os.path.isdir(KSM_DIR)


def _parse(name: str, text: str) -> int | str:
    text = text.strip()
    if "[" in text:  # "[none] scan-time": the selected choice
        lb, rb = text.find("["), text.find("]")
        return text[lb + 1 : rb]
    try:
        return int(text)
    except ValueError:
        return text


def read_ksm_files() -> dict[str, int | str]:
    """Every readable file of /sys/kernel/mm/ksm (numbers as int, choices as the selected one)."""
    out: dict[str, int | str] = {}
    try:
        names = sorted(os.listdir(KSM_DIR))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(KSM_DIR, name)) as f:
                out[name] = _parse(name, f.read())
        except OSError:
            continue
    return out


def read_vmstat(keys: tuple[str, ...] = ("cow_ksm", "ksm_swpin_copy")) -> dict[str, int | None]:
    out: dict[str, int | None] = {k: None for k in keys}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k in out:
                    out[k] = int(v)
    except OSError:
        pass
    return out


def find_ksmd() -> int | None:
    """pid of the ``ksmd`` kernel thread (a child of kthreadd, pid 2)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if data[data.index(b"(") + 1 : data.rindex(b")")] == b"ksmd":
            fields = data[data.rindex(b")") + 2 :].split()
            if int(fields[1]) == 2:
                return int(name)
    return None


def ksmd_cpu_ns(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class KsmSampler:
    """Takes ground-truth samples on demand and, optionally, from a background thread."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval
        self.ksmd = find_ksmd()
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, Any]:
        t = time.monotonic_ns()
        files = read_ksm_files()
        row: dict[str, Any] = {"t_ns": t, "advisor_mode": files.get("advisor_mode")}
        if not isinstance(row["advisor_mode"], str):
            row["advisor_mode"] = None
        for name in KSM_COUNTERS:
            v = files.get(name)
            row[name] = v if isinstance(v, int) else None
        row.update(read_vmstat())
        row["ksmd_cpu_ns"] = ksmd_cpu_ns(self.ksmd)
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
