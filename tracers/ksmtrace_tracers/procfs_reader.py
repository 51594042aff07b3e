"""The procfs reader: the recorder that reads the target processes' pages through /proc.

One snapshot, per target process (see ``docs/capture.md``):

1. /proc/PID/stat, status, cmdline, cgroup, ksm_stat; /proc/PID/smaps (VMAs and VmFlags) -> the
   VMAs in scope;
2. /proc/PID/pagemap for those VMAs (in 64 Ki-entry chunks; only present or swapped entries are
   kept), then /proc/kpageflags for the present PFNs (root);
3. the contents of present pages only (never a swapped or non-present page; pages mapping the
   kernel zero page are known to be zero and not read), read through /proc/PID/mem, which never
   pins a page (:mod:`ksmtrace_tracers.procmem`), each page hashed with the keyed hash (:mod:`.hashing`);
4. with soft-dirty, /proc/PID/clear_refs = 4 (while still frozen);
5. the delta against the previous snapshot of the same process (or a keyframe): the ``pages``,
   ``processes``, ``vmas`` (and ``ksm_stat``, ``contents``) tables of the snapshot; with
   ``--scope all`` also ``vma_files`` (device, inode and offset of every file VMA) and, on file
   pages, the page-cache bits F_DIRTY, F_WRITEBACK, F_ACTIVE from kpageflags.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ksmtrace.errors import TargetError
from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace_tracers import ksmsysfs
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers import procinfo as P
from ksmtrace_tracers.hashing import HASH_ALGORITHM, KEY_BITS, PageHasher, key_fingerprint, load_or_create_key, new_key
from ksmtrace_tracers.options import CaptureOptions
from ksmtrace_tracers.procmaps import Vma, classify, read_smaps
from ksmtrace_tracers.reading import ContentStore, PageReader
from ksmtrace_tracers.session import RecorderBase, SnapshotContext
from ksmtrace_tracers.targets import Member

PAGE = 4096
_PM_CHUNK = 1 << 16
_KEEP = PM.PM_PRESENT | PM.PM_SWAP


@dataclass
class _Proc:
    """What the reader remembers about one process incarnation between snapshots."""

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


def empty_state(extra: tuple[str, ...]) -> dict[str, np.ndarray]:
    st = {
        "vpn": np.zeros(0, np.uint64),
        "hash": np.zeros(0, np.uint64),
        "flags": np.zeros(0, np.uint32),
        "pfn": np.zeros(0, np.uint64),
    }
    for k in extra:
        st[k] = np.zeros(0, np.uint32)
    return st


class ProcfsReader(RecorderBase):
    """Reads every target's pages through /proc; writes ``pages``, ``processes``, ``vmas`` and,
    with ground truth, ``ksm_stat`` (and ``contents`` with ``--contents``)."""

    name = "procfs"

    def __init__(self, opts: CaptureOptions, ground_truth: bool, note=None) -> None:
        self.options = opts
        self.ground_truth = ground_truth
        self.pool = None
        self.kpf: PM.KpageflagsReader | None = PM.KpageflagsReader()
        self.pfn_readable = PM.pfn_readable()
        self.zero_pfn = PM.zero_pfn() if self.pfn_readable else None
        self.sd_available = PM.soft_dirty_available()
        self.sd_enabled = self.sd_available and opts.soft_dirty
        self.ksm_available = ksmsysfs.available()

        # the key: never stored; the manifest keeps its fingerprint only
        if opts.key is not None:
            key, self.key_source = int(opts.key) & ((1 << KEY_BITS) - 1), "given"
        elif opts.hash_key is not None:
            key, created = load_or_create_key(opts.hash_key, warn=note)
            self.key_source = "file (created)" if created else "file"
        else:
            key, self.key_source = new_key(), "random"
        self.key = key
        self.hasher = PageHasher(key, opts.fingerprints)
        self.extra_cols: tuple[str, ...] = ()
        if opts.fingerprints:
            self.extra_cols = ("sample",) + tuple(f.name for f in S.PREFIX_FIELDS) + tuple(f.name for f in S.STRENGTH_FIELDS)
        self.pages_schema = S.pages_schema(sample=opts.fingerprints, prefixes=opts.fingerprints, strengths=opts.fingerprints)
        if opts.workers > 0 and not opts.contents:
            from ksmtrace_tracers.workers import WorkerPool

            self.pool = WorkerPool(opts.workers, key, opts.fingerprints)
        self.reader = PageReader(self.hasher)
        self.contents = ContentStore() if opts.contents else None
        self._state: dict[tuple[int, int], _Proc] = {}
        self._reads: list[_Read] = []
        self._pending: dict[tuple[int, int], tuple[_Proc, dict[str, np.ndarray], dict[str, Any]]] = {}
        self.totals = {"page_snapshots": 0, "present_snapshots": 0, "pages_read": 0, "bytes_read": 0, "rows": 0}
        self.coverage: dict[int, dict[str, Any]] = {}
        #: the files the targets map in this snapshot (scope all): (dev, inode) -> (path, pid, start, end)
        self.mapped_files: dict[tuple[int, int], tuple[str, int, int, int]] = {}
        self.denied: set[int] = set()

    # --- the recorder hooks -------------------------------------------------------------------
    def manifest(self) -> dict[str, dict[str, Any]]:
        opts = self.options
        host = {
            "root": os.geteuid() == 0,
            "pfn_readable": self.pfn_readable,
            "kpageflags_readable": self.kpf is not None and self.kpf.readable,
            "soft_dirty": self.sd_available,
            "ksm_available": self.ksm_available,
            "ksm": ksmsysfs.read_files() if self.ksm_available else None,
        }
        capture: dict[str, Any] = {
            "scope": opts.scope,
            "soft_dirty": self.sd_enabled,
            "fingerprints": opts.fingerprints,
            "contents": opts.contents,
            "workers": opts.workers if self.pool is not None else 0,
            "read_methods": "/proc/PID/mem",
            "hash": {
                "algorithm": HASH_ALGORITHM,
                "keyed": True,
                "key_bits": KEY_BITS,
                "key_fingerprint": key_fingerprint(self.key),
                "key_source": self.key_source,
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
            capture["sample_strengths"] = list(S.SAMPLE_STRENGTHS)
            capture["strength_permutation"] = "the capture's (hash key): sample is strength 64"
        return {"host": host, "capture": capture}

    def check_targets(self, members: list[Member], session) -> None:
        """A target whose memory cannot be read is an error naming it when it was asked for by pid
        (--pid, --tree), or when no target can be read at all; otherwise a note (it is recorded
        with state ``denied`` and no pages)."""
        spec = session.spec
        denied = []
        for m in members:
            why = unreadable(m.pid)
            if why is None:
                continue
            if m.pid in spec.pids or m.pid in spec.trees:
                opt = "--pid" if m.pid in spec.pids else "--tree"
                raise TargetError(f"{opt} {m.pid}: cannot read the memory of {m.comm}: {why}")
            denied.append((m, why))
        if denied and len(denied) == len(members):
            m, why = denied[0]
            more = f" and {len(denied) - 1} more" if len(denied) > 1 else ""
            raise TargetError(f"cannot read the memory of any target: pid {m.pid} ({m.comm}){more}: {why}")
        if denied:
            pids = ", ".join(str(m.pid) for m, _ in denied[:10]) + (" ..." if len(denied) > 10 else "")
            session.note(f"cannot read the memory of {len(denied)} matching process(es) (pid {pids}): "
                         "recorded with state 'denied' and no pages")

    def start(self, session) -> None:
        if self.pool is not None:
            session.targets.helpers.update(self.pool.pids)

    def read(self, ctx: SnapshotContext) -> None:
        self._reads = []
        for m in ctx.members:
            r = self._read_process(m)
            self._reads.append(r)
            if self.sd_enabled and r.status in ("ok", "partial"):
                clear_soft_dirty(m.pid)

    def end(self, ctx: SnapshotContext) -> dict[str, pa.Table]:
        snap, keyframe = ctx.snap, ctx.keyframe
        page_parts: list[dict[str, np.ndarray]] = []
        proc_rows: list[dict[str, Any]] = []
        vma_cols: dict[str, list] = {name: [] for name in S.VMAS_SCHEMA.names}
        vf_cols: dict[str, list] = {name: [] for name in S.VMA_FILES_SCHEMA.names}
        self.mapped_files = {}
        ksm_stat_rows: list[dict[str, Any]] = []
        new_states: dict[tuple[int, int], tuple[_Proc, dict[str, np.ndarray], dict[str, Any]]] = {}
        n_new = n_changed = n_gone = 0
        pages_now = present_now = read_pages = zero_pages = bytes_read = 0
        exited_pids: list[int] = []
        for r in self._reads:
            m = r.member
            if r.status == "exited":
                continue  # handled below with every other vanished process (if known)
            proc = ctx.proc_for(m)
            p = self._state.get(m.key) or _Proc(proc, m.pid, m.start_ticks)
            cur = r.state if r.state is not None else empty_state(self.extra_cols)
            prev = p.state
            dl = page_delta(prev, cur, self.sd_enabled)
            page_parts.append(D.rows_for(snap, proc, m.pid, prev, cur, dl, keyframe, self.extra_cols))
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
                info = {"pid": m.pid, "ppid": 0, "start_ticks": m.start_ticks, "comm": m.comm, "cmdline": "", "cgroup": "",
                        "uid": 0, "rss_pages": 0, "anon_pages": 0, "t_read_ns": ctx.t0}
            info.setdefault("captured_pages", 0)
            info.setdefault("mergeable", False)
            info.setdefault("merge_any", False)
            proc_rows.append(dict(info, snap=snap, proc=proc, state=r.status))
            if r.status == "denied":
                self.denied.add(m.pid)
            for v, cap_n in zip(r.vmas, (r.vma_captured if r.vma_captured is not None else [0] * len(r.vmas))):
                vma_cols["snap"].append(snap)
                vma_cols["proc"].append(proc)
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
                if self.options.scope == "all" and v.in_scope and v.inode != 0 and v.flags & S.V_FILE:
                    vf_cols["snap"].append(snap)
                    vf_cols["proc"].append(proc)
                    vf_cols["pid"].append(m.pid)
                    vf_cols["start"].append(v.start)
                    vf_cols["end"].append(v.end)
                    vf_cols["dev"].append(v.dev)
                    vf_cols["inode"].append(v.inode)
                    vf_cols["pgoff"].append(v.offset)
                    self.mapped_files.setdefault((v.dev, v.inode), (v.path, m.pid, v.start, v.end))
            if r.ksm_stat is not None:
                row = {"snap": snap, "t_ns": ctx.t_read_end, "proc": proc, "pid": m.pid}
                for k in S.KSM_STAT_FIELDS:
                    v = r.ksm_stat.get(k)
                    row[k] = v if isinstance(v, int) and not isinstance(v, bool) else None
                row["ksm_merge_any"] = r.ksm_stat.get("ksm_merge_any")
                row["ksm_mergeable"] = r.ksm_stat.get("ksm_mergeable")
                ksm_stat_rows.append(row)
            new_states[m.key] = (_Proc(proc, m.pid, m.start_ticks), cur, info)
        # processes that vanished (exited, or no longer selected): every page is gone
        for key, p in self._state.items():
            if key in new_states:
                continue
            prev = p.state
            if prev is not None and len(prev["vpn"]):
                empty = empty_state(self.extra_cols)
                dl = D.diff(prev, empty)
                page_parts.append(D.rows_for(snap, p.proc, p.pid, prev, empty, dl, False, self.extra_cols))
                n_gone += len(dl.gone)
            info = dict(p.info)
            info.update(rss_pages=0, anon_pages=0, captured_pages=0, t_read_ns=ctx.t0)
            proc_rows.append(dict(info, snap=snap, proc=p.proc, state="exited"))
            exited_pids.append(p.pid)
        self._reads = []
        self._pending = new_states

        tables: dict[str, pa.Table] = {
            "pages": pages_table(page_parts, self.pages_schema),
            "processes": pa.Table.from_pylist(proc_rows, schema=S.PROCESSES_SCHEMA),
            "vmas": pa.table(vma_cols, schema=S.VMAS_SCHEMA),
        }
        if self.options.scope == "all":
            tables["vma_files"] = pa.table(vf_cols, schema=S.VMA_FILES_SCHEMA)
        if self.ground_truth:
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
        ctx.stats.update(
            processes=len(new_states),
            pages=pages_now,
            present=present_now,
            read_pages=read_pages,
            zero_page=zero_pages,
            new=n_new,
            changed=n_changed,
            gone=n_gone,
            exited=exited_pids,
            bytes_read=bytes_read,
        )
        self._rows = int(tables["pages"].num_rows)
        return tables

    def commit(self, ctx: SnapshotContext, ok: bool) -> None:
        pending, self._pending = self._pending, {}
        self._reads = []
        if not ok:
            if self.contents is not None:
                self.contents.discard()
            return
        if self.contents is not None:
            self.contents.commit()
        self._state = {}
        for key, (p, cur, info) in pending.items():
            p.state = cur
            p.info = dict(info)
            self._state[key] = p
            self.coverage[p.proc] = {
                "proc": p.proc,
                "pid": p.pid,
                "comm": info.get("comm", ""),
                "rss_pages": int(info.get("rss_pages", 0)),
                "captured_pages": int(info.get("captured_pages", 0)),
            }
        st = ctx.stats
        tt = self.totals
        tt["page_snapshots"] += st.get("pages", 0)
        tt["present_snapshots"] += st.get("present", 0)
        tt["pages_read"] += st.get("read_pages", 0)
        tt["bytes_read"] += st.get("bytes_read", 0)
        tt["rows"] += self._rows
        ctx.stats["rows"] = self._rows

    def state_of(self, key: tuple[int, int]) -> dict[str, np.ndarray] | None:
        """The committed page state of a process incarnation (vpn, hash, flags, pfn...)."""
        p = self._state.get(key)
        return p.state if p is not None else None

    def summary(self) -> dict[str, Any]:
        tt = self.totals
        return {
            "processes": len(self.coverage),
            "pages": tt["page_snapshots"],
            "present_pages": tt["present_snapshots"],
            "pages_read": tt["pages_read"],
            "page_rows": tt["rows"],
            "bytes_read": tt["bytes_read"],
            "soft_dirty": self.sd_enabled,
            "denied_pids": sorted(self.denied),
        }

    def close(self) -> dict[str, Any]:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.kpf is not None:
            self.kpf.close()
            self.kpf = None
        self.reader.close()
        return {
            "coverage": [
                dict(c, ratio=(c["captured_pages"] / c["rss_pages"]) if c["rss_pages"] else None)
                for c in sorted(self.coverage.values(), key=lambda c: c["proc"])
            ]
        }

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
            if not alive(m):
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
            return _Read(m, "exited" if not alive(m) else "denied", info=info, vmas=vmas, ksm_stat=ksm_stat)
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
        if self.pool is not None and self.pool.worth_it(len(rd)):
            res = self.pool.read(pid, vpn[rd])
        else:
            res = self.reader.read(pid, vpn[rd], self.contents)
        if res.gone:
            return _Read(m, "exited")
        if res.denied:
            return _Read(m, "denied", info=info, vmas=vmas, ksm_stat=ksm_stat)
        failed = np.zeros(n, bool)
        failed[rd] = res.failed
        drop = np.zeros(n, bool)
        if res.failed.any():
            # a page that failed because it was unmapped meanwhile is simply not there any more
            drop = vanished(pid, vpn, failed)
        if not alive(m):
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
        flags |= page_cache_flags(kflags, kok & file_ & ~anon)
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
            for k, strength in enumerate(S.SAMPLE_STRENGTHS):
                if strength == S.SAMPLE_WORDS:
                    continue  # the ``sample`` column
                a = np.zeros(n, np.uint32)
                a[rd] = res.strengths[:, k]  # type: ignore[index]
                a[zero_page] = self.hasher.zero_strengths[k]
                state[S.strength_column(strength)] = a
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


# --- helpers -----------------------------------------------------------------------------------
def unreadable(pid: int) -> str | None:
    """Why the memory of ``pid`` cannot be read (None: it can, or it is gone).  Opening
    /proc/PID/mem makes the kernel's ptrace access check (PTRACE_MODE_ATTACH)."""
    for name in ("pagemap", "mem"):
        try:
            fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return None
        except PermissionError:
            hint = "run as root" if os.geteuid() != 0 else "a security module (Yama, LSM) forbids it"
            return f"permission denied on /proc/{pid}/{name} ({hint}, or as the process's owner)"
        except OSError as exc:
            return f"/proc/{pid}/{name}: {exc.strerror}"
        os.close(fd)
    return None


