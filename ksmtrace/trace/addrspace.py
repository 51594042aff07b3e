"""Address spaces over time, from a trace's ``processes`` and ``vmas`` tables: who forked whom and
when, which VMAs descend from which (an approximation of anon_vma identity), and how many addresses
of mergeable VMAs hold no page (the holes a ksmd before 6.18 walks one by one).

Page ids, content and frames come from :mod:`ksmtrace.trace.prepare`; this module adds what the
page rows cannot say and some policies need:

* **fork families** — ``proc_parent`` (the incarnation whose pid is the child's ppid, alive when the
  child appeared), ``proc_family`` (the root of that tree within the trace) and ``proc_start_ns``
  (``/proc/PID/stat`` start time, in clock ticks since boot, on the trace's clock: snapshot times
  are CLOCK_MONOTONIC, which equals boot time on a host that never suspended);
* **VMA lineage groups** — the kernel's anon_vma is not in any file a capture can read, so it is
  approximated from what is: within one process, a VMA at snapshot *s* belongs to the same group as
  every VMA of snapshot *s−1* its address range overlaps (a VMA that grows, shrinks, is split by
  ``mprotect``/partial ``munmap`` or merged keeps its anon_vma; split halves share it); a child's VMA
  at its first snapshot that overlaps a VMA of its parent with the same path is a *clone* of it
  (``anon_vma_fork``: the child's VMA joins the parent's anon_vma tree), provided the parent's group
  had anonymous pages by then (a VMA without an anon_vma at fork is not linked).  The anon_vma tree
  of a group ("every VMA ``anon_vma_interval_tree_foreach`` visits") is then the group's own VMAs
  plus those of every group cloned from it, transitively.  Not modelled: an unmapped and re-mapped
  range at the same addresses is taken for the same VMA; ``find_mergeable_anon_vma`` (a new VMA
  reusing an adjacent VMA's anon_vma) is not seen; after ``exec`` a child shares nothing (its
  VMAs are linked only where they overlap the parent's with the same path).
* **holes** — for a ksmd that walks every 4 KiB address of each ``VM_MERGEABLE`` VMA with an
  anon_vma (``scan_get_next_rmap_item`` before commit f5548c318d65), the number of such addresses
  between consecutive page ids of a process (:meth:`AddressSpaces.hole_gaps`).  A VMA "has an
  anon_vma" from the first snapshot at which its group has an anonymous page.
* **same-address classes** — pages at the same virtual address in related processes
  (:meth:`AddressSpaces.page_classes`): ``family`` (same fork family, same vpn), ``vma`` (a VMA of
  the same path and length, same offset in it) or ``any`` (same vpn).

A trace without a ``vmas`` table (small traces built in code, old captures) has no VMA rows: no
holes, no lineage, and the ``vma`` class of every page is -1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.trace import schema as S

PAGE_SHIFT = 12
#: clock ticks per second of /proc/PID/stat (USER_HZ: 100 on every mainstream architecture)
CLK_TCK = 100
NO_TIME = np.iinfo(np.int64).min
SA_KEYS = ("family", "vma", "any")


@dataclass
class AddressSpaces:
    """The processes and VMAs of one trace, dense-indexed like its prepared view."""

    n_snaps: int
    n_procs: int
    proc_parent: np.ndarray  # int64 [n_procs] dense index of the parent, -1
    proc_family: np.ndarray  # int64 [n_procs] root of the fork tree within the trace
    proc_start_ns: np.ndarray  # int64 [n_procs] start time on the trace's clock (NO_TIME: unknown)
    proc_rank: np.ndarray  # int64 [n_procs] order of start (ancestors before descendants)
    # VMA rows, sorted by (snapshot, process, start); addresses in pages
    snap: np.ndarray
    proc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    flags: np.ndarray
    path: np.ndarray  # dense path id
    group: np.ndarray  # lineage group (anon_vma approximation)
    off: np.ndarray  # [n_snaps * n_procs + 1]: rows of (s, p) are off[s*n_procs+p] : off[s*n_procs+p+1]
    n_groups: int = 0
    group_parent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    group_anon_first: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    desc_off: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # CSR: groups of each group's tree
    desc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    grow_off: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # CSR: rows of each group by (snap, start)
    grow: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    changed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [n_snaps, n_procs] rows differ from s-1
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def has_vmas(self) -> bool:
        return len(self.start) > 0

    def snap_index(self, prep) -> np.ndarray:
        """The trace snapshot whose tables hold at each of ``prep``'s snapshots (the same index for
        a plain prepared view; a refined view, with empty snapshots inserted, maps each to the last
        real one at or before it)."""
        times = np.asarray(self.extras["times_ns"], np.int64)
        return np.maximum(np.searchsorted(times, np.asarray(prep.times_ns, np.int64), side="right") - 1, 0)

    def rows(self, s: int, p: int) -> slice:
        i = s * self.n_procs + p
        return slice(int(self.off[i]), int(self.off[i + 1]))

    def row_at(self, s: int, p: int, vpn: int) -> int:
        """The VMA row of process ``p`` at snapshot ``s`` holding address ``vpn``, or -1."""
        return int(_row_at(self.off, self.start, self.end, self.n_procs, s, p, vpn))

    def group_at(self, s: int, p: int, vpn: int) -> int:
        r = self.row_at(s, p, vpn)
        return int(self.group[r]) if r >= 0 else -1

    # --- holes in mergeable VMAs ----------------------------------------------------------------
    def hole_gaps(self, s: int, prep, gap: np.ndarray, tail: np.ndarray, procs=None) -> None:
        """Fill ``gap[pg]`` (addresses of mergeable VMAs with an anon_vma strictly between page
        ``pg - 1`` and page ``pg`` of one process, or before its first page) and ``tail[p]`` (after
        its last page, or all of them for a process without page ids) at snapshot ``s``, for
        ``procs`` (default: every process)."""
        procs = range(self.n_procs) if procs is None else procs
        for p in procs:
            lo, hi = int(prep.proc_pg_lo[p]), int(prep.proc_pg_hi[p])
            sl = self.rows(s, p)
            st, en = self.start[sl], self.end[sl]
            ok = ((self.flags[sl] & S.V_MERGEABLE) != 0) & (self.group_anon_first[self.group[sl]] <= s)
            if not ok.any():
                gap[lo:hi] = 0
                tail[p] = 0
                continue
            st, en = st[ok], en[ok]
            cum = np.concatenate([[0], np.cumsum(en - st)])

            def cover(x):  # VMA addresses below x
                k = np.searchsorted(st, x, side="right") - 1
                kk = np.maximum(k, 0)
                return np.where(k < 0, 0, cum[kk] + np.minimum(np.maximum(x - st[kk], 0), en[kk] - st[kk]))

            if hi > lo:
                v = prep.page_vpn[lo:hi]
                c_at = cover(v)
                c_after = cover(v + 1)
                g = np.empty(hi - lo, np.int64)
                g[0] = c_at[0]
                g[1:] = c_at[1:] - c_after[:-1]
                gap[lo:hi] = g
                tail[p] = cum[-1] - c_after[-1]
            else:
                tail[p] = cum[-1]

    # --- anon_vma trees -----------------------------------------------------------------------------
    def tree_rows(self, s: int, g: int) -> np.ndarray:
        """VMA rows at snapshot ``s`` on the anon_vma tree of group ``g``, in the order the kernel's
        interval tree visits them (start address, then ancestors before descendants)."""
        out = np.zeros(64, np.int64)
        while True:
            n = tree_rows(self.desc_off, self.desc, self.grow_off, self.grow, self.start, self.snap, self.proc,
                          self.proc_rank, s, g, out)
            if n <= len(out):
                return out[:n]
            out = np.zeros(n, np.int64)

    # --- same-address classes -------------------------------------------------------------------------
    def page_classes(self, prep, key: str, s: int = 0) -> np.ndarray:
        """The same-address class of every page id (int64, -1: none) under ``key``: ``family`` and
        ``any`` are fixed for the trace; ``vma`` is the class at snapshot ``s`` (the VMA holding
        the page then: same path, same length, same offset in it)."""
        if key not in SA_KEYS:
            raise ValueError(f"unknown same-address key {key!r}")
        vpn = prep.page_vpn.astype(np.int64)
        if key == "any":
            return dense_rows(np.stack([vpn], axis=1))
        if key == "family":
            fam = self.proc_family[prep.page_proc.astype(np.int64)]
            return dense_rows(np.stack([fam, vpn], axis=1))
        cls = np.full(prep.n_pages, -1, np.int64)
        if not self.has_vmas:
            return cls
        keys = np.full((prep.n_pages, 3), -1, np.int64)
        for p in range(self.n_procs):
            lo, hi = int(prep.proc_pg_lo[p]), int(prep.proc_pg_hi[p])
            sl = self.rows(s, p)
            if hi <= lo or sl.stop <= sl.start:
                continue
            st, en = self.start[sl], self.end[sl]
            v = vpn[lo:hi]
            k = np.searchsorted(st, v, side="right") - 1
            inside = (k >= 0) & (v < en[np.maximum(k, 0)])
            r = sl.start + np.maximum(k, 0)
            keys[lo:hi, 0] = np.where(inside, self.path[r], -1)
            keys[lo:hi, 1] = np.where(inside, self.end[r] - self.start[r], -1)
            keys[lo:hi, 2] = np.where(inside, v - self.start[r], -1)
        has = keys[:, 0] >= 0
        if has.any():
            cls[has] = dense_rows(keys[has])
        return cls


def dense_rows(keys: np.ndarray) -> np.ndarray:
    """Dense ids (in sorted order) of the rows of an int64 matrix."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort(keys.T[::-1])
    srt = keys[order]
    new = np.ones(len(keys), bool)
    new[1:] = (srt[1:] != srt[:-1]).any(axis=1)
    out = np.empty(len(keys), np.int64)
    out[order] = np.cumsum(new) - 1
    return out


