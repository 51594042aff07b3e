"""``doctor``: why memory is not merging, class by class, with what fixing each would unlock.

>>> from ksmtrace.analysis.doctor import doctor
>>> dx = doctor("my-trace")
>>> print(dx.text())

Every page of the trace is put in one class by its flags (``docs/trace-format.md``: ``F_MERGEABLE``,
``F_ANON``, ``F_FILE``, ``F_ZERO_PAGE``, ``F_THP``, ``F_SWAPPED``, ``F_HUGETLB``, ``F_READ_FAILED``,
the frame number) and, for file-flagged pages, by their VMA (a shared anonymous or shmem mapping
is told from a file by the vmas table).  The **candidates** are what ksmd scans: present private
anonymous pages of mergeable VMAs (the ``recorded`` scope).  For each class that KSM does not
merge, **unlock** is the saving fixing it would add: the oracle's saving (a perfect dedup, on
physical frames, as :mod:`ksmtrace.analysis.breakdown` counts) of the candidates *plus* that
class, minus that of the candidates alone — the frames the class's duplicates would free, with
each other and with what is already mergeable.  Mean over the snapshots examined, and at the last.
The candidates' saving and the ``not_mergeable`` class come from the replay's own prepared
arrays (``recorded`` and ``anon`` scopes), so they agree with every other command; the other
classes are differences of the same count made on the page rows.

Classes (each with the usual fix):

* ``not_mergeable`` — private anonymous memory whose VMA is not marked mergeable (no
  ``madvise(MADV_MERGEABLE)``, no ``prctl(PR_SET_MEMORY_MERGE)``);
* ``shared_anon`` — shared anonymous or shmem/memfd mappings: KSM never scans shared mappings;
* ``file`` — page-cache pages of files: not KSM's to merge;
* ``too_young`` — candidates whose content is younger than two full scans at the given scan rate:
  ksmd cannot have seen them unchanged twice (its checksum gate) before they change or go;
* ``thp`` (within the candidates) — merged only after KSM splits their huge page;
* ``fork_shared`` — pages already sharing one frame through fork: nothing more to save;
* ``zero_page`` — pages mapping the kernel's zero page: they use no memory;
* ``swapped``, ``hugetlb``, ``read_failed`` — contents not recorded: counted, not priced.

What a trace cannot tell (pinned pages, memory outside the capture's scope, processes not traced)
is listed separately, with the resident memory the vmas table shows where there is one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import polars as pl

from ksmtrace.analysis.breakdown import _n_distinct
from ksmtrace.analysis.measures import MIB_PER_FRAME, finite
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make
from ksmtrace.trace import schema as S

MAX_SNAPSHOTS = 40
KERNEL_SCAN = {"pages_to_scan": 100, "sleep_millisecs": 20}
SHARED_PATHS = ("/memfd:", "/dev/shm/", "/SYSV", "[anon_shmem]", "/dev/zero")

CLASSES: dict[str, dict[str, str]] = {
    "not_mergeable": {
        "title": "private anonymous memory not marked mergeable",
        "fix": "opt in: madvise(MADV_MERGEABLE) on the range, or prctl(PR_SET_MEMORY_MERGE, 1) for the whole process "
               "(Linux 6.4+); QEMU -machine mem-merge=on (libvirt: no <nosharepages/>); systemd MemoryKSM=yes",
    },
    "shared_anon": {
        "title": "shared anonymous / shmem / memfd mappings (KSM never scans shared mappings)",
        "fix": "use private memory where sharing is not needed: QEMU memory-backend-memfd/file share=off (shared=off), "
               "MAP_PRIVATE instead of MAP_SHARED; vhost-user and similar need shared memory and cannot be merged",
    },
    "file": {
        "title": "file pages (page cache): not KSM's to merge",
        "fix": "none through KSM: equal files share the page cache only if they are the same file (reflinks, "
               "overlay/container image layers, virtiofs/DAX for guests)",
    },
    "too_young": {
        "title": "mergeable, but younger than two full scans",
        "fix": "scan faster (pages_to_scan up, sleep_millisecs down, or the scan-time advisor) at a CPU cost: "
               "ksmtrace advise; pages that change or go sooner than that cannot be merged by any scan rate",
    },
    "thp": {
        "title": "mergeable pages in transparent huge pages (merged only after KSM splits the huge page)",
        "fix": "nothing to unlock: KSM splits the THP to merge a 4 KiB part of it (losing the huge page); "
               "MADV_NOHUGEPAGE on the range avoids the split if merging matters more than THP",
    },
    "fork_shared": {
        "title": "pages already sharing one frame through fork (counted once; nothing more to save)",
        "fix": "none needed; a write breaks the sharing (a COW copy) and the copy is then a candidate",
    },
    "zero_page": {
        "title": "pages mapping the kernel's zero page (use no memory; hash-only counts overcount them)",
        "fix": "none needed",
    },
    "swapped": {
        "title": "swapped-out pages (not scanned until swapped in; contents not recorded)",
        "fix": "none: ksmd scans them once they are back in memory",
    },
    "hugetlb": {
        "title": "hugetlbfs pages (never scanned by KSM; contents not recorded)",
        "fix": "back the memory with THP or 4 KiB pages instead of hugetlbfs if merging matters more",
    },
    "read_failed": {
        "title": "present pages whose contents could not be read at capture",
        "fix": "recapture (the process changed its mappings during the read, or denied access)",
    },
}
#: classes whose duplicates fixing would unlock (the others are information)
UNLOCKABLE = ("not_mergeable", "shared_anon", "file", "too_young")


@dataclass
class Diagnosis:
    trace_name: str
    trace_path: str
    capture_scope: str | None
    snapshots_examined: list[int]
    scan: dict[str, Any]  # pages_to_scan / sleep_millisecs the too_young class assumes, and where from
    candidates: dict[str, Any]  # what ksmd scans now: pages, MiB, the oracle's saving
    findings: list[dict[str, Any]]
    processes: list[dict[str, Any]]  # per process: mergeable VMAs? merge_any?
    host: dict[str, Any]  # KSM on the traced host
    cannot_tell: list[str]
    outside_scope: list[dict[str, Any]]  # resident memory the capture did not record, from the vmas table

    def finding(self, cls: str) -> dict[str, Any] | None:
        return next((f for f in self.findings if f["class"] == cls), None)

    def to_json(self) -> dict[str, Any]:
        clean = lambda d: {k: finite(v) for k, v in d.items()}  # noqa: E731
        return {
            "trace": self.trace_name, "trace_path": self.trace_path, "capture_scope": self.capture_scope,
            "snapshots_examined": self.snapshots_examined, "scan": self.scan, "candidates": clean(self.candidates),
            "findings": [clean(f) for f in self.findings], "processes": self.processes, "host": self.host,
            "cannot_tell": self.cannot_tell, "outside_scope": [clean(o) for o in self.outside_scope],
            "definitions": DEFINITIONS,
        }

    def text(self) -> str:
        return format_diagnosis(self)


DEFINITIONS = {
    "candidates": "present private anonymous pages of mergeable VMAs: what ksmd scans",
    "unlock": "oracle saving (perfect dedup, physical frames) of the candidates plus the class, minus that of the "
              "candidates alone: the frames the class's duplicates would free; mean over the snapshots examined",
    "pages": "pages of the class, mean over the snapshots examined (MiB: x 4 KiB)",
}


def _saved(cid: np.ndarray, frame: np.ndarray) -> int:
    """Frames a perfect dedup frees among these pages: frames in use minus distinct non-zero contents."""
    if cid.size == 0:
        return 0
    return _n_distinct(frame) - _n_distinct(cid[cid != 0])


def _scan_settings(tr, pages_to_scan: int | None, sleep_millisecs: int | None) -> dict[str, Any]:
    from ksmtrace.fidelity.groundtruth import as_captured

    src = "the kernel's defaults"
    base = dict(KERNEL_SCAN)
    try:
        cap = as_captured(tr)
    except KsmtraceError:
        cap = None
    if cap is not None:
        for k in base:
            if k in cap.params:
                base[k] = int(cap.params[k])
        src = "the real KSM's settings during the capture"
    if pages_to_scan is not None:
        base["pages_to_scan"] = int(pages_to_scan)
        src = "as given"
    if sleep_millisecs is not None:
        base["sleep_millisecs"] = int(sleep_millisecs)
        src = "as given"
    if base["pages_to_scan"] < 1 or base["sleep_millisecs"] < 0:
        raise KsmtraceError("doctor: pages_to_scan must be >= 1 and sleep_millisecs >= 0")
    base["source"] = src
    base["pages_per_second"] = base["pages_to_scan"] * 1000.0 / max(base["sleep_millisecs"], 1)
    return base


class _Vmas:
    """Shared-or-file verdicts for (proc, vpn) from one snapshot's vmas table."""

    def __init__(self, df: pl.DataFrame) -> None:
        self.by_proc: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if df.height == 0:
            return
        df = df.with_columns(
            (((pl.col("flags") & S.V_SHARED) != 0) &
             (((pl.col("flags") & S.V_ANON) != 0) | pl.col("path").str.starts_with("/memfd:") |
              pl.col("path").str.starts_with("/dev/shm/") | pl.col("path").str.starts_with("/SYSV") |
              pl.col("path").str.starts_with("[anon_shmem]") | pl.col("path").str.starts_with("/dev/zero"))
             ).alias("shared_anon")).sort("proc", "start")
        for (p,), g in df.group_by(["proc"], maintain_order=True):
            self.by_proc[int(p)] = ((g["start"].to_numpy() >> 12).astype(np.int64), (g["end"].to_numpy() >> 12).astype(np.int64),
                                    g["shared_anon"].to_numpy())

    def shared_anon(self, procs: np.ndarray, vpns: np.ndarray) -> np.ndarray:
        out = np.zeros(len(procs), dtype=bool)
        for p in np.unique(procs):
            t = self.by_proc.get(int(p))
            if t is None:
                continue
            sel = np.flatnonzero(procs == p)
            starts, ends, sh = t
            i = np.searchsorted(starts, vpns[sel], side="right") - 1
            ok = (i >= 0) & (vpns[sel] < ends[np.clip(i, 0, len(ends) - 1)])
            out[sel[ok]] = sh[i[ok]]
        return out


