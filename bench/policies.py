"""Replay throughput of the page-dedup policies on one generated trace (prints figures, asserts nothing).

    .venv/bin/python bench/policies.py [--pages 200000] [--snaps 50] [--procs 8] [--repeat 3] [--keep DIR]

The trace is generated at the numpy level (per process: sorted vpns, contents, pfns) and written
through the real trace writer and delta encoder, like ``ksmtrace.testing.make_trace`` but without a
Python object per page.  Realistic churn: 15 % zero-filled pages, 35 % drawn from a shared pool
(Zipf-like), the rest unique; every second about 2 % of pages are written (80 % of the writes hit
a hot 10 % of each process), 0.5 % unmapped and 0.5 % newly mapped; one process exits half way
and another forks from process 0 (sharing its frames) a little later.

Each policy is replayed once with the fast engine to compile, then ``--repeat`` times timed; each
time below is the best (minimum) of the repeats, the least noisy estimate on a shared machine.
"visits" = the ``pages_visited`` unit (pages handed to the policy's compare/merge step or hash
lookup).  Figures of merit, each with its ratio to ``ksm``:

* ``visits/s``: visits per wall-clock second of the whole replay.  The replay driver's own work
  (the engine applying each snapshot's events, the metrics rows, per-process counts) is about the
  same for every policy, so this figure favours a policy that makes many visits per snapshot.
* ``visits/policy s``: visits per second spent *inside the policy's runtime*, timed directly by
  wrapping the runtime object: ``init s`` (building it: state arrays, scan order), ``hooks s``
  (its ``on_snapshot``: fault-side work such as PKSM registering new pages or the hash table
  dropping references on COW) and ``daemon s`` (its ``run_until``: the scanner).  Everything the
  runtime does is counted, nothing the driver does.
* ``ns/visit``: daemon nanoseconds per visit.

The driver baseline (an ``oracle`` replay: no daemon) is printed for reference; wall s minus
policy s is about that.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ksmtrace.trace import delta as D
from ksmtrace.trace import schema as S
from ksmtrace.trace.writer import TraceWriter

FLAGS = S.F_PRESENT | S.F_PFN | S.F_KPF | S.F_ANON | S.F_MERGEABLE


def _hash(c: np.ndarray) -> np.ndarray:
    x = (c.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    return x * np.uint64(0x94D049BB133111EB)


class Gen:
    def __init__(self, rng, pool=5000):
        self.rng = rng
        self.pool = pool
        self.next_unique = pool + 1
        self.next_pfn = 0x100000

    def contents(self, n):
        r = self.rng.random(n)
        c = np.empty(n, np.int64)
        zero = r < 0.15
        shared = (r >= 0.15) & (r < 0.50)
        uniq = r >= 0.50
        c[zero] = 0
        k = int(shared.sum())
        c[shared] = 1 + np.minimum((self.rng.pareto(1.2, k) * 50).astype(np.int64), self.pool - 1)
        u = int(uniq.sum())
        c[uniq] = self.next_unique + np.arange(u)
        self.next_unique += u
        return c

    def pfns(self, n):
        p = self.next_pfn + np.arange(n, dtype=np.int64)
        self.next_pfn += n
        return p


def generate(path: Path, n_pages: int, n_snaps: int, n_procs: int, seed: int = 1):
    from ksmtrace.trace.reader import open_trace

    rng = np.random.default_rng(seed)
    g = Gen(rng)
    per = n_pages // n_procs
    procs = {}
    for p in range(n_procs):
        vpn = np.arange(per, dtype=np.int64) * 2 + 0x1000  # holes between pages
        procs[p] = {"vpn": vpn, "c": g.contents(per), "pfn": g.pfns(per), "hot": rng.choice(per, per // 10, replace=False)}
    host = {"kernel_release": "bench", "page_size": 4096, "hz": 250, "thp_enabled": "never", "root": True, "pfn_readable": True}
    cap = {"scope": "anon", "interval_s": 1.0, "soft_dirty": False, "contents": False, "hash": {"algorithm": "bench", "key_fingerprint": "bench"}}
    w = TraceWriter(path, host=host, capture=cap, tracer={"name": "bench", "version": "1"}, pages_schema=S.pages_schema(sample=False))
    prev_state: dict[int, dict] = {}
    exit_at, fork_at = n_snaps // 2, n_snaps // 2 + 5
    for s in range(n_snaps):
        if s == exit_at and n_procs > 2:
            procs.pop(n_procs - 1, None)
        if s == fork_at:
            src = procs[0]
            procs[n_procs] = {k: v.copy() for k, v in src.items()}
        for p, st in procs.items():
            if s == 0 or (p == n_procs and s == fork_at):
                continue
            n = len(st["vpn"])
            nw = int(0.02 * n)
            hot = rng.random(nw) < 0.8
            idx = np.where(hot, st["hot"][rng.integers(0, len(st["hot"]), nw)] % n, rng.integers(0, n, nw))
            idx = np.unique(idx)
            st["c"][idx] = g.contents(len(idx))
            if p == n_procs:  # the fork child's writes are COW copies: new frames
                st["pfn"][idx] = g.pfns(len(idx))
            keep = rng.random(n) >= 0.005
            nn = n - int(keep.sum())
            for k in ("vpn", "c", "pfn"):
                st[k] = st[k][keep]
            st["hot"] = st["hot"][st["hot"] < len(st["vpn"])]
            newv = st["vpn"][-1] + 2 + 2 * np.arange(nn, dtype=np.int64) if len(st["vpn"]) else np.arange(nn) * 2
            st["vpn"] = np.concatenate([st["vpn"], newv])
            st["c"] = np.concatenate([st["c"], g.contents(nn)])
            st["pfn"] = np.concatenate([st["pfn"], g.pfns(nn)])
        parts = []
        rows = []
        for p in sorted(procs):
            st = procs[p]
            flags = np.full(len(st["vpn"]), FLAGS, np.uint32)
            flags[st["c"] == 0] |= S.F_ZERO_FILLED
            cur = {"vpn": st["vpn"].astype(np.uint64), "hash": _hash(st["c"]), "flags": flags, "pfn": st["pfn"].astype(np.uint64)}
            prev = prev_state.get(p)
            parts.append(D.rows_for(s, p, 1000 + p, prev, cur, D.diff(prev, cur), s == 0))
            prev_state[p] = cur
            rows.append({"snap": s, "proc": p, "pid": 1000 + p, "ppid": 1, "start_ticks": p, "comm": f"p{p}", "cmdline": f"p{p}",
                         "cgroup": "/", "uid": 0, "state": "ok", "rss_pages": len(st["vpn"]), "anon_pages": len(st["vpn"]),
                         "captured_pages": len(st["vpn"]), "mergeable": True, "merge_any": False, "t_read_ns": s * 10**9})
        for p in sorted(set(prev_state) - set(procs)):
            prev = prev_state.pop(p)
            empty = {k: v[:0] for k, v in prev.items()}
            parts.append(D.rows_for(s, p, 1000 + p, prev, empty, D.diff(prev, empty), False))
        schema = S.pages_schema(sample=False)
        cols = {name: np.concatenate([q[name] for q in parts]) for name in schema.names}
        pages = pa.table({n: pa.array(cols[n].astype(schema.field(n).type.to_pandas_dtype())) for n in schema.names}, schema=schema)
        tables = {"pages": pages, "processes": pa.Table.from_pylist(rows, schema=S.PROCESSES_SCHEMA)}
        w.commit_snapshot(s, s * 10**9, s * 10**9, tables, keyframe=s == 0, stats={"pages": int(sum(len(v["vpn"]) for v in prev_state.values()))})
    w.close("complete")
    return open_trace(path)


POLICIES = [
    ("ksm", {"pages_to_scan": 1000, "sleep_millisecs": 20}, "recorded"),
    ("pksm", {}, "anon"),
    ("pksm-delay", {}, "anon"),
    ("hashtable", {"pages_per_second": 50000, "process_pages_per_second": 0, "sleep_millisecs": 20}, "anon"),
    ("uksm", {}, "anon"),
]


class _Timed:
    """Wraps a runtime and times the policy's own calls (the driver's work is not counted)."""

    def __init__(self, rt, init):
        self.rt = rt
        self.init = init
        self.hooks = 0.0
        self.daemon = 0.0

    def on_snapshot(self, s, now):
        t0 = time.perf_counter()
        self.rt.on_snapshot(s, now)
        self.hooks += time.perf_counter() - t0

    def run_until(self, t_end):
        t0 = time.perf_counter()
        self.rt.run_until(t_end)
        self.daemon += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.rt, name)


def timed_replay(tr, name, params, scope):
    """One replay: (result, wall s, init s, hooks s, daemon s)."""
    from ksmtrace.replay import make_policy, replay

    pol = make_policy(name, params)
    made = []
    runtime = pol.runtime

    def wrapped(ctx):
        t0 = time.perf_counter()
        rt = runtime(ctx)
        made.append(_Timed(rt, time.perf_counter() - t0))
        return made[-1]

    pol.runtime = wrapped
    t0 = time.perf_counter()
    res = replay(tr, pol, scope=scope)
    wall = time.perf_counter() - t0
    return res, wall, made[0].init, made[0].hooks, made[0].daemon


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=200_000)
    ap.add_argument("--snaps", type=int, default=50)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="timed replays per policy (the best is reported)")
    ap.add_argument("--keep", default=None, help="write the trace here and keep it")
    a = ap.parse_args()
    from ksmtrace.replay import replay

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="ksmtrace-bench-"))
    t0 = time.perf_counter()
    tr = generate(tmp / "trace", a.pages, a.snaps, a.procs)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep = tr.prepare("anon")
    tr.prepare("recorded")
    t_prep = time.perf_counter() - t0
    n_events = len(prep.ev_pg)
    print(f"trace: {prep.n_pages} page ids, {a.snaps} snapshots, {prep.n_procs} processes, {n_events} events "
          f"(generated in {t_gen:.1f} s, prepared in {t_prep:.1f} s); times: best of {a.repeat} replays")
    # the replay driver's own cost (engine, metrics rows) with a policy that does no daemon work
    replay(tr, "oracle", {}, scope="anon")
    t_drv = float("inf")
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        replay(tr, "oracle", {}, scope="anon")
        t_drv = min(t_drv, time.perf_counter() - t0)
    print(f"driver baseline (oracle replay, no daemon): {t_drv:.2f} s; policy s = init s + hooks s + daemon s, timed inside the runtime")
    print(f"{'policy':<11} {'params':<58} {'visits':>10} {'wall s':>7} {'visits/s':>11} {'vs ksm':>7} "
          f"{'init s':>6} {'hooks s':>7} {'daemon s':>8} {'policy s':>8} {'visits/policy s':>15} {'vs ksm':>7} {'ns/visit':>8} "
          f"{'saved/oracle':>12} {'cow':>6} {'model cpu s':>11}")
    base = None
    base2 = None
    for name, params, scope in POLICIES:
        replay(tr, name, params, scope=scope)  # compile / warm up
        runs = [timed_replay(tr, name, params, scope) for _ in range(a.repeat)]
        res = runs[0][0]
        wall = min(r[1] for r in runs)
        _, _, init, hooks, daemon = min(runs, key=lambda r: r[2] + r[3] + r[4])  # the run with the least policy time
        own = max(init + hooks + daemon, 1e-6)
        visits = int(res.table["u_pages_visited"].sum())
        vps = visits / wall
        vps2 = visits / own
        if base is None:
            base, base2 = vps, vps2
        s = res.summary
        frac = s["frames_saved_final"] / max(1, s["oracle_saved_final"])
        ptxt = ",".join(f"{k}={v}" for k, v in params.items()) or "(defaults)"
        print(f"{name:<11} {ptxt:<58} {visits:>10} {wall:>7.2f} {vps:>11.0f} {vps / base:>7.2f} "
              f"{init:>6.3f} {hooks:>7.3f} {daemon:>8.3f} {own:>8.3f} {vps2:>15.0f} {vps2 / base2:>7.2f} {1e9 * daemon / max(visits, 1):>8.0f} "
              f"{frac:>12.2f} {s['cow_breaks']:>6} {res.cpu_seconds():>11.3f}")
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
