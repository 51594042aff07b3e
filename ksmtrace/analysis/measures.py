"""The measures the answers (``frontier``, ``advise``) put on a run, defined once.

* **CPU, % of a core**: the daemon's modelled CPU seconds (:meth:`RunResult.cpu_seconds`, under a
  cost model, ``docs/cost-model.md``) divided by the trace's duration (first to last snapshot),
  times 100.  0.1 % of a core is 3.6 s of ksmd CPU per hour.
* **saving, % of the oracle**: the mean over the snapshots of ``frames_saved`` over the mean of
  ``oracle_saved`` (what a perfect, instantaneous dedup frees) — the speed and the amount at once.
* **time to X % of the oracle**: the first snapshot time (s after the first snapshot) from which
  ``frames_saved`` stays at or above X % of that snapshot's ``oracle_saved`` to the end of the
  trace; None when it never does.  "Stays" matters: a saving that is reached and then lost to
  COW breaks is not reached.
* **time to X % of its own saving**: the same against the run's own final ``frames_saved``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

MIB_PER_FRAME = 4096 / 2**20


def duration_s(result) -> float:
    """Seconds from the first to the last snapshot of the run's trace."""
    t = result.table["t_s"]
    return float(t[-1] - t[0]) if result.table.height > 1 else 0.0


def cpu_pct(result, cost=None, duration: float | None = None) -> float | None:
    """ksmd CPU as a percentage of one core over the trace (None for a one-snapshot trace)."""
    d = duration_s(result) if duration is None else duration
    if not d > 0:
        return None
    return 100.0 * result.cpu_seconds(cost) / d


def pct_of_oracle(result) -> float | None:
    """Mean frames_saved over mean oracle_saved, in % (None when the oracle saves nothing)."""
    t = result.table
    if not t.height:
        return None
    o = float(t["oracle_saved"].mean() or 0.0)
    return 100.0 * float(t["frames_saved"].mean() or 0.0) / o if o > 0 else None


def sustained_from(t_s: np.ndarray, ok: np.ndarray) -> float | None:
    """The first time from which ``ok`` holds at every later sample (None if not at the last)."""
    ok = np.asarray(ok, dtype=bool)
    if ok.size == 0 or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    i = int(bad[-1]) + 1 if bad.size else 0
    return float(t_s[i])


def time_to_oracle_share(result, pct: float) -> float | None:
    """Seconds after the first snapshot from which the run keeps ``pct`` % of the oracle's saving."""
    t = result.table
    if not t.height:
        return None
    saved = t["frames_saved"].to_numpy().astype(float)
    oracle = t["oracle_saved"].to_numpy().astype(float)
    if not (oracle > 0).any():
        return None
    ok = (saved >= pct / 100.0 * oracle) | (oracle <= 0)
    return sustained_from(t["t_s"].to_numpy().astype(float), ok)


def time_to_own_share(result, pct: float) -> float | None:
    """Seconds after the first snapshot from which the run keeps ``pct`` % of its own final saving."""
    t = result.table
    if not t.height:
        return None
    saved = t["frames_saved"].to_numpy().astype(float)
    final = float(saved[-1])
    if not final > 0:
        return None
    return sustained_from(t["t_s"].to_numpy().astype(float), saved >= pct / 100.0 * final)


def finite(v: Any) -> Any:
    """``v`` with NaN and infinities as None (for tables and JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return finite(v.item())
    return v
