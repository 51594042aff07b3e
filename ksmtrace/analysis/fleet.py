"""A fleet: several hosts' traces captured with one hash key — how much more would dedup save across
hosts than within each, which hosts (and which VMs or processes) share most, and where to place them.

>>> from ksmtrace.analysis.fleet import fleet
>>> res = fleet(["web01.trace", "web02.trace", "web03.trace"], capacity=2, workers=2)
>>> res.steps.select("step", "intra_host_saved", "cross_host_saved")     # one row per aligned snapshot
>>> res.host_matrix_mean                                                 # frames two hosts share
>>> res.placement                                                        # current vs greedy vs bound

Everything is counted on **physical frames**, with each host's own semantics exactly as the
``oracle`` policy and :mod:`ksmtrace.analysis.breakdown` count them (the host trace is prepared by
:meth:`~ksmtrace.trace.reader.Trace.prepare`): pages that share a frame by fork count once; pages
mapping the kernel's zero page use no frame; an all-zero page's frame is freed within its host (the
zero page is per kernel, so zero pages add nothing across hosts); a page whose content could not be
read equals nothing.  For the candidate pages of every host at one aligned snapshot:

``intra_host_saved``
    the sum over hosts of each host's own ``oracle_saved`` (what perfect dedup inside each host
    frees): zero frames plus, per non-zero content, the host's frames holding it minus one.
``cross_host_saved``
    what merging *across* hosts frees on top: per non-zero content held by frames on ``k`` hosts,
    ``k − 1`` (after deduplicating within each host, each of them still holds one frame of it).
    A cross-host duplicate is a content held by frames on two hosts.
``fleet_saved``
    ``intra_host_saved + cross_host_saved``: the oracle of one imaginary machine holding the fleet.

Hosts are aligned by **snapshot index**: aligned snapshot ``i`` is snapshot ``i`` of every trace
(captures started together with one ``--interval``, as a fleet-wide capture is); the fleet has as
many aligned snapshots as its shortest trace.  Per-host times and the wall-clock skew between
hosts at each aligned snapshot are reported, so a misaligned fleet is visible.

The **sharing matrix** between hosts ``a ≠ b`` is the number of distinct non-zero contents held by
frames on both (what putting both on one machine would free beyond what each frees alone); its
diagonal is each host's ``intra_host_saved``.  The same matrix between units (processes: a VM is
its QEMU process) covers the ``top_units`` largest ones, across and within hosts; its diagonal is
what merging inside the unit alone frees.

The **colocation what-if** places the fleet's units (processes with candidate pages at snapshot
``place_at``) on ``n_hosts`` hosts of ``capacity`` units each, greedily: each host is seeded with
the largest unplaced unit and filled with the unit that shares most with what is already there
(estimated with mergeable HyperLogLog sketches of the units' contents, as Memory Buddies' content
fingerprints do).  Every placement — current, greedy — is then counted exactly: its saving is, per
host, the sum of its units' distinct non-zero contents minus the distinct contents of their union
(frames freed by merging across the units of a host; zero pages and duplicates inside a unit are
freed wherever it runs, and are reported apart).  The bound is the fleet oracle's: every unit on
one host.

**Out of core.**  Each host is one task (:mod:`ksmtrace.executor`): it prepares its trace, walks
its snapshots and writes the distinct (aligned snapshot, content, unit) triples of its non-zero
candidate pages into ``partitions`` Parquet files split by the content hash's top bits.  Each
partition is then one task that reads only its own files from every host and counts — contents
never cross partitions, so every count is a sum over partitions.  No task holds more than one
host's trace or one partition of the fleet; the parent holds only counts and sketches.
``sketch=True`` skips the partitions and answers from per-host HyperLogLog sketches merged across
hosts (for fleets too large to count exactly; each union count's standard error is
``1.04/sqrt(2**precision)``, measured against exact counts by ``bench/fleet.py``).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make

STEP_COLUMNS = (
    "step", "t_s", "candidate_pages", "base_frames", "intra_host_saved", "cross_host_saved", "fleet_saved",
    "zero_saved", "distinct_contents", "fleet_distinct_contents", "wall_skew_s",
)
DEFINITIONS = {
    "candidate_pages": "candidate pages over all hosts (the scope's pages a dedup could consider)",
    "base_frames": "physical frames they use with no dedup, summed over hosts (fork-shared frames once)",
    "intra_host_saved": "sum of each host's oracle_saved: frames perfect dedup inside each host frees",
    "cross_host_saved": "frames merging across hosts frees on top: per non-zero content on k hosts, k - 1",
    "fleet_saved": "intra_host_saved + cross_host_saved: the oracle of one machine holding the whole fleet",
    "zero_saved": "all-zero frames (freed within each host; the zero page is per kernel, nothing across hosts)",
    "distinct_contents": "distinct non-zero contents summed over hosts",
    "fleet_distinct_contents": "distinct non-zero contents in the whole fleet",
    "wall_skew_s": "largest wall-clock difference between the hosts' snapshots aligned here (s)",
    "host_matrix": "a != b: distinct non-zero contents held by frames on both hosts; diagonal: the host's intra_host_saved",
    "unit_matrix": "u != v: distinct non-zero contents both units hold; diagonal: what merging inside the unit frees",
    "placement": "saving = per host, its units' distinct non-zero contents minus those of their union (frames)",
}
DEFAULT_PARTITIONS = 16
DEFAULT_PRECISION = 14
_KIND_NONE, _KIND_ZERO, _KIND_HASH, _KIND_UNIQUE = 0, 1, 2, 3


class FleetError(KsmtraceError):
    """A fleet cannot be analysed: traces that cannot be compared, bad options."""

    exit_code = 2


# --- the traces -----------------------------------------------------------------------------------
@dataclass
class FleetHost:
    index: int
    path: str
    name: str
    fingerprint: str
    hostname: str
    n_snapshots: int
    key_fingerprint: str


def check_fleet(paths: Sequence[str | os.PathLike]) -> list[FleetHost]:
    """Open every trace and check that they form a fleet: at least two, no trace twice, every one
    captured with a keyed hash whose key fingerprint (and algorithm) is the same for all."""
    from ksmtrace.trace.reader import open_trace

    if len(paths) < 2:
        raise FleetError("a fleet needs at least two traces (one per host)")
    hosts: list[FleetHost] = []
    for i, p in enumerate(paths):
        tr = open_trace(p)
        h = tr.capture.get("hash") if isinstance(tr.capture.get("hash"), dict) else {}
        key = h.get("key_fingerprint")
        if not key:
            raise FleetError(f"{tr.path}: the trace records no hash key fingerprint, so its hashes cannot be "
                             "compared with other hosts' (capture every host with one --hash-key)")
        hosts.append(FleetHost(i, str(tr.path), tr.name, tr.fingerprint, str(tr.host.get("hostname") or ""),
                               tr.n_snapshots, f"{h.get('algorithm', '?')}/{key}"))
    first = hosts[0]
    for h in hosts[1:]:
        if h.key_fingerprint != first.key_fingerprint:
            raise FleetError(f"{h.path} was captured with hash key {h.key_fingerprint}, {first.path} with "
                             f"{first.key_fingerprint}: their hashes cannot be compared (capture every host with one --hash-key)")
    seen: dict[str, str] = {}
    for h in hosts:
        if h.fingerprint in seen:
            raise FleetError(f"{h.path} is the same trace as {seen[h.fingerprint]}: give each host once")
        seen[h.fingerprint] = h.path
    return hosts


def resolve_steps(n: int, snaps: Sequence[int] | None) -> list[int]:
    """The aligned snapshots to count (negative = from the end), sorted and unique."""
    if snaps is None:
        return list(range(n))
    out = set()
    for s in snaps:
        k = int(s) + n if int(s) < 0 else int(s)
        if not 0 <= k < n:
            raise FleetError(f"aligned snapshot {s} out of range (the fleet has {n}: its shortest trace's)")
        out.add(k)
    return sorted(out)


# --- HyperLogLog registers (datasketch's HyperLogLog++ on our keys) -------------------------------------
def _identity(x):
    return int(x)


def hll_registers(keys: np.ndarray, p: int) -> np.ndarray:
    """The registers datasketch's ``HyperLogLogPlusPlus(p, hashfunc=identity)`` holds after
    ``update(k)`` of every key — filled with numpy in one pass.  The keys are already keyed 64-bit
    hashes of page contents, uniform over 64 bits, so they need no further hashing."""
    m = 1 << p
    reg = np.zeros(m, dtype=np.int8)
    if len(keys) == 0:
        return reg
    k = np.asarray(keys, dtype=np.uint64)
    idx = (k & np.uint64(m - 1)).astype(np.int64)
    w = k >> np.uint64(p)
    # bit length of w (0 for w == 0), exactly: via float64 frexp of the high and low 32 bits
    hi = (w >> np.uint64(32)).astype(np.float64)
    lo = (w & np.uint64(0xFFFFFFFF)).astype(np.float64)
    bl_hi = np.frexp(hi)[1]
    bl_lo = np.frexp(lo)[1]
    bl = np.where(hi > 0, bl_hi + 32, bl_lo)
    rank = ((64 - p) - bl + 1).astype(np.int8)
    np.maximum.at(reg, idx, rank)
    return reg


def hll(reg: np.ndarray):
    """A datasketch HyperLogLog++ sketch holding ``reg`` (merge with ``.merge``, estimate with ``.count``)."""
    try:
        from datasketch import HyperLogLogPlusPlus
    except ImportError:
        raise FleetError("sketches need datasketch: pip install 'ksmtrace[sketch]'") from None
    return HyperLogLogPlusPlus(reg=np.array(reg, dtype=np.int8), hashfunc=_identity)


def hll_count(*regs: np.ndarray) -> float:
    """Estimated distinct keys of the union of the sketches with these registers."""
    if not regs:
        return 0.0
    merged = np.maximum.reduce([np.asarray(r, dtype=np.int8) for r in regs]) if len(regs) > 1 else regs[0]
    if not np.any(merged):
        return 0.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "close to the correction threshold": the estimator copes
        return float(hll(merged).count())


# --- per-host task -----------------------------------------------------------------------------------
def _event_keys(trace, prep) -> tuple[np.ndarray, np.ndarray]:
    """For every event of the prepared trace: its content's kind (none, zero, hash, unique) and
    its 64-bit keyed hash (for kind hash).  The hash comes from the page row the event was made of
    (the same snapshot, pid and virtual page)."""
    from ksmtrace.trace import schema as S
    from ksmtrace.trace.prepared import EV_APPEAR, EV_WRITE

    n_ev = len(prep.ev_kind)
    kind = np.zeros(n_ev, dtype=np.int8)
    key = np.zeros(n_ev, dtype=np.uint64)
    arrive = np.flatnonzero((prep.ev_kind == EV_APPEAR) | (prep.ev_kind == EV_WRITE))
    if arrive.size == 0:
        return kind, key
    cid = prep.ev_cid[arrive].astype(np.int64)
    snap = np.searchsorted(prep.off, arrive, side="right") - 1
    pg = prep.ev_pg[arrive].astype(np.int64)
    ev = pl.DataFrame({
        "i": np.arange(arrive.size, dtype=np.int64), "snap": snap.astype(np.int64),
        "pid": prep.proc_pid[prep.page_proc[pg]].astype(np.int64), "vpn": prep.page_vpn[pg].astype(np.int64),
    })
    rows = trace.read_table("pages", columns=["snap", "pid", "vpn", "op", "hash", "flags"])
    rows = rows.filter((pl.col("op") != S.OP_GONE) & (pl.col("op") != S.OP_SAME)).select(
        pl.col("snap").cast(pl.Int64), pl.col("pid").cast(pl.Int64), pl.col("vpn").cast(pl.Int64), "hash", "flags")
    j = ev.join(rows, on=["snap", "pid", "vpn"], how="left").sort("i")
    if j.height != arrive.size or j["hash"].null_count():
        raise FleetError(f"{trace.path}: {j['hash'].null_count()} prepared pages have no page row at their snapshot "
                         "(an inconsistent trace)")
    h = j["hash"].to_numpy().astype(np.uint64)
    unreadable = (j["flags"].to_numpy().astype(np.int64) & S.F_READ_FAILED) != 0
    k = np.where(cid == 0, _KIND_ZERO, np.where(unreadable, _KIND_UNIQUE, _KIND_HASH)).astype(np.int8)
    # within a host, equal content ids are equal hashes: check it (a drift here would be a wrong number)
    hk = k == _KIND_HASH
    if hk.any():
        pairs = pl.DataFrame({"c": cid[hk], "h": h[hk]}).unique()
        if pairs["c"].n_unique() != pairs.height or pairs["h"].n_unique() != pairs.height:
            raise FleetError(f"{trace.path}: content ids and hashes disagree (the prepared cache does not match the trace)")
    kind[arrive] = k
    key[arrive] = h
    return kind, key


def _n_distinct(a: np.ndarray) -> int:
    return int(np.unique(a).size) if a.size else 0


def host_task(task: dict[str, Any]) -> dict[str, Any]:
    """One host (run by an executor): prepare its trace, walk its snapshots, and at every aligned
    snapshot wanted count its frames and write its (step, content, unit) triples, partitioned."""
    from ksmtrace.trace.prepared import EV_APPEAR, EV_GONE, EV_UNMERGE, EV_WRITE
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(task["trace"])
    prep = tr.prepare(task["scope"])
    steps: list[int] = task["steps"]
    place_at = task.get("place_at")
    p_bits = int(task["partition_bits"])
    precision = int(task["precision"])
    work = task.get("work")
    host = int(task["host"])
    ev_kind_c, ev_key = _event_keys(tr, prep)
    cur_kind = np.zeros(prep.n_pages, dtype=np.int8)
    cur_key = np.zeros(prep.n_pages, dtype=np.uint64)
    cur_gid = np.full(prep.n_pages, -1, dtype=np.int64)
    page_proc = prep.page_proc.astype(np.int64)
    wanted = set(steps)
    step_rows: list[dict[str, Any]] = []
    units: dict[int, dict[str, Any]] = {}
    sketches: dict[int, np.ndarray] = {}
    unit_sketches: dict[int, np.ndarray] = {}
    parts: list[pl.DataFrame] = []
    for s in range(max(steps) + 1):
        sl = prep.events(s)
        pgs = prep.ev_pg[sl].astype(np.int64)
        kinds = prep.ev_kind[sl]
        rem = (kinds == EV_GONE) | (kinds == EV_UNMERGE)
        add = (kinds == EV_APPEAR) | (kinds == EV_WRITE)
        cur_kind[pgs[rem]] = _KIND_NONE
        cur_gid[pgs[rem]] = -1
        cur_kind[pgs[add]] = ev_kind_c[sl][add]
        cur_key[pgs[add]] = ev_key[sl][add]
        cur_gid[pgs[add]] = prep.event_frames(sl)[add]
        if s not in wanted:
            continue
        active = np.flatnonzero(cur_kind != _KIND_NONE)
        kind, key, gid, proc = cur_kind[active], cur_key[active], cur_gid[active], page_proc[active]
        zero = kind == _KIND_ZERO
        hashed = kind == _KIND_HASH
        nz = ~zero
        frames = _n_distinct(gid)
        zero_saved = _n_distinct(gid[zero])
        frames_nz = _n_distinct(gid[nz])
        distinct_hash = _n_distinct(key[hashed])
        n_unique = _n_distinct(gid[kind == _KIND_UNIQUE])  # each unreadable page is a content of its own
        t = {"step": s, "t_s": float(prep.times_ns[s]) / 1e9, "wall": _wall(tr, s), "candidate_pages": int(active.size),
             "base_frames": frames, "zero_saved": zero_saved,
             "intra_host_saved": zero_saved + frames_nz - distinct_hash - n_unique, "distinct_contents": distinct_hash}
        step_rows.append(t)
        # distinct (content, unit) pairs of hashed pages, and per-unit frame counts
        pk = pl.DataFrame({"key": key[hashed], "unit": proc[hashed].astype(np.uint32)}).unique()
        per_unit = _unit_counts(proc, gid, kind, key)
        for u, c in per_unit.items():
            info = units.setdefault(u, {"unit": u, "pid": int(prep.proc_pid[u]), "comm": str(prep.proc_comm[u]),
                                        "steps": {}})
            info["steps"][s] = c
        if precision:
            sketches[s] = hll_registers(pk["key"].unique().to_numpy(), precision)
            if s == place_at:
                for u, g in pk.group_by("unit"):
                    unit_sketches[int(u[0])] = hll_registers(g["key"].to_numpy(), precision)
        if work is not None and pk.height:
            parts.append(pk.with_columns(pl.lit(s, dtype=pl.UInt32).alias("step")))
    files = 0
    if work is not None:
        allp = pl.concat(parts) if parts else pl.DataFrame(schema={"key": pl.UInt64, "unit": pl.UInt32, "step": pl.UInt32})
        keys = allp["key"].to_numpy()
        part = (keys >> np.uint64(64 - p_bits)) if p_bits else np.zeros(keys.size, np.uint64)
        allp = allp.with_columns(pl.Series("part", part.astype(np.uint32)))
        for (part,), g in allp.group_by("part"):
            d = Path(work) / f"part-{int(part):05d}"
            d.mkdir(parents=True, exist_ok=True)
            g.select("step", "key", "unit").sort("step", "key", "unit").write_parquet(d / f"host-{host:05d}.parquet")
            files += 1
    return {"host": host, "steps": step_rows, "units": list(units.values()), "sketches": sketches,
            "unit_sketches": unit_sketches, "files": files, "n_procs": prep.n_procs}


def _wall(tr, s: int) -> float | None:
    w = tr.snapshots[s].get("wall")
    return float(w) if isinstance(w, (int, float)) else None


def _unit_counts(proc, gid, kind, key) -> dict[int, dict[str, int]]:
    """Per unit (process): candidate pages, frames, zero frames, non-zero frames, distinct non-zero
    contents (hashed), and the frames merging inside the unit alone frees."""
    out: dict[int, dict[str, int]] = {}
    if proc.size == 0:
        return out
    df = pl.DataFrame({"u": proc, "g": gid, "k": kind, "h": key})
    agg = df.group_by("u").agg(
        pl.len().alias("pages"),
        pl.col("g").n_unique().alias("frames"),
        pl.col("g").filter(pl.col("k") == _KIND_ZERO).n_unique().alias("zero"),
        pl.col("g").filter(pl.col("k") != _KIND_ZERO).n_unique().alias("frames_nz"),
        pl.col("h").filter(pl.col("k") == _KIND_HASH).n_unique().alias("contents"),
        pl.col("g").filter(pl.col("k") == _KIND_UNIQUE).n_unique().alias("unique"),
    )
    for r in agg.iter_rows(named=True):
        out[int(r["u"])] = {"pages": r["pages"], "frames": r["frames"], "zero_saved": r["zero"],
                            "contents": r["contents"],
                            "self_saved": r["zero"] + r["frames_nz"] - r["contents"] - r["unique"]}
    return out


# --- per-partition tasks ------------------------------------------------------------------------------
def _read_partition(work: str, part: int) -> pl.DataFrame:
    d = Path(work) / f"part-{part:05d}"
    files = sorted(d.glob("host-*.parquet")) if d.is_dir() else []
    frames = []
    for f in files:
        h = int(f.stem.split("-")[1])
        frames.append(pl.read_parquet(f).with_columns(pl.lit(h, dtype=pl.UInt32).alias("host")))
    if not frames:
        return pl.DataFrame(schema={"step": pl.UInt32, "key": pl.UInt64, "unit": pl.UInt32, "host": pl.UInt32})
    return pl.concat(frames)


def _cooccurrence(rows: np.ndarray, cols: np.ndarray, n: int, chunk: int = 65536) -> np.ndarray:
    """``A.T @ A`` for the 0/1 incidence matrix A with ones at (rows, cols) (rows sorted, distinct
    pairs): how many rows hold each pair of columns.  Dense float32 blocks of at most ``chunk``
    rows (exact: a block's counts stay below 2**24), summed in int64."""
    out = np.zeros((n, n), dtype=np.int64)
    if rows.size == 0 or n == 0:
        return out
    uniq, r = np.unique(rows, return_inverse=True)
    for lo in range(0, uniq.size, chunk):
        hi = min(lo + chunk, uniq.size)
        m = (r >= lo) & (r < hi)
        a = np.zeros((hi - lo, n), dtype=np.float32)
        a[r[m] - lo, cols[m]] = 1.0
        out += np.rint(a.T @ a).astype(np.int64)
    return out


def partition_task(task: dict[str, Any]) -> dict[str, Any]:
    """One hash-prefix partition of the fleet (run by an executor): per aligned snapshot, the
    distinct contents, how many hosts hold each, the host-pair and top-unit-pair counts, and the
    union sizes of the placements asked for.  Only this partition's files are read."""
    df = _read_partition(task["work"], int(task["part"]))
    n_hosts = int(task["n_hosts"])
    top = task.get("top_units") or []  # [(host, unit), ...]
    top_index = {(int(h), int(u)): i for i, (h, u) in enumerate(top)}
    placements: dict[str, dict] = task.get("placements") or {}
    place_at = task.get("place_at")
    out: dict[str, Any] = {"steps": {}, "placements": {}}
    if df.height == 0:
        return out
    for (s,), g in df.group_by("step"):
        s = int(s)
        hk = g.select("key", "host").unique().sort("key", "host")
        keys = hk["key"].to_numpy()
        hosts = hk["host"].to_numpy().astype(np.int64)
        new = np.ones(keys.size, dtype=bool)
        new[1:] = keys[1:] != keys[:-1]
        n_fleet = int(new.sum())
        per_key = np.diff(np.append(np.flatnonzero(new), keys.size))
        hist = np.bincount(per_key, minlength=n_hosts + 1)
        key_id = np.cumsum(new) - 1
        step_out = {"fleet_distinct": n_fleet, "host_distinct": int(keys.size),
                    "hosts_per_content": hist.tolist(),
                    "host_matrix": _cooccurrence(key_id, hosts, n_hosts).tolist()}
        if top_index:
            gu = g.select("key", "host", "unit").unique()
            gk = gu["key"].to_numpy()
            idx = np.array([top_index.get((int(h), int(u)), -1) for h, u in zip(gu["host"].to_list(), gu["unit"].to_list())],
                           dtype=np.int64)
            sel = idx >= 0
            if sel.any():
                _, kid = np.unique(gk[sel], return_inverse=True)
                order = np.argsort(kid, kind="stable")
                step_out["unit_matrix"] = _cooccurrence(kid[order], idx[sel][order], len(top)).tolist()
        out["steps"][s] = step_out
        if s == place_at and placements:
            gu = g.select("key", "host", "unit").unique()
            for name, assign in placements.items():  # assign: {"h:u": target host}
                tgt = np.array([assign.get(f"{h}:{u}", -1) for h, u in zip(gu["host"].to_list(), gu["unit"].to_list())],
                               dtype=np.int64)
                t = pl.DataFrame({"key": gu["key"], "t": tgt}).filter(pl.col("t") >= 0).unique()
                out["placements"][name] = {int(k): int(v) for k, v in
                                           t.group_by("t").len().iter_rows()}
    return out


# --- the result ------------------------------------------------------------------------------------
@dataclass
class FleetResult:
    hosts: list[FleetHost]
    scope: str
    steps: pl.DataFrame  # one row per aligned snapshot: STEP_COLUMNS
    host_table: pl.DataFrame  # one row per host and aligned snapshot
    units: pl.DataFrame  # one row per unit (host, process) and aligned snapshot
    host_matrix: dict[int, np.ndarray]  # aligned snapshot -> hosts x hosts
    unit_labels: list[str] = field(default_factory=list)
    unit_matrix: dict[int, np.ndarray] = field(default_factory=dict)
    hosts_per_content: dict[int, list[int]] = field(default_factory=dict)
    placement: dict[str, Any] | None = None
    method: str = "exact"
    precision: int | None = None
    partitions: int = 0

    @property
    def host_matrix_mean(self) -> np.ndarray:
        """The host sharing matrix averaged over the aligned snapshots counted (frames)."""
        return np.mean(np.stack([self.host_matrix[s] for s in sorted(self.host_matrix)]), axis=0)

    @property
    def unit_matrix_mean(self) -> np.ndarray | None:
        if not self.unit_matrix:
            return None
        return np.mean(np.stack([self.unit_matrix[s] for s in sorted(self.unit_matrix)]), axis=0)

    def summary(self) -> dict[str, Any]:
        st = self.steps
        mean = {c: float(st[c].mean() or 0.0) for c in ("base_frames", "intra_host_saved", "cross_host_saved",
                                                        "fleet_saved", "zero_saved")} if st.height else {}
        pct = (lambda a, b: None if not b else round(100.0 * a / b, 2))
        return {
            "hosts": len(self.hosts), "aligned_snapshots": st.height, "method": self.method,
            "mean_frames": mean,
            "cross_host_pct_of_fleet_saved": pct(mean.get("cross_host_saved", 0), mean.get("fleet_saved", 0)),
            "fleet_saved_pct_of_frames": pct(mean.get("fleet_saved", 0), mean.get("base_frames", 0)),
            "max_wall_skew_s": float(st["wall_skew_s"].max()) if st.height and st["wall_skew_s"].null_count() < st.height else None,
        }

    def to_json(self) -> dict[str, Any]:
        labels = [h.name for h in self.hosts]
        last = max(self.host_matrix) if self.host_matrix else None
        out = {
            "hosts": [{"index": h.index, "trace": h.path, "name": h.name, "hostname": h.hostname,
                       "snapshots": h.n_snapshots} for h in self.hosts],
            "key_fingerprint": self.hosts[0].key_fingerprint if self.hosts else None,
            "scope": self.scope, "method": self.method, "sketch_precision": self.precision,
            "partitions": self.partitions, "alignment": "snapshot index",
            "summary": self.summary(),
            "steps": self.steps.to_dicts(),
            "host_table": self.host_table.to_dicts(),
            "host_labels": labels,
            "host_matrix_mean": self.host_matrix_mean.tolist() if self.host_matrix else None,
            "host_matrix_last": self.host_matrix[last].tolist() if last is not None else None,
            "hosts_per_content_last": self.hosts_per_content.get(last) if last is not None else None,
            "unit_labels": self.unit_labels,
            "unit_matrix_mean": None if self.unit_matrix_mean is None else self.unit_matrix_mean.tolist(),
            "placement": self.placement,
            "definitions": DEFINITIONS,
        }
        return out


# --- driver ------------------------------------------------------------------------------------------
def fleet(traces: Sequence[str | os.PathLike], *, scope: str = "recorded", snaps: Sequence[int] | None = None,
          partitions: int = DEFAULT_PARTITIONS, sketch: bool = False, precision: int = DEFAULT_PRECISION,
          top_units: int = 20, capacity: int | None = None, n_hosts: int | None = None, place_at: int = -1,
          executor=None, workers: int | None = None, work_dir: str | os.PathLike | None = None,
          progress: ProgressFn | None = None) -> FleetResult:
    """Analyse a fleet of traces (see the module docstring).  ``partitions``: hash-prefix
    partitions (a power of two); ``sketch``: answer from HyperLogLog sketches of ``precision``
    bits instead of exact counts; ``capacity``: units per host for the colocation what-if (None:
    no what-if), ``n_hosts`` hosts (default: as few as hold every unit); ``place_at``: the aligned
    snapshot the placement is made at (default the last); ``executor``/``workers``: where the
    host and partition tasks run (:mod:`ksmtrace.executor`); ``work_dir``: where the partition
    files go (default a private temporary directory, removed at the end; with a remote Dask
    scheduler it must be on storage the workers share)."""
    from ksmtrace.executor import make_executor

    prog = make(progress)
    if scope not in ("recorded", "anon"):
        raise FleetError(f"unknown scope {scope!r} (scopes: recorded, anon)")
    if partitions < 1 or partitions & (partitions - 1) or partitions > 1 << 16:
        raise FleetError(f"--partitions {partitions}: must be a power of two between 1 and 65536")
    if not 4 <= precision <= 18:
        raise FleetError(f"sketch precision {precision}: must be between 4 and 18 bits")
    if capacity is not None and capacity < 1:
        raise FleetError(f"--capacity {capacity}: must be at least 1 unit per host")
    hosts = check_fleet(traces)
    n_aligned = min(h.n_snapshots for h in hosts)
    steps = resolve_steps(n_aligned, snaps)
    place = resolve_steps(n_aligned, [place_at])[0] if capacity is not None else None
    if place is not None and place not in steps:
        steps = sorted(set(steps) | {place})
    if sketch and capacity is None:
        pass
    own_tmp = None
    ex = make_executor(executor, min(workers or os.cpu_count() or 1, len(hosts)))
    if not sketch:
        if work_dir is None:
            if getattr(ex, "address", None):
                ex.close()
                raise FleetError("with a remote Dask scheduler, give --work-dir on storage its workers share")
            own_tmp = tempfile.mkdtemp(prefix="ksmtrace-fleet-")
            work = own_tmp
        else:
            work = str(Path(work_dir) / "partitions")
            if Path(work).exists():
                shutil.rmtree(work)
            Path(work).mkdir(parents=True, mode=0o700)
    else:
        work = None
    try:
        bits = int(math.log2(partitions))
        tasks = [{"trace": h.path, "host": h.index, "scope": scope, "steps": steps, "place_at": place,
                  "partition_bits": bits, "precision": precision if (sketch or capacity is not None) else 0,
                  "work": work} for h in hosts]
        per_host: list[dict | None] = [None] * len(hosts)
        total = len(hosts) + (0 if sketch else partitions)
        prog(0, total, "hosts")
        for k, done in enumerate(ex.run(host_task, tasks)):
            if done.error is not None:
                raise done.error
            per_host[done.index] = done.value
            prog(k + 1, total, f"host {hosts[done.index].name}")
        host_res: list[dict] = per_host  # type: ignore[assignment]
        units = _unit_frame(hosts, host_res)
        top = _top_units(units, top_units)
        placement_units = _placement_units(units, place) if place is not None else None
        plans: dict[str, dict[str, int]] = {}
        if placement_units is not None and placement_units.height:
            plans = _plan_placements(placement_units, host_res, capacity, n_hosts, precision)
        if sketch:
            agg = _from_sketches(hosts, host_res, steps)
            placement_counts = _placement_from_sketches(plans, host_res, place) if plans else {}
        else:
            ptasks = [{"work": work, "part": p, "n_hosts": len(hosts), "top_units": top, "place_at": place,
                       "placements": {name: a["assign"] for name, a in plans.items()}} for p in range(partitions)]
            agg = {"steps": {}, "placements": {}}
            for k, done in enumerate(ex.run(partition_task, ptasks)):
                if done.error is not None:
                    raise done.error
                _merge_partition(agg, done.value)
                prog(len(hosts) + k + 1, total, f"partition {done.index}")
            placement_counts = agg["placements"]
    finally:
        if ex is not executor:
            ex.close()
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)
    return _assemble(hosts, host_res, units, top, steps, agg, plans, placement_counts, placement_units, scope,
                     "sketch" if sketch else "exact", precision if sketch else None, 0 if sketch else partitions, place,
                     capacity)


