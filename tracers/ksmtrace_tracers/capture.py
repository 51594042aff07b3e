"""The capture: :class:`Capture` takes one snapshot on demand; :func:`run_capture` is the CLI loop.

>>> from ksmtrace_tracers.capture import Capture, CaptureOptions
>>> with Capture("out-trace", [pid], CaptureOptions(scope="mergeable")) as cap:
...     cap.snapshot()          # snapshot 0 (a keyframe)
...     step_the_workload()
...     cap.snapshot()          # snapshot 1: only pages that appeared, changed or vanished
>>> # the trace is closed (manifest complete, end_reason "closed") when the block ends

One snapshot, per target process (see ``docs/capture.md``):

1. /proc/PID/stat, status, cmdline, cgroup; /proc/PID/smaps (VMAs and VmFlags) -> VMAs in scope;
2. /proc/PID/pagemap for those VMAs (in 64 Ki-entry chunks; only present or swapped entries are
   kept), then /proc/kpageflags for the present PFNs (root);
3. the contents of present pages only (never a swapped or non-present page; pages mapping the
   kernel zero page are known to be zero and not read): process_vm_readv for exclusively mapped
   non-KSM pages, /proc/PID/mem for the others (a read-only pin of a shared anonymous page would
   make the kernel unshare it — see :mod:`ksmtrace_tracers.pvr`); each page hashed with the keyed
   xxh3_64;
4. with soft-dirty, /proc/PID/clear_refs = 4 (while still frozen);
5. the delta against the previous snapshot of the same process (or a keyframe), committed
   atomically with the processes, vmas, ksm, ksm_stat (and contents) tables.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ksmtrace.errors import CaptureError
from ksmtrace.progress import ProgressFn, make as make_progress
from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace.trace.writer import TraceWriter, default_host_facts, dir_bytes
from ksmtrace_tracers import TRACER_NAME, TRACER_VERSION
from ksmtrace_tracers import groundtruth as GT
from ksmtrace_tracers import ksmsysfs
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers import procinfo as P
from ksmtrace_tracers.hashing import PageHasher, key_fingerprint, load_or_create_key, new_key
from ksmtrace_tracers.procmaps import SCOPES, Vma, classify, read_smaps
from ksmtrace_tracers.reading import ContentStore, PageReader
from ksmtrace_tracers.targets import Member, TargetSet, TargetSpec

PAGE = 4096
_PM_CHUNK = 1 << 16
_KEEP = PM.PM_PRESENT | PM.PM_SWAP


@dataclass
class CaptureOptions:
    """Everything a capture can be told.  ``output`` and ``targets`` may instead be given to
    :class:`Capture` directly."""

    output: str | os.PathLike | None = None
    targets: Any = None  # TargetSpec, a pid, or pids
    interval: float = 1.0  # seconds between snapshot starts (run_capture)
    duration: float | None = None  # run_capture: stop after this many seconds
    count: int | None = None  # run_capture: stop after this many snapshots
    scope: str = "anon"  # mergeable | anon | all
    freeze: bool = False
    fingerprints: bool = False
    contents: bool = False
    hash_key: str | os.PathLike | None = None  # key file shared across hosts
    key: int | None = None  # an explicit key (library use; never stored)
    keyframe_every: int = 0
    ksm_sample_interval: float | None = None
    soft_dirty: bool = True  # use soft-dirty when the kernel has it
    ground_truth: bool = True  # sample the real KSM when /sys/kernel/mm/ksm exists
    workers: int = 0
    allow_pvr: bool = True  # False: /proc/PID/mem only
    command_line: list[str] | None = None
    hold_frozen_s: float = 0.0  # test hook: stay frozen this long after reading (env KSMTRACE_TEST_HOLD_FROZEN)

    def validate(self) -> None:
        if not (self.interval > 0):
            raise CaptureError(f"--interval must be > 0 (got {self.interval})")
        if self.duration is not None and not (self.duration >= 0):
            raise CaptureError(f"--duration must be >= 0 (got {self.duration})")
        if self.count is not None and self.count < 1:
            raise CaptureError(f"--count must be >= 1 (got {self.count})")
        if self.scope not in SCOPES:
            raise CaptureError(f"--scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if self.keyframe_every < 0:
            raise CaptureError(f"--keyframe-every must be >= 0 (got {self.keyframe_every})")
        if self.ksm_sample_interval is not None and not (self.ksm_sample_interval > 0):
            raise CaptureError(f"--ksm-sample-interval must be > 0 (got {self.ksm_sample_interval})")
        if self.workers < 0:
            raise CaptureError(f"--workers must be >= 0 (got {self.workers})")


@dataclass
class _Proc:
    """What the capture remembers about one process incarnation between snapshots."""

    proc: int
    pid: int
    start_ticks: int
    state: dict[str, np.ndarray] | None = None  # page state at the last committed snapshot
    info: dict[str, Any] = field(default_factory=dict)  # last processes-table row


@dataclass
class _Read:
    """One process read in one snapshot."""

    member: Member
    status: str  # ok | partial | denied | exited
    info: dict[str, Any] = field(default_factory=dict)
    vmas: list[Vma] = field(default_factory=list)
    vma_captured: np.ndarray | None = None
    state: dict[str, np.ndarray] | None = None
    ksm_stat: dict[str, Any] | None = None
    present: int = 0
    read_pages: int = 0
    zero_page: int = 0
    bytes_read: int = 0


def _empty_state(extra: tuple[str, ...]) -> dict[str, np.ndarray]:
    st = {
        "vpn": np.zeros(0, np.uint64),
        "hash": np.zeros(0, np.uint64),
        "flags": np.zeros(0, np.uint32),
        "pfn": np.zeros(0, np.uint64),
    }
    for k in extra:
        st[k] = np.zeros(0, np.uint32)
    return st


def host_capabilities() -> dict[str, Any]:
    """What this host lets a capture see (recorded in the manifest, shown by ``info``)."""
    kpf = PM.KpageflagsReader()
    caps = {
        "root": os.geteuid() == 0,
        "pfn_readable": PM.pfn_readable(),
        "kpageflags_readable": kpf.readable,
        "soft_dirty": PM.soft_dirty_available(),
        "ksm_available": ksmsysfs.available(),
    }
    kpf.close()
    return caps


class Capture:
    """A capture in progress: one trace directory, snapshots taken on demand.

    ``Capture(output, targets, options)``: ``targets`` is a :class:`TargetSpec`, a pid or a list
    of pids.  Raises :class:`~ksmtrace.errors.TargetError` when a target does not exist or
    nothing matches, :class:`~ksmtrace.errors.CaptureError` for a bad option or output.
    """

    def __init__(
        self,
        output: str | os.PathLike | None = None,
        targets: Any = None,
        options: CaptureOptions | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> None:
        opts = options or CaptureOptions()
        if output is not None:
            opts = replace(opts, output=output)
        if targets is not None:
            opts = replace(opts, targets=targets)
        if opts.hold_frozen_s == 0.0 and os.environ.get("KSMTRACE_TEST_HOLD_FROZEN"):
            opts = replace(opts, hold_frozen_s=float(os.environ["KSMTRACE_TEST_HOLD_FROZEN"]))
        opts.validate()
        if opts.output is None:
            raise CaptureError("no output directory given (-o DIR)")
        if opts.targets is None:
            raise CaptureError("no targets: give --pid, --name, --tree, --cgroup or --all")
        self.options = opts
        self.output = Path(opts.output)
        self.progress = make_progress(progress)
        self.closed = False
        self.end_reason: str | None = None
        self.pool = None
        self.freezer = None
        self.sampler: GT.KsmSampler | None = None
        self.kpf: PM.KpageflagsReader | None = None
        self.writer: TraceWriter | None = None
        try:
            self._setup()
        except BaseException:
            self._release()
            raise

    # --- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        opts = self.options
        out = self.output
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CaptureError(f"{out}: output exists and is not an empty directory")
        self.spec = TargetSpec.of(opts.targets)
        self.targets = TargetSet(self.spec)
        self.targets.first()

        # host facts and what we can see
        self.kpf = PM.KpageflagsReader()
        self.pfn_readable = PM.pfn_readable()
        self.zero_pfn = PM.zero_pfn() if self.pfn_readable else None
        self.sd_available = PM.soft_dirty_available()
        self.sd_enabled = self.sd_available and opts.soft_dirty
        self.ksm_available = ksmsysfs.available()
        self.gt_enabled = self.ksm_available and opts.ground_truth

        # the key: never stored; the manifest keeps its fingerprint only
        if opts.key is not None:
            key, source = int(opts.key) & ((1 << 64) - 1), "given"
        elif opts.hash_key is not None:
            key, created = load_or_create_key(opts.hash_key)
            source = "file (created)" if created else "file"
        else:
            key, source = new_key(), "random"
        self.hasher = PageHasher(key, opts.fingerprints)
        self.extra_cols: tuple[str, ...] = ()
        if opts.fingerprints:
            self.extra_cols = ("sample",) + tuple(f.name for f in S.PREFIX_FIELDS)
        self.pages_schema = S.pages_schema(sample=opts.fingerprints, prefixes=opts.fingerprints)

        # processes first (fork before any thread or the watchdog exists)
        if opts.workers > 0 and not opts.contents:
            from ksmtrace_tracers.workers import WorkerPool

            self.pool = WorkerPool(opts.workers, key, opts.fingerprints, allow_pvr=opts.allow_pvr)
        self.reader = PageReader(self.hasher, allow_pvr=opts.allow_pvr)
        self.contents = ContentStore() if opts.contents else None
        if opts.freeze:
            from ksmtrace_tracers.freeze import Freezer

            self.freezer = Freezer()
        if self.gt_enabled:
            self.sampler = GT.KsmSampler(opts.ksm_sample_interval)
        if self.pool is not None:
            self.targets.helpers.update(self.pool.pids)
        if self.freezer is not None and self.freezer.watchdog_pid is not None:
            self.targets.helpers.add(self.freezer.watchdog_pid)

        host = default_host_facts()
        host.update(
            root=os.geteuid() == 0,
            pfn_readable=self.pfn_readable,
            kpageflags_readable=self.kpf.readable,
            soft_dirty=self.sd_available,
            ksm_available=self.ksm_available,
            ksm=ksmsysfs.read_files() if self.ksm_available else None,
        )
        capture = {
            "scope": opts.scope,
            "interval_s": opts.interval,
            "duration_s": opts.duration,
            "count": opts.count,
            "targets": self.spec.describe(),
            "fixed_targets": self.spec.fixed,
            "freeze": opts.freeze,
            "soft_dirty": self.sd_enabled,
            "fingerprints": opts.fingerprints,
            "contents": opts.contents,
            "keyframe_every": opts.keyframe_every,
            "ground_truth": self.gt_enabled,
            "ksm_sample_interval_s": opts.ksm_sample_interval if self.gt_enabled else None,
            "workers": opts.workers if self.pool is not None else 0,
            "read_methods": "process_vm_readv (exclusive non-KSM pages), /proc/PID/mem (others)"
            if opts.allow_pvr
            else "/proc/PID/mem",
            "hash": {
                "algorithm": "xxh3_64",
                "keyed": True,
                "key_fingerprint": key_fingerprint(key),
                "key_source": source,
            },
        }
        if opts.fingerprints:
            capture["sample_hash"] = {
                "algorithm": "pksm",
                "words": 64,
                "init": "0xdeadbeef",
                "steps": "h += w; h += h << 8; h ^= h >> 12 (u32)",
                "offsets": "first 64 of a keyed Fisher-Yates permutation of 1024 word offsets",
                "zero_page": f"0x{self.hasher.zero_sample:08x}",
            }
            capture["prefix_lengths"] = list(S.PREFIX_LENGTHS)
        self.writer = TraceWriter(
            self.output,
            host=host,
            capture=capture,
            tracer={"name": TRACER_NAME, "version": TRACER_VERSION, "module": "ksmtrace_tracers.procfs"},
            command_line=list(opts.command_line) if opts.command_line is not None else list(sys.argv),
            pages_schema=self.pages_schema,
        )
        self._reserve = self.output / RESERVE_FILE
        _make_reserve(self._reserve)
        if self.sampler is not None:
            self.sampler.start()

        self._procs: dict[tuple[int, int], _Proc] = {}
        self._next_proc = 0
        self.totals = {
            "snapshots": 0,
            "page_snapshots": 0,
            "present_snapshots": 0,
            "pages_read": 0,
            "bytes_read": 0,
            "rows": 0,
            "seconds": 0.0,
            "read_seconds": 0.0,
            "pause_ns_max": 0,
            "pause_ns_total": 0,
        }
        self.coverage: dict[int, dict[str, Any]] = {}
        self.denied: set[int] = set()
        self.last_stats: dict[str, Any] | None = None

    # --- one process --------------------------------------------------------------------------
    def _read_process(self, m: Member) -> _Read:
        t_read = time.monotonic_ns()
        pid = m.pid
        st = P.read_stat(pid)
        if st is None or st.start_ticks != m.start_ticks or st.zombie:
            return _Read(m, "exited")
        status = P.read_status(pid)
        info = {
            "pid": pid,
            "ppid": st.ppid,
            "start_ticks": st.start_ticks,
            "comm": st.comm,
            "cmdline": P.read_cmdline(pid) or "",
            "cgroup": P.read_cgroup(pid) or "",
            "uid": status.uid if status else 0,
            "rss_pages": status.rss_pages if status else 0,
            "anon_pages": status.anon_pages if status else 0,
            "t_read_ns": t_read,
        }
        ksm_stat = P.read_ksm_stat(pid) if self.ksm_available else None
        try:
            vmas = read_smaps(pid)
        except (FileNotFoundError, ProcessLookupError):
            return _Read(m, "exited")
        except PermissionError:
            return _Read(m, "denied", info=info, ksm_stat=ksm_stat)
        except OSError:
            if not _alive(m):
                return _Read(m, "exited")
            return _Read(m, "denied", info=info, ksm_stat=ksm_stat)
        classify(vmas, self.options.scope)
        scope_vmas = [(i, v) for i, v in enumerate(vmas) if v.in_scope]
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return _Read(m, "exited")
        except PermissionError:
            return _Read(m, "denied", info=info, vmas=vmas, ksm_stat=ksm_stat)
        except OSError:
            return _Read(m, "exited" if not _alive(m) else "denied", info=info, vmas=vmas, ksm_stat=ksm_stat)
        vpn_parts: list[np.ndarray] = []
        pm_parts: list[np.ndarray] = []
        vi_parts: list[np.ndarray] = []
        chunk = np.empty(_PM_CHUNK, np.uint64)
        try:
            for i, v in scope_vmas:
                base = v.start_vpn
                for lo in range(0, v.pages, _PM_CHUNK):
                    n = min(_PM_CHUNK, v.pages - lo)
                    buf = PM.read_pagemap(fd, base + lo, n, out=chunk[:n])
                    keep = np.flatnonzero(buf & _KEEP)
                    if len(keep):
                        vpn_parts.append(keep.astype(np.uint64) + np.uint64(base + lo))
                        pm_parts.append(buf[keep])
                        vi_parts.append(np.full(len(keep), i, np.int32))
        finally:
            os.close(fd)
        if vpn_parts:
            vpn = np.concatenate(vpn_parts)
            pm = np.concatenate(pm_parts)
            vi = np.concatenate(vi_parts)
        else:
            vpn, pm, vi = np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int32)
        d = PM.decode(pm)
        present, swapped, file_ = d["present"], d["swapped"], d["file"]
        pfn = d["pfn"]
        n = len(vpn)

        # kpageflags of the present PFNs
        kflags = np.zeros(n, np.uint64)
        kok = np.zeros(n, bool)
        if self.pfn_readable and self.kpf is not None and self.kpf.readable and n:
            pi = np.flatnonzero(present & (pfn != 0))
            if len(pi):
                kf, ok = self.kpf.read(pfn[pi])
                kflags[pi] = kf
                kok[pi] = ok
        zero_page = present & kok & PM.kpf_bit(kflags, PM.KPF_ZERO_PAGE)
        if self.zero_pfn is not None:
            zero_page |= present & (pfn == np.uint64(self.zero_pfn))
        ksm = kok & PM.kpf_bit(kflags, PM.KPF_KSM)
        thp = kok & PM.kpf_bit(kflags, PM.KPF_THP)
        vma_private = np.array([v.private for v in vmas], bool)
        vma_merge = np.array([v.mergeable for v in vmas], bool)
        priv = vma_private[vi] if len(vmas) else np.zeros(n, bool)
        anon = np.where(kok, PM.kpf_bit(kflags, PM.KPF_ANON) | zero_page, ~file_) & (priv | kok)
        anon |= zero_page & priv
        if self.options.scope != "all":
            keep = anon | (swapped & ~file_ & priv)
            if not keep.all():
                sel = np.flatnonzero(keep)
                vpn, pm, vi, kflags, kok = vpn[sel], pm[sel], vi[sel], kflags[sel], kok[sel]
                d = {k: a[sel] for k, a in d.items()}
                zero_page, ksm, thp, anon = zero_page[sel], ksm[sel], thp[sel], anon[sel]
                present, swapped, file_, pfn = d["present"], d["swapped"], d["file"], d["pfn"]
                n = len(vpn)

        # contents: present pages that do not map the zero page
        rd = np.flatnonzero(present & ~zero_page)
        use_pvr = d["exclusive"][rd] & ~ksm[rd]
        if self.pool is not None and self.pool.worth_it(len(rd)):
            res = self.pool.read(pid, vpn[rd], use_pvr)
        else:
            res = self.reader.read(pid, vpn[rd], use_pvr, self.contents)
        if res.gone:
            return _Read(m, "exited")
        if res.denied:
            return _Read(m, "denied", info=info, vmas=vmas, ksm_stat=ksm_stat)
        failed = np.zeros(n, bool)
        failed[rd] = res.failed
        drop = np.zeros(n, bool)
        if res.failed.any():
            # a page that failed because it was unmapped meanwhile is simply not there any more
            drop = self._vanished(pid, vpn, failed)
        if not _alive(m):
            return _Read(m, "exited")

        hashes = np.zeros(n, np.uint64)
        hashes[rd] = res.hash
        hashes[zero_page] = np.uint64(self.hasher.zero_hash)
        flags = np.zeros(n, np.uint32)
        flags |= np.where(present, S.F_PRESENT, 0).astype(np.uint32)
        flags |= np.where(swapped, S.F_SWAPPED, 0).astype(np.uint32)
        flags |= np.where(d["exclusive"], S.F_EXCLUSIVE, 0).astype(np.uint32)
        flags |= np.where(file_, S.F_FILE, 0).astype(np.uint32)
        if self.sd_enabled:
            flags |= np.where(d["soft_dirty"], S.F_SOFT_DIRTY, 0).astype(np.uint32)
        zero_filled = (present & ~failed & (hashes == np.uint64(self.hasher.zero_hash))) | zero_page
        flags |= np.where(zero_filled, S.F_ZERO_FILLED, 0).astype(np.uint32)
        flags |= np.where(anon, S.F_ANON, 0).astype(np.uint32)
        flags |= np.where(thp, S.F_THP, 0).astype(np.uint32)
        flags |= np.where(ksm, S.F_KSM, 0).astype(np.uint32)
        flags |= np.where(zero_page, S.F_ZERO_PAGE, 0).astype(np.uint32)
        if len(vmas):
            flags |= np.where(vma_merge[vi], S.F_MERGEABLE, 0).astype(np.uint32)
        if self.pfn_readable:
            flags |= np.where(present, S.F_PFN, 0).astype(np.uint32)
        flags |= np.where(kok, S.F_KPF, 0).astype(np.uint32)
        flags |= np.where(failed, S.F_READ_FAILED, 0).astype(np.uint32)
        pfn_col = np.where(present, pfn, np.uint64(0)) if self.pfn_readable else np.zeros(n, np.uint64)
        state = {"vpn": vpn, "hash": hashes, "flags": flags, "pfn": pfn_col.astype(np.uint64)}
        if self.options.fingerprints:
            samp = np.zeros(n, np.uint32)
            samp[rd] = res.sample
            samp[zero_page] = np.uint32(self.hasher.zero_sample)
            state["sample"] = samp
            for ln in S.PREFIX_LENGTHS:
                a = np.zeros(n, np.uint32)
                a[rd] = res.pfx[ln]  # type: ignore[index]
                a[zero_page] = np.uint32(self.hasher.zero_prefix[ln])
                state[f"pfx{ln}"] = a
        if self.contents is not None and zero_page.any():
            self.contents.add(self.hasher.zero_hash, bytes(PAGE))
        if drop.any():
            keep_idx = np.flatnonzero(~drop)
            state = {k: v[keep_idx] for k, v in state.items()}
            vi = vi[keep_idx]
            present = present[keep_idx]
            failed = failed[keep_idx]
        captured_vma = np.bincount(vi[present], minlength=len(vmas)) if len(vmas) else np.zeros(0, np.int64)
        info["captured_pages"] = int(present.sum())
        info["mergeable"] = bool(vma_merge.any()) or bool(ksm_stat and ksm_stat.get("ksm_merge_any"))
        info["merge_any"] = bool(ksm_stat and ksm_stat.get("ksm_merge_any"))
        return _Read(
            m,
            "partial" if failed.any() else "ok",
            info=info,
            vmas=vmas,
            vma_captured=captured_vma,
            state=state,
            ksm_stat=ksm_stat,
            present=int(present.sum()),
            read_pages=len(rd),
            zero_page=int(zero_page.sum()),
            bytes_read=res.bytes_read,
        )

    @staticmethod
    def _vanished(pid: int, vpn: np.ndarray, failed: np.ndarray) -> np.ndarray:
        """Failed pages that are no longer present (unmapped mid-read): to be dropped."""
        drop = np.zeros(len(vpn), bool)
        idx = np.flatnonzero(failed)
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            drop[idx] = True
            return drop
        try:
            fv = vpn[idx]
            starts = np.concatenate(([0], np.flatnonzero(np.diff(fv.astype(np.int64)) != 1) + 1))
            ends = np.concatenate((starts[1:], [len(fv)]))
            for s, e in zip(starts.tolist(), ends.tolist()):
                pm = PM.read_pagemap(fd, int(fv[s]), e - s)
                drop[idx[s:e]] = (pm & PM.PM_PRESENT) == 0
        finally:
            os.close(fd)
        return drop

    # --- one snapshot ---------------------------------------------------------------------------
    def _proc_for(self, m: Member) -> _Proc:
        p = self._procs.get(m.key)
        if p is None:
            p = _Proc(self._next_proc, m.pid, m.start_ticks)
        return p

    def snapshot(self) -> dict[str, Any]:
        """Take and commit one snapshot; returns its statistics.

        Raises CaptureError when the disk is full (the snapshot is discarded; the trace keeps
        every earlier one)."""
        if self.closed or self.writer is None:
            raise CaptureError("the capture is closed")
        opts = self.options
        snap = len(self.writer.committed)
        keyframe = snap == 0 or (opts.keyframe_every > 0 and snap % opts.keyframe_every == 0)
        t0 = time.monotonic_ns()
        if self.sampler is not None:
            self.sampler.add(self.sampler.sample())
        members = self.targets.resolve()
        reads: list[_Read] = []
        pause_ns = 0
        t_freeze = 0
        try:
            if self.freezer is not None:
                t_freeze = time.monotonic_ns()
                self.freezer.freeze(members, [m.cgroup_dir for m in members if m.cgroup_dir])
            for m in members:
                r = self._read_process(m)
                reads.append(r)
                if self.sd_enabled and r.status in ("ok", "partial"):
                    _clear_soft_dirty(m.pid)
            if self.freezer is not None and opts.hold_frozen_s > 0:
                time.sleep(opts.hold_frozen_s)
        finally:
            if self.freezer is not None:
                self.freezer.thaw()
                pause_ns = time.monotonic_ns() - t_freeze
        t_read_end = time.monotonic_ns()
        if self.sampler is not None:  # ground truth as of the pages just read (a write during the reads is in both)
            self.sampler.add(self.sampler.sample())

        # --- tables -------------------------------------------------------------------------
        page_parts: list[dict[str, np.ndarray]] = []
        proc_rows: list[dict[str, Any]] = []
        vma_cols: dict[str, list] = {name: [] for name in S.VMAS_SCHEMA.names}
        ksm_stat_rows: list[dict[str, Any]] = []
        new_states: dict[tuple[int, int], tuple[_Proc, dict[str, np.ndarray] | None, dict[str, Any]]] = {}
        seen_keys: set[tuple[int, int]] = set()
        n_new = n_changed = n_gone = 0
        pages_now = present_now = read_pages = zero_pages = bytes_read = 0
        exited_pids: list[int] = []
        next_proc = self._next_proc
        for r in reads:
            m = r.member
            if r.status == "exited":
                continue  # handled below with every other vanished process (if known)
            p = self._procs.get(m.key)
            if p is None:
                p = _Proc(next_proc, m.pid, m.start_ticks)
                next_proc += 1
            seen_keys.add(m.key)
            cur = r.state if r.state is not None else _empty_state(self.extra_cols)
            prev = p.state
            dl = _delta(prev, cur, self.sd_enabled)
            rows = D.rows_for(snap, p.proc, m.pid, prev, cur, dl, keyframe, self.extra_cols)
            page_parts.append(rows)
            n_new += len(dl.new)
            n_changed += len(dl.changed)
            n_gone += len(dl.gone)
            pages_now += len(cur["vpn"])
            present_now += r.present
            read_pages += r.read_pages
            zero_pages += r.zero_page
            bytes_read += r.bytes_read
            info = dict(r.info) if r.info else dict(p.info)
            if not info:
                info = {"pid": m.pid, "ppid": 0, "start_ticks": m.start_ticks, "comm": m.comm, "cmdline": "", "cgroup": "", "uid": 0, "rss_pages": 0, "anon_pages": 0, "t_read_ns": t0}
            info.setdefault("captured_pages", 0)
            info.setdefault("mergeable", False)
            info.setdefault("merge_any", False)
            proc_rows.append(dict(info, snap=snap, proc=p.proc, state=r.status))
            if r.status == "denied":
                self.denied.add(m.pid)
            for v, cap_n in zip(r.vmas, (r.vma_captured if r.vma_captured is not None else [0] * len(r.vmas))):
                vma_cols["snap"].append(snap)
                vma_cols["proc"].append(p.proc)
                vma_cols["pid"].append(m.pid)
                vma_cols["start"].append(v.start)
                vma_cols["end"].append(v.end)
                vma_cols["perms"].append(v.perms)
                vma_cols["flags"].append(v.flags)
                vma_cols["vmflags"].append(" ".join(v.vmflags))
                vma_cols["path"].append(v.path)
                vma_cols["rss_pages"].append(v.rss_kb // 4)
                vma_cols["anon_pages"].append(v.anon_kb // 4)
                vma_cols["captured_pages"].append(int(cap_n))
            if r.ksm_stat is not None:
                row = {"snap": snap, "t_ns": t_read_end, "proc": p.proc, "pid": m.pid}
                for k in S.KSM_STAT_FIELDS:
                    v = r.ksm_stat.get(k)
                    row[k] = v if isinstance(v, int) and not isinstance(v, bool) else None
                row["ksm_merge_any"] = r.ksm_stat.get("ksm_merge_any")
                row["ksm_mergeable"] = r.ksm_stat.get("ksm_mergeable")
                ksm_stat_rows.append(row)
            new_states[m.key] = (p, cur, info)
        # processes that vanished (exited, or no longer selected): every page is gone
        for key, p in self._procs.items():
            if key in seen_keys:
                continue
            prev = p.state
            if prev is not None and len(prev["vpn"]):
                empty = _empty_state(self.extra_cols)
                dl = D.diff(prev, empty)
                page_parts.append(D.rows_for(snap, p.proc, p.pid, prev, empty, dl, False, self.extra_cols))
                n_gone += len(dl.gone)
            info = dict(p.info)
            info.update(rss_pages=0, anon_pages=0, captured_pages=0, t_read_ns=t0)
            proc_rows.append(dict(info, snap=snap, proc=p.proc, state="exited"))
            exited_pids.append(p.pid)

        tables: dict[str, pa.Table] = {
            "pages": _pages_table(page_parts, self.pages_schema),
            "processes": pa.Table.from_pylist(proc_rows, schema=S.PROCESSES_SCHEMA),
            "vmas": pa.table(vma_cols, schema=S.VMAS_SCHEMA),
        }
        ksm_rows: list[dict[str, Any]] = []
        if self.sampler is not None:
            ksm_rows = self.sampler.take()
            tables["ksm"] = pa.Table.from_pylist([dict(r, snap=snap) for r in ksm_rows], schema=S.KSM_SCHEMA)
            tables["ksm_stat"] = pa.Table.from_pylist(ksm_stat_rows, schema=S.KSM_STAT_SCHEMA)
        if self.contents is not None:
            keys, datas = self.contents.take()
            tables["contents"] = pa.table(
                {
                    "snap": pa.array(np.full(len(keys), snap, np.uint32)),
                    "hash": pa.array(np.array(keys, dtype=np.uint64)),
                    "data": pa.array(datas, type=pa.binary()),
                },
                schema=S.CONTENTS_SCHEMA,
            )
        stats = {
            "processes": len(new_states),
            "pages": pages_now,
            "present": present_now,
            "read_pages": read_pages,
            "zero_page": zero_pages,
            "new": n_new,
            "changed": n_changed,
            "gone": n_gone,
            "exited": exited_pids,
            "bytes_read": bytes_read,
            "read_ns": t_read_end - t0,
            "pause_ns": pause_ns,
        }
        try:
            entry = self.writer.commit_snapshot(snap, t0, t_read_end, tables, keyframe=keyframe, stats=stats)
        except OSError as exc:
            if self.contents is not None:
                self.contents.discard()
            if self.sampler is not None:
                self.sampler.give_back(ksm_rows)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CaptureError(
                    f"{self.output}: disk full ({exc.strerror}) while writing snapshot {snap}; "
                    f"the trace keeps the {snap} complete snapshot(s)"
                ) from None
            raise CaptureError(f"{self.output}: cannot write snapshot {snap}: {exc.strerror or exc}") from None
        except BaseException:
            if self.contents is not None:
                self.contents.discard()
            if self.sampler is not None:
                self.sampler.give_back(ksm_rows)
            raise
        # committed: remember the new states
        if self.contents is not None:
            self.contents.commit()
        self._next_proc = next_proc
        for key in [k for k in self._procs if k not in seen_keys]:
            del self._procs[key]
        for key, (p, cur, info) in new_states.items():
            p.state = cur
            p.info = {k: v for k, v in info.items()}
            self._procs[key] = p
            self.coverage[p.proc] = {
                "proc": p.proc,
                "pid": p.pid,
                "comm": info.get("comm", ""),
                "rss_pages": int(info.get("rss_pages", 0)),
                "captured_pages": int(info.get("captured_pages", 0)),
            }
        rows = int(tables["pages"].num_rows)
        seconds = (time.monotonic_ns() - t0) / 1e9
        tt = self.totals
        tt["snapshots"] += 1
        tt["page_snapshots"] += pages_now
        tt["present_snapshots"] += present_now
        tt["pages_read"] += read_pages
        tt["bytes_read"] += bytes_read
        tt["rows"] += rows
        tt["seconds"] += seconds
        tt["read_seconds"] += (t_read_end - t0) / 1e9
        tt["pause_ns_max"] = max(tt["pause_ns_max"], pause_ns)
        tt["pause_ns_total"] += pause_ns
        out = dict(stats, snap=snap, keyframe=keyframe, rows=rows, seconds=seconds, t_ns=t0, t_end_ns=t_read_end,
                   bytes=sum(f["bytes"] for f in entry["files"].values()))
        self.last_stats = out
        return out

    # --- end -------------------------------------------------------------------------------------
    @property
    def n_snapshots(self) -> int:
        return len(self.writer.committed) if self.writer is not None else 0

    def all_targets_gone(self) -> bool:
        return self.targets.all_gone()

    def summary(self) -> dict[str, Any]:
        tt = self.totals if hasattr(self, "totals") else {}
        size = dir_bytes(self.output)
        present = tt.get("present_snapshots", 0)
        secs = tt.get("seconds", 0.0)
        return {
            "output": str(self.output),
            "snapshots": self.n_snapshots,
            "end_reason": self.end_reason,
            "processes": len(self.coverage),
            "pages": tt.get("page_snapshots", 0),
            "present_pages": present,
            "pages_read": tt.get("pages_read", 0),
            "page_rows": tt.get("rows", 0),
            "bytes_read": tt.get("bytes_read", 0),
            "trace_bytes": size,
            "bytes_per_page_snapshot": (size / tt["page_snapshots"]) if tt.get("page_snapshots") else None,
            "capture_seconds": secs,
            "gib_per_s": (present * PAGE / 2**30 / secs) if secs > 0 else None,
            "pages_per_s": (present / secs) if secs > 0 else None,
            "max_pause_ms": tt.get("pause_ns_max", 0) / 1e6 if self.options.freeze else None,
            "fixed_targets": self.spec.fixed if hasattr(self, "spec") else None,
            "soft_dirty": getattr(self, "sd_enabled", False),
            "denied_pids": sorted(getattr(self, "denied", ())),
        }

    def close(self, reason: str = "closed") -> dict[str, Any]:
        """Finish the trace (manifest: complete, end_reason, coverage, snapshot list) and release
        everything (targets resumed, watchdog and workers stopped).  Idempotent."""
        if self.closed:
            return self.summary()
        old = None
        try:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        except (ValueError, OSError):
            pass
        try:
            self.closed = True
            self.end_reason = reason
            self._release(keep_writer=True)
            if self.writer is not None:
                try:
                    os.unlink(self._reserve)  # room for the final manifest, even on a full disk
                except (OSError, AttributeError):
                    pass
                summary = self.summary()
                full = dict(
                    coverage=[
                        dict(c, ratio=(c["captured_pages"] / c["rss_pages"]) if c["rss_pages"] else None)
                        for c in sorted(self.coverage.values(), key=lambda c: c["proc"])
                    ],
                    snapshots=[
                        {"snap": e["snap"], "t_ns": e["t_ns"], "t_end_ns": e["t_end_ns"], "keyframe": e["keyframe"]}
                        for e in self.writer.committed
                    ],
                    summary={k: v for k, v in summary.items() if k not in ("output", "trace_bytes", "bytes_per_page_snapshot")},
                )
                try:
                    self.writer.update_manifest(complete=True, end_reason=reason, **full)
                except OSError:
                    try:  # the snapshot list is also in snapshots.jsonl: drop it if space is short
                        self.writer.manifest.pop("snapshots", None)
                        self.writer.update_manifest(complete=True, end_reason=reason, coverage=full["coverage"])
                    except OSError:
                        pass  # snapshots.jsonl alone still makes a valid trace
            return self.summary()
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _release(self, keep_writer: bool = False) -> None:
        if self.freezer is not None:
            try:
                self.freezer.close()
            finally:
                self.freezer = None
        if self.sampler is not None:
            self.sampler.stop()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.kpf is not None:
            self.kpf.close()
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.close()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("closed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close(f"error: {exc_type.__name__}: {exc}")


# --- helpers -----------------------------------------------------------------------------------
def _alive(m: Member) -> bool:
    st = P.read_stat(m.pid)
    return st is not None and st.start_ticks == m.start_ticks and not st.zombie


RESERVE_FILE = ".reserve"
RESERVE_BYTES = 128 * 1024


def _make_reserve(path: Path) -> None:
    """A private placeholder file deleted at close, so the final manifest can be written even
    when the disk filled up during the capture."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
    finally:
        os.close(fd)


