"""Build small traces in code: for tests, examples and third-party policy authors.

>>> make_trace(tmp / "t", [
...     {(0, 10): "a", (0, 11): "a", (1, 10): "b"},      # snapshot 0: proc 0 has two equal pages
...     {(0, 10): "a", (0, 11): "c", (1, 10): "b"},      # snapshot 1: page (0, 11) rewritten
... ], interval=1.0)

A page is ``(proc, vpn) -> spec``.  ``spec`` is a content key (``0`` or ``"zero"`` = an all-zero
page; any other value = a content, equal keys = equal pages) or a dict with ``c`` (content) and
optionally ``frame`` (a label: pages with the same label share one physical frame, as after fork),
``mergeable`` (default True), ``thp`` (a label: pages with the same label are one huge page),
``zero_page`` (maps the kernel zero page), ``ksm`` (a real-kernel KSM page), ``swapped``,
``anon`` (default True), ``soft_dirty``, ``flags`` (further ``F_*`` bits, e.g. ``F_DIRTY``).

Fingerprints: ``samples`` (content -> u32) writes the 64-word sampled hash column ``sample``;
``strengths=True`` writes the sampled hash at every strength of ``SAMPLE_STRENGTHS`` (format
version 2), each derived from the content label (:func:`strength_sample`): the zero page gets its
true value at every strength, any other content a hash of its label per strength, so different
contents never collide unless ``collisions`` says so: ``{content: (group, upto)}`` makes a content
hash as ``group`` at every strength <= ``upto`` (all members of a group collide there; group ``0``
collides with the zero page).

Contents: ``contents=True`` stores a 4096-byte page per content (:func:`content_bytes`, random bytes
seeded by the label; zero for the zero page) in the contents table, as ``capture --contents`` does.

``faults`` (optional) writes a ``faults`` table (format version 2, as ``capture --kernel-events``
does): a list of ``(t, proc, vpn)`` (a write fault at ``t`` seconds on the trace's clock) or dicts
with ``t``, ``proc``, ``vpn`` and optionally ``present`` (default True: a protection fault, the
COW kind), ``write`` (True), ``pid``.  Each goes to the snapshot whose interval holds it (previous
snapshot < t <= this one); one after the last snapshot is in no committed snapshot and is left out.

``ksm_events`` (optional) writes a ``ksm_events`` table the same way: dicts with ``t`` (seconds),
``event`` (a name of ``schema.KSM_EVENT_NAMES``) and any other column of it (``rmap_item``, ``err``,
``ksm_page``, ``seq``, ...; ``pid`` defaults to 1, ``cpu`` to 0).

``procs`` gives per process ``pid`` (default 1000 + proc), ``ppid`` (default 1: no parent in the
trace), ``start`` (clock ticks of 10 ms on the trace's clock; default: the first snapshot the
process is in, rounded up), ``uid``, ``cgroup``, ``comm``, ``mergeable``, ``snaps``.

``vmas`` (optional) writes a ``vmas`` table: ``True`` for one anonymous mergeable VMA per process
spanning its pages, or ``{proc: [vma, ...]}`` (the same at every snapshot the process is in), or a
list of such mappings, one per snapshot; a ``vma`` is ``(start_vpn, end_vpn)`` or a dict with
``start``, ``end`` and optionally ``path`` (default ``""``), ``mergeable`` (True), ``stack``, ``vmflags``
(the smaps VmFlags text; default ``"rd wr mr mw me ac"``, plus ``mg`` when mergeable and ``gd`` for a
stack), ``perms`` (default ``"rw-p"``; ``"r--p"`` for a read-only mapping, whose default VmFlags
have no ``wr``), or ``(start_vpn, end_vpn, vmflags)``.

The trace goes through the real :class:`~ksmtrace.trace.writer.TraceWriter` and delta encoder, so
it is a trace like any captured one.

``extra_tables`` (optional): one mapping per snapshot of further tables (name -> ``pyarrow.Table`` of
that table's schema) committed with it, e.g. the page-cache tables that
:func:`ksmtrace.testing.pagecache.make_pagecache_trace` builds.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import xxhash

from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace.trace.sampled import zero_sample
from ksmtrace.trace.writer import TraceWriter

ZERO_PFN = 0x1000
_KEY = 0x5EED


def content_hash(c: Any) -> int:
    return xxhash.xxh3_64_intdigest(repr(c).encode(), seed=_KEY)


def _is_zero(c: Any) -> bool:
    return c == 0 or c == "zero"


def strength_sample(c: Any, strength: int, collisions: Mapping[Any, tuple[Any, int]] | None = None) -> int:
    """The builder's sampled hash of content ``c`` at ``strength`` (see the module docstring)."""
    group, upto = (collisions or {}).get(c, (c, 0))
    label = group if strength <= upto else c
    if _is_zero(label) or _is_zero(c):
        return zero_sample(strength)
    return xxhash.xxh3_64_intdigest(f"{label!r}@{strength}".encode(), seed=_KEY) & 0xFFFFFFFF


