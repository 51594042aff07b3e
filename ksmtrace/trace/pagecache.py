"""The ``file`` scope: a trace's page cache as the replay engine's pages (format version 2).

A page-cache page is ``(device, inode, index)``: one page of one file's ``address_space``, however
many processes map it.  This module turns a trace's page-cache view into a
:class:`~ksmtrace.trace.prepared.Prepared` whose "processes" are **files** (address spaces, in
(device, inode) order; ``proc_comm`` is the path) and whose pages are their resident pages in
index order, so every policy, the oracle included, runs on the page cache unchanged.

Where the pages come from, per snapshot:

* **mapped** file pages: present ``pages`` rows with ``F_FILE`` and without ``F_ANON`` (captured
  with ``--scope all``), placed in their file through the ``vma_files`` table (device, inode and
  byte offset of the VMA: ``index = pgoff / 4096 + vpn - start``);
* **unmapped** (and mapped) resident pages of the files under ``capture --files PATH``: the
  ``filepages`` table.

A page seen both ways is one page (its dirty, writeback and active bits OR'ed).

The rules (also in ``docs/policies-pagecache.md``):

* a page is a **candidate** while it is resident, clean (neither ``F_DIRTY`` nor ``F_WRITEBACK``)
  and readable; content ids as in ``prepare`` (0 = all zeros);
* a file is **written** at snapshot *s* when one of its pages changed content since *s-1*, one is
  dirty or under writeback at *s*, or its ``mtime_ns`` or ``size`` (``files`` table) changed — a
  ``write()`` that the snapshots cannot see page by page still moves mtime;
* a write **breaks the file's sharing**: every candidate page of a written file gets ``WRITE`` (a
  fresh private copy: the engine counts a COW break for each one that was merged), a page that
  turned dirty gets ``UNMERGE`` (still resident, no longer mergeable: a copy), and it comes back
  (``APPEAR``) once clean;
* every page-cache page is a frame of its own without dedup (the same file's page is one copy
  already, whoever maps it).

``extras`` carries what a page-cache policy needs beyond the events:

* ``pc_hot_off``/``pc_hot_pg``/``pc_hot_val``: per snapshot, the candidate pages whose class
  changed: bit 0 **mapped** (a target maps it), bit 1 **active** (kpageflags ACTIVE); a page of
  class 0 (clean, unmapped, inactive) is one the kernel reclaims first anyway;
* ``pc_written_off``/``pc_written``: per snapshot, the files written (file ids);
* ``pc_files``: ``(dev, inode)`` per file id.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from ksmtrace.trace import schema as S
from ksmtrace.trace.prepared import (EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE, Prepared, add_baselines, dense_ids,
                                     dense_pair_ids)

HOT_MAPPED = 1
HOT_ACTIVE = 2


def has_page_cache(trace) -> bool:
    """The trace records file pages placed in their files (``vma_files`` or ``filepages``)."""
    return trace.has_table("filepages") or trace.has_table("vma_files")


def _upsert(state: pl.DataFrame | None, rows: pl.DataFrame, key: list[str], keep) -> pl.DataFrame:
    """Apply one snapshot's delta rows to a state (GONE rows remove; others replace)."""
    live = rows.filter(pl.col("op") != S.OP_GONE)
    live = live.filter(keep(live)) if keep is not None else live
    live = live.drop("op", "snap")
    if state is None:
        return live
    return pl.concat([state.join(rows.select(key), on=key, how="anti"), live])


def _mapped_pages(trace, s: int, state: pl.DataFrame) -> pl.DataFrame:
    """The mapped file pages of snapshot ``s`` as (dev, inode, index, hash, flags, mapped=1)."""
    empty = pl.DataFrame(schema={"dev": pl.UInt64, "inode": pl.UInt64, "index": pl.Int64, "hash": pl.UInt64,
                                 "flags": pl.Int64, "mapped": pl.Int64})
    if state.height == 0:
        return empty
    vf = trace.read_table("vma_files", [s], ["proc", "start", "end", "dev", "inode", "pgoff"])
    if vf.height == 0:
        return empty
    vf = vf.sort("proc", "start")
    vproc = vf["proc"].to_numpy().astype(np.int64)
    vstart = vf["start"].to_numpy().astype(np.int64) >> 12
    vend = (vf["end"].to_numpy().astype(np.int64) + S.PAGE_SIZE - 1) >> 12
    vkey = (vproc << 40) | vstart
    proc = state["proc"].to_numpy().astype(np.int64)
    vpn = state["vpn"].to_numpy().astype(np.int64)
    j = np.searchsorted(vkey, (proc << 40) | vpn, side="right") - 1
    ok = j >= 0
    jj = np.maximum(j, 0)
    ok &= (vproc[jj] == proc) & (vpn < vend[jj])
    idx = (vf["pgoff"].to_numpy().astype(np.int64)[jj] >> 12) + vpn - vstart[jj]
    return pl.DataFrame({
        "dev": vf["dev"].to_numpy()[jj][ok], "inode": vf["inode"].to_numpy()[jj][ok], "index": idx[ok],
        "hash": state["hash"].to_numpy()[ok], "flags": state["flags"].to_numpy().astype(np.int64)[ok],
        "mapped": np.ones(int(ok.sum()), np.int64),
    }, schema=empty.schema)