def doctor(trace, *, pages_to_scan: int | None = None, sleep_millisecs: int | None = None,
           max_snapshots: int = MAX_SNAPSHOTS, progress: ProgressFn | None = None) -> Diagnosis:
    """Diagnose ``trace`` (a path, sample name or Trace).  ``pages_to_scan``/``sleep_millisecs``: the
    scan rate the ``too_young`` class assumes (default: the real KSM's during the capture, else the
    kernel's defaults).  Examines every snapshot, or ``max_snapshots`` evenly spaced ones (the last
    always among them)."""
    from ksmtrace.samples import resolve_trace
    from ksmtrace.trace.reader import Trace, open_trace

    tr = trace if isinstance(trace, Trace) else open_trace(resolve_trace(trace))
    prog = make(progress)
    n = tr.n_snapshots
    if n <= max_snapshots:
        wanted = list(range(n))
    else:
        wanted = sorted({int(round(x)) for x in np.linspace(0, n - 1, max_snapshots)})
    scan = _scan_settings(tr, pages_to_scan, sleep_millisecs)
    times = np.asarray(tr.times_s, dtype=float)
    rows_all = _rows_with_real_ksm_zero(tr)
    rec, anon = tr.prepare("recorded"), tr.prepare("anon")
    state: pl.DataFrame | None = None
    per_snap: list[dict[str, Any]] = []
    wanted_set = set(wanted)
    for s in range(n):
        rows = rows_all.filter(pl.col("snap") == s)
        live = rows.filter(pl.col("op") != S.OP_GONE).drop("op", "snap")
        if state is None:
            # pages present at the first snapshot: their age is unknown, so they count as old
            state = live.with_columns(pl.lit(-1, dtype=pl.Int64).alias("since"))
        else:
            touched = rows.select("proc", "vpn")
            old = state.join(touched, on=["proc", "vpn"], how="semi").select("proc", "vpn", pl.col("hash").alias("h0"),
                                                                                pl.col("since").alias("s0"))
            new = live.join(old, on=["proc", "vpn"], how="left").with_columns(
                pl.when(pl.col("h0").is_not_null() & (pl.col("h0") == pl.col("hash"))).then(pl.col("s0"))
                .otherwise(pl.lit(s, dtype=pl.Int64)).alias("since")).drop("h0", "s0")
            state = pl.concat([state.join(touched, on=["proc", "vpn"], how="anti"), new])
        if s in wanted_set:
            vm = tr.read_table("vmas", [s], ["proc", "start", "end", "flags", "path"]) if tr.has_table("vmas") else \
                pl.DataFrame(schema={"proc": pl.Int64, "start": pl.UInt64, "end": pl.UInt64, "flags": pl.UInt32, "path": pl.String})
            row = _classify(state, _Vmas(vm.with_columns(pl.col("proc").cast(pl.Int64))), times, s, scan)
            # what ksmd scans, and all private anonymous memory: exactly as the replay counts them
            row["candidates"] = int(rec.base_pages[s])
            row["candidate_saved"] = int(rec.oracle_saved[s])
            row["pages"]["not_mergeable"] = int(anon.base_pages[s] - rec.base_pages[s])
            row["unlock"]["not_mergeable"] = int(anon.oracle_saved[s] - rec.oracle_saved[s])
            per_snap.append(row)
        prog(s + 1, n, f"snapshot {s + 1}/{n}")
    if not per_snap:
        raise KsmtraceError(f"{tr.path}: no snapshot to examine")
    return _diagnosis(tr, per_snap, wanted, scan)


