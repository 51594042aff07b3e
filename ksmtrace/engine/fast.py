"""The fast engine: ground truth as numpy arrays (see :mod:`ksmtrace.engine.state`)."""
from __future__ import annotations

import numpy as np

from ksmtrace.engine import state as st


class FastEngine:
    kind = "fast"

    def __init__(self, prep) -> None:
        self.prep = prep
        self.E = st.new_arrays(prep)
        self.n_frames = self.E.fr.shape[0]  # frame ids are recycled slots below this
        self._proc_new = np.zeros(prep.n_procs, dtype=np.bool_)
        self.now = 0

    def apply_snapshot(self, s: int, now: int) -> int:
        """Apply snapshot ``s``'s page events at virtual time ``now``; returns COW breaks."""
        p = self.prep
        sl = p.events(s)
        self._proc_new[:] = p.proc_first_snap == s
        self.now = now
        return int(
            st.apply_events(
                self.E, p.ev_pg[sl], p.ev_kind[sl], p.ev_cid[sl], p.ev_gid[sl], p.ev_thp[sl],
                self._proc_new, now,
            )
        )

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