def _unit_frame(hosts, host_res) -> pl.DataFrame:
    rows = []
    for h, r in zip(hosts, host_res):
        for u in r["units"]:
            for s, c in u["steps"].items():
                rows.append({"host": h.index, "host_name": h.name, "unit": u["unit"], "pid": u["pid"], "comm": u["comm"],
                             "step": int(s), **c})
    schema = {"host": pl.Int64, "host_name": pl.String, "unit": pl.Int64, "pid": pl.Int64, "comm": pl.String,
              "step": pl.Int64, "pages": pl.Int64, "frames": pl.Int64, "zero_saved": pl.Int64, "contents": pl.Int64,
              "self_saved": pl.Int64}
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def _top_units(units: pl.DataFrame, n: int) -> list[tuple[int, int]]:
    if n <= 0 or units.height == 0:
        return []
    t = (units.group_by("host", "unit").agg(pl.col("pages").mean().alias("m"))
         .sort(["m", "host", "unit"], descending=[True, False, False]).head(n).sort("host", "unit"))
    return [(int(h), int(u)) for h, u in t.select("host", "unit").iter_rows()]


def _placement_units(units: pl.DataFrame, place: int) -> pl.DataFrame:
    return units.filter((pl.col("step") == place) & (pl.col("contents") > 0)).sort("host", "unit")


