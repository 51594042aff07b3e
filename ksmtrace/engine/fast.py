"""The fast engine: ground truth as numpy arrays (see :mod:`ksmtrace.engine.state`).

It offers the primitive surface of :class:`ksmtrace.engine.api.Engine` as methods, so a readable
runtime (plain Python, no numba) runs on it unchanged; a policy's numba kernel works on the arrays
(``self.E``) through the jitted twins of the same primitives.
"""
from __future__ import annotations

import numpy as np

from ksmtrace.engine import state as st


class FastEngine:
    kind = "fast"

    def __init__(self, prep, n_faults: int = 0) -> None:
        """``n_faults``: the recorded write faults the run applies (``--writes faults``): each gets a
        time slot of its own (see :func:`ksmtrace.engine.state.new_arrays`)."""
        self.prep = prep
        self.E = st.new_arrays(prep, n_faults)
        self._fault_slot = prep.n_snaps  # the next fault's time slot
        self._fault_slots_end = prep.n_snaps + n_faults
        self.n_frames = self.E.fr.shape[0]  # frame ids are recycled slots below this
        self._proc_new = np.zeros(prep.n_procs, dtype=np.bool_)
        self._faulted: dict[int, int] = {}  # page written by a fault -> the snapshot time its write carries
        self.now = 0

    # --- the driver's side ----------------------------------------------------------------------
    def batch(self, s: int, now: int):
        """Snapshot ``s``'s events, and which processes are new at it; the engine's clock moves to ``now``."""
        p = self.prep
        self._proc_new[:] = p.proc_first_snap == s
        self.now = now
        return p.batch(s), self._proc_new

    def apply_snapshot(self, s: int, now: int) -> int:
        """Apply snapshot ``s``'s page events at virtual time ``now``; returns COW breaks."""
        ev, proc_new = self.batch(s, now)
        kinds = st.faulted_kinds(ev.pg, ev.kind, self._faulted, now)
        return int(st.apply_events(self.E, ev.pg, kinds, ev.cid, ev.gid, ev.thp, proc_new, s, now))

    def write_fault(self, pg: int, cid: int, now: int, until: int) -> int:
        """A recorded write fault on ``pg`` at ``now`` (see :func:`ksmtrace.engine.state.write_fault`);
        the page's ``EV_WRITE`` at the snapshot at ``until`` is then already applied."""
        if self._fault_slot >= self._fault_slots_end:
            raise ValueError("more write faults than the fast engine was sized for (FastEngine(prep, n_faults))")
        cow = int(st.write_fault(self.E, np.int64(pg), np.int64(cid), np.int64(now), np.int64(self._fault_slot)))
        if cow >= 0:
            self._fault_slot += 1
            self._faulted[int(pg)] = int(until)
        return cow

    def counters(self) -> dict[str, int]:
        ec = self.E.ec
        out = {name: int(ec[i]) for i, name in enumerate(st.COUNTER_NAMES)}
        if ec[st.C_VIOLATIONS] and ec[st.C_NFREE] == 0:
            out["frame_slots_exhausted"] = 1
        return out

    def per_process(self) -> tuple[np.ndarray, np.ndarray]:
        """(candidate pages, merged pages) per process now; merged = mapping a KSM page or the
        zero page through the policy."""
        return st.per_process_counts(self.E, self.prep.n_procs)

    def latency_hist(self) -> np.ndarray:
        return self.E.ec[st.LAT0 : st.TS0].copy()

    def first_merge_ns(self) -> np.ndarray:
        """Per page, the virtual time of its first merge (-1: never merged)."""
        return self.E.first.copy()

    # --- queries (plain numpy reads: cheaper from Python than a jitted call) --------------------
    def is_candidate(self, pg: int) -> bool:
        return bool(self.E.pg[pg, st.P_CID] >= 0)

    def cid(self, pg: int) -> int:
        return int(self.E.pg[pg, st.P_CID])

    def frame(self, pg: int) -> int:
        return int(self.E.pg[pg, st.P_FRAME])

    def page_is_ksm(self, pg: int) -> bool:
        f = int(self.E.pg[pg, st.P_FRAME])
        return f > 0 and bool(self.E.fr[f, st.F_KSM] == 1)

    def frame_alive(self, f: int, gen: int) -> bool:
        fr = self.E.fr
        return f > 0 and bool(fr[f, st.F_REF] > 0 and fr[f, st.F_KSM] == 1 and fr[f, st.F_GEN] == gen)

    def frame_refs(self, f: int) -> int:
        return int(self.E.fr[f, st.F_REF]) if f > 0 else 0

    # --- proposals (the jitted primitives the kernels call) ---------------------------------------
    def stabilize(self, pg: int) -> int:
        return int(st.stabilize(self.E, np.int64(pg)))

    def merge(self, pg: int, f: int, now: int) -> bool:
        return bool(st.merge(self.E, np.int64(pg), np.int64(f), np.int64(now)))

    def merge_zero(self, pg: int, now: int) -> bool:
        return bool(st.merge_zero(self.E, np.int64(pg), np.int64(now)))

    def split_thp(self, pg: int, remap_zero: bool) -> int:
        proc = int(self.prep.page_proc[pg])
        lo, hi = int(self.prep.proc_pg_lo[proc]), int(self.prep.proc_pg_hi[proc])
        return int(st.split_thp(self.E, np.int64(pg), np.int64(lo), np.int64(hi), bool(remap_zero)))