def _rows_with_real_ksm_zero(tr) -> pl.DataFrame:
    """Every page row (no keyframe SAME rows), with a page that maps the zero page only because the
    real KSM put it there during the capture turned back into the zero-filled page it stands for
    (the rule the replay's prepare applies, ``prepare._real_ksm_zero_merges``: otherwise the
    memory those pages stand for would vanish from every count)."""
    from ksmtrace.trace.prepare import _real_ksm_zero_merges
    from ksmtrace.trace.prepared import dense_pair_ids

    rows = tr.read_table("pages", columns=["snap", "proc", "vpn", "op", "hash", "flags", "pfn"])
    rows = rows.filter(pl.col("op") != S.OP_SAME).with_columns(
        pl.col("proc").cast(pl.Int64), pl.col("vpn").cast(pl.Int64), pl.col("snap").cast(pl.Int64))
    if rows.height == 0:
        return rows
    f = rows["flags"].to_numpy().astype(np.int64)
    op = rows["op"].to_numpy()
    present = (op != S.OP_GONE) & ((f & S.F_PRESENT) != 0) & ((f & S.F_SWAPPED) == 0)
    zp = (f & S.F_ZERO_PAGE) != 0
    cand = present & ((f & S.F_ANON) != 0) & ~zp & ((f & S.F_HUGETLB) == 0) & ((f & S.F_MERGEABLE) != 0)
    pg, _ = dense_pair_ids(rows["proc"].to_numpy(), rows["vpn"].to_numpy(), ordered=True)
    kz = _real_ksm_zero_merges(tr, pg, rows["snap"].to_numpy(), f, cand, present & zp & ((f & S.F_MERGEABLE) != 0))
    if kz is None or not kz.any():
        return rows
    fixed = np.where(kz, (f & ~S.F_ZERO_PAGE & ~S.F_PFN) | S.F_ZERO_FILLED, f)
    return rows.with_columns(pl.Series("flags", fixed.astype(np.uint32)))


