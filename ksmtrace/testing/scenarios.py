"""Standard small traces for policy tests: deterministic, built in code, each exercising a behaviour.

``scenario(name, path)`` writes the trace and returns it opened.  Policies name the scenario on
which each of their parameters must change the result (``Policy.sensitivity``), and the contract
suite checks it, so a parameter that is not wired up fails a test.

* ``mixed`` — four processes over 40 snapshots 50 ms apart: duplicates within and across
  processes, many copies of one content (for sharing limits and chains), zero-filled pages, pages
  rewritten every few snapshots (COW breaks, volatile pages), stable unique pages (smart_scan),
  a forked child sharing frames, a process that exits, a huge page with zero subpages; one of the
  processes is in another security domain.  Its VMAs (:func:`mixed_vmas`) leave holes in a
  mergeable VMA, are cloned by the fork child and split later.
* ``mixed-slow`` — the same, 0.5 s apart (20 s in all), for behaviour that needs full scans of
  several seconds (the scan-time advisor).
* ``families`` — fork families and strangers with equal content at equal virtual addresses
  (:func:`families_snapshots`; for the same-address plan).
* ``random-N`` — a seeded random trace (``random-7``): churn, forks and exits.
* ``mixed-faults`` — ``mixed`` with a recorded write fault (the ``faults`` table of ``capture
  --kernel-events``) on a seeded tenth of its pages in every interval: rewrites with the same
  bytes the snapshots cannot see, and the faults of the pages they see rewritten
  (:func:`mixed_faults`).
* ``strengths`` — a trace with a VMA table and the sampled hash at every strength, 100 ms apart
  (3 s): template pages shared across processes, contents that collide with each other at weak
  strengths and contents that collide with the zero page, sparse VMAs (holes), a region rewritten
  every few snapshots (COWs of merged pages), a VMA that grows and one that splits, an
  ineligible stack VMA, a forked child and an exiting process.

* ``pagecache`` — a page cache (format version 2, ``file`` scope): three copies of a library tree
  (:func:`pagecache_snapshots`), mapped in part by three processes, with zero-filled pages,
  pages at different offsets of one file with equal content, active pages, a file written
  through a mapping (dirty) and one by ``write()`` (mtime), and a file evicted; 50 ms apart.

``library_trace(path)`` is the small three-process trace the report, plot and sweep tests share.
``plain_processes_trace(path)`` is what a user's first capture of ordinary programs looks like:
no page in a mergeable VMA (no madvise/prctl), so the ``recorded`` scope is empty.
"""
from __future__ import annotations

import os
import random
from typing import Any

from ksmtrace.testing.builders import make_trace


