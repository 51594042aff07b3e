"""Coarser traces from a fine one: keep every k-th snapshot and re-encode the page deltas.

>>> subsample_trace("fine.trace", "coarse.trace", every=4)

The result is a valid trace (written by :class:`~ksmtrace.trace.writer.TraceWriter`, delta encoded
against the previous *kept* snapshot), as if it had been captured at ``every`` times the interval:

* page rows: the state at each kept snapshot, diffed against the previous kept one (NEW, CHANGED,
  GONE; flags compared without the soft-dirty bit).  With soft-dirty, a page written in any of the
  merged intervals is CHANGED and carries the bit — exactly what a capture at the coarser interval
  would have recorded; without it, a page rewritten and restored between two kept snapshots is
  invisible, which is the point of the interval study;
* processes, VMAs and ``ksm_stat``: the rows of the kept snapshots;
* ground truth (``ksm``): every sample is kept and belongs to the next kept snapshot (samples after
  the last kept snapshot are dropped, as a capture ending there would have no later ones);
* contents (if stored): carried to the next kept snapshot;
* the manifest: the source's, with ``capture.interval_s`` multiplied and ``capture.subsampled`` =
  ``{"from", "every"}`` (and the ``validate`` record, so fidelity still knows KSM's start).
"""
from __future__ import annotations

import os

import polars as pl
import pyarrow as pa

from ksmtrace.errors import TraceError
from ksmtrace.trace import schema as S
from ksmtrace.trace.writer import TraceWriter

KEY = ["proc", "vpn"]


def subsample_trace(src, dst: str | os.PathLike, every: int):
    """Write ``dst``, keeping snapshots 0, ``every``, 2·``every``, ... of ``src``; return it opened."""
    from ksmtrace.trace.reader import Trace, open_trace

    tr = src if isinstance(src, Trace) else open_trace(src)
    every = int(every)
    if every < 1:
        raise TraceError(f"subsample: every must be >= 1 (got {every})")
    n = tr.n_snapshots
    keep = list(range(0, n, every))
    cols = tr.pages_columns
    extra = [c for c in cols if c not in S.PAGES_SCHEMA.names]
    pschema = S.pages_schema_for(cols)
    soft_dirty = bool(tr.capture.get("soft_dirty"))
    sd = S.F_SOFT_DIRTY
    capture = dict(tr.capture)
    if capture.get("interval_s"):
        capture["interval_s"] = float(capture["interval_s"]) * every
    capture["subsampled"] = {"from": str(tr.path), "from_fingerprint": tr.fingerprint, "every": every,
                             "source_interval_s": tr.capture.get("interval_s")}
    capture["keyframe_every"] = 0
    w = TraceWriter(dst, host=tr.host, capture=capture, tracer=dict(tr.manifest.get("tracer", {})),
                    command_line=list(tr.manifest.get("command_line", [])), pages_schema=pschema)
    state_cols = ["proc", "pid", "vpn", "hash", "flags", "pfn"] + extra
    state: pl.DataFrame | None = None
    prev_kept: pl.DataFrame | None = None
    dirty: list[pl.DataFrame] = []
    pending: dict[str, list[pl.DataFrame]] = {"ksm": [], "contents": []}
    committed = []
    j = 0
    for s in range(n):
        rows = tr.read_table("pages", [s], state_cols + ["op"])
        rows = rows.select([pl.col(c) for c in state_cols + ["op"]])
        if state is None or tr.snapshots[s].get("keyframe"):
            state = rows.filter(pl.col("op") != S.OP_GONE).drop("op")
        else:
            state = pl.concat([state.join(rows.select(KEY), on=KEY, how="anti"),
                               rows.filter(pl.col("op") != S.OP_GONE).drop("op")])
        if soft_dirty:
            dirty.append(rows.filter((pl.col("flags") & sd) != 0).select(KEY))
        for t in ("ksm", "contents"):
            if tr.has_table(t):
                part = tr.read_table(t, [s])
                if part.height:
                    pending[t].append(part)
        if s not in keep:
            continue
        cur = state
        dset = pl.concat(dirty).unique() if (soft_dirty and dirty) else None
        page_rows = _delta_rows(prev_kept, cur, j, dset, extra)
        tables = {"pages": page_rows.to_arrow().select(pschema.names).cast(pschema) if page_rows.height
                  else pschema.empty_table()}
        for t in ("processes", "vmas", "ksm_stat"):
            if tr.has_table(t):
                part = tr.read_table(t, [s])
                if part.height or t != "ksm_stat":
                    tables[t] = _renumber(part, j, S.SCHEMAS[t])
        for t in ("ksm", "contents"):
            if pending[t]:
                tables[t] = _renumber(pl.concat(pending[t], how="vertical_relaxed"), j, S.SCHEMAS[t])
                pending[t] = []
            elif t == "ksm" and tr.has_table("ksm"):
                tables[t] = S.KSM_SCHEMA.empty_table()
        e = tr.snapshots[s]
        entry = w.commit_snapshot(j, int(e["t_ns"]), int(e.get("t_end_ns", e["t_ns"])), tables, keyframe=(j == 0),
                                  stats={"source_snap": s, "pages": cur.height})
        committed.append({"snap": j, "t_ns": entry["t_ns"], "t_end_ns": entry["t_end_ns"], "keyframe": entry["keyframe"]})
        # the kept state, with soft-dirty bits cleared (a kept snapshot starts a new interval)
        prev_kept = cur.with_columns((pl.col("flags") & ~sd).alias("flags")) if soft_dirty else cur
        dirty = []
        j += 1
    extra_fields = {"snapshots": committed, "subsampled_from": str(tr.path)}
    if "validate" in tr.manifest:
        extra_fields["validate"] = tr.manifest["validate"]
    if "coverage" in tr.manifest:
        extra_fields["coverage"] = tr.manifest["coverage"]
    w.close(f"subsampled every {every} snapshots from {tr.name}", **extra_fields)
    return open_trace(dst)


