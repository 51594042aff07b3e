"""Large synthetic traces, generated with numpy (for benchmarks and scale tests).

The page mix follows ``../shared/reference/limits.md``: about 20 % zero-filled pages, 25 % copies
of a Zipf-distributed set of templates, the rest unique; every snapshot rewrites ``churn`` of the
pages (half with unique content, half with a template or zeros), unmaps a few and maps new ones.
Each process's pages are contiguous; every page has its own frame (no fork sharing).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace.trace.writer import TraceWriter

ZERO_HASH = 0x5A5A5A5A5A5A5A5A


def _contents(rng, n, n_templates, zero_frac=0.2, dup_frac=0.25):
    """Content keys: 0 = zero page, 1..T = templates, >T = unique (drawn from a large space)."""
    u = rng.random(n)
    out = rng.integers(1 << 40, 1 << 62, size=n, dtype=np.int64)
    z = u < zero_frac
    t = (u >= zero_frac) & (u < zero_frac + dup_frac)
    out[z] = 0
    k = int(t.sum())
    if k:
        out[t] = np.minimum(rng.zipf(1.3, size=k), n_templates).astype(np.int64)
    return out


def synthetic_trace(
    path: str | os.PathLike,
    pages: int = 1_000_000,
    snapshots: int = 100,
    processes: int = 8,
    churn: float = 0.05,
    interval: float = 10.0,
    templates: int = 10_000,
    seed: int = 0,
    mergeable: bool = True,
    capture: dict | None = None,
):
    """Write a synthetic trace and return it opened.  ``capture``: extra capture facts (e.g. the
    ``hash`` key fingerprint a fleet of synthetic hosts shares)."""
    from ksmtrace.trace.reader import open_trace

    rng = np.random.default_rng(seed)
    host = {"kernel_release": "synthetic", "page_size": 4096, "hz": 250, "root": True, "pfn_readable": True}
    cap = {"scope": "anon", "interval_s": interval, "soft_dirty": False, "synthetic": True,
           "pages": pages, "churn": churn, "seed": seed, **(capture or {})}
    w = TraceWriter(path, host=host, capture=cap, tracer={"name": "synthetic", "version": "1"})
    per = pages // processes
    base_flags = np.uint32(S.F_PRESENT | S.F_ANON | S.F_PFN | S.F_KPF | (S.F_MERGEABLE if mergeable else 0))
    state = []
    next_pfn = 1 << 20
    for p in range(processes):
        c = _contents(rng, per, templates)
        vpn = np.arange(per, dtype=np.uint64) + np.uint64(0x7F0000000 + p * (per + 1000))
        pfn = np.arange(next_pfn, next_pfn + per, dtype=np.uint64)
        next_pfn += per
        state.append({"vpn": vpn, "c": c, "pfn": pfn})
    for s in range(snapshots):
        parts = []
        proc_rows = []
        for p in range(processes):
            cur = state[p]
            if s > 0:
                n = len(cur["vpn"])
                k = int(n * churn)
                idx = rng.choice(n, size=k, replace=False)
                cur["c"][idx] = _contents(rng, k, templates, zero_frac=0.1, dup_frac=0.4)
                cur["pfn"][idx] = np.arange(next_pfn, next_pfn + k, dtype=np.uint64)
                next_pfn += k
                # unmap a few pages, map a few new ones at the end of the range
                drop = rng.choice(n, size=max(1, k // 10), replace=False)
                keep = np.ones(n, dtype=bool)
                keep[drop] = False
                m = max(1, k // 10)
                newv = cur["vpn"].max() + np.arange(1, m + 1, dtype=np.uint64)
                cur = {
                    "vpn": np.concatenate([cur["vpn"][keep], newv]),
                    "c": np.concatenate([cur["c"][keep], _contents(rng, m, templates)]),
                    "pfn": np.concatenate([cur["pfn"][keep], np.arange(next_pfn, next_pfn + m, dtype=np.uint64)]),
                }
                next_pfn += m
            hashes = np.where(cur["c"] == 0, ZERO_HASH, (cur["c"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xABCDEF))
            flags = np.full(len(hashes), base_flags, np.uint32)
            flags[cur["c"] == 0] |= np.uint32(S.F_ZERO_FILLED)
            st = {"vpn": cur["vpn"], "hash": hashes.astype(np.uint64), "flags": flags, "pfn": cur["pfn"]}
            prev = state[p].get("_st") if s > 0 else None
            dl = D.diff(prev, st)
            parts.append(D.rows_for(s, p, 10000 + p, prev, st, dl, s == 0))
            cur["_st"] = st
            state[p] = cur
            proc_rows.append({
                "snap": s, "proc": p, "pid": 10000 + p, "ppid": 1, "start_ticks": p, "comm": f"synth{p}",
                "cmdline": f"synth{p}", "cgroup": "/", "uid": 0, "state": "ok", "rss_pages": len(hashes),
                "anon_pages": len(hashes), "captured_pages": len(hashes), "mergeable": mergeable,
                "merge_any": False, "t_read_ns": int(s * interval * 1e9),
            })
        cols = {k: np.concatenate([q[k] for q in parts]) for k in S.PAGES_SCHEMA.names}
        table = pa.table({k: pa.array(cols[k], type=S.PAGES_SCHEMA.field(k).type) for k in S.PAGES_SCHEMA.names}, schema=S.PAGES_SCHEMA)
        t = int(s * interval * 1e9)
        w.commit_snapshot(s, t, t, {"pages": table, "processes": pa.Table.from_pylist(proc_rows, schema=S.PROCESSES_SCHEMA)},
                          keyframe=(s == 0), stats={"pages": int(sum(len(x["vpn"]) for x in state))})
    w.close("complete")
    return open_trace(path)