def page_cache_states(trace) -> list[pl.DataFrame]:
    """Per snapshot, every resident page-cache page: ``dev, inode, index, hash, flags, mapped``
    (``mapped`` = 1 when a target maps it), one row per page."""
    is_file = lambda df: ((pl.col("flags") & (S.F_FILE | S.F_ANON | S.F_PRESENT | S.F_ZERO_PAGE | S.F_HUGETLB))
                          == (S.F_FILE | S.F_PRESENT))
    mapped_state: pl.DataFrame | None = None
    listed_state: pl.DataFrame | None = None
    has_vf = trace.has_table("vma_files")
    has_fp = trace.has_table("filepages")
    out = []
    for s in range(trace.n_snapshots):
        parts = []
        if has_vf:
            rows = trace.read_table("pages", [s], ["snap", "proc", "vpn", "op", "hash", "flags"])
            mapped_state = _upsert(mapped_state, rows, ["proc", "vpn"], is_file)
            parts.append(_mapped_pages(trace, s, mapped_state))
        if has_fp:
            rows = trace.read_table("filepages", [s], ["snap", "dev", "inode", "index", "op", "hash", "flags"])
            listed_state = _upsert(listed_state, rows, ["dev", "inode", "index"], None)
            parts.append(listed_state.with_columns(pl.col("index").cast(pl.Int64), pl.col("flags").cast(pl.Int64),
                                                   pl.lit(0, pl.Int64).alias("mapped")))
        if not parts:
            out.append(pl.DataFrame(schema={"dev": pl.UInt64, "inode": pl.UInt64, "index": pl.Int64, "hash": pl.UInt64,
                                            "flags": pl.Int64, "mapped": pl.Int64}))
            continue
        both = pl.concat(parts)
        # one row per page: the content of a mapped row (the process saw it), flags OR'ed
        bits = [S.F_DIRTY, S.F_WRITEBACK, S.F_ACTIVE]
        st = both.sort("mapped", descending=True).group_by(["dev", "inode", "index"], maintain_order=True).agg(
            pl.col("hash").first(), pl.col("flags").first(), pl.col("mapped").max(),
            *[(pl.col("flags") & b).max().alias(f"b{b}") for b in bits])
        st = st.with_columns(pl.fold(pl.col("flags"), lambda acc, x: acc | x, [pl.col(f"b{b}") for b in bits]).alias("flags")
                             ).drop([f"b{b}" for b in bits])
        out.append(st.sort("dev", "inode", "index"))
    return out


def _file_meta(trace) -> pl.DataFrame | None:
    if not trace.has_table("files"):
        return None
    return trace.read_table("files", columns=["snap", "dev", "inode", "path", "size", "mtime_ns"])


def _event_store(ev_off, pg, kind, cid, page_vpn):
    """The events in an in-memory store, one block per snapshot (no shared frames, no huge pages)."""
    from ksmtrace.trace.events import EventStore

    store = EventStore(sample=False, capacity=len(pg))
    none = np.full(len(pg), -1, np.int32)
    for a, b in zip(ev_off[:-1], ev_off[1:]):
        store.append({"pg": pg[a:b], "kind": kind[a:b], "cid": cid[a:b], "gid": none[a:b], "thp": none[a:b]})
    store.finish()
    store.put("page_vpn", page_vpn)
    return store