def mixed_snapshots(n_snaps: int = 40) -> list[dict]:
    snaps = []
    for s in range(n_snaps):
        pages: dict[tuple[int, int], Any] = {}
        # proc 0: a big run of one content (chains at small max_page_sharing), zero pages, uniques
        for v in range(24):
            pages[(0, v)] = "hot"
        for v in range(24, 32):
            pages[(0, v)] = 0
        for v in range(32, 60):
            pages[(0, v)] = f"u0-{v}"
        # proc 1: shares some contents with proc 0 and rewrites a region every 5 snapshots
        for v in range(10):
            pages[(1, v)] = "hot" if v < 4 else f"t{v % 3}"
        for v in range(10, 20):
            pages[(1, v)] = f"t{v % 3}" if (s // 5) % 2 == 0 else f"w{s // 5}-{v}"
        for v in range(20, 26):
            pages[(1, v)] = 0
        # proc 2: exits at snapshot 25; stable uniques and a few template pages
        if s < 25:
            for v in range(12):
                pages[(2, v)] = f"t{v % 3}" if v < 6 else f"u2-{v}"
        # proc 3: a huge page (zero subpages and template subpages), in another domain
        for v in range(512, 512 + 16):
            pages[(3, v)] = {"c": 0 if v % 2 else "t1", "thp": "H"} if s < 30 else (0 if v % 2 else "t1")
        # proc 4: forked from proc 0 at snapshot 12: shares proc 0's frames until it writes
        if s >= 12:
            for v in range(0, 32):
                c = pages[(0, v)]
                if s >= 20 and v % 4 == 0:
                    pages[(4, v)] = f"child-{v}"
                else:
                    pages[(4, v)] = {"c": c, "frame": ("fork", v)}
                    if s < 20 or v % 4 != 0:
                        pages[(0, v)] = {"c": c, "frame": ("fork", v)}
        # a late page identical to the hot content appears in proc 1 (first-visit merges in 6.10)
        if s >= 15:
            pages[(1, 40)] = "hot"
            # and a template page in proc 0 after its fork: on the anon_vma its child's VMA shares
            pages[(0, 60)] = "t1"
        snaps.append(pages)
    return snaps


MIXED_PROCS = {3: {"uid": 1000, "cgroup": "/other"}, 4: {"ppid": 1000}}


def mixed_vmas(n_snaps: int = 40) -> list[dict]:
    """The VMAs of ``mixed``: each process's pages in one anonymous mergeable VMA, proc 0's with
    140 unpopulated pages after them (holes), cloned by its fork child (proc 4), and split in two
    by an mprotect-like change at snapshot 30."""
    out = []
    for s in range(n_snaps):
        v0 = [(0, 200)] if s < 30 else [(0, 100), (100, 200)]
        out.append({0: v0, 1: [(0, 64)], 2: [(0, 16)], 3: [(512, 1024)], 4: [(0, 200)]})
    return out


def families_snapshots(n_snaps: int = 12) -> list[dict]:
    """Two fork families and strangers holding equal content at equal addresses (the same-address
    plan): a parent (proc 0) and two children (1, 2) with the same template pages at the same vpns
    (each in a frame of its own: written after the fork), a second family (3, 4) with other
    templates, an unrelated process (5) holding the first family's templates at the same vpns, and
    a process (6) holding them in a VMA of the same path and length at another address; some pages
    differ per process and a few are rewritten now and then."""
    snaps = []
    for s in range(n_snaps):
        pages: dict[tuple[int, int], Any] = {}
        for p in (0, 1, 2, 5):
            for v in range(24):
                pages[(p, v)] = f"tmpl-{v}" if v < 16 else f"own-{p}-{v}"
            if s % 4 == 3:
                pages[(p, 20)] = f"w-{p}-{s}"
        for p in (3, 4):
            for v in range(16):
                pages[(p, v)] = f"fam2-{v % 8}"
        for v in range(16):
            pages[(6, 1000 + v)] = f"tmpl-{v}"
        snaps.append(pages)
    return snaps


FAMILIES_PROCS = {1: {"ppid": 1000}, 2: {"ppid": 1000}, 4: {"ppid": 1003}}
FAMILIES_VMAS = {p: [{"start": 0, "end": 32, "path": "/lib"}] for p in range(6)} | {6: [{"start": 1000, "end": 1032, "path": "/lib"}]}


def random_snapshots(seed: int, nproc: int = 3, npages: int = 60, nsnap: int = 12, ncontent: int = 8) -> list[dict]:
    """A random trace with churn, a fork at snapshot 4 and an exit at snapshot 8."""
    rnd = random.Random(seed)
    state: dict = {}
    for p in range(nproc):
        for v in range(npages):
            if rnd.random() < 0.8:
                state[(p, v)] = rnd.choice([0] + [f"c{i}" for i in range(ncontent)] + [f"u{p}_{v}"])
    snaps = []
    for s in range(nsnap):
        new = dict(state)
        for k in list(new):
            r = rnd.random()
            if r < 0.08:
                new[k] = rnd.choice([0] + [f"c{i}" for i in range(ncontent)] + [f"w{s}_{k}"])
            elif r < 0.11:
                del new[k]
        for _ in range(rnd.randint(0, 6)):
            p = rnd.randrange(nproc)
            v = rnd.randrange(npages + 10)
            new[(p, v)] = rnd.choice([0] + [f"c{i}" for i in range(ncontent)])
        if s == 4 and nproc > 1:
            for (p, v), c in list(new.items()):
                if p == 0:
                    new[(p, v)] = {"c": c, "frame": ("F", v, c)}
                    new[(nproc, v)] = {"c": c, "frame": ("F", v, c)}
        if s == 5:
            for k in [k for k in new if k[0] == nproc]:
                if rnd.random() < 0.5:
                    new[k] = new[k]["c"] if isinstance(new[k], dict) else new[k]
        if s == 8:
            for k in [k for k in new if k[0] == 1]:
                del new[k]
        snaps.append(new)
        state = {k: (v["c"] if isinstance(v, dict) else v) for k, v in new.items()}
    return snaps


STRENGTHS_COLLISIONS = {**{f"g{i}": ("grp", 32) for i in range(6)}, **{f"nz{i}": (0, 16) for i in range(3)}}


def strengths_snapshots(n_snaps: int = 30) -> tuple[list[dict], list[dict]]:
    """Pages and VMAs of the ``strengths`` scenario."""
    snaps, vmas = [], []
    for s in range(n_snaps):
        pages: dict[tuple[int, int], Any] = {}
        vm: dict[int, list[tuple]] = {}
        for p in (0, 1, 2):
            if p == 2 and s >= 20:
                continue
            for v in range(40):  # a heap-like VMA: templates, group-colliding pages, zero, uniques
                if v < 16:
                    c: Any = f"t{v % 8}"
                elif v < 22:
                    c = f"g{(v + p) % 6}"
                elif v < 26:
                    c = 0
                elif v < 28:
                    c = f"nz{(v + p) % 3}"
                else:
                    c = f"u{p}-{v}"
                pages[(p, v)] = c
            for v in (100, 117, 140, 163):  # a sparse VMA: mostly holes
                pages[(p, v)] = f"t{v % 8}"
            for v in range(200, 216):  # rewritten every 3 snapshots: merged, then COW-broken
                pages[(p, v)] = f"w{s // 3}-{v % 4}"
            grow = 8 if s < 10 or p != 1 else 24  # proc 1's VMA grows at snapshot 10
            for v in range(300, 300 + grow):
                pages[(p, v)] = f"t{v % 8}"
            for v in range(500, 504):  # the stack: not a UKSM slot
                pages[(p, v)] = f"t{v % 8}"
            heap = [(0, 64)] if not (p == 0 and s >= 15) else [(0, 32), (32, 64)]  # proc 0's heap splits
            vm[p] = heap + [(100, 164), (200, 216), (300, 300 + grow), (496, 504, "rd wr mr mw me gd ac")]
        if s >= 8:  # proc 3 forked from proc 0: its heap shares proc 0's frames until either writes
            for v in range(40):
                c = pages[(0, v)]
                if s >= 18 and v % 5 == 0:
                    pages[(3, v)] = f"child-{v}"
                else:
                    pages[(3, v)] = {"c": c, "frame": ("fork", v, str(c))}
                    pages[(0, v)] = {"c": c, "frame": ("fork", v, str(c))}
            vm[3] = [(0, 64)]
        snaps.append(pages)
        vmas.append(vm)
    return snaps, vmas


def library_trace(path: str | os.PathLike, n: int = 8, pages: int = 24):
    """Three processes (two users) sharing library-like pages, zero pages, private pages, pages
    rewritten every two snapshots, and from snapshot 3 on a write to a shared page each snapshot
    (COW breaks); 1 s apart."""
    snaps = []
    for s in range(n):
        d: dict = {}
        for p in range(3):
            for v in range(pages):
                if v < 10:
                    c: Any = f"lib{v % 5}"
                elif v < 14:
                    c = 0
                elif v < 18:
                    c = f"p{p}-{v}"
                else:
                    c = f"w{p}-{v}-{s // 2}"
                d[(p, v)] = c
            if s >= 3 and p == s % 3:
                d[(p, 0)] = f"dirty{s}"
        snaps.append(d)
    procs = {0: {"uid": 1, "comm": "alpha"}, 1: {"uid": 1, "comm": "beta"}, 2: {"uid": 2, "comm": "gamma"}}
    return make_trace(path, snaps, procs=procs, interval=1.0)


def mixed_faults(snaps: list[dict], interval: float, seed: int = 11) -> list[tuple[float, int, int]]:
    """Write faults for a trace of ``snaps`` taken ``interval`` s apart: in every interval, a fault on
    a seeded tenth of the pages present at both ends, at a seeded time inside it, and on every page
    whose content changes, before the snapshot that shows the change."""
    rnd = random.Random(seed)
    out = []
    for s in range(1, len(snaps)):
        a, b = snaps[s - 1], snaps[s]
        for key in sorted(set(a) & set(b)):
            changed = a[key] != b[key]
            if changed or rnd.random() < 0.1:
                out.append(((s - 1 + rnd.uniform(0.05, 0.95)) * interval, key[0], key[1]))
    return out


def pagecache_snapshots(n_snaps: int = 30) -> tuple[list[dict], list[dict]]:
    """Pages ``(file, index) -> spec`` and file metadata per snapshot for the ``pagecache`` scenario."""
    snaps, meta = [], []
    for s in range(n_snaps):
        d: dict = {}
        m: dict = {}
        for copy in range(3):  # files 3*copy + {0, 1, 2}: three copies of one tree
            for k in range(3):
                f = 3 * copy + k
                if copy == 2 and k == 2 and 10 <= s < 16:
                    continue  # evicted for a while
                for i in range(12 + 4 * k):
                    c: Any = f"lib{k}-{i}" if i % 5 else 0
                    if k == 1 and i >= 12:
                        c = f"lib1-{i % 2}"  # equal pages at other offsets of the same file
                    spec: dict = {"c": c}
                    if i < 6 + copy:
                        spec["mapped"] = [copy]
                    if i % 3 == 0:
                        spec["active"] = True
                    if copy == 1 and k == 0 and i == 3 and s % 9 == 4:
                        spec["dirty"] = True  # written through a shared mapping
                        spec["c"] = f"w{s}"
                    d[(f, i)] = spec
                m[f] = {"mtime_ns": (s // 7) if (copy == 0 and k == 2) else 0}  # written by write() every 7
        d[(9, 0)] = "private-0"  # a file of its own
        snaps.append(d)
        meta.append(m)
    return snaps, meta


def scenario(name: str, path: str | os.PathLike):
    if name == "pagecache":
        from ksmtrace.testing.pagecache import make_pagecache_trace

        snaps, meta = pagecache_snapshots()
        return make_pagecache_trace(path, snaps, meta=meta, interval=0.05)
    if name == "mixed-faults":
        snaps = mixed_snapshots()
        return make_trace(path, snaps, interval=0.05, procs=MIXED_PROCS, vmas=mixed_vmas(), faults=mixed_faults(snaps, 0.05))
    if name == "mixed":
        return make_trace(path, mixed_snapshots(), interval=0.05, procs=MIXED_PROCS, vmas=mixed_vmas())
    if name == "mixed-slow":  # the same pages, 0.5 s apart (for multi-second full scans)
        return make_trace(path, mixed_snapshots(), interval=0.5, procs=MIXED_PROCS, vmas=mixed_vmas())
    if name == "families":
        return make_trace(path, families_snapshots(), interval=0.05, procs=FAMILIES_PROCS, vmas=FAMILIES_VMAS)
    if name == "strengths":
        snaps, vmas = strengths_snapshots()
        return make_trace(path, snaps, interval=0.1, procs={3: {"ppid": 1000}}, strengths=True,
                          collisions=STRENGTHS_COLLISIONS, vmas=vmas)
    if name.startswith("random-"):
        seed = int(name.split("-", 1)[1])
        return make_trace(path, random_snapshots(seed), interval=0.03)
    raise ValueError(f"unknown scenario {name!r}")


def plain_processes_trace(path: str | os.PathLike, n: int = 8, pages: int = 240):
    """Two plain processes (a parent and its fork child) of a capture made with ``--scope anon`` on a
    6.18 kernel without KSM ground truth: no page is in a mergeable VMA.  Each has library-like
    pages equal across both, zero-filled pages, private pages, pages rewritten every snapshot, and
    the child shares some frames with its parent through fork; 0.5 s apart."""
    snaps = []
    for s in range(n):
        d: dict = {}
        for p in range(2):
            for v in range(pages):
                if v < pages // 3:
                    spec: Any = {"c": f"lib{v % 40}"}
                elif v < pages // 3 + 30:
                    spec = {"c": 0}
                elif v < pages // 3 + 60:
                    spec = {"c": f"forked{v}", "frame": f"fork{v}"}  # parent and child share the frame
                elif v < pages - 40:
                    spec = {"c": f"own{p}-{v}"}
                else:
                    spec = {"c": f"churn{p}-{v}-{s}"}
                d[(p, v)] = {**spec, "mergeable": False}
        snaps.append(d)
    procs = {0: {"pid": 4101, "comm": "python3"}, 1: {"pid": 4102, "ppid": 4101, "comm": "python3"}}
    return make_trace(path, snaps, procs=procs, interval=0.5,
                      host={"kernel_release": "6.18.44", "thp_enabled": "always [madvise] never"},
                      capture={"scope": "anon"})
