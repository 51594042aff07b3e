"""Make a trace fit to share: ``ksmtrace redact TRACE -o OUT`` (issue 9, item 8).

A trace is a detailed picture of the processes it captured and of the host (docs/trace-format.md,
"What a trace reveals").  The redacted copy keeps everything a replay needs — which pages are
equal, which share a frame or a huge page, in which order ksmd meets them, when they change — and
replaces every identifier that ties the trace to a host, a boot, a process or another trace:

* **page hashes**: re-keyed with a fresh secret key (never stored): the new hash is a keyed
  BLAKE2b PRF of the old one (64 bits, checked collision-free), so equal pages stay equal and the
  capture key's known (content, hash) pairs say nothing about the new hashes; the 32-bit
  fingerprints (``sample``, ``pfx*``) go through a keyed 4-round Feistel permutation (equality kept
  exactly; the zero page's PKSM checksum and 0 stay fixed, as the policies rely on them);
* **physical frame numbers** (root-only information): replaced by frame-class ids — the 2 MiB
  physical regions in a random order, the offset inside one kept — so pages sharing a frame, or
  a huge page, still do, and nothing physical remains;
* **virtual addresses** (the processes' address-space layout): every *segment* (a run of
  overlapping VMAs over the whole trace) moves by a random shift of its own, with random gaps
  between segments, in order: distances inside a VMA (its length, the holes ksmd walks) and
  equal addresses (a fork child's, same-address classes) are kept, where the regions lie relative
  to each other is not;
* **pids and parent pids**: an order-preserving map with a random offset and random gaps (order
  decides the registration order of processes that appear together); **start times** move by
  whole clock ticks with the snapshot times, so the earliest process starts at a random time
  between 1000 s and 12 hours after "boot";
* **command lines**: dropped — replaced by the process name (``comm``), or with ``names=False``
  both replaced by ``proc-N``; **cgroups, uids, mapped file paths**: labels that sort as the
  originals did (``/cgroup-00000003``, ``/path-00000017``, uids renumbered from 1000) and keep
  which processes share a security domain and which VMAs map the same file;
* **times**: every monotonic timestamp shifted with the start times (what a start time says about
  the snapshots is kept, not how long the host had been up); wall-clock times (the log's
  ``wall``, the manifest's ``created``) dropped; the host-wide cumulative KSM counters re-based
  to start at 0;
* **the manifest**: hostname, command line, capture targets, the key fingerprint and the
  capture summary dropped; page contents (``--contents``) are never copied.

Two redactions of one trace (or redactions of two traces of one process) share no hash, no
frame-class assignment, no address, pid or start time: they cannot be linked by identifiers.
What remains — page counts, how much is duplicated, the rhythm of changes — is the point of the
trace and is not hidden.  ``key`` (``--key-file``) re-keys several traces with one key, so their
hashes stay comparable with each other (and only with each other).
"""
from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa

from ksmtrace._version import __version__
from ksmtrace.errors import TraceError
from ksmtrace.trace import schema as S
from ksmtrace.trace.reader import Trace, open_trace
from ksmtrace.trace.sampled import zero_sample
from ksmtrace.trace.writer import TraceWriter

ZERO_SAMPLE = 0x7AEC7314  # the PKSM checksum of a zero page (unkeyed: every word is 0)
assert ZERO_SAMPLE == zero_sample(S.SAMPLE_WORDS)
START_TICKS = 100_000  # the earliest process of a redacted trace starts after 1000 s (100 ticks/s)
CLK_TCK = 100  # USER_HZ, as ksmtrace.trace.addrspace assumes when the host does not say
CUMULATIVE = ("full_scans", "pages_scanned", "pages_skipped", "cow_ksm", "ksmd_cpu_ns", "ksm_swpin_copy")
HOST_KEPT = ("kernel_release", "machine", "page_size", "cpus", "thp_enabled", "hz", "clk_tck", "root", "pfn_readable",
             "kpageflags_readable", "soft_dirty", "ksm_available", "ksm")
CAPTURE_KEPT = ("scope", "interval_s", "duration_s", "count", "fixed_targets", "freeze", "soft_dirty", "fingerprints",
                "keyframe_every", "ground_truth", "ksm_sample_interval_s", "workers", "read_methods", "prefix_lengths")
PAGE_LIMIT = 1 << 52


