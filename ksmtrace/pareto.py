"""Non-dominated (Pareto-optimal) points: maximise some objectives, minimise others."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def non_dominated(maximize: Sequence[Sequence[float]] = (), minimize: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    ``maximize`` and ``minimize`` are lists of equally long columns (one per objective).  Point
    ``j`` dominates ``i`` when it is at least as good in every objective and strictly better in
    one.  NaN counts as the worst value.  Equal points do not dominate each other, so duplicates
    are all kept.

    >>> non_dominated(maximize=[[1, 2, 2]], minimize=[[1, 1, 3]]).tolist()
    [False, True, False]
    """
    cols = []
    for c in maximize:
        a = -np.asarray(c, dtype=float)  # turn every objective into "smaller is better"
        cols.append(a)
    for c in minimize:
        cols.append(np.asarray(c, dtype=float))
    if not cols:
        raise ValueError("non_dominated needs at least one objective")
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError("every objective needs one value per point")
    if n == 0:
        return np.zeros(0, dtype=bool)
    m = np.column_stack([np.where(np.isnan(c), np.inf, c) for c in cols])  # [n, k]
    keep = np.ones(n, dtype=bool)
    step = max(1, 4_000_000 // max(n * m.shape[1], 1))
    for lo in range(0, n, step):
        blk = m[lo:lo + step]  # candidates i in this block
        le = (m[None, :, :] <= blk[:, None, :]).all(axis=2)  # [b, n]: j at least as good as i
        lt = (m[None, :, :] < blk[:, None, :]).any(axis=2)  # j strictly better somewhere
        keep[lo:lo + step] = ~(le & lt).any(axis=1)
    return keep