def _plan_placements(pu: pl.DataFrame, host_res, capacity: int, n_hosts: int | None, precision: int) -> dict[str, dict]:
    """The current placement and the greedy one (chosen with the units' HyperLogLog sketches)."""
    ids = [f"{h}:{u}" for h, u in pu.select("host", "unit").iter_rows()]
    size = dict(zip(ids, pu["contents"].to_list()))
    n = len(ids)
    m = n_hosts if n_hosts is not None else -(-n // capacity)
    if m * capacity < n:
        raise FleetError(f"{n} units do not fit on {m} hosts of {capacity} units each")
    sk = {}
    for (h, u) in pu.select("host", "unit").iter_rows():
        sk[f"{h}:{u}"] = host_res[h]["unit_sketches"].get(int(u), np.zeros(1 << precision, np.int8))
    current = {i: int(i.split(":")[0]) for i in ids}
    unplaced = sorted(ids, key=lambda i: (-size[i], i))
    greedy: dict[str, int] = {}
    for t in range(m):
        if not unplaced:
            break
        seed = unplaced.pop(0)
        greedy[seed] = t
        reg = sk[seed].copy()
        union = hll_count(reg)
        while unplaced and sum(1 for v in greedy.values() if v == t) < capacity:
            # units left must still fit on the hosts left
            best, best_gain = None, -1.0
            for i in unplaced:
                gain = size[i] + union - hll_count(reg, sk[i])
                if gain > best_gain + 1e-9:
                    best, best_gain = i, gain
            if best is None:
                break
            hosts_left = m - t - 1
            if best_gain <= 0.5 and len(unplaced) <= hosts_left * capacity:
                break  # sharing nothing: leave room to seed another host
            unplaced.remove(best)
            greedy[best] = t
            reg = np.maximum(reg, sk[best])
            union = hll_count(reg)
    return {"current": {"assign": current, "hosts": len(set(current.values()))},
            "greedy": {"assign": greedy, "hosts": m}}


def _placement_from_sketches(plans, host_res, place) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name, a in plans.items():
        groups: dict[int, list[np.ndarray]] = {}
        for i, t in a["assign"].items():
            h, u = (int(x) for x in i.split(":"))
            groups.setdefault(t, []).append(host_res[h]["unit_sketches"][u])
        out[name] = {t: hll_count(*regs) for t, regs in groups.items()}
    return out


def _from_sketches(hosts, host_res, steps) -> dict[str, Any]:
    agg: dict[str, Any] = {"steps": {}}
    n = len(hosts)
    for s in steps:
        regs = [r["sketches"][s] for r in host_res]
        est = [hll_count(x) for x in regs]
        mat = np.zeros((n, n))
        for a in range(n):
            for b in range(a + 1, n):
                mat[a, b] = mat[b, a] = max(0.0, est[a] + est[b] - hll_count(regs[a], regs[b]))
        agg["steps"][s] = {"fleet_distinct": hll_count(*regs), "host_distinct_est": float(sum(est)),
                           "host_matrix": mat.tolist()}
    return agg


def _merge_partition(agg: dict[str, Any], part: dict[str, Any]) -> None:
    for s, st in part["steps"].items():
        cur = agg["steps"].get(s)
        if cur is None:
            agg["steps"][s] = {k: (np.array(v) if isinstance(v, list) else v) for k, v in st.items()}
            continue
        for k, v in st.items():
            if isinstance(v, list):
                a, b = np.asarray(cur.get(k, np.zeros_like(np.asarray(v)))), np.asarray(v)
                if a.shape != b.shape:  # hosts_per_content histograms of different lengths
                    n = max(a.size, b.size)
                    a, b = np.pad(a, (0, n - a.size)), np.pad(b, (0, n - b.size))
                cur[k] = a + b
            else:
                cur[k] = cur.get(k, 0) + v
    for name, counts in part["placements"].items():
        dst = agg["placements"].setdefault(name, {})
        for t, c in counts.items():
            dst[t] = dst.get(t, 0) + c


def _assemble(hosts, host_res, units, top, steps, agg, plans, placement_counts, pu, scope, method, precision,
              partitions, place, capacity) -> FleetResult:
    n = len(hosts)
    host_rows = []
    for h, r in zip(hosts, host_res):
        for t in r["steps"]:
            host_rows.append({"host": h.index, "host_name": h.name, **{k: v for k, v in t.items()}})
    ht = pl.DataFrame(host_rows)
    step_rows = []
    host_matrix: dict[int, np.ndarray] = {}
    unit_matrix: dict[int, np.ndarray] = {}
    hpc: dict[int, list[int]] = {}
    for s in steps:
        g = ht.filter(pl.col("step") == s)
        a = agg["steps"].get(s, {})
        sum_distinct = int(g["distinct_contents"].sum())
        fleet_distinct = float(a.get("fleet_distinct", 0))
        intra = int(g["intra_host_saved"].sum())
        cross = sum_distinct - fleet_distinct
        walls = [w for w in g["wall"].to_list() if w is not None]
        mat = np.asarray(a.get("host_matrix", np.zeros((n, n))), dtype=float)
        mat = mat.copy()
        for i, row in enumerate(g.sort("host").iter_rows(named=True)):
            mat[row["host"], row["host"]] = row["intra_host_saved"]
        host_matrix[s] = mat
        if "unit_matrix" in a:
            um = np.asarray(a["unit_matrix"], dtype=float).copy()
            self_saved = {(int(r["host"]), int(r["unit"])): r["self_saved"]
                          for r in units.filter(pl.col("step") == s).iter_rows(named=True)}
            for i, key in enumerate(top):
                um[i, i] = self_saved.get(key, 0)
            unit_matrix[s] = um
        if "hosts_per_content" in a:
            hpc[s] = [int(x) for x in np.asarray(a["hosts_per_content"]).tolist()]
        step_rows.append({
            "step": s, "t_s": float(g.filter(pl.col("host") == 0)["t_s"][0]) if g.height else 0.0,
            "candidate_pages": int(g["candidate_pages"].sum()), "base_frames": int(g["base_frames"].sum()),
            "intra_host_saved": intra, "cross_host_saved": cross if method == "sketch" else int(cross),
            "fleet_saved": intra + cross if method == "sketch" else int(intra + cross),
            "zero_saved": int(g["zero_saved"].sum()), "distinct_contents": sum_distinct,
            "fleet_distinct_contents": fleet_distinct if method == "sketch" else int(fleet_distinct),
            "wall_skew_s": (max(walls) - min(walls)) if len(walls) == n else None,
        })
    num = pl.Float64 if method == "sketch" else pl.Int64
    schema = {"step": pl.Int64, "t_s": pl.Float64, "candidate_pages": pl.Int64, "base_frames": pl.Int64,
              "intra_host_saved": pl.Int64, "cross_host_saved": num, "fleet_saved": num, "zero_saved": pl.Int64,
              "distinct_contents": pl.Int64, "fleet_distinct_contents": num, "wall_skew_s": pl.Float64}
    steps_df = pl.DataFrame(step_rows, schema=schema)
    labels = []
    for h, u in top:
        r = units.filter((pl.col("host") == h) & (pl.col("unit") == u)).row(0, named=True)
        labels.append(f"{hosts[h].name}/{r['comm']}({r['pid']})")
    placement = None
    if plans and pu is not None:
        sizes = {f"{h}:{u}": c for h, u, c in pu.select("host", "unit", "contents").iter_rows()}
        total = sum(sizes.values())
        fleet_union = float(agg["steps"].get(place, {}).get("fleet_distinct", 0))
        bound = total - fleet_union if method == "sketch" else int(total - fleet_union)
        placement = {"snapshot": place, "capacity": capacity, "units": len(sizes),
                     "unit_contents_total": total, "bound_saved": bound,
                     "zero_saved": int(pu["zero_saved"].sum()), "self_saved": int(pu["self_saved"].sum())}
        for name, a in plans.items():
            groups: dict[int, list[str]] = {}
            for i, t in a["assign"].items():
                groups.setdefault(t, []).append(i)
            counts = placement_counts.get(name, {})
            saved = sum(sum(sizes[i] for i in members) - counts.get(t, 0) for t, members in groups.items())
            lab = {f"{h}:{u}": f"{hosts[h].name}/{c}({p})" for h, u, c, p in pu.select("host", "unit", "comm", "pid").iter_rows()}
            placement[name] = {
                "saved": saved, "hosts": len(groups),
                "pct_of_bound": None if not bound else 100.0 * saved / bound,
                "max_units_per_host": max(len(v) for v in groups.values()),
                "groups": [[lab[i] for i in sorted(members)] for t, members in sorted(groups.items())],
            }
    return FleetResult(hosts=hosts, scope=scope, steps=steps_df, host_table=ht.drop("wall"), units=units,
                       host_matrix=host_matrix, unit_labels=labels, unit_matrix=unit_matrix, hosts_per_content=hpc,
                       placement=placement, method=method, precision=precision, partitions=partitions)