# --- keyed maps --------------------------------------------------------------------------------
def _subkey(key: bytes, label: str) -> bytes:
    return hashlib.blake2b(label.encode(), key=key[:64], digest_size=32).digest()


def prf64(key: bytes, values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A keyed BLAKE2b PRF of the 64-bit ``values`` (0 kept as 0), computed once per distinct
    value; returns the map (for values among ``values``).

    Raises if two distinct values collide (probability ~n^2/2^65): equality is kept exactly."""
    uniq = np.unique(values.astype(np.uint64))
    k = _subkey(key, "hash")
    out = np.empty(len(uniq), np.uint64)
    for i, v in enumerate(uniq.tolist()):
        out[i] = int.from_bytes(hashlib.blake2b(v.to_bytes(8, "little"), key=k, digest_size=8).digest(), "little")
    out[uniq == 0] = 0
    if len(np.unique(out)) != len(out) or ((out == 0) & (uniq != 0)).any():
        raise TraceError("redact: the re-keyed hashes collided; run redact again (a fresh key)")

    def apply(v: np.ndarray) -> np.ndarray:
        return out[np.searchsorted(uniq, v.astype(np.uint64))]

    return apply


class Permutation32:
    """A keyed permutation of 32-bit values: a 4-round Feistel network on 16-bit halves whose
    round functions are SHAKE-256 tables of the key; ``fixed`` values map to themselves (cycle
    walking keeps it a permutation of the rest)."""

    def __init__(self, key: bytes, label: str, fixed: tuple[int, ...] = ()) -> None:
        k = _subkey(key, label)
        self.tables = [np.frombuffer(hashlib.shake_256(k + bytes([r])).digest(1 << 17), dtype="<u2").astype(np.uint32)
                       for r in range(4)]
        self.fixed = np.array(sorted(set(fixed)), dtype=np.uint32)

    def _round(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint32(16), x & np.uint32(0xFFFF)
        for t in self.tables:
            left, right = right, left ^ t[right]
        return (left << np.uint32(16)) | right

    def __call__(self, values: np.ndarray) -> np.ndarray:
        x = values.astype(np.uint32)
        keep = np.isin(x, self.fixed)
        y = self._round(x)
        walk = ~keep & np.isin(y, self.fixed)
        while walk.any():
            y[walk] = self._round(y[walk])
            walk &= np.isin(y, self.fixed)
        y[keep] = x[keep]
        return y


def monotone_map(values: np.ndarray, rng: np.random.Generator, limit: int, max_gap: int = 1 << 16,
                 base_max: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """An order-preserving map of the distinct ``values`` onto a random base plus random positive
    gaps, below ``limit``.  Returns the map (for values among ``values``)."""
    uniq = np.unique(values.astype(np.uint64))
    n = max(len(uniq), 1)
    gap = int(max(1, min(max_gap, (limit // 2) // (n + 1))))
    base_hi = base_max if base_max is not None else limit // 2
    base = int(rng.integers(1, max(2, base_hi)))
    new = base + np.cumsum(rng.integers(1, gap + 1, size=len(uniq)).astype(np.uint64))
    if len(new) and int(new[-1]) >= limit:
        raise TraceError("redact: too many distinct values to remap")

    def apply(v: np.ndarray) -> np.ndarray:
        return new[np.searchsorted(uniq, v.astype(np.uint64))]

    return apply


def labels(values: list[str], prefix: str, keep: tuple[str, ...] = ()) -> dict[str, str]:
    """Distinct strings to labels that sort as they did (a label keeps the first character and
    numbers the strings in their sorted order: ``/path-00000017``); ``keep``: left as they are.
    Code that numbers paths or cgroups in sorted order then numbers the labels alike."""
    uniq = sorted(set(values) - set(keep))
    out = {v: f"{v[:1]}{prefix}-{k:08d}" for k, v in enumerate(uniq)}
    out.update({v: v for v in keep})
    return out


def _synth_intervals(vpns: np.ndarray) -> np.ndarray:
    """Runs of sorted distinct ``vpns`` split where the gap exceeds ``SYNTH_VMA_GAP`` (over every
    process at once: a run of one process never splits, so its synthesised VMAs stay as they were)."""
    if not len(vpns):
        return np.zeros((0, 2), np.int64)
    cuts = np.flatnonzero(np.diff(vpns) > S.SYNTH_VMA_GAP) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(vpns)]])
    return np.stack([vpns[starts], vpns[ends - 1] + 1], axis=1)


def segment_map(vpns: np.ndarray, intervals: np.ndarray, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A map of virtual page numbers that moves every *segment* — a maximal run of overlapping
    VMAs (``intervals``: [first page, last page + 1) of every VMA row of the trace; a page outside
    every VMA is a segment of its own) — by a shift of its own: random gaps between segments,
    segments in their order, every distance inside a segment kept (so VMA lengths, offsets and the
    holes ksmd walks inside a VMA), equal addresses equal (fork children, same-address classes),
    page offsets in a huge page kept (shifts are multiples of 512)."""
    lo = np.concatenate([intervals[:, 0], vpns]).astype(np.int64) if len(intervals) else vpns.astype(np.int64)
    hi = np.concatenate([intervals[:, 1], vpns + 1]).astype(np.int64) if len(intervals) else vpns.astype(np.int64) + 1
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)
    new = np.ones(len(lo), bool)
    new[1:] = lo[1:] >= reach[:-1]  # a segment starts where nothing before reaches
    seg_lo = lo[new]
    seg_hi = np.maximum.reduceat(hi, np.flatnonzero(new)) if len(lo) else hi[:0]
    base = (int(rng.integers(1 << 20, 1 << 26)) << 9)
    shifts = np.empty(len(seg_lo), np.int64)
    at = base
    for i in range(len(seg_lo)):
        start = at + ((int(seg_lo[i]) - at) % 512)  # the same offset in a huge page as before
        shifts[i] = start - int(seg_lo[i])
        # a gap of at least 3 huge pages: wider than SYNTH_VMA_GAP, so segments never join
        at = start + int(seg_hi[i] - seg_lo[i]) + 512 * int(rng.integers(3, 1 << 12))
    if at >= PAGE_LIMIT:
        raise TraceError("redact: the address space does not fit below 2^52 pages")

    def apply(v: np.ndarray) -> np.ndarray:
        x = v.astype(np.int64)
        k = np.searchsorted(seg_lo, x, side="right") - 1
        return (x + shifts[k]).astype(np.uint64)

    return apply