def alive(m: Member) -> bool:
    st = P.read_stat(m.pid)
    return st is not None and st.start_ticks == m.start_ticks and not st.zombie


def vanished(pid: int, vpn: np.ndarray, failed: np.ndarray) -> np.ndarray:
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


def clear_soft_dirty(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except OSError:
        pass


def page_delta(prev: dict[str, np.ndarray] | None, cur: dict[str, np.ndarray], soft_dirty: bool) -> D.Delta:
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


def page_cache_flags(kflags: np.ndarray, file_page: np.ndarray) -> np.ndarray:
    """``F_DIRTY``, ``F_WRITEBACK``, ``F_ACTIVE`` of page-cache pages (``file_page``: file pages
    whose kpageflags were read) from their kpageflags.  Anonymous pages get none: their dirty and
    LRU bits say nothing about a file and would only churn the delta."""
    out = np.zeros(len(kflags), np.uint32)
    for bit, flag in ((PM.KPF_DIRTY, S.F_DIRTY), (PM.KPF_WRITEBACK, S.F_WRITEBACK), (PM.KPF_ACTIVE, S.F_ACTIVE)):
        out |= np.where(file_page & PM.kpf_bit(kflags, bit), flag, 0).astype(np.uint32)
    return out


def pages_table(parts: list[dict[str, np.ndarray]], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        dt = f.type.to_pandas_dtype()
        arrs = [p[f.name] for p in parts if f.name in p and len(p[f.name])]
        a = np.concatenate(arrs).astype(dt, copy=False) if arrs else np.zeros(0, dt)
        cols[f.name] = pa.array(a, type=f.type)
    return pa.table(cols, schema=schema)
