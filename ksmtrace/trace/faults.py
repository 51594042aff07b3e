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
  pages the trace never saw in that process, before the first or after the last snapshot are
  dropped (counted in :attr:`FaultWrites.unknown`);
* the first fault of a page in an interval carries the page's content at snapshot ``k+1`` when
  that snapshot shows it written (``EV_WRITE``): the write that faulted is the one that changed it.
  Later faults of the page in the interval, and faults on pages whose content did not change, keep
  the content (a rewrite with the same bytes).

The engine applies each write at its time (:meth:`ksmtrace.engine.api.Engine.write_fault`) and then
treats the page's ``EV_WRITE`` at snapshot ``k+1`` (at ``until_ns``) as already applied, so a change
is never counted twice.  The prepared view may be refined (``fidelity`` inserts empty snapshots):
intervals and "the next snapshot" are always the trace's own.
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
    """The writes, in time order: at ``t_ns`` (virtual time, ns since the first snapshot) page
    ``pg`` is written, leaving content ``cid`` (-1: the same bytes); ``until_ns`` is the time of the
    trace snapshot that follows it (whose ``EV_WRITE`` of the page the write carries)."""

    t_ns: np.ndarray  # int64
    pg: np.ndarray  # int64 page id
    cid: np.ndarray  # int64 content after the write, -1 = unchanged (the same bytes)
    until_ns: np.ndarray  # int64
    recorded: int = 0  # write faults in the table
    unknown: int = 0  # protection write faults on no page of the prepared trace (or outside every interval)

    def between(self, t0: int, t1: int) -> slice:
        """The writes with ``t0 < t <= t1``."""
        return slice(int(np.searchsorted(self.t_ns, t0, side="right")), int(np.searchsorted(self.t_ns, t1, side="right")))

    def __len__(self) -> int:
        return len(self.pg)


def resolve_writes(trace, writes: str | None, policy=None) -> str:
    """The write mode a replay of ``trace`` uses: ``faults`` or ``snapshots``.  ``policy``: a
    policy (class or instance) whose ``fault_writes`` is False takes the writes at the snapshots
    under ``auto``, and refuses ``faults``."""
    writes = writes or "auto"
    if writes not in WRITE_MODES:
        raise KsmtraceError(f"unknown write mode {writes!r} (modes: {', '.join(WRITE_MODES)})")
    if policy is not None and not getattr(policy, "fault_writes", True):
        if writes == "faults":
            raise KsmtraceError(f"policy {policy.name!r} does not model write faults between snapshots "
                                "(its runtime keeps its own view of the pages); use --writes snapshots")
        return "snapshots"
    has = trace.has_table("faults")
    if writes == "faults" and not has:
        raise KsmtraceError(f"{trace.path}: the trace has no faults table (capture it with --kernel-events as root) "
                            "to replay writes at their fault time; use --writes snapshots")
    if writes == "auto":
        return "faults" if has else "snapshots"
    return writes


def fault_writes(trace, prep) -> FaultWrites:
    """The write faults of ``trace`` as writes on the pages of ``prep`` (see the module docstring)."""
    from ksmtrace.trace.prepared import EV_WRITE

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
    real = np.asarray(trace.times_ns, dtype=np.int64)  # the trace's own snapshots (prep's may be refined)
    j = np.searchsorted(real, ft, side="left")  # real[j-1] < t <= real[j]
    ok = (pg >= 0) & (j >= 1) & (j < len(real))
    unknown = int(len(pg) - np.count_nonzero(ok))
    ft, pg, j = ft[ok], pg[ok], j[ok]
    o = np.lexsort((pg, ft))  # time order (ties: page order)
    ft, pg, j = ft[o], pg[o], j[o]
    until = real[j]
    times = np.asarray(prep.times_ns, dtype=np.int64)
    k = np.searchsorted(times, until)  # prep's snapshot at that time
    k = np.where((k < len(times)) & (times[np.minimum(k, len(times) - 1)] == until), k, -1) if len(times) else k
    # the first fault of a page before a snapshot takes the content that snapshot shows it written with
    cid = np.full(len(pg), -1, np.int64)
    if len(pg):
        wr = np.flatnonzero(prep.ev_kind == EV_WRITE)
        ev_snap = np.searchsorted(prep.off, wr, side="right") - 1
        ev_key = ev_snap.astype(np.int64) * prep.n_pages + prep.ev_pg[wr].astype(np.int64)
        so = np.argsort(ev_key, kind="stable")
        ev_key, ev_cid = ev_key[so], prep.ev_cid[wr][so].astype(np.int64)
        key = k * prep.n_pages + pg
        first = np.zeros(len(pg), bool)
        _, idx = np.unique(key, return_index=True)  # (the earliest row of each key: rows are in time order)
        first[idx] = True
        e = np.searchsorted(ev_key, key)
        if len(ev_key):
            hit = first & (k >= 0) & (e < len(ev_key)) & (ev_key[np.minimum(e, len(ev_key) - 1)] == key)
            cid[hit] = ev_cid[e[hit]]
    return FaultWrites(t_ns=ft, pg=pg, cid=cid, until_ns=until, recorded=recorded, unknown=unknown)