def _classify(state: pl.DataFrame, vmas: _Vmas, times: np.ndarray, s: int, scan: dict[str, Any]) -> dict[str, Any]:
    f = state["flags"].to_numpy().astype(np.int64)
    h = state["hash"].to_numpy().view(np.int64) if state["hash"].dtype == pl.UInt64 else state["hash"].to_numpy().astype(np.int64)
    pfn = state["pfn"].to_numpy().astype(np.int64)
    proc = state["proc"].to_numpy()
    vpn = state["vpn"].to_numpy()
    since = state["since"].to_numpy()
    has = lambda bit: (f & bit) != 0  # noqa: E731
    present = has(S.F_PRESENT) & ~has(S.F_SWAPPED)
    zp = has(S.F_ZERO_PAGE)
    huge = has(S.F_HUGETLB)
    bad = has(S.F_READ_FAILED)
    zero = has(S.F_ZERO_FILLED)
    anon = has(S.F_ANON)
    usable = present & ~zp & ~huge
    cand = usable & anon & has(S.F_MERGEABLE)  # unreadable pages too: each a content of its own
    not_merg = usable & anon & ~has(S.F_MERGEABLE)
    other = usable & ~anon & ~bad
    shared = np.zeros(len(f), dtype=bool)
    if other.any():
        shared[other] = vmas.shared_anon(proc[other], vpn[other])
    file_pages = other & ~shared
    shared_pages = other & shared
    # content ids: 0 = all-zero; frames: (pfn, content) when the frame is real and not a real-KSM page
    uniq = np.arange(len(f), dtype=np.int64)
    cid = np.where(h == 0, 1, h)  # keep 0 for the zero content only
    cid = np.where(bad, -(uniq + 2), cid)  # an unreadable page equals nothing
    cid = np.where(zero & ~bad, 0, cid)
    real = has(S.F_PFN) & ~has(S.F_KSM) & (pfn != 0)
    # frame key: a real frame's pfn (negated, so it never collides with a row number), else the row
    frame = np.where(real, -(pfn + 1), uniq)
    t_s = float(times[s])
    full_scan_s = float(cand.sum()) / scan["pages_per_second"] if scan["pages_per_second"] > 0 else float("inf")
    reach_s = 2.0 * full_scan_s
    age = np.where(since < 0, np.inf, t_s - times[np.clip(since, 0, len(times) - 1)])
    young = cand & (age < reach_s)
    base = _saved(cid[cand], frame[cand])

    def unlock(extra: np.ndarray) -> int:
        m = cand | extra
        return _saved(cid[m], frame[m]) - base

    # fork-shared: real frames mapped by pages of more than one process
    fs = np.zeros(len(f), dtype=bool)
    if real.any():
        key = pl.DataFrame({"fr": frame[real], "p": proc[real]})
        multi = key.group_by("fr").agg(pl.col("p").n_unique().alias("np")).filter(pl.col("np") > 1)["fr"].to_numpy()
        fs[real] = np.isin(frame[real], multi)
    out = {
        "snap": s, "t_s": t_s, "candidates": int(cand.sum()), "candidate_saved": base,
        "full_scan_s": full_scan_s, "reach_s": reach_s,
        "pages": {
            "not_mergeable": int(not_merg.sum()), "shared_anon": int(shared_pages.sum()), "file": int(file_pages.sum()),
            "too_young": int(young.sum()), "thp": int((cand & has(S.F_THP)).sum()), "fork_shared": int((fs & (cand | not_merg)).sum()),
            "zero_page": int((present & zp).sum()), "swapped": int(has(S.F_SWAPPED).sum()), "hugetlb": int(huge.sum()),
            "read_failed": int((present & bad & anon).sum()),
        },
        "unlock": {
            "not_mergeable": unlock(not_merg), "shared_anon": unlock(shared_pages), "file": unlock(file_pages),
            "too_young": base - _saved(cid[cand & ~young], frame[cand & ~young]),
            "thp": base - _saved(cid[cand & ~has(S.F_THP)], frame[cand & ~has(S.F_THP)]),
        },
        "real_ksm_pages": int((cand & has(S.F_KSM)).sum()),
    }
    return out


