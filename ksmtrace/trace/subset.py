"""A trace without some of its processes: what the host would look like had they opted out.

>>> from ksmtrace.trace.subset import without_processes
>>> view = without_processes(trace, [3])        # trace-unique ``proc`` ids
>>> replay(view, "ksm", {...})                  # the same replay, process 3 not in it

The view is read-only and lives in memory: every table with a ``proc`` column loses the rows of
the excluded processes, everything else is the wrapped trace's.  It has a fingerprint of its own
(the trace's plus the excluded ids), so its prepared arrays and run ids never mix with the full
trace's.  This is the per-VM (or per-process) opt-out that KubeVirt, Proxmox and libvirt offer,
replayed: ``advise`` uses it to say what each process contributes and costs.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import polars as pl

from ksmtrace.errors import KsmtraceError


class TraceWithout:
    """``trace`` minus the processes ``procs`` (see the module docstring)."""

    #: its rows are not those the snapshot log's statistics describe (prepare checks them on a trace)
    log_describes_rows = False

    def __init__(self, trace, procs: Iterable[int]) -> None:
        self._trace = trace
        self.excluded = sorted({int(p) for p in procs})

    def __getattr__(self, name):
        return getattr(self._trace, name)

    @property
    def fingerprint(self) -> str:
        tag = hashlib.sha256(",".join(map(str, self.excluded)).encode()).hexdigest()[:8]
        return f"{self._trace.fingerprint}~without{tag}"

    def read_table(self, table: str, snaps=None, columns: list[str] | None = None) -> pl.DataFrame:
        want = None if columns is None else list(columns)
        extra = want is not None and "proc" not in want
        df = self._trace.read_table(table, snaps, (want + ["proc"]) if extra and self._has_proc(table) else want)
        if "proc" in df.columns and self.excluded:
            df = df.filter(~pl.col("proc").is_in(self.excluded))
        if extra and "proc" in df.columns:
            df = df.drop("proc")
        return df

    def read_batches(self, table: str, snap: int, columns: list[str] | None = None, rows: int = 1 << 20):
        """:meth:`Trace.read_batches` without the excluded processes' rows."""
        want = None if columns is None else list(columns)
        extra = want is not None and "proc" not in want and self._has_proc(table)
        for df in self._trace.read_batches(table, snap, (want + ["proc"]) if extra else want, rows):
            if "proc" in df.columns and self.excluded:
                df = df.filter(~pl.col("proc").is_in(self.excluded))
            yield df.drop("proc") if extra else df

    @staticmethod
    def _has_proc(table: str) -> bool:
        from ksmtrace.trace import schema

        return "proc" in schema.SCHEMAS[table].names

    def prepare(self, scope: str = "recorded", cache: bool = True):
        from ksmtrace.trace.prepare import prepare

        return prepare(self, scope=scope, cache=cache)


def without_processes(trace, procs: Iterable[int]) -> TraceWithout:
    """``trace`` without the processes whose trace-unique ``proc`` ids are in ``procs``."""
    procs = list(procs)
    known = set(trace.read_table("processes", columns=["proc"])["proc"].to_list()) if trace.has_table("processes") else set()
    unknown = [p for p in procs if known and int(p) not in known]
    if unknown:
        raise KsmtraceError(f"{trace.path}: no process {unknown[0]} in the trace")
    return TraceWithout(trace, procs)
