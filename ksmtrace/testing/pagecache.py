"""Build small page-cache traces in code (format version 2): files, their resident pages, which
processes map them, dirty and active bits, and file metadata changes.

>>> make_pagecache_trace(tmp / "t", [
...     {(0, 0): "libA", (0, 1): "libB", (1, 0): "libA", (1, 1): {"c": "libB", "mapped": [0]}},
...     {(0, 0): "libA", (0, 1): "libB", (1, 0): {"c": "libA", "dirty": True}, (1, 1): "libB"},
... ], interval=1.0)

A page is ``(file, index) -> spec``: ``spec`` is a content key (as in
:func:`~ksmtrace.testing.builders.make_trace`: ``0`` is all zeros, equal keys are equal pages) or a
dict with ``c`` (content) and optionally ``dirty``, ``writeback``, ``active`` (the kpageflags bits)
and ``mapped`` (the processes that map the page, present in their page tables).  A file is
``(dev 8:1, inode 100 + file, path /lib/f<file>)``.

``meta`` (optional): per snapshot ``{file: {"mtime_ns", "size", "listed"}}``; ``mtime_ns``
defaults to 0, ``size`` to the file's highest index in any snapshot + 1 pages, ``listed`` (default True)
says the file is under ``capture --files``: every resident page of it is a ``filepages`` row,
mapped or not.  An unlisted file's pages are seen only where a process maps them.

Process ``p`` maps file ``f`` as one private read-only VMA at virtual page ``0x1000 * (f + 1)``
(file offset 0) while it maps any page of it; a mapped page is a ``pages`` row of every process
in its ``mapped`` list, all with one frame (the page-cache page), ``F_FILE`` and not ``F_ANON``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from ksmtrace.testing.builders import _is_zero, content_hash, make_trace
from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S

DEV = os.makedev(8, 1)
PC_FLAGS = {"dirty": S.F_DIRTY, "writeback": S.F_WRITEBACK, "active": S.F_ACTIVE}


def file_inode(f: int) -> int:
    return 100 + int(f)


def file_base_vpn(f: int) -> int:
    """Where every process maps file ``f`` (virtual page number)."""
    return 0x1000 * (int(f) + 1)


def make_pagecache_trace(
    path: str | os.PathLike,
    snapshots: list[Mapping[tuple[int, int], Any]],
    *,
    meta: list[Mapping[int, Mapping[str, Any]]] | None = None,
    procs: Mapping[int, Mapping[str, Any]] | None = None,
    anon: list[Mapping[tuple[int, int], Any]] | None = None,
    interval: float = 1.0,
    **kw: Any,
):
    """Write a page-cache trace and return it opened.  ``anon`` adds ordinary (anonymous) pages
    per snapshot, as :func:`~ksmtrace.testing.builders.make_trace` takes them."""
    pages_snaps: list[dict] = []
    vma_snaps: list[dict] = []
    extra: list[dict[str, pa.Table]] = []
    prev_listed: dict[int, dict[str, np.ndarray]] = {}
    all_procs = set(procs or {})
    top: dict[int, int] = {}
    for snap in snapshots:
        for f, idx in snap:
            top[int(f)] = max(top.get(int(f), 0), int(idx) + 1)
    for s, snap in enumerate(snapshots):
        m = dict((meta[s] if meta is not None and s < len(meta) else {}) or {})
        specs: dict[int, list[tuple[int, dict]]] = {}
        for (f, idx), spec in snap.items():
            d = dict(spec) if isinstance(spec, Mapping) else {"c": spec}
            specs.setdefault(int(f), []).append((int(idx), d))
        pages: dict[tuple[int, int], Any] = dict((anon[s] if anon is not None and s < len(anon) else {}) or {})
        vmas: dict[int, list] = {}
        vf_rows, file_rows = [], []
        fp_parts = []
        for f in sorted(set(specs) | set(m)):
            rows = sorted(specs.get(f, []))
            fm = m.get(f, {})
            mappers = sorted({p for _, d in rows for p in d.get("mapped", [])})
            n_idx = (rows[-1][0] + 1) if rows else 0
            for p in mappers:
                all_procs.add(p)
                base = file_base_vpn(f)
                vmas.setdefault(p, []).append({"start": base, "end": base + max(n_idx, 1), "path": f"/lib/f{f}",
                                               "mergeable": False, "vmflags": "rd mr mw me"})
                vf_rows.append({"snap": s, "proc": p, "pid": 1000 + p, "start": base << 12,
                                "end": (base + max(n_idx, 1)) << 12, "dev": DEV, "inode": file_inode(f), "pgoff": 0})
            listed = bool(fm.get("listed", True))
            idx_l, hash_l, flag_l, pfn_l = [], [], [], []
            dirty = wb = 0
            for idx, d in rows:
                c = d.get("c")
                fl = 0
                for k, bit in PC_FLAGS.items():
                    if d.get(k):
                        fl |= bit
                dirty += bool(d.get("dirty"))
                wb += bool(d.get("writeback"))
                for p in d.get("mapped", []):
                    pages[(p, file_base_vpn(f) + idx)] = {"c": c, "anon": False, "mergeable": False,
                                                          "frame": ("pc", f, idx, repr(c)), "flags": fl}
                if listed:
                    idx_l.append(idx)
                    hash_l.append(content_hash(0) if _is_zero(c) else content_hash(c))
                    flag_l.append(fl | S.F_PRESENT | S.F_FILE | S.F_KPF | (S.F_ZERO_FILLED if _is_zero(c) else 0))
                    pfn_l.append(0)
            if listed:
                cur = {"vpn": np.array(idx_l, np.uint64), "hash": np.array(hash_l, np.uint64),
                       "flags": np.array(flag_l, np.uint32), "pfn": np.array(pfn_l, np.uint64)}
                prev = prev_listed.get(f)
                r = D.rows_for(s, 0, 0, prev, cur, D.diff(prev, cur), s == 0)
                prev_listed[f] = cur
                fp_parts.append((f, r))
            file_rows.append({"snap": s, "dev": DEV, "inode": file_inode(f), "path": f"/lib/f{f}",
                              "size": int(fm.get("size", top.get(f, 0) * S.PAGE_SIZE)), "mtime_ns": int(fm.get("mtime_ns", 0)),
                              "source": (S.FILE_MAPPED if mappers else 0) | (S.FILE_LISTED if listed else 0),
                              "cached_pages": len(rows), "dirty_pages": dirty, "writeback_pages": wb})
        for f in sorted(set(prev_listed) - {f for f, _ in fp_parts}):  # a listed file that left the cache
            prev = prev_listed.pop(f)
            empty = {k: v[:0] for k, v in prev.items()}
            fp_parts.append((f, D.rows_for(s, 0, 0, prev, empty, D.diff(prev, empty), False)))
        fp = D.filepages_table(s, [(DEV, file_inode(f), r) for f, r in fp_parts])
        extra.append({"vma_files": pa.Table.from_pylist(vf_rows, schema=S.VMA_FILES_SCHEMA),
                      "files": pa.Table.from_pylist(file_rows, schema=S.FILES_SCHEMA), "filepages": fp})
        pages_snaps.append(pages)
        vma_snaps.append(vmas)
    # every process stays alive for the whole trace (its VMAs come and go)
    pr = {p: {"snaps": range(len(snapshots)), **dict((procs or {}).get(p, {}))} for p in all_procs}
    cap = {"scope": "all", "files": ["/lib"], **dict(kw.pop("capture", {}) or {})}
    return make_trace(path, pages_snaps, interval=interval, procs=pr, vmas=vma_snaps, extra_tables=extra,
                      capture=cap, **kw)