def _diagnosis(tr, per_snap: list[dict[str, Any]], wanted: Sequence[int], scan: dict[str, Any]) -> Diagnosis:
    last = per_snap[-1]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    findings = []
    for cls, info in CLASSES.items():
        pages = [p["pages"][cls] for p in per_snap]
        if not any(pages):
            continue
        row: dict[str, Any] = {"class": cls, "title": info["title"], "fix": info["fix"],
                               "pages_mean": mean(pages), "pages_final": int(last["pages"][cls]),
                               "mib_mean": mean(pages) * MIB_PER_FRAME}
        if cls in last["unlock"]:
            u = [p["unlock"][cls] for p in per_snap]
            row.update({"unlock_frames_mean": mean(u), "unlock_frames_final": int(last["unlock"][cls]),
                        "unlock_mib_mean": mean(u) * MIB_PER_FRAME, "unlock_mib_final": last["unlock"][cls] * MIB_PER_FRAME,
                        "unlockable": cls in UNLOCKABLE})
        else:
            row.update({"unlock_frames_mean": None, "unlock_frames_final": None, "unlock_mib_mean": None,
                        "unlock_mib_final": None, "unlockable": False})
        findings.append(row)
    findings.sort(key=lambda r: (not r["unlockable"], -(r["unlock_frames_mean"] or 0.0), -r["pages_mean"]))
    cand = {
        "pages_mean": mean([p["candidates"] for p in per_snap]), "pages_final": last["candidates"],
        "mib_mean": mean([p["candidates"] for p in per_snap]) * MIB_PER_FRAME,
        "oracle_saved_mean": mean([p["candidate_saved"] for p in per_snap]),
        "oracle_saved_final": last["candidate_saved"],
        "oracle_mib_mean": mean([p["candidate_saved"] for p in per_snap]) * MIB_PER_FRAME,
        "full_scan_s_final": last["full_scan_s"], "reach_s_final": last["reach_s"],
        "real_ksm_pages_final": last["real_ksm_pages"],
    }
    return Diagnosis(
        trace_name=tr.name, trace_path=str(tr.path), capture_scope=tr.capture.get("scope"),
        snapshots_examined=list(wanted), scan=scan, candidates=cand, findings=findings,
        processes=_processes(tr), host=_host(tr), cannot_tell=_cannot_tell(tr), outside_scope=_outside_scope(tr))


