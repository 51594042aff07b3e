"""One interpreter of the python-sci sample workload (run by recapture.py, not by ksmtrace).

    python worker.py KIND SECONDS

1. marks the whole process mergeable for KSM: prctl(PR_SET_MEMORY_MERGE=67, 1) (every current
   and future VMA gets VM_MERGEABLE, as `mg` in smaps);
2. prints "armed" and waits for one line on stdin (the capture takes its first snapshot of the
   bare interpreters meanwhile);
3. imports the same scientific stack as its siblings (numpy, pyarrow, polars, matplotlib/Agg);
4. does KIND of work for SECONDS, then prints "done" and waits for stdin to close.

KIND: linalg (numpy dense linear algebra), frames (polars group-by/join), plots (matplotlib
rendering to PNG in memory), arrow (pyarrow tables, sort, Parquet round trips).  Each keeps a small
rolling window of results, so memory is allocated, written and freed throughout.
"""
from __future__ import annotations

import ctypes
import io
import sys
import time

PR_SET_MEMORY_MERGE = 67


def arm() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MEMORY_MERGE)")


def main() -> int:
    kind, seconds = sys.argv[1], float(sys.argv[2])
    arm()
    print("armed", flush=True)
    sys.stdin.readline()
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from matplotlib.figure import Figure

    print("imported", flush=True)
    seed = {"linalg": 1, "frames": 2, "plots": 3, "arrow": 4}[kind]
    rng = np.random.default_rng(seed)
    keep: list = []
    end = time.monotonic() + seconds
    it = 0
    while time.monotonic() < end:
        it += 1
        if kind == "linalg":
            a = rng.standard_normal((220, 220))
            q, r = np.linalg.qr(a)
            w = np.linalg.eigvals(a @ a.T)
            x = np.linalg.solve(a + 220 * np.eye(220), rng.standard_normal(220))
            keep.append((q[:40].copy(), np.sort(w.real), x))
        elif kind == "frames":
            n = 40_000
            df = pl.DataFrame({"k": rng.integers(0, 500, n), "v": rng.standard_normal(n),
                               "s": rng.choice(["a", "b", "c", "d"], n)})
            g = df.group_by("k", "s").agg(pl.col("v").mean().alias("m"), pl.len().alias("n")).sort("k", "s")
            j = g.join(df.head(2000), on=["k", "s"], how="inner")
            keep.append(j.select(pl.col("m").sum(), pl.col("n").max()))
        elif kind == "plots":
            fig = Figure(figsize=(5, 3.5), dpi=80)
            ax = fig.add_subplot()
            t = np.linspace(0, 10, 2000)
            for k in range(4):
                ax.plot(t, np.sin(t * (k + 1) + it) + rng.normal(0, 0.1, t.size), lw=0.8)
            ax.set_title(f"iteration {it}")
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            keep.append(buf.getvalue()[:4096])
        elif kind == "arrow":
            n = 30_000
            tbl = pa.table({"id": pa.array(rng.permutation(n)), "x": pa.array(rng.standard_normal(n)),
                            "tag": pa.array([f"t{v}" for v in rng.integers(0, 50, n)])})
            idx = pc.sort_indices(tbl, sort_keys=[("tag", "ascending"), ("x", "descending")])
            tbl = tbl.take(idx)
            buf = io.BytesIO()
            pq.write_table(tbl, buf)
            back = pq.read_table(io.BytesIO(buf.getvalue()))
            keep.append(pc.sum(back["x"]).as_py())
        else:
            raise SystemExit(f"unknown kind {kind!r}")
        if len(keep) > 30:
            del keep[: len(keep) - 30]
        time.sleep(0.05)
    print(f"done {it}", flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
