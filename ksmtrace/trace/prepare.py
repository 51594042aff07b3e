"""Turn a trace into the dense arrays the replay engine runs on (once per trace and scope).

What this computes, and the rules it applies (also in ``docs/replay-semantics.md``):

* **page ids** (``pg``): every (process, virtual page) ever seen, numbered in (process, address)
  order, so one process's pages are one contiguous range in address order — the order in which
  ksmd walks an mm.
* **content ids** (``cid``): the keyed page hashes, dictionary-encoded; ``cid 0`` is the all-zero
  page (flagged at capture time).  A page whose content could not be read gets a content id of its
  own that equals nothing else.
* **frame ids** (``gid``): which pages share one physical frame *without any deduplication*: pages
  showing the same PFN with the same content are one frame (fork COW sharing).  Pages the real
  kernel had already merged (kpageflags KSM) are *not* grouped — the replay simulates merging
  itself — and without PFNs (unprivileged capture) every page is its own frame.
* **candidates** under the scope: ``recorded`` = present anonymous pages of mergeable VMAs (what
  ksmd scans); ``anon`` = every present private anonymous page.  Pages mapping the kernel's shared
  zero page, swapped pages and hugetlb pages are never candidates.
* **events** per snapshot and page, from the page's previous row: ``APPEAR`` (became a candidate),
  ``GONE`` (stopped being one: unmapped, exited, swapped, zero-page mapped), ``UNMERGE`` (still a
  present anonymous page but no longer mergeable: the kernel breaks KSM sharing, a COW copy),
  ``WRITE`` (still a candidate and written: its content changed, its soft-dirty bit is set, or it
  stopped being a real-kernel KSM page), ``THP`` (only its huge-page membership changed).
* **baselines** per snapshot: candidate pages, frames with no dedup, the oracle's frames (distinct
  non-zero contents: perfect dedup with zero pages mapped to the zero page), and the hash-only
  duplicate count that naive studies quote.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ksmtrace._version import __version__
from ksmtrace.errors import TraceError
from ksmtrace.trace import schema as S

SCOPES = ("recorded", "anon")

EV_APPEAR = 1
EV_GONE = 2
EV_UNMERGE = 3
EV_WRITE = 4
EV_THP = 5
EVENT_NAMES = {EV_APPEAR: "appear", EV_GONE: "gone", EV_UNMERGE: "unmerge", EV_WRITE: "write", EV_THP: "thp"}

_PREP_VERSION = 3


@dataclass
class Prepared:
    """Dense, engine-ready view of one trace under one scope."""

    scope: str
    trace_fingerprint: str
    times_ns: np.ndarray  # int64 [n_snaps], ns since the first snapshot
    n_pages: int
    page_proc: np.ndarray  # int32 [n_pages]
    page_vpn: np.ndarray  # int64 [n_pages]
    n_procs: int
    proc_pid: np.ndarray  # int64 [n_procs]
    proc_comm: list[str]
    proc_domain: np.ndarray  # int32 [n_procs] security domain id (uid+cgroup)
    proc_first_snap: np.ndarray  # int32: first snapshot the process is seen in
    proc_reg_snap: np.ndarray  # int32: first snapshot at which the mm is registered (-1 never)
    proc_exit_snap: np.ndarray  # int32: first snapshot at which it is gone (n_snaps: never)
    proc_order: np.ndarray  # int32: processes sorted by registration (ksm_mm_head order)
    proc_pg_lo: np.ndarray  # int64 [n_procs]
    proc_pg_hi: np.ndarray  # int64 [n_procs]
    n_cids: int
    n_gids: int
    n_thp: int
    off: np.ndarray  # int64 [n_snaps + 1]: events of snapshot s are [off[s], off[s+1])
    ev_pg: np.ndarray  # int32
    ev_kind: np.ndarray  # uint8 (EV_*)
    ev_cid: np.ndarray  # int32 (new content; -1 for GONE/UNMERGE)
    ev_gid: np.ndarray  # int64 (frame with no dedup; -1 for GONE/UNMERGE)
    ev_thp: np.ndarray  # int64 (huge page id, -1 if not in a THP)
    ev_sample: np.ndarray | None  # uint32 sampled hash (PKSM/UKSM style) when captured
    base_pages: np.ndarray  # int64 [n_snaps] candidate pages
    base_frames: np.ndarray  # int64 [n_snaps] frames they use with no dedup
    oracle_frames: np.ndarray  # int64 [n_snaps] frames with perfect dedup
    zero_filled: np.ndarray  # int64 [n_snaps] candidate pages that are all zero
    zero_page_mapped: np.ndarray  # int64 [n_snaps] pages in scope mapping the shared zero page
    hash_dup_pages: np.ndarray  # int64 [n_snaps] present pages minus distinct hashes (naive count)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_snaps(self) -> int:
        return len(self.times_ns)

    @property
    def oracle_saved(self) -> np.ndarray:
        return self.base_frames - self.oracle_frames

    def events(self, s: int) -> slice:
        return slice(int(self.off[s]), int(self.off[s + 1]))


# ---------------------------------------------------------------------------------------------
def _cache_path(trace, scope: str) -> Path | None:
    if os.environ.get("KSMTRACE_NO_CACHE"):
        return None
    base = os.environ.get("KSMTRACE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ksmtrace", "prepared"
    )
    key = hashlib.sha256(f"{trace.fingerprint}:{scope}:{_PREP_VERSION}:{__version__}".encode()).hexdigest()[:24]
    return Path(base) / f"{key}.pkl"


def prepare(trace, scope: str = "recorded", cache: bool = True) -> Prepared:
    if scope not in SCOPES:
        raise TraceError(f"unknown scope {scope!r} (scopes: {', '.join(SCOPES)})")
    path = _cache_path(trace, scope) if cache else None
    if path is not None and path.exists():
        try:
            with open(path, "rb") as fh:
                prep = pickle.load(fh)
            if isinstance(prep, Prepared) and prep.trace_fingerprint == trace.fingerprint:
                return prep
        except Exception:  # a stale or foreign cache file is simply rebuilt
            pass
    prep = _prepare(trace, scope)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp%d" % os.getpid())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(prep, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except OSError:
            pass
    return prep


def _prepare(trace, scope: str) -> Prepared:
    n_snaps = trace.n_snapshots
    times = np.asarray(trace.times_ns, dtype=np.int64)
    cols = ["snap", "proc", "pid", "vpn", "op", "hash", "flags", "pfn"]
    has_sample = trace.has_sample_hash
    if has_sample:
        cols.append("sample")
    rows = trace.read_table("pages", columns=cols).filter(pl.col("op") != S.OP_SAME)

    # --- processes -------------------------------------------------------------------------
    procs = _process_table(trace, rows)
    n_procs = procs.height
    proc_ids = procs["proc"].to_numpy().astype(np.int64)
    proc_index = {int(p): i for i, p in enumerate(proc_ids)}  # trace proc id -> dense index
    max_proc = int(proc_ids.max()) if n_procs else 0
    proc_map = np.full(max_proc + 1, -1, dtype=np.int64)
    proc_map[proc_ids] = np.arange(n_procs)

    # --- page ids ----------------------------------------------------------------------------
    keys = rows.select("proc", "vpn").unique().sort("proc", "vpn")
    n_pages = keys.height
    keys = keys.with_row_index("pg")
    rows = rows.join(keys, on=["proc", "vpn"], how="left")
    page_proc = proc_map[keys["proc"].to_numpy().astype(np.int64)].astype(np.int32)
    page_vpn = keys["vpn"].to_numpy().astype(np.int64)
    if (page_proc < 0).any():
        raise TraceError(f"{trace.path}: page rows name a process missing from the processes table")
    proc_pg_lo = np.searchsorted(page_proc, np.arange(n_procs), side="left").astype(np.int64)
    proc_pg_hi = np.searchsorted(page_proc, np.arange(n_procs), side="right").astype(np.int64)

    # --- per-row candidate state and content/frame ids --------------------------------------
    rows = rows.sort("pg", "snap")
    flags = rows["flags"].to_numpy().astype(np.int64)
    op = rows["op"].to_numpy()
    pg = rows["pg"].to_numpy().astype(np.int64)
    snap = rows["snap"].to_numpy().astype(np.int64)
    hashes = rows["hash"].to_numpy()
    pfn = rows["pfn"].to_numpy().astype(np.int64)
    n = len(pg)

    mapped = op != S.OP_GONE
    present = mapped & ((flags & S.F_PRESENT) != 0) & ((flags & S.F_SWAPPED) == 0)
    anon = (flags & S.F_ANON) != 0
    zp = (flags & S.F_ZERO_PAGE) != 0
    huge = (flags & S.F_HUGETLB) != 0
    in_scope = (flags & S.F_MERGEABLE) != 0 if scope == "recorded" else np.ones(n, dtype=bool)
    anon_present = present & anon & ~zp & ~huge
    cand = anon_present & in_scope
    zp_now = present & zp & in_scope

    # content ids: 0 = zero-filled; unreadable pages get a content of their own
    zero_filled = (flags & S.F_ZERO_FILLED) != 0
    unreadable = (flags & S.F_READ_FAILED) != 0
    cid = np.full(n, -1, dtype=np.int64)
    normal = cand & ~zero_filled & ~unreadable
    if normal.any():
        _, inv = np.unique(hashes[normal], return_inverse=True)
        cid[normal] = inv + 1
    n_cids = int(cid.max()) + 1 if n else 1
    n_cids = max(n_cids, 1)
    cid[cand & zero_filled & ~unreadable] = 0
    bad = cand & unreadable
    if bad.any():
        cid[bad] = n_cids + np.arange(int(bad.sum()))
        n_cids += int(bad.sum())

    # frame ids: (pfn, content) for real, non-KSM frames; otherwise one frame per row
    ksm_flag = (flags & S.F_KSM) != 0
    pfn_known = (flags & S.F_PFN) != 0
    groupable = cand & pfn_known & ~ksm_flag & (pfn != 0)
    gid = np.full(n, -1, dtype=np.int64)
    n_gids = 1  # gid 0 is reserved for the shared zero page
    if groupable.any():
        gkey = pl.DataFrame({"pfn": pfn[groupable], "cid": cid[groupable]})
        ginv = gkey.select(pl.struct("pfn", "cid").rank("dense").alias("g"))["g"].to_numpy().astype(np.int64)
        gid[groupable] = ginv  # ranks start at 1
        n_gids = int(ginv.max()) + 1
    single = cand & ~groupable
    if single.any():
        gid[single] = n_gids + np.arange(int(single.sum()))
        n_gids += int(single.sum())

    # THP membership: (process, PMD-aligned pfn)
    thp_flag = present & ((flags & S.F_THP) != 0) & pfn_known
    thp = np.full(n, -1, dtype=np.int64)
    n_thp = 0
    if thp_flag.any():
        tkey = pl.DataFrame({"p": rows["proc"].to_numpy()[thp_flag].astype(np.int64), "h": pfn[thp_flag] >> 9})
        tinv = tkey.select(pl.struct("p", "h").rank("dense").alias("t"))["t"].to_numpy().astype(np.int64) - 1
        thp[thp_flag] = tinv
        n_thp = int(tinv.max()) + 1

    # previous row of the same page (rows are sorted by page, then snapshot)
    same_pg = np.zeros(n, dtype=bool)
    same_pg[1:] = pg[1:] == pg[:-1]
    prev = np.arange(n) - 1
    cand_prev = np.zeros(n, dtype=bool)
    cand_prev[same_pg] = cand[prev[same_pg]]
    zp_prev = np.zeros(n, dtype=bool)
    zp_prev[same_pg] = zp_now[prev[same_pg]]
    cid_prev = np.full(n, -1, dtype=np.int64)
    cid_prev[same_pg] = cid[prev[same_pg]]
    ksm_prev = np.zeros(n, dtype=bool)
    ksm_prev[same_pg] = ksm_flag[prev[same_pg]]
    thp_prev = np.full(n, -1, dtype=np.int64)
    thp_prev[same_pg] = thp[prev[same_pg]]
    soft_dirty = (flags & S.F_SOFT_DIRTY) != 0 if trace.capture.get("soft_dirty") else np.zeros(n, bool)

    kind = np.zeros(n, dtype=np.uint8)
    kind[~cand_prev & cand] = EV_APPEAR
    gone = cand_prev & ~cand
    kind[gone] = EV_GONE
    kind[gone & anon_present] = EV_UNMERGE  # still a present anon page, no longer mergeable
    both = cand_prev & cand
    written = both & ((cid != cid_prev) | soft_dirty | (ksm_prev & ~ksm_flag))
    kind[written] = EV_WRITE
    kind[both & ~written & (thp != thp_prev)] = EV_THP

    # --- per-snapshot baselines (vectorised running counts) ----------------------------------
    base_pages = np.cumsum(np.bincount(snap, weights=cand.astype(np.int64) - cand_prev, minlength=n_snaps)).astype(np.int64)
    zpm = np.cumsum(np.bincount(snap, weights=zp_now.astype(np.int64) - zp_prev, minlength=n_snaps)).astype(np.int64)
    keep = kind != 0
    ev_order = np.lexsort((pg[keep], snap[keep]))
    sel = np.flatnonzero(keep)[ev_order]
    ev_snap = snap[sel]
    off = np.searchsorted(ev_snap, np.arange(n_snaps + 1)).astype(np.int64)

    prep = Prepared(
        scope=scope,
        trace_fingerprint=trace.fingerprint,
        times_ns=times,
        n_pages=n_pages,
        page_proc=page_proc,
        page_vpn=page_vpn,
        n_procs=n_procs,
        proc_pid=procs["pid"].to_numpy().astype(np.int64),
        proc_comm=procs["comm"].to_list(),
        proc_domain=procs["domain"].to_numpy().astype(np.int32),
        proc_first_snap=procs["first_snap"].fill_null(0).to_numpy().astype(np.int32),
        proc_reg_snap=np.zeros(n_procs, dtype=np.int32),
        proc_exit_snap=np.full(n_procs, n_snaps, dtype=np.int32),
        proc_order=np.arange(n_procs, dtype=np.int32),
        proc_pg_lo=proc_pg_lo,
        proc_pg_hi=proc_pg_hi,
        n_cids=n_cids,
        n_gids=n_gids,
        n_thp=n_thp,
        off=off,
        ev_pg=pg[sel].astype(np.int32),
        ev_kind=kind[sel],
        ev_cid=np.where(np.isin(kind[sel], (EV_GONE, EV_UNMERGE)), -1, cid[sel]).astype(np.int32),
        ev_gid=np.where(np.isin(kind[sel], (EV_GONE, EV_UNMERGE)), -1, gid[sel]).astype(np.int64),
        ev_thp=thp[sel],
        ev_sample=rows["sample"].to_numpy().astype(np.uint32)[sel] if has_sample else None,
        base_pages=base_pages,
        base_frames=np.zeros(n_snaps, dtype=np.int64),
        oracle_frames=np.zeros(n_snaps, dtype=np.int64),
        zero_filled=np.zeros(n_snaps, dtype=np.int64),
        zero_page_mapped=zpm,
        hash_dup_pages=np.zeros(n_snaps, dtype=np.int64),
    )
    _registration(prep, procs, rows, cand, snap, n_snaps, scope)
    _baselines(prep)
    return prep


def _process_table(trace, rows: pl.DataFrame) -> pl.DataFrame:
    """One row per process incarnation: pid, comm, domain, registration and exit snapshots."""
    if trace.has_table("processes"):
        p = trace.read_table("processes", columns=["snap", "proc", "pid", "start_ticks", "comm", "cgroup", "uid", "state", "mergeable"])
    else:
        p = None
    seen = rows.group_by("proc").agg(pl.col("pid").first(), pl.col("snap").min().alias("first_row"))
    if p is None or p.height == 0:
        out = seen.with_columns(
            pl.lit(0, dtype=pl.UInt64).alias("start_ticks"),
            pl.lit("").alias("comm"),
            pl.lit("").alias("cgroup"),
            pl.lit(0, dtype=pl.UInt32).alias("uid"),
            pl.col("first_row").alias("first_snap"),
            pl.col("first_row").alias("first_mergeable"),
            pl.lit(None, dtype=pl.Int64).alias("last_alive"),
        ).drop("first_row")
    else:
        alive = p.filter(pl.col("state") != "exited")
        agg = p.group_by("proc").agg(
            pl.col("pid").first(),
            pl.col("start_ticks").first(),
            pl.col("comm").first(),
            pl.col("cgroup").first(),
            pl.col("uid").first(),
            pl.col("snap").min().alias("first_snap"),
            pl.col("snap").filter(pl.col("mergeable")).min().alias("first_mergeable"),
        )
        last = alive.group_by("proc").agg(pl.col("snap").max().alias("last_alive"))
        out = agg.join(last, on="proc", how="left")
        missing = seen.join(out.select("proc"), on="proc", how="anti")
        if missing.height:
            raise TraceError(f"{trace.path}: page rows name process {missing['proc'][0]} missing from the processes table")
    out = out.sort("proc")
    dom = out.select(pl.struct("uid", "cgroup").rank("dense").alias("d"))["d"].to_numpy().astype(np.int32) - 1
    return out.with_columns(pl.Series("domain", dom))


def _registration(prep: Prepared, procs: pl.DataFrame, rows, cand, snap, n_snaps, scope) -> None:
    """When each mm joins ksmd's list, when it leaves, and the list order.

    ``recorded``: an mm registers at the first snapshot at which it has a mergeable VMA (or the
    first at which it has a candidate page); ``anon``: at its first snapshot.  Order: registration
    snapshot, then process start time, then pid (processes that register together were started in
    that order; the kernel appends each new mm behind the scan cursor, modelled in the policy).
    """
    n_procs = prep.n_procs
    first_cand = np.full(n_procs, n_snaps, dtype=np.int64)
    if cand.any():
        pidx = prep.page_proc[rows["pg"].to_numpy()[cand]]
        np.minimum.at(first_cand, pidx, snap[cand])
    first_snap = procs["first_snap"].fill_null(n_snaps).to_numpy().astype(np.int64)
    if scope == "recorded":
        fm = procs["first_mergeable"].fill_null(n_snaps).to_numpy().astype(np.int64)
        reg = np.minimum(fm, first_cand)
    else:
        reg = np.minimum(first_snap, first_cand)
    reg = np.where(reg >= n_snaps, -1, reg).astype(np.int32)
    last = procs["last_alive"].to_numpy()
    exit_snap = np.full(n_procs, n_snaps, dtype=np.int32)
    for i, v in enumerate(last):
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            exit_snap[i] = int(v) + 1
    starts = procs["start_ticks"].to_numpy().astype(np.int64)
    pids = procs["pid"].to_numpy().astype(np.int64)
    regkey = np.where(reg < 0, n_snaps + 1, reg)
    prep.proc_reg_snap = reg
    prep.proc_exit_snap = np.minimum(exit_snap, n_snaps).astype(np.int32)
    prep.proc_order = np.lexsort((np.arange(n_procs), pids, starts, regkey)).astype(np.int32)


def _baselines(prep: Prepared) -> None:
    """Frames with no dedup, frames with perfect dedup, zero-filled and hash-duplicate pages."""
    cur_cid = np.full(prep.n_pages, -1, dtype=np.int64)
    cur_gid = np.full(prep.n_pages, -1, dtype=np.int64)
    cnt_cid = np.zeros(prep.n_cids, dtype=np.int64)
    cnt_gid = np.zeros(prep.n_gids, dtype=np.int64)
    distinct_cid = 0
    distinct_gid = 0
    for s in range(prep.n_snaps):
        sl = prep.events(s)
        pgs = prep.ev_pg[sl].astype(np.int64)
        kinds = prep.ev_kind[sl]
        rem = (kinds == EV_GONE) | (kinds == EV_UNMERGE) | (kinds == EV_WRITE)
        add = (kinds == EV_APPEAR) | (kinds == EV_WRITE)
        if rem.any():
            old_c = cur_cid[pgs[rem]]
            old_g = cur_gid[pgs[rem]]
            distinct_cid -= _dec(cnt_cid, old_c)
            distinct_gid -= _dec(cnt_gid, old_g)
            cur_cid[pgs[rem]] = -1
            cur_gid[pgs[rem]] = -1
        if add.any():
            new_c = prep.ev_cid[sl][add].astype(np.int64)
            new_g = prep.ev_gid[sl][add]
            distinct_cid += _inc(cnt_cid, new_c)
            distinct_gid += _inc(cnt_gid, new_g)
            cur_cid[pgs[add]] = new_c
            cur_gid[pgs[add]] = new_g
        zero = int(cnt_cid[0])
        prep.base_frames[s] = distinct_gid
        prep.oracle_frames[s] = distinct_cid - (1 if zero else 0)
        prep.zero_filled[s] = zero
        # naive: every present page in scope (zero-page mapped ones read as zeros) minus distinct hashes
        zpm = int(prep.zero_page_mapped[s])
        distinct_naive = distinct_cid + (1 if (zpm and not zero) else 0)
        prep.hash_dup_pages[s] = int(prep.base_pages[s]) + zpm - distinct_naive


def _dec(cnt: np.ndarray, ids: np.ndarray) -> int:
    """Decrement counts; return how many ids dropped to zero."""
    u, m = np.unique(ids, return_counts=True)
    before = cnt[u]
    cnt[u] = before - m
    return int(((before > 0) & (cnt[u] == 0)).sum())


def _inc(cnt: np.ndarray, ids: np.ndarray) -> int:
    u, m = np.unique(ids, return_counts=True)
    before = cnt[u]
    cnt[u] = before + m
    return int(((before == 0) & (cnt[u] > 0)).sum())
