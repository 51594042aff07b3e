"""The replay side of a controller: its ticks between daemon batches, the memory it sees, the run
switch, and the trajectory it leaves in the result (used by :func:`ksmtrace.replay.replay`).

Between snapshots ``s`` and ``s+1`` the driver normally calls ``rt.run_until(t_{s+1})``.  With a
controller it runs the daemon up to each tick ``t`` (every batch that wakes before ``t`` runs in
full), builds the :class:`~ksmtrace.controllers.ControlState`, asks the controller, and applies
its writes through the runtime's ``set_params`` before the next batch; a tick at exactly a
snapshot's time comes after that snapshot's pages are applied.  While ``run`` is 0 the daemon does
no batch (ksmd waits; merged pages stay merged; mm registrations go on); setting it to 1 wakes it
(``wake_at``) unless its sleep ends later.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from ksmtrace.controllers import KIB_PER_PAGE, ControlState, Controller, controls_for


def rss_pages(trace, prep) -> tuple[np.ndarray, str]:
    """The traced processes' summed resident set size (pages) at every snapshot, and its source:
    the processes table's ``rss_pages`` of the processes alive then, else the candidate pages."""
    n = prep.n_snaps
    if trace.has_table("processes"):
        p = trace.read_table("processes", columns=["snap", "rss_pages", "state"])
        p = p.filter(pl.col("state") != "exited").group_by("snap").agg(pl.col("rss_pages").sum())
        out = np.zeros(n, dtype=np.int64)
        snaps = p["snap"].to_numpy().astype(np.int64)
        keep = snaps < n
        out[snaps[keep]] = p["rss_pages"].to_numpy().astype(np.int64)[keep]
        if out.any():
            return out, "the processes table's rss_pages"
    return prep.base_pages.astype(np.int64), "the candidate pages (the trace records no RSS)"


class ControlLoop:
    """One controller driving one runtime through one replay."""

    def __init__(self, ctl: Controller, trace, prep, eng, rt, pol, host_kib: int | None, start_ns: int) -> None:
        self.ctl, self.prep, self.eng, self.rt = ctl, prep, eng, rt
        self.host_kib = int(host_kib or 0)
        self.rss, self.rss_source = rss_pages(trace, prep)
        times = prep.times_ns
        duration_s = max(0.0, (int(times[-1]) - int(start_ns)) / 1e9) if len(times) else 0.0
        self.ticks = sorted(int(start_ns) + int(round(x * 1e9)) for x in ctl.ticks(duration_s))
        self.i = 0
        self.snap = 0
        self.running = bool(ctl.initial_run())
        self.params: dict[str, Any] = dict(pol.describe())
        self.log: list[dict[str, Any]] = []
        self.columns = controls_for(ctl, ())
        self.overcommitted = 0

    # --- what the controller sees ------------------------------------------------------------------
    def memory_kib(self) -> tuple[int, int, int, int]:
        """(rss, used, free, saved) now, in KiB."""
        s = self.snap
        base_frames = int(self.prep.base_frames[s])
        fork = int(self.prep.base_pages[s]) - base_frames
        saved = base_frames - int(self.eng.counters()["frames_in_use"])
        rss = int(self.rss[s]) * KIB_PER_PAGE
        used = max(0, rss - (fork + saved) * KIB_PER_PAGE)
        free = max(0, self.host_kib - used) if self.host_kib else 0
        return rss, used, free, saved * KIB_PER_PAGE

    def state(self, now: int) -> ControlState:
        rss, used, free, saved = self.memory_kib()
        return ControlState(t_s=now / 1e9, snap=self.snap, host_kib=self.host_kib, rss_kib=rss, used_kib=used,
                            free_kib=free, saved_kib=saved, running=self.running, params=dict(self.params),
                            counters=dict(self.rt.counters()))

    # --- ticks -------------------------------------------------------------------------------------
    def tick(self, now: int) -> None:
        st = self.state(now)
        changes = dict(self.ctl.step(st) or {})
        run = changes.pop("run", None)
        refused = self.rt.set_params(changes, now) if changes else {}
        p = getattr(self.rt, "p", None)
        if p is not None:
            self.params = p.as_dict()
        if run is not None:
            on = bool(int(run))
            if on and not self.running:
                self.rt.wake_at(now)
            self.running = on
        entry: dict[str, Any] = {"t_s": now / 1e9, "snap": st.snap, "free_kib": st.free_kib, "used_kib": st.used_kib,
                                 "rss_kib": st.rss_kib, "writes": {**changes, **({} if run is None else {"run": int(run)})}}
        if refused:
            entry["refused"] = refused
        self.log.append(entry)

    def at_snapshot(self, s: int, now: int) -> None:
        """Snapshot ``s`` has been applied at ``now``: the ticks due by now."""
        self.snap = s
        while self.i < len(self.ticks) and self.ticks[self.i] <= now:
            self.tick(self.ticks[self.i])
            self.i += 1

    def run_until(self, t_end: int) -> None:
        """The daemon's work until ``t_end``, with the ticks before it."""
        while self.i < len(self.ticks) and self.ticks[self.i] < t_end:
            t = self.ticks[self.i]
            self._daemon_until(t)
            self.tick(t)
            self.i += 1
        self._daemon_until(t_end)

    def _daemon_until(self, t: int) -> None:
        """Run the daemon to ``t``; stopped, it does no batch (its next wake-up is pushed to ``t``),
        but what happens to it meanwhile still happens (ksm: a fork registers the child's mm)."""
        if not self.running:
            self.rt.wake_at(t)
        self.rt.run_until(t)

    # --- the trajectory ----------------------------------------------------------------------------
    def row(self, existing: dict[str, Any]) -> dict[str, Any]:
        """The trajectory columns of the row of the current snapshot (those not already in it)."""
        out: dict[str, Any] = {}
        for c in self.columns:
            if c in existing:
                continue
            out[c] = int(self.running) if c == "run" else _int(self.params.get(c))
        rss, used, free, _ = self.memory_kib()
        out["mem_used_kib"] = used
        if self.host_kib:
            out["mem_free_kib"] = free
            self.overcommitted += used > self.host_kib
        return out

    def extras(self) -> dict[str, Any]:
        return {"name": self.ctl.name, "params": self.ctl.describe(), "host_kib": self.host_kib or None,
                "rss_source": self.rss_source, "ticks": len(self.log), "log": self.log,
                "snapshots_overcommitted": self.overcommitted}


def _int(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    return v
