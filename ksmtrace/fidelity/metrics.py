"""The numbers a fidelity report is made of: pure functions of time series, easy to test.

Conventions (printed in every report, see ``docs/fidelity.md``):

* **final**: the value at the trace's last snapshot (real: the ground-truth sample taken at the
  start of that snapshot; simulated: the replay's row for it).
* **NRMSE**: root mean square of (simulated - real) over the snapshot times from KSM's start on,
  divided by the *peak* (largest absolute value) of the real values over those times; ``None``
  when that is 0 and the simulation is not (then the error is reported as ``rmse`` alone).
  (The range max - min is a poor divisor here: a counter that is near its final value at the first
  snapshot after KSM's start has a tiny range.)
* **t90**: the first time the counter reaches 90% of its final value, in seconds after KSM
  started; linear interpolation between ground-truth samples (real) and between the replay's
  rows (simulated).  ``None`` when the final value is not positive.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def step_hold(t_samples: np.ndarray, values: np.ndarray, t_query: np.ndarray) -> np.ndarray:
    """The last sample at or before each query time (the first sample before all samples)."""
    t_samples = np.asarray(t_samples, dtype=float)
    values = np.asarray(values, dtype=float)
    if len(t_samples) == 0:
        return np.full(len(t_query), np.nan)
    idx = np.searchsorted(t_samples, np.asarray(t_query, dtype=float), side="right") - 1
    return values[np.clip(idx, 0, len(values) - 1)]


def rmse(sim: Sequence[float], real: Sequence[float]) -> float:
    a = np.asarray(sim, dtype=float)
    b = np.asarray(real, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    if not ok.any():
        return float("nan")
    return float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2)))


def nrmse(sim: Sequence[float], real: Sequence[float]) -> float | None:
    """RMSE normalised by the peak absolute real value."""
    b = np.asarray(real, dtype=float)
    b = b[~np.isnan(b)]
    if len(b) == 0:
        return None
    e = rmse(sim, real)
    peak = float(np.max(np.abs(b)))
    if peak <= 0:
        return 0.0 if e == 0 else None
    return e / peak


def time_to_fraction(t: Sequence[float], values: Sequence[float], fraction: float = 0.9,
                     final: float | None = None, t_from: float = 0.0) -> float | None:
    """First time (minus ``t_from``) at which ``values`` reaches ``fraction`` of ``final`` (default:
    the last value), linearly interpolated between samples; None if the target is not positive
    or never reached."""
    t = np.asarray(t, dtype=float)
    v = np.asarray(values, dtype=float)
    ok = ~np.isnan(v)
    t, v = t[ok], v[ok]
    if len(v) == 0:
        return None
    fin = float(v[-1]) if final is None else float(final)
    target = fraction * fin
    if not fin > 0:
        return None
    hit = np.flatnonzero(v >= target)
    if len(hit) == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return float(t[0] - t_from)
    t0, t1, v0, v1 = t[i - 1], t[i], v[i - 1], v[i]
    if v1 == v0:
        return float(t1 - t_from)
    x = t0 + (target - v0) * (t1 - t0) / (v1 - v0)
    return float(x - t_from)


def relative_error(sim: float | None, real: float | None) -> float | None:
    """(sim - real) / real; None when real is 0 or a value is missing."""
    if sim is None or real is None:
        return None
    if isinstance(sim, float) and math.isnan(sim) or isinstance(real, float) and math.isnan(real):
        return None
    if real == 0:
        return None
    return (float(sim) - float(real)) / abs(float(real))


def within(sim: float | None, real: float | None, rel: float, floor: float = 1.0) -> bool | None:
    """|sim - real| <= max(rel * |real|, floor) (None if a value is missing)."""
    if sim is None or real is None:
        return None
    return abs(float(sim) - float(real)) <= max(rel * abs(float(real)), floor) + 1e-9


def spread_band(values: Sequence[float], extra: float = 0.10) -> tuple[float, float] | None:
    """The run-to-run range of real values widened by ``extra`` times their mean (both sides)."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if len(v) == 0:
        return None
    pad = extra * abs(float(v.mean()))
    return float(v.min() - pad), float(v.max() + pad)
