"""uksm on the sample traces: its readable runtime against its numba kernel (prints figures, asserts nothing).

    .venv/bin/python bench/uksm.py [--repeat 2] [--governor full]

Each sample is replayed with ``runtime="readable"`` (plain Python on the fast engine) and
``runtime="kernel"``; each time is the best of ``--repeat`` timed replays after one warm-up, the
whole replay (set-up, hooks, daemon, the driver's rows).  Also printed: the visits the daemon made
(``pages_visited`` + ``addresses_walked``: UKSM visits holes too), the tables' equality, and the
ratio readable / kernel.
"""
from __future__ import annotations

import argparse
import time

from ksmtrace import samples
from ksmtrace.replay import replay


def best(trace, params, runtime, repeat):
    replay(trace, "uksm", params, runtime=runtime)
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = replay(trace, "uksm", params, runtime=runtime)
        dt = time.perf_counter() - t0
        if out is None or dt < out[1]:
            out = (res, dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--governor", default="full")
    a = ap.parse_args()
    params = {"cpu_governor": a.governor}
    print(f"uksm {params}: best of {a.repeat} replays per runtime")
    print(f"{'trace':<11} {'visits':>9} {'readable s':>10} {'kernel s':>9} {'readable/kernel':>15} {'equal':>6}")
    for name in ("vm", "python-sci", "prefork"):
        tr = samples.open_sample(name)
        r_res, r_t = best(tr, params, "readable", a.repeat)
        k_res, k_t = best(tr, params, "kernel", a.repeat)
        t = k_res.table
        visits = int(t["u_pages_visited"].sum() + t["u_addresses_walked"].sum())
        print(f"{name:<11} {visits:>9} {r_t:>10.2f} {k_t:>9.2f} {r_t / k_t:>15.1f} {str(r_res.table.equals(t)):>6}")


if __name__ == "__main__":
    main()
