"""The recorded write faults of a trace as writes the replay applies at their own time.

A snapshot sees a page's content, not when or how often it was written: a page rewritten with the
same bytes shows no change at all, and a changed page is, as far as the snapshots know, written at
the next snapshot.  The ``faults`` table (``capture --kernel-events``, format version 2) records
every user write fault of the targets: a write to a write-protected page (a KSM page, a page a
fork shares, the zero page), which is exactly when the kernel breaks COW.  This module turns those
rows into the writes the replay applies between two snapshots (``--writes faults``,
``docs/replay-semantics.md``):

* only protection faults (``write`` and ``present``): a write to a page that was not mapped
  allocates a page, it breaks no sharing;
* a fault belongs to the interval ``(t_k, t_k+1]`` of the snapshots that holds its time (the
  snapshots' clock: CLOCK_MONOTONIC) and to the page (process, virtual page) it hit; faults on
  pages the trace never saw in that process are dropped (counted in :attr:`FaultWrites.unknown`);
* the first fault of a page in an interval carries the page's content at snapshot ``k+1`` when
  that snapshot shows it written (``EV_WRITE``): the write that faulted is the one that changed it.
  Later faults of the page in the interval, and faults on pages whose content did not change, keep
  the content (a rewrite with the same bytes).

The engine applies each write at its time (:meth:`ksmtrace.engine.api.Engine.write_fault`) and then
treats the page's ``EV_WRITE`` at snapshot ``k+1`` as already applied, so a change is never
counted twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ksmtrace.errors import KsmtraceError

#: how the replay learns of writes: ``faults`` (the recorded write faults at their time, and the
#: content changes the snapshots show), ``snapshots`` (content changes only, at the snapshot that
#: shows them), ``auto`` (``faults`` when the trace has a faults table)
WRITE_MODES = ("auto", "faults", "snapshots")


@dataclass
class FaultWrites:
    """The writes of interval ``k`` (between snapshots ``k`` and ``k+1``) are rows
    ``[off[k], off[k+1])``, in time order."""

    off: np.ndarray  # int64 [n_snaps + 1] (the last interval, after the last snapshot, is empty)
    t_ns: np.ndarray  # int64, virtual time (ns since the first snapshot), t_k < t <= t_k+1
    pg: np.ndarray  # int64 page id
    cid: np.ndarray  # int64 content after the write, -1 = unchanged (the same bytes)
    recorded: int = 0  # write faults in the table
    unknown: int = 0  # protection write faults on no page of the prepared trace (or outside every interval)

    def interval(self, k: int) -> slice:
        return slice(int(self.off[k]), int(self.off[k + 1]))

    def __len__(self) -> int:
        return len(self.pg)


def resolve_writes(trace, writes: str | None) -> str:
    """The write mode a replay of ``trace`` uses: ``faults`` or ``snapshots``."""
    writes = writes or "auto"
    if writes not in WRITE_MODES:
        raise KsmtraceError(f"unknown write mode {writes!r} (modes: {', '.join(WRITE_MODES)})")
    has = trace.has_table("faults")
    if writes == "faults" and not has:
        raise KsmtraceError(f"{trace.path}: the trace has no faults table (capture it with --kernel-events as root) "
                            "to replay writes at their fault time; use --writes snapshots")
    if writes == "auto":
        return "faults" if has else "snapshots"
    return writes


def fault_writes(trace, prep) -> FaultWrites:
    """The write faults of ``trace`` as writes on the pages of ``prep`` (see the module docstring)."""
    from ksmtrace.trace.prepare import EV_WRITE

    n = prep.n_snaps
    t = trace.read_table("faults", columns=["t_ns", "proc", "vpn", "write", "present"])
    recorded = t.height
    t = t.filter(t["write"] & t["present"] & t["proc"].is_not_null())
    ft = t["t_ns"].to_numpy().astype(np.int64) - int(trace.t0_ns)
    fproc = t["proc"].to_numpy().astype(np.int64)
    fvpn = t["vpn"].to_numpy().astype(np.int64)
    # the page: process id -> dense process -> its page range, sorted by address
    order = np.argsort(prep.proc_id, kind="stable")
    ids = prep.proc_id[order]
    j = np.searchsorted(ids, fproc)
    known = (j < len(ids)) & (ids[np.minimum(j, max(len(ids) - 1, 0))] == fproc) if len(ids) else np.zeros(len(fproc), bool)
    dproc = np.where(known, order[np.minimum(j, max(len(ids) - 1, 0))], 0) if len(ids) else np.zeros(len(fproc), np.int64)
    pg = np.full(len(fproc), -1, np.int64)
    for i in np.flatnonzero(known).tolist():
        lo, hi = int(prep.proc_pg_lo[dproc[i]]), int(prep.proc_pg_hi[dproc[i]])
        k = lo + int(np.searchsorted(prep.page_vpn[lo:hi], fvpn[i]))
        if k < hi and prep.page_vpn[k] == fvpn[i]:
            pg[i] = k
    times = np.asarray(prep.times_ns, dtype=np.int64)
    k = np.searchsorted(times, ft, side="left") - 1  # times[k] < t <= times[k+1]
    ok = (pg >= 0) & (k >= 0) & (k < n - 1)
    unknown = int(len(pg) - np.count_nonzero(ok))
    ft, pg, k = ft[ok], pg[ok], k[ok]
    o = np.lexsort((pg, ft))  # time order (ties: page order)
    ft, pg, k = ft[o], pg[o], k[o]
    # the first fault of a page in its interval takes the content snapshot k+1 shows it written with
    cid = np.full(len(pg), -1, np.int64)
    if len(pg):
        wr = np.flatnonzero(prep.ev_kind == EV_WRITE)
        ev_snap = np.searchsorted(prep.off, wr, side="right") - 1
        ev_key = ev_snap.astype(np.int64) * prep.n_pages + prep.ev_pg[wr].astype(np.int64)
        so = np.argsort(ev_key, kind="stable")
        ev_key, ev_cid = ev_key[so], prep.ev_cid[wr][so].astype(np.int64)
        key = (k + 1) * prep.n_pages + pg
        first = np.zeros(len(pg), bool)
        _, idx = np.unique(key, return_index=True)  # (stable: the earliest row of each key)
        first[idx] = True
        e = np.searchsorted(ev_key, key)
        hit = first & (e < len(ev_key)) & (ev_key[np.minimum(e, max(len(ev_key) - 1, 0))] == key) if len(ev_key) else np.zeros(len(pg), bool)
        cid[hit] = ev_cid[e[hit]]
    off = np.zeros(n + 1, np.int64)
    off[1:] = np.cumsum(np.bincount(k, minlength=n)[:n])
    return FaultWrites(off=off, t_ns=ft, pg=pg, cid=cid, recorded=recorded, unknown=unknown)