def _processes(tr) -> list[dict[str, Any]]:
    if not tr.has_table("processes"):
        return []
    p = tr.read_table("processes", columns=["proc", "pid", "comm", "mergeable", "merge_any", "state", "anon_pages"])
    agg = (p.group_by("proc").agg(pl.col("pid").first(), pl.col("comm").first(), pl.col("mergeable").any(),
                                  pl.col("merge_any").any(), pl.col("anon_pages").max())
           .sort("proc"))
    return [{"proc": int(r["proc"]), "pid": int(r["pid"]), "comm": r["comm"], "mergeable": bool(r["mergeable"]),
             "merge_any": bool(r["merge_any"]), "anon_mib": int(r["anon_pages"] or 0) * MIB_PER_FRAME}
            for r in agg.iter_rows(named=True)]


def _host(tr) -> dict[str, Any]:
    h = tr.host or {}
    ksm = h.get("ksm") or {}
    out: dict[str, Any] = {"ksm_available": h.get("ksm_available"), "kernel": h.get("kernel_release"),
                           "thp_enabled": h.get("thp_enabled")}
    if ksm:
        out["run_at_start"] = ksm.get("run")
    if tr.has_ground_truth:
        try:
            g = tr.read_table("ksm", columns=["run"])["run"].drop_nulls()
            out["run_during_capture"] = sorted(set(int(x) for x in g.to_list()))
        except KsmtraceError:
            pass
    return out


def _cannot_tell(tr) -> list[str]:
    h = tr.host or {}
    cap = tr.capture or {}
    out = [
        "pinned pages (GUP: VFIO passthrough, RDMA, io_uring fixed buffers): pagemap and kpageflags do not show pins; "
        "KSM skips a page with extra references at merge time, and the replay assumes every merge succeeds",
        "memory of processes that were not traced, and the host's own (ksmd scans every mergeable process)",
    ]
    if not h.get("pfn_readable", True):
        out.append("fork sharing: the capture could not read frame numbers (no root), so pages shared by fork "
                   "look like separate frames and the savings count them twice")
    if not h.get("kpageflags_readable", True):
        out.append("THP, zero-page and real-KSM flags: the capture could not read /proc/kpageflags")
    if cap.get("scope") == "mergeable":
        out.append("memory outside mergeable VMAs: the capture's scope 'mergeable' recorded only what KSM scans; "
                   "recapture with --scope anon (or all) to price the not-mergeable, shared and file classes")
    elif cap.get("scope") == "anon":
        out.append("shared and file mappings: the capture's scope 'anon' recorded private mappings only; recapture "
                   "with --scope all to price them")
    out.append("hugetlbfs memory: never captured (its resident size is in the vmas table)")
    return out


def _outside_scope(tr) -> list[dict[str, Any]]:
    """Resident memory of VMAs the capture's scope did not record, by kind, at the last snapshot."""
    if not tr.has_table("vmas"):
        return []
    v = tr.read_table("vmas", [tr.n_snapshots - 1], ["flags", "vmflags", "path", "rss_pages", "anon_pages", "captured_pages"])
    if v.height == 0:
        return []
    v = v.filter((pl.col("flags") & S.V_IN_SCOPE) == 0)
    if v.height == 0:
        return []
    kind = (pl.when(pl.col("vmflags").str.contains(r"\bht\b")).then(pl.lit("hugetlb"))
            .when((pl.col("flags") & S.V_SHARED) != 0).then(pl.lit("shared mappings"))
            .when(((pl.col("flags") & S.V_FILE) != 0) & (pl.col("anon_pages") == 0)).then(pl.lit("file mappings"))
            .when((pl.col("flags") & S.V_MERGEABLE) != 0).then(pl.lit("mergeable (out of scope)"))
            .otherwise(pl.lit("private anonymous, not mergeable")))
    g = v.with_columns(kind.alias("kind")).group_by("kind").agg(pl.col("rss_pages").sum(), pl.col("anon_pages").sum(),
                                                                 pl.len().alias("vmas"))
    return [{"kind": r["kind"], "vmas": int(r["vmas"]), "rss_mib": int(r["rss_pages"]) * MIB_PER_FRAME,
             "anon_mib": int(r["anon_pages"]) * MIB_PER_FRAME}
            for r in g.sort("rss_pages", descending=True).iter_rows(named=True) if r["rss_pages"]]


