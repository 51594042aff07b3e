"""The answers on the shipped sample traces: how long each takes, and what they say (prints, asserts nothing).

    .venv/bin/python bench/answers.py [--samples vm,prefork,python-sci] [--budget 1] [--skip-demo]

For every sample: wall and CPU seconds of ``frontier`` (standard grid, one worker), ``advise`` (the
default budget, with attribution and fidelity) and ``doctor``, each in a fresh output directory, so
every replay runs (the numba code and the prepared traces are cached on disk: "warm").  Then
``ksmtrace demo`` on the default sample, end to end in a subprocess (its goal: under a minute,
warm).  On a shared machine the wall time grows with the load; the CPU seconds of this process and
its children say how much work it was.

Then, per sample, the frontier's two tables, the advise recommendation, and how close the
recommendation comes to the frontier's best ksm setting within the same budget.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_s() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed(fn):
    t0, c0 = time.monotonic(), cpu_s()
    out = fn()
    return out, time.monotonic() - t0, cpu_s() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="vm,prefork,python-sci")
    ap.add_argument("--budget", type=float, default=1.0, help="advise's CPU budget (%% of a core)")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()

    from ksmtrace.analysis.advise import advise
    from ksmtrace.analysis.doctor import doctor
    from ksmtrace.analysis.frontier import budget_table_rows, frontier, target_table_rows
    from ksmtrace.samples import open_sample
    from ksmtrace.textfmt import table

    names = [s for s in args.samples.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-answers-"))
    rows, found = [], {}
    for name in names:
        tr = open_sample(name)
        tr.prepare("recorded"), tr.prepare("anon")  # warm the prepared-trace cache
        fr, w1, c1 = timed(lambda: frontier(tr, out_dir=tmp / name / "frontier"))
        adv, w2, c2 = timed(lambda: advise(tr, cpu_budget_pct=args.budget, out_dir=tmp / name / "advise"))
        _, w3, c3 = timed(lambda: doctor(tr))
        found[name] = (fr, adv)
        rows.append({"trace": name, "frontier runs": fr.runs.height, "frontier s": round(w1, 1), "cpu s": round(c1, 1),
                     "advise replays": adv.search.height, "advise s": round(w2, 1), "cpu s ": round(c2, 1),
                     "doctor s": round(w3, 1), "cpu s  ": round(c3, 1)})
    demo = None
    if not args.skip_demo:
        out = tmp / "demo"
        t0, c0 = time.monotonic(), cpu_s()
        r = subprocess.run([sys.executable, "-m", "ksmtrace", "demo", "-o", str(out), "--quiet"], capture_output=True,
                           text=True, env=dict(os.environ, KSMTRACE_PROGRESS="0"))
        demo = (r.returncode, time.monotonic() - t0, cpu_s() - c0)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(table(rows))
    if demo:
        print(f"\nksmtrace demo (vm, standard grid, warm): exit {demo[0]}, {demo[1]:.1f} s wall, {demo[2]:.1f} s CPU")
    for name, (fr, adv) in found.items():
        print(f"\n=== {name}: frontier ({fr.runs.height} runs; the oracle saves "
              f"{fr.oracle_saved_mean * 4096 / 2**20:,.1f} MiB on average)")
        print(table(budget_table_rows(fr)))
        print(table(target_table_rows(fr)))
        s = adv.settings
        print(f"advise at {adv.cpu_budget_pct:g} % of a core: {adv.verdict.upper()}; "
              + " ".join(f"{k}={v}" for k, v in s.items()))
        if adv.result is not None:
            e = adv.expected
            t = lambda v: "never" if v is None else f"{v:.0f} s"  # noqa: E731
            print(f"  mean saving {e['pct_of_oracle_mean']:.1f} % of the oracle at {e['cpu_pct']:.3g} % CPU; "
                  f"{e['saving_mib_final']:,.1f} MiB at the end; 50 % / 90 % of it from {t(e['t50_s'])} / {t(e['t90_s'])}")
        best = fr.budget_rows()
        ksm = next((r for r in best if r["policy"] == "ksm" and r["budget_pct"] == adv.cpu_budget_pct), None)
        if ksm and ksm["pct_of_oracle"] is not None and adv.result is not None:
            print(f"  the frontier's best ksm setting within {adv.cpu_budget_pct:g} %: {ksm['settings']} "
                  f"{ksm['pct_of_oracle']:.1f} % at {ksm['cpu_pct']:.3g} % CPU; the recommendation is "
                  f"{adv.expected['pct_of_oracle_mean'] - ksm['pct_of_oracle']:+.1f} percentage points from it")
        for m in adv.more_budget:
            print(f"  at {m['budget_pct']:g} % of a core: {m['settings']} {m['pct_of_oracle']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
