"""Delta encoding of page rows, shared by every tracer and by the test trace builder.

A *state* is the set of pages of one process at one snapshot: parallel numpy arrays ``vpn``
(sorted, unique), ``hash``, ``flags``, ``pfn`` (and optional fingerprint columns).  ``diff`` says
which pages are new, which changed (hash, flags or frame) and which are gone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ksmtrace.trace import schema as S


@dataclass
class Delta:
    new: np.ndarray  # indices into cur
    changed: np.ndarray  # indices into cur
    gone: np.ndarray  # indices into prev
    same: np.ndarray  # indices into cur


def diff(prev: dict[str, np.ndarray] | None, cur: dict[str, np.ndarray], compare: tuple[str, ...] = ("hash", "flags", "pfn")) -> Delta:
    """Compare two states of one process (``vpn`` sorted and unique in both)."""
    n = len(cur["vpn"])
    if prev is None or len(prev["vpn"]) == 0:
        return Delta(np.arange(n), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    common, i_prev, i_cur = np.intersect1d(prev["vpn"], cur["vpn"], assume_unique=True, return_indices=True)
    differs = np.zeros(len(common), dtype=bool)
    for col in compare:
        if col in prev and col in cur:
            differs |= prev[col][i_prev] != cur[col][i_cur]
    in_prev = np.zeros(len(prev["vpn"]), dtype=bool)
    in_prev[i_prev] = True
    in_cur = np.zeros(n, dtype=bool)
    in_cur[i_cur] = True
    return Delta(
        new=np.flatnonzero(~in_cur),
        changed=np.sort(i_cur[differs]),
        gone=np.flatnonzero(~in_prev),
        same=np.sort(i_cur[~differs]),
    )


def rows_for(snap: int, proc: int, pid: int, prev, cur, delta: Delta, keyframe: bool, extra_cols: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Page rows (column arrays) of one process for one snapshot, sorted by vpn."""
    parts = [(cur, delta.new, S.OP_NEW), (cur, delta.changed, S.OP_CHANGED)]
    if keyframe:
        parts.append((cur, delta.same, S.OP_SAME))
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("vpn", "op", "hash", "flags", "pfn") + tuple(extra_cols)}
    for src, idx, op in parts:
        if len(idx) == 0:
            continue
        cols["vpn"].append(src["vpn"][idx])
        cols["op"].append(np.full(len(idx), op, np.uint8))
        for k in ("hash", "flags", "pfn") + tuple(extra_cols):
            cols[k].append(src[k][idx])
    if prev is not None and len(delta.gone):
        g = delta.gone
        cols["vpn"].append(prev["vpn"][g])
        cols["op"].append(np.full(len(g), S.OP_GONE, np.uint8))
        cols["hash"].append(np.zeros(len(g), np.uint64))
        cols["flags"].append(np.zeros(len(g), np.uint32))
        cols["pfn"].append(np.zeros(len(g), np.uint64))
        for k in extra_cols:
            cols[k].append(np.zeros(len(g), prev[k].dtype if k in prev else np.uint32))
    out: dict[str, np.ndarray] = {}
    dtypes = {"vpn": np.uint64, "op": np.uint8, "hash": np.uint64, "flags": np.uint32, "pfn": np.uint64}
    for k, v in cols.items():
        dt = dtypes.get(k, np.uint32)
        out[k] = np.concatenate(v).astype(dt) if v else np.zeros(0, dt)
    order = np.argsort(out["vpn"], kind="stable")
    for k in out:
        out[k] = out[k][order]
    m = len(out["vpn"])
    out["snap"] = np.full(m, snap, np.uint32)
    out["proc"] = np.full(m, proc, np.uint32)
    out["pid"] = np.full(m, pid, np.uint32)
    return out


def filepages_table(snap: int, parts: list[tuple[int, int, dict[str, np.ndarray]]]) -> pa.Table:
    """The ``filepages`` table of one snapshot from per-file rows: ``parts`` holds ``(dev, inode,
    rows)`` with ``rows`` from :func:`rows_for` over the file's state (``vpn`` = page index)."""
    cols: dict[str, list[np.ndarray]] = {n: [] for n in S.FILEPAGES_SCHEMA.names}
    for dev, inode, r in parts:
        n = len(r["vpn"])
        cols["snap"].append(np.full(n, snap, np.uint32))
        cols["dev"].append(np.full(n, dev, np.uint64))
        cols["inode"].append(np.full(n, inode, np.uint64))
        cols["index"].append(r["vpn"])
        for k in ("op", "hash", "flags", "pfn"):
            cols[k].append(r[k])
    out = {}
    for f in S.FILEPAGES_SCHEMA:
        dt = f.type.to_pandas_dtype()
        out[f.name] = pa.array(np.concatenate(cols[f.name]).astype(dt, copy=False) if cols[f.name] else np.zeros(0, dt), type=f.type)
    return pa.table(out, schema=S.FILEPAGES_SCHEMA)