# --- the redaction ------------------------------------------------------------------------------
@dataclass
class Maps:
    """Everything a redaction maps, built from the whole trace before anything is written."""

    hashes: Callable[[np.ndarray], np.ndarray]
    samples: Permutation32
    prefixes: dict[str, Permutation32]
    vpn: Callable[[np.ndarray], np.ndarray]
    pfn_class: dict[str, np.ndarray]  # sorted distinct huge-page regions and their random class
    pid: Callable[[np.ndarray], np.ndarray]
    start: Callable[[np.ndarray], np.ndarray]
    names: dict[int, str]  # proc -> label when names are dropped
    cgroup: dict[str, str]
    uid: dict[int, int]
    path: dict[str, str]
    t_shift: int
    counter_base: dict[str, int] = field(default_factory=dict)


def _pfn(maps: Maps, pfn: np.ndarray) -> np.ndarray:
    out = np.zeros(len(pfn), np.uint64)
    nz = pfn != 0
    if nz.any():
        p = pfn[nz].astype(np.uint64)
        region = p >> np.uint64(9)
        cls = maps.pfn_class["class"][np.searchsorted(maps.pfn_class["region"], region)]
        out[nz] = (cls << np.uint64(9)) | (p & np.uint64(511))
    return out


def _build_maps(tr: Trace, key: bytes, names: bool) -> Maps:
    rng = np.random.default_rng(np.frombuffer(_subkey(key, "rng"), dtype=np.uint64))
    pages = tr.read_table("pages", columns=["vpn", "pfn", "pid", "hash"])
    hash_map = prf64(key, pages["hash"].to_numpy())
    vmas = tr.read_table("vmas", columns=["start", "end", "path", "pid"]) if tr.has_table("vmas") else None
    procs = tr.read_table("processes", columns=["proc", "pid", "ppid", "start_ticks", "cgroup", "uid"]) \
        if tr.has_table("processes") else None
    ksm_stat = tr.read_table("ksm_stat", columns=["pid"]) if tr.has_table("ksm_stat") else None

    if vmas is not None and vmas.height:
        st = vmas["start"].to_numpy() >> np.uint64(12)
        en = (vmas["end"].to_numpy() + np.uint64(4095)) >> np.uint64(12)
        intervals = np.stack([st, np.maximum(en, st + np.uint64(1))], axis=1)
    else:  # no VMAs: the ones a replay synthesises (runs of pages split at gaps > SYNTH_VMA_GAP)
        intervals = _synth_intervals(np.unique(pages["vpn"].to_numpy()).astype(np.int64))
    vpn_map = segment_map(np.unique(pages["vpn"].to_numpy()), intervals, rng)

    pfn = pages["pfn"].to_numpy()
    regions = np.unique(pfn[pfn != 0].astype(np.uint64) >> np.uint64(9))
    classes = (rng.permutation(len(regions)) + 1).astype(np.uint64)

    pids = [pages["pid"].to_numpy()]
    for t in (procs, vmas, ksm_stat):
        if t is not None and t.height:
            pids.append(t["pid"].to_numpy())
    if procs is not None and procs.height:
        pids.append(procs["ppid"].to_numpy())
    pid_map = monotone_map(np.concatenate(pids), rng, 1 << 31, max_gap=64, base_max=1 << 20)
    # times move by whole clock ticks, start times (ticks since boot) by as many ticks: what a
    # start time says about the snapshots (address spaces: fork-time registration) is kept; the
    # earliest process now starts at a random tick after START_TICKS
    tck = int(tr.host.get("clk_tck") or CLK_TCK)
    starts = procs["start_ticks"].to_numpy().astype(np.int64) if procs is not None and procs.height else np.zeros(0, np.int64)
    first = int(starts[starts > 0].min()) if (starts > 0).any() else tr.t0_ns * tck // 1_000_000_000
    shift_ticks = START_TICKS + int(rng.integers(0, 1 << 22)) - first
    ns_per_tick = 1_000_000_000 // tck
    if shift_ticks * ns_per_tick + tr.t0_ns < 0:
        shift_ticks = -(tr.t0_ns // ns_per_tick)

    def start_map(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.int64)
        return np.where(v > 0, v + shift_ticks, 0).astype(np.uint64)

    proc_ids = sorted(set(procs["proc"].to_list())) if procs is not None else []
    order = rng.permutation(len(proc_ids))
    name_map = {p: f"proc-{int(k) + 1}" for p, k in zip(proc_ids, order)}
    cgroups = labels(procs["cgroup"].to_list() if procs is not None else [], "cgroup", keep=("",))
    uids_all = sorted(set(procs["uid"].to_list())) if procs is not None else []
    uid_map = {u: 1000 + k for k, u in enumerate(uids_all)}  # in their order
    kept_paths = tuple(p for p in (vmas["path"].unique().to_list() if vmas is not None else [])
                       if p == "" or (p.startswith("[") and p.endswith("]") and "/" not in p))
    paths = labels(vmas["path"].to_list() if vmas is not None else [], "path", keep=kept_paths)

    maps = Maps(
        hashes=hash_map,
        samples=Permutation32(key, "sample", fixed=(0, ZERO_SAMPLE)),
        # every fingerprint column has a permutation of its own (equality within a column kept,
        # no value shared between columns); each strength keeps its zero-page value, which
        # UKSM's zero-page check looks for
        prefixes={f.name: Permutation32(key, f.name, fixed=(0,)) for f in S.PREFIX_FIELDS}
        | {f.name: Permutation32(key, f.name, fixed=(0, zero_sample(int(f.name[6:])))) for f in S.STRENGTH_FIELDS},
        vpn=vpn_map,
        pfn_class={"region": regions, "class": classes},
        pid=pid_map,
        start=start_map,
        names=name_map if not names else {},
        cgroup=cgroups,
        uid=uid_map,
        path=paths,
        t_shift=shift_ticks * ns_per_tick,
    )
    if tr.has_ground_truth:
        g = tr.read_table("ksm", columns=list(CUMULATIVE))
        for c in CUMULATIVE:
            nn = g[c].drop_nulls()
            if len(nn):
                maps.counter_base[c] = int(nn.min())
    return maps


def _u64(a: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(a, dtype=np.uint64))


def _replace(t: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), arr.cast(t.schema.field(i).type))


