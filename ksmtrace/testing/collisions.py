"""Traces whose pages have true sampled hashes at every strength: synthetic page *bytes* with a
controlled structure, hashed with the real function (:func:`ksmtrace.trace.sampled.strength_samples`)
over one random word permutation -- for studying hash strength, where the sample traces (which
record only the 64-word hash) cannot show how collisions change with the strength.

The page mix (fractions of all pages; the rest are unique random pages):

* ``zero``: all-zero pages;
* ``dup``: copies of a pool of random pages (the duplicates a policy should merge);
* ``sparse``: zero pages with a few non-zero words (1 + a geometric number, mean ``sparse_words``)
  at random offsets -- a sample of s words misses them all with probability ~(1 - k/1024)^s, and
  then hashes exactly like the zero page: a false zero-page match; two such pages also collide
  with each other.  Real heaps and guest RAM hold many (the vm sample has ~1,000 pages whose
  64-word hash is the zero page's);
* ``template``: variants of a few random base pages that differ from their base in a few words
  (mean ``template_words``): they collide with one another where the sample misses the differences.

Sparse and template contents are drawn from pools with replacement, so some of them are
duplicates too.  Every snapshot rewrites ``churn`` of each process's pages with a new draw from
the same mix.  Each process is one VMA, plus (``vma_churn``) a small scratch VMA that grows by a
page every snapshot, as a heap or an arena does (UKSM re-creates its slot each time; without
any VMA change, UKSM's hash rounds can stop, see docs/policies-uksm.md).  No fork sharing.  Written with numpy straight through the
trace writer (a few seconds for ~10^5 page-snapshots).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import xxhash

from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace.trace.sampled import PAGE, strength_samples, zero_sample
from ksmtrace.trace.writer import TraceWriter

WORDS = PAGE // 4
# content id ranges by kind (id 0 = the zero page)
_KIND_BASE = {"d": 1 << 40, "s": 2 << 40, "t": 3 << 40, "u": 4 << 40}


def _page_words(cid: int, seed: int, sparse_words: float, template_words: float, n_bases: int) -> np.ndarray:
    kind = next(k for k, b in sorted(_KIND_BASE.items(), key=lambda x: -x[1]) if cid >= b)
    i = cid - _KIND_BASE[kind]
    r = np.random.default_rng([seed, ord(kind), i])
    if kind == "s":
        w = np.zeros(WORDS, np.uint32)
        k = min(WORDS, 1 + int(r.geometric(1.0 / sparse_words)))
        w[r.choice(WORDS, size=k, replace=False)] = r.integers(1, 1 << 32, size=k, dtype=np.uint32)
        return w
    if kind == "t":
        base = np.random.default_rng([seed, 7, i % n_bases]).integers(0, 1 << 32, WORDS, dtype=np.uint32)
        k = min(WORDS, 1 + int(r.geometric(1.0 / template_words)))
        pos = r.choice(WORDS, size=k, replace=False)
        base[pos] ^= r.integers(1, 1 << 32, size=k, dtype=np.uint32)
        return base
    return r.integers(0, 1 << 32, WORDS, dtype=np.uint32)


def collision_trace(path: str | os.PathLike, *, procs: int = 4, pages: int = 1500, snapshots: int = 16,
                    interval: float = 0.5, zero: float = 0.1, dup: float = 0.3, sparse: float = 0.2,
                    template: float = 0.2, sparse_words: float = 4.0, template_words: float = 4.0,
                    churn: float = 0.05, vma_churn: bool = True, seed: int = 0):
    """Write the trace (see the module docstring) and return it opened."""
    from ksmtrace.trace.reader import open_trace

    rng = np.random.default_rng(seed)
    perm = rng.permutation(WORDS)
    n_dup, n_pool, n_bases = max(1, pages // 4), max(1, procs * pages // 3), 8
    next_unique = [0]
    cuts = np.cumsum([zero, dup, sparse, template])

    def draw(n: int) -> np.ndarray:
        u = rng.random(n)
        kind = np.searchsorted(cuts, u, side="right")  # 0 zero, 1 dup, 2 sparse, 3 template, 4 unique
        out = np.zeros(n, np.int64)
        out[kind == 1] = _KIND_BASE["d"] + rng.integers(n_dup, size=int((kind == 1).sum()))
        out[kind == 2] = _KIND_BASE["s"] + rng.integers(n_pool, size=int((kind == 2).sum()))
        out[kind == 3] = _KIND_BASE["t"] + rng.integers(n_pool, size=int((kind == 3).sum()))
        m = int((kind == 4).sum())
        out[kind == 4] = _KIND_BASE["u"] + next_unique[0] + np.arange(m)
        next_unique[0] += m
        return out

    contents = [draw(pages) for _ in range(procs)]
    history = []
    for s in range(snapshots):
        if s:
            for p in range(procs):
                idx = rng.choice(pages, size=int(pages * churn), replace=False)
                contents[p] = contents[p].copy()
                contents[p][idx] = draw(len(idx))
        history.append([c.copy() for c in contents])
    ids = np.unique(np.concatenate([c for snap in history for c in snap]))
    ids = ids[ids != 0]
    table = np.zeros((len(ids), len(S.SAMPLE_STRENGTHS)), np.uint32)
    for a in range(0, len(ids), 2048):
        part = ids[a : a + 2048]
        arr = np.stack([_page_words(int(c), seed, sparse_words, template_words, n_bases) for c in part])
        table[a : a + len(part)] = strength_samples(arr.view(np.uint8).reshape(len(part), PAGE), perm)
    zero_row = np.array([zero_sample(x) for x in S.SAMPLE_STRENGTHS], np.uint32)
    key = seed * 0x9E3779B1 + 1

    pschema = S.pages_schema(strengths=True)
    extra = tuple(n for n in pschema.names if n not in S.PAGES_SCHEMA.names)
    host = {"kernel_release": "synthetic", "page_size": 4096, "hz": 250, "root": True, "pfn_readable": True}
    cap = {"scope": "anon", "interval_s": interval, "soft_dirty": False, "synthetic": "collisions", "seed": seed,
           "fingerprints": True, "sample_strengths": list(S.SAMPLE_STRENGTHS)}
    w = TraceWriter(path, host=host, capture=cap, tracer={"name": "synthetic-collisions", "version": "1"}, pages_schema=pschema)
    base_flags = np.uint32(S.F_PRESENT | S.F_ANON | S.F_PFN | S.F_KPF | S.F_MERGEABLE)
    prev_state: list = [None] * procs
    pfn_of: list = [None] * procs
    next_pfn = 1 << 20
    for s, snap in enumerate(history):
        parts, proc_rows, vma_rows = [], [], []
        for p in range(procs):
            c = snap[p]
            vpn = np.arange(pages, dtype=np.uint64) + np.uint64(0x10000 * (p + 1))
            scratch = np.arange(8, dtype=np.uint64) + np.uint64(0x10000 * (p + 1) + 0x8000)
            pos = np.searchsorted(ids, c)
            zero_pg = c == 0
            vals = np.where(zero_pg[:, None], zero_row[None, :], table[np.minimum(pos, len(ids) - 1)])
            hashes = np.array([xxhash.xxh3_64_intdigest(int(x).to_bytes(8, "little"), seed=key) for x in c.tolist()], np.uint64)
            flags = np.full(pages, base_flags, np.uint32)
            flags[zero_pg] |= np.uint32(S.F_ZERO_FILLED)
            if vma_churn:  # the scratch VMA's 8 pages (unique, unchanging contents)
                sh = np.array([xxhash.xxh3_64_intdigest(b"scratch%d-%d" % (p, i), seed=key) for i in range(8)], np.uint64)
                vpn = np.concatenate([vpn, scratch])
                hashes = np.concatenate([hashes, sh])
                flags = np.concatenate([flags, np.full(8, base_flags, np.uint32)])
                vals = np.concatenate([vals, (sh[:, None] >> np.arange(8, dtype=np.uint64)[None, :]).astype(np.uint32)])
                c = np.concatenate([c, np.full(8, -1 - p, np.int64)])
            old = pfn_of[p]
            n = len(c)
            changed = np.ones(n, bool) if old is None else np.concatenate([history[s - 1][p] != c[:pages], np.zeros(n - pages, bool)])
            pfn = np.empty(n, np.uint64) if old is None else old.copy()
            k = int(changed.sum())
            pfn[changed] = np.arange(next_pfn, next_pfn + k, dtype=np.uint64)
            next_pfn += k
            pfn_of[p] = pfn
            st = {"vpn": vpn, "hash": hashes, "flags": flags, "pfn": pfn}
            for i, x in enumerate(S.SAMPLE_STRENGTHS):
                st[S.strength_column(x)] = vals[:, i].astype(np.uint32)
            dl = D.diff(prev_state[p], st)
            parts.append(D.rows_for(s, p, 20000 + p, prev_state[p], st, dl, s == 0, extra))
            prev_state[p] = st
            proc_rows.append({"snap": s, "proc": p, "pid": 20000 + p, "ppid": 1, "start_ticks": p, "comm": f"coll{p}",
                              "cmdline": f"coll{p}", "cgroup": "/", "uid": 0, "state": "ok", "rss_pages": n,
                              "anon_pages": n, "captured_pages": n, "mergeable": True, "merge_any": False,
                              "t_read_ns": int(s * interval * 1e9)})
            spans = [(int(vpn[0]), int(vpn[0]) + pages)]
            if vma_churn:
                spans.append((int(scratch[0]), int(scratch[0]) + 8 + s))
            for a, b in spans:
                vma_rows.append({"snap": s, "proc": p, "pid": 20000 + p, "start": a << 12, "end": b << 12, "perms": "rw-p",
                                 "flags": S.V_ANON | S.V_PRIVATE | S.V_IN_SCOPE | S.V_MERGEABLE,
                                 "vmflags": "rd wr mr mw me ac mg", "path": "", "rss_pages": b - a, "anon_pages": b - a,
                                 "captured_pages": b - a})
        cols = {k: np.concatenate([q[k] for q in parts]) for k in pschema.names}
        pt = pa.table({k: pa.array(cols[k], type=pschema.field(k).type) for k in pschema.names}, schema=pschema)
        t = int(s * interval * 1e9)
        w.commit_snapshot(s, t, t, {"pages": pt, "processes": pa.Table.from_pylist(proc_rows, schema=S.PROCESSES_SCHEMA),
                                    "vmas": pa.Table.from_pylist(vma_rows, schema=S.VMAS_SCHEMA)},
                          keyframe=(s == 0), stats={"pages": int(sum(len(x["vpn"]) for x in prev_state))})
    w.close("complete")
    return open_trace(path)