def _clear_soft_dirty(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except OSError:
        pass


def _delta(prev: dict[str, np.ndarray] | None, cur: dict[str, np.ndarray], soft_dirty: bool) -> D.Delta:
    """The delta of one process.  Flags are compared without the soft-dirty bit; with soft-dirty,
    a page whose bit is set was written in the interval and is a CHANGED row even if its hash and
    other flags are the same (F_SOFT_DIRTY in a row means "written since the previous snapshot")."""
    if prev is None:
        return D.diff(None, cur)
    sd = np.uint32(S.F_SOFT_DIRTY)
    if len(prev["vpn"]) == len(cur["vpn"]) and np.array_equal(prev["vpn"], cur["vpn"]):
        differs = (prev["hash"] != cur["hash"]) | (((prev["flags"] ^ cur["flags"]) & ~sd) != 0) | (prev["pfn"] != cur["pfn"])
        if soft_dirty:
            differs |= (cur["flags"] & sd) != 0
        e = np.zeros(0, np.int64)
        return D.Delta(new=e, changed=np.flatnonzero(differs), gone=e, same=np.flatnonzero(~differs))
    p2 = {"vpn": prev["vpn"], "hash": prev["hash"], "pfn": prev["pfn"], "cmp": prev["flags"] & ~sd}
    c2 = {"vpn": cur["vpn"], "hash": cur["hash"], "pfn": cur["pfn"], "cmp": cur["flags"] & ~sd}
    dl = D.diff(p2, c2, compare=("hash", "cmp", "pfn"))
    if soft_dirty and len(dl.same):
        dirty = (cur["flags"][dl.same] & sd) != 0
        if dirty.any():
            dl = D.Delta(dl.new, np.sort(np.concatenate((dl.changed, dl.same[dirty]))), dl.gone, dl.same[~dirty])
    return dl


def _pages_table(parts: list[dict[str, np.ndarray]], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        dt = f.type.to_pandas_dtype()
        arrs = [p[f.name] for p in parts if f.name in p and len(p[f.name])]
        a = np.concatenate(arrs).astype(dt, copy=False) if arrs else np.zeros(0, dt)
        cols[f.name] = pa.array(a, type=f.type)
    return pa.table(cols, schema=schema)


# --- the loop ------------------------------------------------------------------------------------
class CaptureAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: abandon the snapshot in progress."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def run_capture(
    options: CaptureOptions,
    progress: ProgressFn | None = None,
    *,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Capture snapshots every ``options.interval`` seconds until ``count``/``duration`` is reached,
    fixed targets are all gone, or SIGINT/SIGTERM arrives; return the summary.

    The first SIGINT/SIGTERM finishes the snapshot in progress and ends the capture; a second one
    discards the snapshot in progress.  Either way the trace is valid and its manifest says why it
    ended.  ``summary["exit_status"]`` is 0, or 128+signal when a signal cut short a capture that
    had a --count or --duration.  A full disk raises CaptureError after closing the trace.
    """
    prog = make_progress(progress)
    signals: list[int] = []
    stop = threading.Event()
    cap_box: list[Capture] = []

    def handler(signum, frame):
        signals.append(signum)
        stop.set()
        if len(signals) >= 2:
            if cap_box and cap_box[0].freezer is not None:
                cap_box[0].freezer.thaw()
            raise CaptureAborted(signum)

    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {}
    if in_main:
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, handler)
    try:
        cap = Capture(options=options, progress=prog)
        cap_box.append(cap)
        opts = cap.options
        reason = None
        exit_status = 0
        try:
            t_start = None
            k = 0
            while True:
                if stop.is_set():
                    break
                st = cap.snapshot()
                if t_start is None:
                    t_start = st["t_ns"] / 1e9
                k += 1
                if on_snapshot is not None:
                    on_snapshot(st)
                gib = st["present"] * PAGE / 2**30
                rate = gib / st["seconds"] if st["seconds"] > 0 else 0.0
                prog(k, opts.count or 0, f"snapshot {k}: {st['present']:,} pages, {st['rows']:,} rows, {rate:.2f} GiB/s")
                if opts.count is not None and k >= opts.count:
                    reason = f"count reached ({k} snapshots)"
                    break
                if cap.spec.fixed and cap.all_targets_gone():
                    reason = "all targets exited"
                    break
                now = time.monotonic()
                j = int((now - t_start) / opts.interval) + 1
                next_t = t_start + j * opts.interval
                if opts.duration is not None and next_t - t_start > opts.duration + 1e-6:
                    reason = f"duration reached ({opts.duration:g} s)"
                    break
                if stop.wait(max(0.0, next_t - time.monotonic())):
                    break
            if reason is None and signals:
                reason = ("interrupted" if signals[0] == signal.SIGINT else "terminated") + f" ({_SIGNAL_NAMES.get(signals[0], signals[0])})"
                if opts.count is not None or opts.duration is not None:
                    exit_status = 128 + signals[0]
            summary = cap.close(reason or "stopped")
        except CaptureAborted as exc:
            name = _SIGNAL_NAMES.get(exc.signum, str(exc.signum))
            reason = ("interrupted" if signals[0] == signal.SIGINT else "terminated") + f" ({name} twice; the snapshot in progress was discarded)"
            summary = cap.close(reason)
            exit_status = 128 + signals[0]
        except CaptureError as exc:
            cap.close(f"error: {exc}")
            raise
        except BaseException as exc:
            cap.close(f"error: {type(exc).__name__}: {exc}")
            raise
    finally:
        if in_main:
            for s, h in old_handlers.items():
                signal.signal(s, h)
    if summary["snapshots"] == 0 and exit_status == 0:
        exit_status = 128 + (signals[0] if signals else 1)
    summary["exit_status"] = exit_status
    summary["all_targets_exited"] = reason == "all targets exited"
    return summary