def class_members(cls: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the pages of every class (classes as dense ids, -1 left out), each class's pages in
    ``rank`` order: ``(offsets, pages)``, pages of class c at ``pages[offsets[c]:offsets[c+1]]``."""
    n_cls = int(cls.max()) + 1 if len(cls) and cls.max() >= 0 else 0
    sel = np.flatnonzero(cls >= 0)
    order = sel[np.lexsort((rank[sel], cls[sel]))]
    counts = np.bincount(cls[sel], minlength=n_cls)
    off = np.zeros(n_cls + 1, np.int64)
    off[1:] = np.cumsum(counts)
    return off, order.astype(np.int64)


@njit(cache=True)
def _row_at(off, start, end, n_procs, s, p, vpn):
    i = s * n_procs + p
    lo = off[i]
    hi = off[i + 1]
    while lo < hi:  # last row with start <= vpn
        mid = (lo + hi) // 2
        if start[mid] <= vpn:
            lo = mid + 1
        else:
            hi = mid
    r = lo - 1
    if r >= off[i] and vpn < end[r]:
        return r
    return -1


@njit(cache=True)
def tree_rows(desc_off, desc, grow_off, grow, start, row_snap, row_proc, proc_rank, s, g, out):
    """Rows of snapshot s on group g's tree, sorted by (start, proc rank); returns how many (may
    exceed len(out): the caller retries with a larger buffer)."""
    n = 0
    for k in range(desc_off[g], desc_off[g + 1]):
        h = desc[k]
        a = grow_off[h]
        b = grow_off[h + 1]
        lo = a
        hi = b
        while lo < hi:  # first row of h at snapshot >= s
            mid = (lo + hi) // 2
            if row_snap[grow[mid]] < s:
                lo = mid + 1
            else:
                hi = mid
        j = lo
        while j < b and row_snap[grow[j]] == s:
            if n < len(out):
                out[n] = grow[j]
            n += 1
            j += 1
    if n > len(out):
        return n
    for i in range(1, n):  # insertion sort: trees are small
        r = out[i]
        j = i - 1
        while j >= 0 and (start[out[j]] > start[r] or (start[out[j]] == start[r] and proc_rank[row_proc[out[j]]] > proc_rank[row_proc[r]])):
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = r
    return n


@njit(cache=True)
def _lineage(proc, snap, start, end, n_rows):
    """Union-find of VMA rows sorted by (proc, snap, start): a row joins every row of the same
    process at its previous snapshot whose range overlaps it.  Returns the group of every row."""
    parent = np.arange(n_rows)
    i = 0
    prev_a = -1
    prev_b = -1
    while i < n_rows:
        j = i
        while j < n_rows and proc[j] == proc[i] and snap[j] == snap[i]:
            j += 1
        # rows [i, j) are one (proc, snap); [prev_a, prev_b) the previous snapshot of the same proc
        if prev_a >= 0 and proc[prev_a] == proc[i]:
            a = prev_a
            b = i
            while a < prev_b and b < j:
                if start[a] < end[b] and start[b] < end[a]:
                    ra = _find(parent, a)
                    rb = _find(parent, b)
                    if ra != rb:
                        parent[rb] = ra
                if end[a] <= end[b]:
                    a += 1
                else:
                    b += 1
        prev_a = i
        prev_b = j
        i = j
    out = np.empty(n_rows, np.int64)
    for k in range(n_rows):
        out[k] = _find(parent, k)
    return out


@njit(inline="always")
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _proc_ids(trace) -> np.ndarray:
    """The trace's process ids in the prepared view's dense order (``prepare._process_table``)."""
    if trace.has_table("processes"):
        p = trace.read_table("processes", columns=["proc"])
        if p.height:
            return np.unique(p["proc"].to_numpy().astype(np.int64))
    rows = trace.read_table("pages", columns=["proc"])
    return np.unique(rows["proc"].to_numpy().astype(np.int64))


_CACHE: dict[tuple[str, str], AddressSpaces] = {}


def address_spaces(trace, prep) -> AddressSpaces:
    """The :class:`AddressSpaces` of ``trace`` in ``prep``'s dense process order (cached per trace).
    Its snapshots are the trace's: map a prepared view's with :meth:`AddressSpaces.snap_index`."""
    key = (trace.fingerprint, str(trace.path))
    hit = _CACHE.get(key)
    if hit is not None and hit.n_procs == prep.n_procs:
        return hit
    asp = _build(trace, prep)
    if len(_CACHE) > 8:
        _CACHE.clear()
    _CACHE[key] = asp
    return asp


def _build(trace, prep) -> AddressSpaces:
    n_snaps, n_procs = int(trace.n_snapshots), int(prep.n_procs)
    times_ns = np.asarray(trace.times_ns, np.int64)
    ids = _proc_ids(trace)
    dense = {int(x): i for i, x in enumerate(ids.tolist())}
    parent = np.full(n_procs, -1, np.int64)
    start_ns = np.full(n_procs, NO_TIME, np.int64)
    first = np.full(n_procs, n_snaps, np.int64)
    last = np.full(n_procs, -1, np.int64)
    if len(ids) == n_procs and trace.has_table("processes"):
        pt = trace.read_table("processes", columns=["snap", "proc", "pid", "ppid", "start_ticks", "state"])
        if pt.height:
            agg = pt.group_by("proc").agg(pl.col("pid").first(), pl.col("ppid").first(), pl.col("start_ticks").first(),
                                          pl.col("snap").min().alias("first"),
                                          pl.col("snap").filter(pl.col("state") != "exited").max().alias("last"))
            tck = float(trace.host.get("clk_tck") or CLK_TCK)
            t0 = int(trace.t0_ns)
            pid = np.zeros(n_procs, np.int64)
            ppid = np.full(n_procs, -1, np.int64)
            for r in agg.iter_rows(named=True):
                i = dense.get(int(r["proc"]))
                if i is None:
                    continue
                pid[i], ppid[i] = int(r["pid"]), int(r["ppid"])
                first[i] = int(r["first"])
                last[i] = int(r["last"]) if r["last"] is not None else first[i]
                if r["start_ticks"]:
                    start_ns[i] = int(round(int(r["start_ticks"]) * 1e9 / tck)) - t0
            by_pid: dict[int, list[int]] = {}
            for i in range(n_procs):
                by_pid.setdefault(int(pid[i]), []).append(i)
            for c in range(n_procs):
                cands = [q for q in by_pid.get(int(ppid[c]), []) if q != c and first[q] <= first[c]
                         and (start_ns[q] == NO_TIME or start_ns[c] == NO_TIME or start_ns[q] <= start_ns[c])]
                alive = [q for q in cands if last[q] >= first[c] - 1]
                pick = alive or cands
                if pick:
                    parent[c] = max(pick, key=lambda q: (first[q], q))
    family = np.arange(n_procs, dtype=np.int64)
    for c in range(n_procs):
        r, seen = c, 0
        while parent[r] >= 0 and seen < n_procs:
            r, seen = int(parent[r]), seen + 1
        family[c] = r
    # an unknown start time ranks as the time of the first snapshot the process is in
    first_t = times_ns[np.minimum(first, n_snaps - 1)]
    key = np.where(start_ns == NO_TIME, first_t, start_ns)
    rank = np.empty(n_procs, np.int64)
    rank[np.lexsort((np.arange(n_procs), key))] = np.arange(n_procs)

    empty = np.zeros(0, np.int64)
    asp = AddressSpaces(n_snaps=n_snaps, n_procs=n_procs, proc_parent=parent, proc_family=family,
                        proc_start_ns=start_ns, proc_rank=rank, snap=empty, proc=empty, start=empty, end=empty, flags=empty, path=empty,
                        group=empty, off=np.zeros(n_snaps * n_procs + 1, np.int64),
                        changed=np.zeros((n_snaps, n_procs), bool), extras={"times_ns": times_ns})
    if not trace.has_table("vmas") or len(ids) != n_procs:
        return asp
    v = trace.read_table("vmas", columns=["snap", "proc", "start", "end", "flags", "path", "anon_pages", "captured_pages"])
    if v.height == 0:
        return asp
    vp = np.array([dense.get(int(x), -1) for x in v["proc"].to_list()], np.int64)
    vs = v["snap"].to_numpy().astype(np.int64)
    keep = (vp >= 0) & (vs < n_snaps)
    st = (v["start"].to_numpy().astype(np.uint64) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    en = ((v["end"].to_numpy().astype(np.uint64) + np.uint64(4095)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    keep &= en > st
    fl = v["flags"].to_numpy().astype(np.int64)
    anon = (v["anon_pages"].to_numpy() > 0) | (v["captured_pages"].to_numpy() > 0)
    path_ids, path_inv = np.unique(np.array(v["path"].to_list(), dtype=object), return_inverse=True)
    path = path_inv.astype(np.int64)
    sel = np.flatnonzero(keep)
    order = sel[np.lexsort((st[sel], vp[sel], vs[sel]))]  # (snap, proc, start)
    vs, vp, st, en, fl, path, anon = (a[order] for a in (vs, vp, st, en, fl, path, anon))
    n = len(order)
    off = np.searchsorted(vs * n_procs + vp, np.arange(n_snaps * n_procs + 1)).astype(np.int64)
    # lineage groups: rows in (proc, snap, start) order for the sweep
    po = np.lexsort((st, vs, vp))
    root = _lineage(vp[po], vs[po], st[po], en[po], n)
    grp_sorted = np.empty(n, np.int64)
    grp_sorted[po] = root[np.arange(n)]
    # root ids are positions in po-order; make them dense
    uniq, grp = np.unique(grp_sorted, return_inverse=True)
    grp = grp.astype(np.int64)
    n_groups = len(uniq)
    anon_first = np.full(n_groups, n_snaps, np.int64)
    if anon.any():
        np.minimum.at(anon_first, grp[anon], vs[anon])
    # fork links: a child's rows at its first snapshot with rows, against the parent's latest rows
    gparent = np.full(n_groups, -1, np.int64)
    has_rows = np.diff(off).reshape(n_snaps, n_procs) > 0
    for c in range(n_procs):
        p = int(parent[c])
        if p < 0:
            continue
        snaps_c = np.flatnonzero(has_rows[:, c])
        if len(snaps_c) == 0:
            continue
        sc = int(snaps_c[0])
        snaps_p = np.flatnonzero(has_rows[: sc + 1, p])
        if len(snaps_p) == 0:
            continue
        sp = int(snaps_p[-1])
        cr = asp_rows(off, n_procs, sc, c)
        pr = asp_rows(off, n_procs, sp, p)
        for r in range(cr.start, cr.stop):
            g = int(grp[r])
            if gparent[g] >= 0:
                continue
            best, best_ov = -1, 0
            for q in range(pr.start, pr.stop):
                ov = min(en[r], en[q]) - max(st[r], st[q])
                if ov > best_ov and path[q] == path[r] and anon_first[grp[q]] <= sc and grp[q] != g:
                    best, best_ov = q, ov
            if best >= 0:
                gparent[g] = grp[best]
    # each group's tree: itself and every group cloned from it, transitively
    children: list[list[int]] = [[] for _ in range(n_groups)]
    for g in range(n_groups):
        if gparent[g] >= 0:
            children[int(gparent[g])].append(g)
    desc_off = np.zeros(n_groups + 1, np.int64)
    desc_parts = []
    for g in range(n_groups):
        stack, members, seen = [g], [], set()
        while stack:
            h = stack.pop()
            if h in seen:
                continue
            seen.add(h)
            members.append(h)
            stack.extend(children[h])
        desc_parts.append(np.array(sorted(members), np.int64))
        desc_off[g + 1] = desc_off[g] + len(members)
    desc = np.concatenate(desc_parts) if desc_parts else np.zeros(0, np.int64)
    gorder = np.lexsort((st, vs, grp)).astype(np.int64)
    grow_off = np.searchsorted(grp[gorder], np.arange(n_groups + 1)).astype(np.int64)
    # which (snapshot, process) row sets differ from the previous snapshot's
    sig = np.zeros(n_snaps * n_procs, np.uint64)
    sig2 = np.zeros(n_snaps * n_procs, np.uint64)
    if n:
        cell = vs * n_procs + vp
        h1 = (st.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (en.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        h2 = (h1 ^ (fl.astype(np.uint64) << np.uint64(17)) ^ (anon_first[grp] <= vs).astype(np.uint64)
              ^ (path.astype(np.uint64) * np.uint64(0x27D4EB2F165667C5)))
        np.add.at(sig, cell, h1)
        np.add.at(sig2, cell, h2 * np.uint64(0x165667B19E3779F9))
    cnt = np.diff(off)
    sig = sig.reshape(n_snaps, n_procs)
    sig2 = sig2.reshape(n_snaps, n_procs)
    cnt = cnt.reshape(n_snaps, n_procs)
    changed = np.ones((n_snaps, n_procs), bool)
    changed[1:] = (sig[1:] != sig[:-1]) | (sig2[1:] != sig2[:-1]) | (cnt[1:] != cnt[:-1])
    asp.snap, asp.proc = vs, vp
    asp.start, asp.end, asp.flags, asp.path, asp.group, asp.off = st, en, fl, path, grp, off
    asp.n_groups, asp.group_parent, asp.group_anon_first = n_groups, gparent, anon_first
    asp.desc_off, asp.desc, asp.grow_off, asp.grow = desc_off, desc, grow_off, gorder
    asp.changed = changed
    asp.extras["paths"] = path_ids.tolist()
    return asp


def asp_rows(off: np.ndarray, n_procs: int, s: int, p: int) -> slice:
    i = s * n_procs + p
    return slice(int(off[i]), int(off[i + 1]))
