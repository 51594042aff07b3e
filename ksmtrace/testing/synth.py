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
    # per process, its pages now (vpn sorted): content key, frame, and the hash and flags the trace shows
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
            if s == 0:
                cur["hash"], cur["flags"] = _hash_flags(cur["c"], base_flags)
                rows = {"vpn": cur["vpn"], "op": np.full(per, S.OP_NEW, np.uint8), "hash": cur["hash"],
                        "flags": cur["flags"], "pfn": cur["pfn"]}
            else:
                cur, rows = _churn(rng, cur, churn, templates, next_pfn, base_flags)
                next_pfn = cur.pop("next_pfn")
                state[p] = cur
            n = len(cur["vpn"])
            m = len(rows["vpn"])
            rows.update(snap=np.full(m, s, np.uint32), proc=np.full(m, p, np.uint32), pid=np.full(m, 10000 + p, np.uint32))
            parts.append(rows)
            proc_rows.append({
                "snap": s, "proc": p, "pid": 10000 + p, "ppid": 1, "start_ticks": p, "comm": f"synth{p}",
                "cmdline": f"synth{p}", "cgroup": "/", "uid": 0, "state": "ok", "rss_pages": n,
                "anon_pages": n, "captured_pages": n, "mergeable": mergeable,
                "merge_any": False, "t_read_ns": int(s * interval * 1e9),
            })
        cols = {k: np.concatenate([q[k] for q in parts]) for k in S.PAGES_SCHEMA.names}
        del parts
        table = pa.table({k: pa.array(cols[k], type=S.PAGES_SCHEMA.field(k).type) for k in S.PAGES_SCHEMA.names}, schema=S.PAGES_SCHEMA)
        del cols
        t = int(s * interval * 1e9)
        w.commit_snapshot(s, t, t, {"pages": table, "processes": pa.Table.from_pylist(proc_rows, schema=S.PROCESSES_SCHEMA)},
                          keyframe=(s == 0), stats={"pages": int(sum(len(x["vpn"]) for x in state))})
        del table
    w.close("complete")
    return open_trace(path)


def _hash_flags(c: np.ndarray, base_flags) -> tuple[np.ndarray, np.ndarray]:
    """The keyed hash the trace shows for content keys (the zero page's is fixed) and the flags."""
    zero = c == 0
    hashes = np.where(zero, np.uint64(ZERO_HASH), (c.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xABCDEF))
    flags = np.full(len(c), base_flags, np.uint32)
    flags[zero] |= np.uint32(S.F_ZERO_FILLED)
    return hashes.astype(np.uint64), flags


def _churn(rng, cur: dict, churn: float, templates: int, next_pfn: int, base_flags):
    """One snapshot of one process: ``churn`` of its pages rewritten (with new frames), a few
    unmapped, a few new ones mapped at the end of its range.  Returns its new state and its page
    rows (the delta against the old state, in address order).  Written out rather than diffed, so
    a 16 M-page trace is generated in bounded time and memory; a rewrite that leaves the hash
    unchanged (zero to zero, a template to itself) shows no row, as no capture would see it."""
    n = len(cur["vpn"])
    k = int(n * churn)
    idx = rng.choice(n, size=k, replace=False)
    c = cur["c"]
    c[idx] = _contents(rng, k, templates, zero_frac=0.1, dup_frac=0.4)
    pfn = cur["pfn"]
    pfn[idx] = np.arange(next_pfn, next_pfn + k, dtype=np.uint64)
    next_pfn += k
    drop = rng.choice(n, size=max(1, k // 10), replace=False)
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    m = max(1, k // 10)
    newv = cur["vpn"].max() + np.arange(1, m + 1, dtype=np.uint64)
    new_c = _contents(rng, m, templates)
    new_pfn = np.arange(next_pfn, next_pfn + m, dtype=np.uint64)
    next_pfn += m
    hash_idx, flags_idx = _hash_flags(c[idx], base_flags)
    written = np.zeros(n, dtype=bool)
    written[idx[hash_idx != cur["hash"][idx]]] = True
    cur["hash"][idx] = hash_idx
    cur["flags"][idx] = flags_idx
    changed = np.flatnonzero(written & keep)
    new_hash, new_flags = _hash_flags(new_c, base_flags)
    gone = np.sort(drop)
    rows = {
        "vpn": np.concatenate([cur["vpn"][changed], cur["vpn"][gone], newv]),
        "op": np.concatenate([np.full(len(changed), S.OP_CHANGED, np.uint8), np.full(len(gone), S.OP_GONE, np.uint8),
                              np.full(m, S.OP_NEW, np.uint8)]),
        "hash": np.concatenate([cur["hash"][changed], np.zeros(len(gone), np.uint64), new_hash]),
        "flags": np.concatenate([cur["flags"][changed], np.zeros(len(gone), np.uint32), new_flags]),
        "pfn": np.concatenate([pfn[changed], np.zeros(len(gone), np.uint64), new_pfn]),
    }
    order = np.argsort(rows["vpn"], kind="stable")
    rows = {k_: v[order] for k_, v in rows.items()}
    new = {name: np.concatenate([cur[name][keep], add]) for name, add in
           (("vpn", newv), ("c", new_c), ("pfn", new_pfn), ("hash", new_hash), ("flags", new_flags))}
    new["next_pfn"] = next_pfn
    return new, rows
