#!/usr/bin/env python3
"""ksmtrace fleet: memory stays bounded as the fleet grows; sketches' error against exact counts.

    python bench/fleet.py                      # 2, 4 and 8 synthetic hosts of 2 M pages x 3 snapshots
    python bench/fleet.py --hosts 2,4 --pages 500000 --quick

For each fleet size it runs, each in a fresh process (peak RSS = ru_maxrss, parent and largest
worker separately):

* ``fleet``: ``ksmtrace.analysis.fleet.fleet`` with 2 local workers and 64 hash-prefix partitions
  (exact counts);
* ``naive``: what a script without partitions does — every host's page rows of the counted
  snapshots in one polars frame, distinct (snapshot, content, host), hosts per content and the
  host-pair counts by a self-join — run only up to ``--naive-max`` hosts (it grows with the fleet).

Then the error of ``--sketch`` (HyperLogLog++, p=14) against the exact counts on the shipped
fleet-vm sample and on the largest synthetic fleet.  Synthetic hosts follow
``ksmtrace.testing.synth`` (20 % zero pages, 25 % Zipf-distributed templates shared by every host,
the rest unique), all with one hash key.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _child(mode: str, paths: list[str], extra: dict) -> None:
    """Runs in a fresh process; prints one JSON line."""
    import polars as pl

    t0 = time.monotonic()
    if mode == "fleet":
        from ksmtrace.analysis.fleet import fleet

        res = fleet(paths, workers=2, partitions=64, snaps=[-1], top_units=0, sketch=extra.get("sketch", False))
        row = res.steps.row(-1, named=True)
        out = {"cross": row["cross_host_saved"], "union": row["fleet_distinct_contents"], "intra": row["intra_host_saved"]}
    else:
        from ksmtrace.trace import schema as S
        from ksmtrace.trace.reader import open_trace

        parts = []
        for h, p in enumerate(paths):
            tr = open_trace(p)
            snap = tr.snapshot(tr.n_snapshots - 1)
            f = pl.col("flags")
            parts.append(snap.filter(((f & S.F_ZERO_FILLED) == 0) & ((f & S.F_PRESENT) != 0))
                         .select("hash").with_columns(pl.lit(h, dtype=pl.UInt32).alias("host")))
        df = pl.concat(parts).unique()
        per = df.group_by("hash").len()
        pairs = df.join(df, on="hash").filter(pl.col("host") < pl.col("host_right")).group_by("host", "host_right").len()
        out = {"cross": int(df.height - per.height), "union": int(per.height), "pairs": pairs.height}
    out["seconds"] = time.monotonic() - t0
    out["rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_worker_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


def run(mode: str, paths: list[str], **extra) -> dict:
    env = dict(os.environ, KSMTRACE_PROGRESS="0")
    r = subprocess.run([sys.executable, __file__, "--child", mode, json.dumps({"paths": paths, **extra})],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="2,4,8")
    ap.add_argument("--pages", type=int, default=2_000_000)
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--naive-max", type=int, default=4)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        info = json.loads(a.child[1])
        _child(a.child[0], info.pop("paths"), info)
        return 0
    from ksmtrace.testing.synth import synthetic_trace

    sizes = [int(x) for x in a.hosts.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-fleet-"))
    os.environ.setdefault("KSMTRACE_CACHE_DIR", str(tmp / "cache"))
    paths = []
    t0 = time.monotonic()
    for h in range(max(sizes)):
        p = tmp / f"host{h}"
        synthetic_trace(p, pages=a.pages, snapshots=a.snapshots, processes=4, seed=h,
                        capture={"hash": {"algorithm": "xxh3_64", "keyed": True, "key_fingerprint": "bench"}})
        paths.append(str(p))
    print(f"# {max(sizes)} synthetic hosts x {a.pages:,} pages x {a.snapshots} snapshots written in "
          f"{time.monotonic() - t0:.0f} s ({tmp})")
    print(f"{'hosts':>5} {'page-snapshots':>15} {'method':>6} {'seconds':>8} {'peak RSS parent':>16} "
          f"{'peak RSS worker':>16} {'cross_host_saved':>17}")
    last = None
    for n in sizes:
        ps = paths[:n]
        f = run("fleet", ps)
        print(f"{n:>5} {n * a.pages * a.snapshots:>15,} {'fleet':>6} {f['seconds']:>8.1f} {f['rss_self_mib']:>12.0f} MiB "
              f"{f['rss_worker_mib']:>12.0f} MiB {f['cross']:>17,}")
        if n <= a.naive_max:
            nv = run("naive", ps)
            assert nv["cross"] == f["cross"] and nv["union"] == f["union"], (nv, f)
            print(f"{n:>5} {n * a.pages * a.snapshots:>15,} {'naive':>6} {nv['seconds']:>8.1f} {nv['rss_self_mib']:>12.0f} MiB "
                  f"{'-':>16} {nv['cross']:>17,}   (same counts; {nv['rss_self_mib'] / max(f['rss_self_mib'], f['rss_worker_mib']):.1f}x the fleet's largest process)")
        last = (ps, f)
    # sketches against exact counts
    print("\n# --sketch (HyperLogLog++, p=14) against exact counts, last aligned snapshot")
    sample = [str(REPO / "sample-traces" / "fleet-vm" / f"guest{i}") for i in range(3)]
    for name, ps, exact in (("fleet-vm sample", sample, run("fleet", sample)), (f"{len(last[0])} synthetic hosts", last[0], last[1])):
        est = run("fleet", ps, sketch=True)
        eu = 100 * (est["union"] - exact["union"]) / exact["union"]
        ec = 100 * (est["cross"] - exact["cross"]) / exact["cross"] if exact["cross"] else float("nan")
        print(f"{name:>20}: distinct contents exact {exact['union']:,} sketch {est['union']:,.0f} ({eu:+.2f} %); "
              f"cross_host_saved exact {exact['cross']:,} sketch {est['cross']:,.0f} ({ec:+.2f} %); "
              f"peak RSS {est['rss_self_mib']:.0f} MiB vs exact {exact['rss_self_mib']:.0f} MiB")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