DEFAULT_VMFLAGS = "rd wr mr mw me ac"


def content_bytes(c: Any) -> bytes:
    """The builder's 4 KiB page of content ``c`` (``contents=True``)."""
    if _is_zero(c):
        return bytes(4096)
    return np.random.default_rng(content_hash(c)).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def make_trace(
    path: str | os.PathLike,
    snapshots: list[Mapping[tuple[int, int], Any]],
    *,
    times: list[float] | None = None,
    interval: float = 1.0,
    procs: Mapping[int, Mapping[str, Any]] | None = None,
    host: Mapping[str, Any] | None = None,
    capture: Mapping[str, Any] | None = None,
    ground_truth: list[list[Mapping[str, Any]]] | None = None,
    keyframe_every: int = 0,
    samples: Mapping[Any, int] | None = None,
    strengths: bool | Mapping[Any, Any] = False,
    collisions: Mapping[Any, tuple[Any, int]] | None = None,
    vmas: Any = None,
    contents: bool = False,
    faults: list | None = None,
    ksm_events: list | None = None,
    extra_tables: list[Mapping[str, pa.Table]] | None = None,
):
    """Write a trace and return it opened (:class:`~ksmtrace.trace.reader.Trace`)."""
    from ksmtrace.trace.reader import open_trace

    procs = dict(procs or {})
    times = list(times) if times is not None else [i * interval for i in range(len(snapshots))]
    host_facts = {"kernel_release": "test", "page_size": 4096, "hz": 250, "thp_enabled": "never", "root": True, "pfn_readable": True}
    host_facts.update(host or {})
    cap = {"scope": "anon", "interval_s": interval, "soft_dirty": False, "contents": contents, "hash": {"algorithm": "xxh3_64", "key_fingerprint": "test"}}
    stored: set[int] = set()
    cap.update(capture or {})
    with_sample = samples is not None or strengths
    pschema = S.pages_schema(sample=with_sample, strengths=strengths)
    fp_cols = tuple(n for n in pschema.names if n not in S.PAGES_SCHEMA.names)
    w = TraceWriter(path, host=host_facts, capture=cap, tracer={"name": "builder", "version": "1"}, pages_schema=pschema)
    next_pfn = [0x100000]
    labels: dict[Any, int] = {}
    thp_base: dict[Any, int] = {}
    prev_pfn: dict[tuple[int, int], tuple[Any, int]] = {}
    prev_state: dict[int, dict[str, np.ndarray]] = {}
    first_snap: dict[int, int] = {}

    def fresh() -> int:
        next_pfn[0] += 1
        return next_pfn[0]

    for s, snap in enumerate(snapshots):
        by_proc: dict[int, list[tuple[int, dict]]] = {}
        for (proc, vpn), spec in snap.items():
            d = dict(spec) if isinstance(spec, Mapping) else {"c": spec}
            by_proc.setdefault(proc, []).append((vpn, d))
        alive = set(by_proc)
        for p, info in procs.items():
            snaps_alive = info.get("snaps")
            if snaps_alive is not None and s in snaps_alive:
                alive.add(p)
        page_parts = []
        proc_rows = []
        cur_pfn: dict[tuple[int, int], tuple[Any, int]] = {}
        vma_rows = []
        for proc in sorted(alive):
            first_snap.setdefault(proc, s)
            info = procs.get(proc, {})
            pid = int(info.get("pid", 1000 + proc))
            pages = sorted(by_proc.get(proc, []), key=lambda x: x[0])
            n = len(pages)
            vpn = np.array([v for v, _ in pages], dtype=np.uint64)
            hashes = np.zeros(n, np.uint64)
            flags = np.zeros(n, np.uint32)
            pfns = np.zeros(n, np.uint64)
            fps = {name: np.zeros(n, np.uint32) for name in fp_cols}
            any_mergeable = False
            for i, (v, d) in enumerate(pages):
                c = d.get("c")
                f = S.F_PRESENT | S.F_PFN | S.F_KPF
                if d.get("anon", True):
                    f |= S.F_ANON
                else:
                    f |= S.F_FILE
                if d.get("mergeable", True):
                    f |= S.F_MERGEABLE
                    any_mergeable = True
                if _is_zero(c):
                    f |= S.F_ZERO_FILLED
                if d.get("swapped"):
                    f = (f & ~S.F_PRESENT) | S.F_SWAPPED
                if d.get("ksm"):
                    f |= S.F_KSM
                if d.get("soft_dirty"):
                    f |= S.F_SOFT_DIRTY
                f |= int(d.get("flags", 0))
                if d.get("zero_page"):
                    f |= S.F_ZERO_PAGE | S.F_ZERO_FILLED
                    c = 0
                    pfn = ZERO_PFN
                elif d.get("thp") is not None:
                    f |= S.F_THP
                    if d["thp"] not in thp_base:
                        base = (next_pfn[0] // 512 + 2) * 512
                        thp_base[d["thp"]] = base
                        next_pfn[0] = base + 512
                    base = thp_base[d["thp"]]
                    pfn = base + (int(v) & 511)
                elif d.get("frame") is not None:
                    if d["frame"] not in labels:
                        labels[d["frame"]] = fresh()
                    pfn = labels[d["frame"]]
                else:
                    old = prev_pfn.get((proc, v))
                    pfn = old[1] if old is not None and old[0] == c else fresh()
                cur_pfn[(proc, v)] = (c, pfn)
                hashes[i] = content_hash(0) if _is_zero(c) else content_hash(c)
                flags[i] = f
                pfns[i] = pfn
                if strengths:
                    for st_ in S.SAMPLE_STRENGTHS:
                        fps[S.strength_column(st_)][i] = strength_sample(c, st_, collisions)
                if samples is not None:
                    fps["sample"][i] = int(samples.get(c, content_hash(c) & 0xFFFFFFFF)) & 0xFFFFFFFF
            cur = {"vpn": vpn, "hash": hashes, "flags": flags, "pfn": pfns, **fps}
            extra = fp_cols
            keyframe = s == 0 or (keyframe_every and s % keyframe_every == 0)
            prev = prev_state.get(proc)
            dl = D.diff(prev, cur)
            page_parts.append(D.rows_for(s, proc, pid, prev, cur, dl, bool(keyframe), extra))
            prev_state[proc] = cur
            proc_rows.append(
                {
                    "snap": s, "proc": proc, "pid": pid, "ppid": int(info.get("ppid", 1)),
                    "start_ticks": int(info.get("start", math.ceil(times[first_snap[proc]] * 100 - 1e-9))),
                    "comm": str(info.get("comm", f"p{proc}")),
                    "cmdline": str(info.get("comm", f"p{proc}")), "cgroup": str(info.get("cgroup", "/")),
                    "uid": int(info.get("uid", 0)), "state": "ok", "rss_pages": n, "anon_pages": n,
                    "captured_pages": n, "mergeable": bool(info.get("mergeable", any_mergeable)),
                    "merge_any": False, "t_read_ns": int(times[s] * 1e9),
                }
            )
            if vmas is not None:
                vma_rows += _vma_rows(vmas, s, proc, pid, vpn)
        # processes that vanished: their pages are gone
        for proc in sorted(set(prev_state) - alive):
            prev = prev_state.pop(proc)
            info = procs.get(proc, {})
            pid = int(info.get("pid", 1000 + proc))
            empty = {k: v[:0] for k, v in prev.items()}
            dl = D.diff(prev, empty)
            page_parts.append(D.rows_for(s, proc, pid, prev, empty, dl, False, fp_cols))
        cols: dict[str, np.ndarray] = {}
        for name in pschema.names:
            arrs = [p[name] for p in page_parts if name in p]
            cols[name] = np.concatenate(arrs) if arrs else np.zeros(0)
        pages = pa.table({n: pa.array(cols[n].astype(pschema.field(n).type.to_pandas_dtype())) for n in pschema.names}, schema=pschema)
        tables = {"pages": pages, "processes": pa.Table.from_pylist(proc_rows, schema=S.PROCESSES_SCHEMA)}
        if vmas is not None:
            tables["vmas"] = pa.Table.from_pylist(vma_rows, schema=S.VMAS_SCHEMA)
        if contents:
            new = {}
            for spec in snap.values():
                c = spec.get("c") if isinstance(spec, Mapping) else spec
                h = content_hash(0) if _is_zero(c) else content_hash(c)
                if h not in stored:
                    stored.add(h)
                    new[h] = content_bytes(c)
            tables["contents"] = pa.table({"snap": pa.array([s] * len(new), pa.uint32()), "hash": pa.array(list(new), pa.uint64()),
                                           "data": pa.array(list(new.values()), pa.binary())}, schema=S.CONTENTS_SCHEMA)
        if faults is not None:
            tables["faults"] = _fault_rows(faults, times, s, procs)
        if ksm_events is not None:
            tables["ksm_events"] = _ksm_event_rows(ksm_events, times, s)
        if ground_truth is not None and s < len(ground_truth):
            rows = []
            for g in ground_truth[s]:
                r = {k: None for k in S.KSM_SCHEMA.names}
                r.update({"snap": s, "t_ns": int(times[s] * 1e9)})
                r.update(g)
                rows.append(r)
            tables["ksm"] = pa.Table.from_pylist(rows, schema=S.KSM_SCHEMA)
        if extra_tables is not None and s < len(extra_tables):
            tables = {**extra_tables[s], **tables}
        t0 = int(times[s] * 1e9)
        ops = cols["op"]
        stats = {"pages": int(sum(len(v["vpn"]) for v in prev_state.values())), "new": int((ops == S.OP_NEW).sum()),
                 "changed": int((ops == S.OP_CHANGED).sum()), "gone": int((ops == S.OP_GONE).sum())}
        w.commit_snapshot(s, t0, t0, tables, keyframe=bool(s == 0 or (keyframe_every and s % keyframe_every == 0)), stats=stats)
        prev_pfn = cur_pfn
    w.close("complete")
    return open_trace(path)


def _in_snapshot(t: float, times: list[float], s: int) -> bool:
    return (s == 0 and t <= times[0]) or (s > 0 and times[s - 1] < t <= times[s])


def _ksm_event_rows(events: list, times: list[float], s: int) -> pa.Table:
    """The ``ksm_events`` table of snapshot ``s``: the events with times[s-1] < t <= times[s]."""
    rows = []
    for e in events:
        d = dict(e)
        t = float(d.pop("t"))
        if not _in_snapshot(t, times, s):
            continue
        r = {k: None for k in S.KSM_EVENTS_SCHEMA.names}
        r.update({"snap": s, "t_ns": int(round(t * 1e9)), "pid": 1, "cpu": 0})
        r.update(d)
        rows.append(r)
    rows.sort(key=lambda r: r["t_ns"])
    return pa.Table.from_pylist(rows, schema=S.KSM_EVENTS_SCHEMA)


def _fault_rows(faults: list, times: list[float], s: int, procs: Mapping[int, Mapping[str, Any]]) -> pa.Table:
    """The ``faults`` table of snapshot ``s``: the faults with times[s-1] < t <= times[s]."""
    rows = []
    for f in faults:
        d = dict(f) if isinstance(f, Mapping) else dict(zip(("t", "proc", "vpn"), f))
        t = float(d["t"])
        if not _in_snapshot(t, times, s):
            continue
        proc, vpn = int(d["proc"]), int(d["vpn"])
        pid = int(d.get("pid", procs.get(proc, {}).get("pid", 1000 + proc)))
        present, write = bool(d.get("present", True)), bool(d.get("write", True))
        rows.append({"snap": s, "t_ns": int(round(t * 1e9)), "proc": proc, "pid": pid, "tid": pid, "vpn": vpn,
                     "address": vpn << 12, "error_code": (1 if present else 0) | (2 if write else 0) | 4, "write": write,
                     "present": present, "prev_flags": None, "cpu": 0})
    rows.sort(key=lambda r: r["t_ns"])
    return pa.Table.from_pylist(rows, schema=S.FAULTS_SCHEMA)


def _vma_rows(vmas: Any, s: int, proc: int, pid: int, vpn: np.ndarray) -> list[dict]:
    """Rows of the vmas table for one process at snapshot ``s`` (see :func:`make_trace`)."""
    if vmas is True:
        specs = [(int(vpn.min()), int(vpn.max()) + 1)] if len(vpn) else []
    else:
        per = vmas[s] if isinstance(vmas, (list, tuple)) else vmas
        specs = list(per.get(proc, []))
    rows = []
    for spec in specs:
        d = dict(spec) if isinstance(spec, Mapping) else {"start": spec[0], "end": spec[1]}
        if not isinstance(spec, Mapping) and len(spec) > 2:
            d["vmflags"] = spec[2]
        a, b = int(d["start"]), int(d["end"])
        path = str(d.get("path", ""))
        n = int(((vpn >= a) & (vpn < b)).sum())
        fl = S.V_IN_SCOPE | S.V_PRIVATE | (S.V_ANON if not path or path.startswith("[") else S.V_FILE)
        if d.get("mergeable", True):
            fl |= S.V_MERGEABLE
        if d.get("stack") or path == "[stack]":
            fl |= S.V_STACK
        if path == "[heap]":
            fl |= S.V_HEAP
        perms = str(d.get("perms", "rw-p"))
        default = DEFAULT_VMFLAGS if "w" in perms else " ".join(f for f in DEFAULT_VMFLAGS.split() if f != "wr")
        vmflags = d.get("vmflags") or (default + (" mg" if d.get("mergeable", True) else "")
                                       + (" gd" if fl & S.V_STACK else ""))
        if "gd" in vmflags.split():
            fl |= S.V_STACK
        rows.append({"snap": s, "proc": proc, "pid": pid, "start": a << 12, "end": b << 12, "perms": perms,
                     "flags": fl, "vmflags": vmflags, "path": path, "rss_pages": n, "anon_pages": n, "captured_pages": n})
    return rows