def _pages(t: pa.Table, m: Maps) -> pa.Table:
    t = _replace(t, "hash", _u64(m.hashes(t.column("hash").to_numpy())))
    t = _replace(t, "vpn", _u64(m.vpn(t.column("vpn").to_numpy())))
    t = _replace(t, "pfn", _u64(_pfn(m, t.column("pfn").to_numpy())))
    t = _replace(t, "pid", pa.array(m.pid(t.column("pid").to_numpy()).astype(np.uint32)))
    if "sample" in t.column_names:
        t = _replace(t, "sample", pa.array(m.samples(t.column("sample").to_numpy())))
    for name, perm in m.prefixes.items():
        if name in t.column_names:
            t = _replace(t, name, pa.array(perm(t.column(name).to_numpy())))
    return t


def _processes(t: pa.Table, m: Maps, names: bool) -> pa.Table:
    df = pl.from_arrow(t)
    if df.height == 0:
        return t
    comm = df["comm"].to_list() if names else [m.names[p] for p in df["proc"].to_list()]
    df = df.with_columns(
        pl.Series("pid", m.pid(df["pid"].to_numpy()).astype(np.uint32)),
        pl.Series("ppid", m.pid(df["ppid"].to_numpy()).astype(np.uint32)),
        pl.Series("start_ticks", m.start(df["start_ticks"].to_numpy())),
        pl.Series("comm", comm),
        pl.Series("cmdline", comm),
        pl.Series("cgroup", [m.cgroup[c] for c in df["cgroup"].to_list()]),
        pl.Series("uid", np.array([m.uid[u] for u in df["uid"].to_list()], np.uint32)),
        pl.Series("t_read_ns", df["t_read_ns"].to_numpy() + m.t_shift),
    )
    return df.to_arrow().select(S.PROCESSES_SCHEMA.names).cast(S.PROCESSES_SCHEMA)