def prepare_file(trace, scope: str = "file"):
    """The ``file`` scope's :class:`~ksmtrace.trace.prepared.Prepared` (see the module docstring)."""

    n_snaps = trace.n_snapshots
    times = np.asarray(trace.times_ns, dtype=np.int64)
    states = page_cache_states(trace)
    meta = _file_meta(trace)
    keys = [st.select("dev", "inode") for st in states]
    if meta is not None:
        keys.append(meta.select("dev", "inode"))
    files = pl.concat(keys).unique().sort("dev", "inode") if keys else pl.DataFrame(schema={"dev": pl.UInt64, "inode": pl.UInt64})
    files = files.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("fid"))
    n_files = files.height
    paths = [""] * n_files
    if meta is not None and meta.height:
        last = meta.join(files, on=["dev", "inode"]).group_by("fid").agg(pl.col("path").last())
        for fid, p in zip(last["fid"].to_list(), last["path"].to_list()):
            paths[fid] = p
    # page ids: (file, index) in that order over every snapshot
    allp = pl.concat([st.join(files, on=["dev", "inode"]).select("fid", "index") for st in states]) if states else None
    if allp is not None and allp.height:
        fid_all = allp["fid"].to_numpy().astype(np.int64)
        idx_all = allp["index"].to_numpy().astype(np.int64)
        _, n_pages = dense_pair_ids(fid_all, idx_all)
        uniq = allp.unique().sort("fid", "index")
        page_proc = uniq["fid"].to_numpy().astype(np.int32)
        page_vpn = uniq["index"].to_numpy().astype(np.int64)
    else:
        n_pages = 0
        page_proc = np.zeros(0, np.int32)
        page_vpn = np.zeros(0, np.int64)
    n_pages = len(page_proc)
    pkey = page_proc.astype(np.int64) << 40 | page_vpn

    # content ids over every (snapshot, page) row
    rows_pg, rows_hash, rows_flags, rows_mapped, rows_snap = [], [], [], [], []
    for s, st in enumerate(states):
        j = st.join(files, on=["dev", "inode"])
        k = j["fid"].to_numpy().astype(np.int64) << 40 | j["index"].to_numpy().astype(np.int64)
        rows_pg.append(np.searchsorted(pkey, k))
        rows_hash.append(j["hash"].to_numpy().astype(np.uint64))
        rows_flags.append(j["flags"].to_numpy().astype(np.int64))
        rows_mapped.append(j["mapped"].to_numpy().astype(np.int64))
        rows_snap.append(np.full(j.height, s, np.int64))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    r_pg, r_hash, r_flags = cat(rows_pg, np.int64), cat(rows_hash, np.uint64), cat(rows_flags, np.int64)
    r_mapped, r_snap = cat(rows_mapped, np.int64), cat(rows_snap, np.int64)
    zero = (r_flags & S.F_ZERO_FILLED) != 0
    bad = (r_flags & S.F_READ_FAILED) != 0
    r_cid = np.full(len(r_pg), -1, np.int64)
    normal = ~zero & ~bad
    n_cids = 1
    if normal.any():
        inv, k = dense_ids(r_hash[normal].view(np.int64))
        r_cid[normal] = inv + 1
        n_cids = k + 1
    r_cid[zero & ~bad] = 0
    if bad.any():
        r_cid[bad] = n_cids + np.arange(int(bad.sum()))
        n_cids += int(bad.sum())
    clean = (r_flags & (S.F_DIRTY | S.F_WRITEBACK)) == 0
    r_off = np.searchsorted(r_snap, np.arange(n_snaps + 1))

    # files written per snapshot: metadata moved, a page changed content, or a page is dirty
    written_meta = [np.zeros(0, np.int64) for _ in range(n_snaps)]
    if meta is not None and meta.height:
        m = meta.join(files, on=["dev", "inode"]).sort("fid", "snap")
        moved = m.with_columns(
            ((pl.col("fid") == pl.col("fid").shift(1)) & (pl.col("snap") > pl.col("snap").shift(1))
             & ((pl.col("mtime_ns") != pl.col("mtime_ns").shift(1)) | (pl.col("size") != pl.col("size").shift(1)))).alias("w"))
        mv = moved.filter(pl.col("w"))
        for s_, fid in zip(mv["snap"].to_list(), mv["fid"].to_list()):
            written_meta[int(s_)] = np.append(written_meta[int(s_)], int(fid))

    cur_cid = np.full(n_pages, -1, np.int64)  # content at the previous snapshot (resident), -1 absent
    cur_cand = np.zeros(n_pages, bool)
    cur_hot = np.zeros(n_pages, np.int64)
    ev_off = [0]
    ev_pg, ev_kind, ev_cid = [], [], []
    hot_off = [0]
    hot_pg, hot_val = [], []
    w_off = [0]
    w_files = []
    for s in range(n_snaps):
        a, b = int(r_off[s]), int(r_off[s + 1])
        pg = r_pg[a:b]
        res = np.zeros(n_pages, bool)
        res[pg] = True
        cid_now = np.full(n_pages, -1, np.int64)
        cid_now[pg] = r_cid[a:b]
        cand = np.zeros(n_pages, bool)
        cand[pg] = clean[a:b] & ~bad[a:b]
        dirty_now = np.zeros(n_pages, bool)
        dirty_now[pg] = ~clean[a:b]
        hot = np.zeros(n_pages, np.int64)
        hot[pg] = (r_mapped[a:b] > 0) * HOT_MAPPED + ((r_flags[a:b] & S.F_ACTIVE) != 0) * HOT_ACTIVE
        changed = res & (cur_cid >= 0) & (cid_now != cur_cid)
        wfile = np.zeros(max(n_files, 1), bool)
        if s > 0:
            wfile[page_proc[changed | dirty_now]] = True
            wfile[written_meta[s]] = True
        written = wfile[page_proc] if n_pages else np.zeros(0, bool)
        kind = np.zeros(n_pages, np.uint8)
        kind[~cur_cand & cand] = EV_APPEAR
        gone = cur_cand & ~cand
        kind[gone] = EV_GONE
        kind[gone & res] = EV_UNMERGE  # still resident, no longer mergeable (dirty): the sharing breaks
        both = cur_cand & cand
        kind[both & ((cid_now != cur_cid) | written)] = EV_WRITE
        sel = np.flatnonzero(kind)
        ev_pg.append(sel)
        ev_kind.append(kind[sel])
        ev_cid.append(np.where((kind[sel] == EV_GONE) | (kind[sel] == EV_UNMERGE), -1, cid_now[sel]))
        ev_off.append(ev_off[-1] + len(sel))
        hsel = np.flatnonzero(cand & (hot != cur_hot))
        hot_pg.append(hsel)
        hot_val.append(hot[hsel])
        hot_off.append(hot_off[-1] + len(hsel))
        cur_hot = np.where(cand, hot, cur_hot)
        wf = np.flatnonzero(wfile[:n_files])
        w_files.append(wf)
        w_off.append(w_off[-1] + len(wf))
        cur_cid = cid_now
        cur_cand = cand

    ev_pg_a = cat(ev_pg, np.int32)
    first = np.full(n_files, n_snaps, np.int64)
    if len(r_pg):
        np.minimum.at(first, page_proc[r_pg], r_snap)
    first = np.where(first >= n_snaps, 0, first).astype(np.int32)
    prep = Prepared(
        scope=scope,
        trace_fingerprint=trace.fingerprint,
        times_ns=times,
        n_pages=n_pages,
        page_proc=page_proc,
        n_procs=n_files,
        proc_pid=np.zeros(n_files, np.int64),
        proc_id=np.arange(n_files, dtype=np.int64),  # file ids: the scope has no traced process
        proc_comm=paths,
        proc_domain=np.zeros(n_files, np.int32),
        proc_first_snap=first,
        proc_reg_snap=first.copy(),
        proc_exit_snap=np.full(n_files, n_snaps, np.int32),
        proc_order=np.arange(n_files, dtype=np.int32),
        proc_pg_lo=np.searchsorted(page_proc, np.arange(n_files), side="left").astype(np.int64),
        proc_pg_hi=np.searchsorted(page_proc, np.arange(n_files), side="right").astype(np.int64),
        n_cids=n_cids,
        n_gids=0,
        n_thp=0,
        off=np.asarray(ev_off, np.int64),
        store=_event_store(ev_off, ev_pg_a, cat(ev_kind, np.uint8), cat(ev_cid, np.int32), page_vpn),
        base_pages=np.zeros(n_snaps, np.int64),
        base_frames=np.zeros(n_snaps, np.int64),
        oracle_frames=np.zeros(n_snaps, np.int64),
        zero_filled=np.zeros(n_snaps, np.int64),
        zero_page_mapped=np.zeros(n_snaps, np.int64),
        hash_dup_pages=np.zeros(n_snaps, np.int64),
        extras={
            "pc_hot_off": np.asarray(hot_off, np.int64), "pc_hot_pg": cat(hot_pg, np.int32),
            "pc_hot_val": cat(hot_val, np.int8),
            "pc_written_off": np.asarray(w_off, np.int64), "pc_written": cat(w_files, np.int32),
            "pc_files": files.select("dev", "inode").to_numpy().astype(np.int64) if n_files else np.zeros((0, 2), np.int64),
        },
    )
    # candidate pages per snapshot
    kinds = prep.ev_kind.astype(np.int64)
    delta = np.where(kinds == EV_APPEAR, 1, 0) - np.where((kinds == EV_GONE) | (kinds == EV_UNMERGE), 1, 0)
    ev_snap = np.repeat(np.arange(n_snaps), np.diff(prep.off))
    prep.base_pages = np.cumsum(np.bincount(ev_snap, weights=delta, minlength=n_snaps)).astype(np.int64)
    add_baselines(prep)
    return prep