def _renumber(df: pl.DataFrame, snap: int, schema: pa.Schema) -> pa.Table:
    df = df.with_columns(pl.lit(snap, dtype=pl.UInt32).alias("snap"))
    t = df.to_arrow()
    return t.select(schema.names).cast(schema)


def _delta_rows(prev: pl.DataFrame | None, cur: pl.DataFrame, snap: int, dirty: pl.DataFrame | None,
                extra: list[str]) -> pl.DataFrame:
    """Page rows of one kept snapshot: NEW, CHANGED and GONE against the previous kept state."""
    sd = S.F_SOFT_DIRTY
    out_cols = ["snap", "proc", "pid", "vpn", "op", "hash", "flags", "pfn"] + extra
    cur = cur.with_columns(pl.lit(False).alias("_dirty"))
    if dirty is not None and dirty.height:
        cur = cur.drop("_dirty").join(dirty.with_columns(pl.lit(True).alias("_dirty")), on=KEY, how="left").with_columns(
            pl.col("_dirty").fill_null(False))
        cur = cur.with_columns(pl.when(pl.col("_dirty")).then(pl.col("flags") | sd).otherwise(pl.col("flags") & ~sd).alias("flags"))
    if prev is None or prev.height == 0:
        out = cur.with_columns(pl.lit(S.OP_NEW, dtype=pl.UInt8).alias("op"))
    else:
        p = prev.select(KEY + ["hash", "flags", "pfn"]).rename({"hash": "_h", "flags": "_f", "pfn": "_p"})
        j = cur.join(p, on=KEY, how="left")
        is_new = pl.col("_h").is_null()
        changed = (pl.col("hash") != pl.col("_h")) | (((pl.col("flags") ^ pl.col("_f")) & ~sd) != 0) | (pl.col("pfn") != pl.col("_p")) | pl.col("_dirty")
        j = j.with_columns(pl.when(is_new).then(pl.lit(S.OP_NEW)).when(changed).then(pl.lit(S.OP_CHANGED))
                           .otherwise(pl.lit(S.OP_SAME)).cast(pl.UInt8).alias("op"))
        out = j.filter(pl.col("op") != S.OP_SAME).drop(["_h", "_f", "_p"])
        gone = prev.join(cur.select(KEY), on=KEY, how="anti")
        if gone.height:
            zeros = [pl.lit(0, dtype=pl.UInt64).alias("hash"), pl.lit(0, dtype=pl.UInt32).alias("flags"),
                     pl.lit(0, dtype=pl.UInt64).alias("pfn")] + [pl.lit(0, dtype=pl.UInt32).alias(c) for c in extra]
            g = gone.select(["proc", "pid", "vpn"]).with_columns(zeros).with_columns(
                pl.lit(S.OP_GONE, dtype=pl.UInt8).alias("op"), pl.lit(False).alias("_dirty"))
            out = pl.concat([out.select(g.columns), g])
    out = out.with_columns(pl.lit(snap, dtype=pl.UInt32).alias("snap"))
    return out.select(out_cols).sort(KEY)