def _last_page(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The last page of each VMA [start, end) (its first for an empty one)."""
    return np.maximum((end + np.uint64(4095)) >> np.uint64(12), (start >> np.uint64(12)) + np.uint64(1)) - np.uint64(1)


def _vmas(t: pa.Table, m: Maps) -> pa.Table:
    df = pl.from_arrow(t)
    if df.height == 0:
        return t
    df = df.with_columns(
        pl.Series("pid", m.pid(df["pid"].to_numpy()).astype(np.uint32)),
        pl.Series("start", (m.vpn(df["start"].to_numpy() >> np.uint64(12)) << np.uint64(12))
                  | (df["start"].to_numpy() & np.uint64(4095))),
        pl.Series("end", m.vpn(_last_page(df["start"].to_numpy(), df["end"].to_numpy())) + np.uint64(1) << np.uint64(12)),
        pl.Series("path", [m.path[p] for p in df["path"].to_list()]),
    )
    return df.to_arrow().select(S.VMAS_SCHEMA.names).cast(S.VMAS_SCHEMA)


def _ksm(t: pa.Table, m: Maps) -> pa.Table:
    df = pl.from_arrow(t)
    if df.height == 0:
        return t
    cols = [pl.col("t_ns") + m.t_shift]
    cols += [(pl.col(c) - base).alias(c) for c, base in m.counter_base.items()]
    return df.with_columns(cols).to_arrow().select(S.KSM_SCHEMA.names).cast(S.KSM_SCHEMA)


def _ksm_stat(t: pa.Table, m: Maps) -> pa.Table:
    df = pl.from_arrow(t)
    if df.height == 0:
        return t
    df = df.with_columns(pl.Series("pid", m.pid(df["pid"].to_numpy()).astype(np.uint32)), pl.col("t_ns") + m.t_shift)
    return df.to_arrow().select(S.KSM_STAT_SCHEMA.names).cast(S.KSM_STAT_SCHEMA)


def _manifest(tr: Trace, m: Maps, key_fp: str, names: bool, ground_truth: bool) -> tuple[dict, dict, dict]:
    host = {k: tr.host[k] for k in HOST_KEPT if k in tr.host}
    cap = {k: tr.capture[k] for k in CAPTURE_KEPT if k in tr.capture}
    cap["contents"] = False
    if not ground_truth:
        cap["ground_truth"] = False
    old_hash = tr.capture.get("hash") if isinstance(tr.capture.get("hash"), dict) else {}
    cap["hash"] = {"algorithm": f"keyed BLAKE2b-64 of the capture's {old_hash.get('algorithm', 'hash')}",
                   "keyed": True, "key_fingerprint": key_fp, "key_source": "redact"}
    if isinstance(tr.capture.get("sample_hash"), dict):
        sh = dict(tr.capture["sample_hash"])
        sh["redacted"] = "values put through a keyed 32-bit Feistel permutation (the zero page's checksum kept)"
        cap["sample_hash"] = sh
    cap["redacted"] = {
        "ksmtrace_version": __version__,
        "names": "comm kept, cmdline dropped" if names else "comm and cmdline replaced by proc-N",
        "what": "hashes re-keyed; PFNs -> frame classes; addresses, pids, start times remapped in order; "
                "cgroups, uids, paths labelled; times shifted; hostname, command line, targets, summary and "
                "kernel events (faults, ksm_events) dropped",
    }
    extra: dict[str, Any] = {}
    v = tr.manifest.get("validate")
    if isinstance(v, dict):
        v = dict(v)
        if isinstance(v.get("run_start_ns"), int):
            v["run_start_ns"] = v["run_start_ns"] + m.t_shift
        extra["validate"] = v
    cov = tr.manifest.get("coverage")
    if isinstance(cov, list):
        extra["coverage"] = [{k: c.get(k) for k in ("proc", "rss_pages", "captured_pages", "ratio")}
                             for c in cov if isinstance(c, dict)]
    return host, cap, extra


def key_fingerprint(key: bytes) -> str:
    """Names a redaction key without revealing it (as the capture's key_fingerprint)."""
    return hashlib.blake2b(b"ksmtrace redact key", key=_subkey(key, "fingerprint"), digest_size=8).hexdigest()


def _current(t: pa.Table, name: str) -> pa.Table:
    """A table of an older format version in the current schema: columns a later version added
    are null (e.g. ``ksm.ksmd_wait_ns`` of a version-1 trace)."""
    want = S.SCHEMAS[name]
    for f in want:
        if f.name not in t.column_names:
            t = t.append_column(f, pa.nulls(t.num_rows, f.type))
    return t.select(want.names).cast(want)


def redact(src: str | os.PathLike | Trace, dst: str | os.PathLike, *, key: bytes | None = None, names: bool = True,
           ground_truth: bool = True, progress=None) -> Trace:
    """Write a redacted copy of ``src`` to ``dst`` (a new or empty directory) and return it opened.

    ``key``: the secret for the re-keyed hashes and the random maps (default: fresh random bytes,
    never stored); ``names``: keep ``comm`` (command lines are always dropped), else ``proc-N``;
    ``ground_truth``: keep the host's KSM samples (``ksm``, ``ksm_stat``; fidelity needs them)."""
    from ksmtrace.progress import make

    prog = make(progress)
    tr = src if isinstance(src, Trace) else open_trace(src)
    key = key or secrets.token_bytes(32)
    if len(key) < 16:
        raise TraceError("redact: the key must hold at least 16 bytes")
    m = _build_maps(tr, key, names)
    host, cap, extra = _manifest(tr, m, key_fingerprint(key), names, ground_truth)
    pschema = tr._schema("pages")
    w = TraceWriter(dst, host=host, capture=cap, tracer=dict(tr.manifest.get("tracer") or {}), command_line=[],
                    pages_schema=pschema)
    try:
        for s, e in enumerate(tr.snapshots):
            tables = {"pages": _pages(tr.read_table("pages", [s]).to_arrow().cast(pschema), m)}
            for name, fn in (("processes", lambda t: _processes(t, m, names)), ("vmas", lambda t: _vmas(t, m)),
                             ("ksm", lambda t: _ksm(t, m)), ("ksm_stat", lambda t: _ksm_stat(t, m))):
                if name in tr._log.files[s] and (ground_truth or name not in ("ksm", "ksm_stat")):
                    tables[name] = fn(_current(tr.read_table(name, [s]).to_arrow(), name))
            stats = {k: e[k] for k in ("processes", "pages", "present", "new", "changed", "gone") if k in e}
            stats["wall"] = None  # the writer's wall-clock time of this copy: not kept either
            w.commit_snapshot(s, int(e["t_ns"]) + m.t_shift, int(e.get("t_end_ns") or e["t_ns"]) + m.t_shift, tables,
                              keyframe=bool(e.get("keyframe")), stats=stats)
            prog(s + 1, tr.n_snapshots, "redact")
        snaps = [{"snap": x["snap"], "t_ns": x["t_ns"], "t_end_ns": x["t_end_ns"], "keyframe": x["keyframe"]}
                 for x in w.committed]
        w.manifest.pop("created", None)  # a wall-clock time: not kept
        w.close(tr.meta.end_reason or "redacted copy of an unfinished capture", snapshots=snaps, **extra)
    except BaseException:
        w.abandon()  # an unfinished copy stays marked unfinished
        raise
    return open_trace(Path(dst))