# --- text ----------------------------------------------------------------------------------------
def _mib(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def format_diagnosis(d: Diagnosis) -> str:
    from ksmtrace.textfmt import table

    c = d.candidates
    lines = [f"doctor for trace {d.trace_name!r} (captured with scope {d.capture_scope or '?'}; "
             f"{len(d.snapshots_examined)} snapshots examined)"]
    h = d.host
    if h.get("ksm_available") is False:
        lines.append("the traced host has no KSM (/sys/kernel/mm/ksm missing: a kernel without CONFIG_KSM)")
    elif h.get("run_during_capture") is not None:
        runs = h["run_during_capture"]
        lines.append(f"KSM on the traced host: run={','.join(map(str, runs))} during the capture"
                     + ("" if 1 in runs else " (ksmd was not merging: echo 1 > /sys/kernel/mm/ksm/run)"))
    lines += [
        f"what ksmd scans now (present private anonymous pages of mergeable VMAs): {c['mib_mean']:,.1f} MiB on average; "
        f"a perfect dedup of it frees {c['oracle_mib_mean']:,.1f} MiB",
        f"scan rate assumed: pages_to_scan={d.scan['pages_to_scan']} every {d.scan['sleep_millisecs']} ms "
        f"({d.scan['source']})" + (f": a full scan of the last snapshot's candidates takes {c['full_scan_s_final']:,.1f} s"
                                   if c["pages_final"] else ": ksmd has nothing to scan at the last snapshot"),
        "",
    ]
    no_merge = [p for p in d.processes if not p["mergeable"] and not p["merge_any"]]
    if d.processes:
        if no_merge:
            names = ", ".join(f"{p['comm']} ({p['pid']})" for p in no_merge[:6]) + (" ..." if len(no_merge) > 6 else "")
            lines.append(f"{len(no_merge)} of {len(d.processes)} traced processes have no mergeable memory: {names}")
        else:
            lines.append(f"every one of the {len(d.processes)} traced processes has mergeable memory")
        lines.append("")
    unl = [f for f in d.findings if f["unlockable"]]
    info = [f for f in d.findings if not f["unlockable"]]
    if unl:
        lines.append("Why memory is not merging, and what fixing it would unlock (MiB; mean over the snapshots / at the last):")
        lines.append(table([{"class": f["class"], "memory": round(f["mib_mean"], 1),
                             "unlock": f"{_mib(f['unlock_mib_mean'])} / {_mib(f['unlock_mib_final'])}",
                             "what": f["title"]} for f in unl],
                           ["class", "memory", "unlock", "what"], {"memory": "memory (MiB)", "unlock": "unlock (MiB)"}))
        lines += ["", "Fixes:"] + [f"  {f['class']}: {f['fix']}" for f in unl]
    else:
        lines.append("No class of recorded memory holds duplicates that a fix would unlock.")
    if info:
        lines += ["", "Also in the trace (nothing to unlock, or contents not recorded):"]
        for f in info:
            extra = f"; {_mib(f['unlock_mib_mean'])} MiB of the saving sits in them" if f.get("unlock_mib_mean") else ""
            lines.append(f"  {f['class']}: {f['mib_mean']:,.1f} MiB — {f['title']}{extra}")
    if d.outside_scope:
        lines += ["", "Resident memory the capture did not record (vmas table, last snapshot):"]
        lines += [f"  {o['kind']}: {o['rss_mib']:,.1f} MiB in {o['vmas']} VMAs" for o in d.outside_scope]
    lines += ["", "What this trace cannot tell:"] + [f"  - {x}" for x in d.cannot_tell]
    lines += ["", "unlock = oracle saving of what ksmd scans plus the class, minus that of what it scans now: the frames "
                  "the class's duplicates would free (too_young: the part of today's saving in pages younger than two "
                  "full scans)."]
    return "\n".join(lines)
