"""Controllers and safe presets on the shipped sample traces: what they say, and what they cost (prints, asserts nothing).

    .venv/bin/python bench/controllers.py [--samples vm,prefork] [--hosts vm=800M,16G prefork=300M,16G]

For every sample and host size: ``ksmtrace controllers`` (the static ksm frontier, standard grid,
then ksmtuned and KubeVirt at their sources' periods — 60 s, 3 min — and at 5 s / 10 s, and the
kernel's scan-time advisor), its table, and the wall and CPU seconds it took.  The first host size
is chosen to put the sample under memory pressure (the traced processes use most of it), the
second is a host with room to spare.  Then, per sample, the safe presets: what the oracle and ksm
(pages_to_scan=1000) keep under each, and the exposed merges it leaves; and how long the presets'
content-id rewrite takes beside a plain replay.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from answers import timed  # bench/answers.py: wall and CPU seconds of one call

CONTROLLERS = ["ksmtuned", "kubevirt", "ksmtuned:monitor_interval=5", "kubevirt:interval=10", "scan-time"]
HOSTS = {"vm": ["700M", "16G"], "prefork": ["200M", "16G"], "python-sci": ["700M", "16G"]}
PRESETS = [None, "zero-pages", "same-domain", "windows", "same-domain:process", "read-only"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="vm,prefork")
    ap.add_argument("--hosts", nargs="*", default=None, help="SAMPLE=SIZE,SIZE (default: %s)" % HOSTS)
    args = ap.parse_args()
    hosts = dict(HOSTS)
    for item in args.hosts or []:
        name, _, sizes = item.partition("=")
        hosts[name] = sizes.split(",")

    from ksmtrace.analysis.controllers import compare_controllers
    from ksmtrace.replay import choose_scope, replay, trace_params
    from ksmtrace.samples import open_sample
    from ksmtrace.textfmt import table
    from ksmtrace.trace.restrict import restrict_prepared

    for name in [s for s in args.samples.split(",") if s]:
        tr = open_sample(name)
        with tempfile.TemporaryDirectory(prefix=f"bench-controllers-{name}-") as out:
            frontier = None
            for host in hosts.get(name, ["16G"]):
                cc, wall, cpu = timed(lambda: compare_controllers(tr, CONTROLLERS, host, out, frontier=frontier))
                frontier = cc.frontier  # the static runs once per sample
                print(f"=== {name}, host {host}: controllers against {frontier.policy_runs('ksm').height} static ksm "
                      f"settings ({wall:.1f} s wall, {cpu:.1f} s CPU) ===")
                print(cc.text())
                print()
        params, _ = trace_params(tr, "ksm", {"pages_to_scan": 1000})
        scope = choose_scope(tr)[0]
        rows = []
        for preset in PRESETS:
            if preset == "read-only" and not tr.has_table("vmas"):
                continue
            o = replay(tr, "oracle", restrict=preset, scope=scope)
            k, wall, _ = timed(lambda: replay(tr, "ksm", params, restrict=preset, scope=scope))
            u = o.summary.get("unrestricted_oracle_saved_mean", o.summary["oracle_saved_mean"])
            rows.append({"preset": preset or "none", "oracle keeps": f"{100 * o.summary['oracle_saved_mean'] / u:.1f} %" if u else "-",
                         "ksm keeps": f"{100 * k.summary['frames_saved_mean'] / u:.1f} %" if u else "-",
                         "ksm exposed": k.summary["exposed_merges"], "ksm COW": k.summary["cow_breaks"],
                         "ksm cpu_s": f"{k.summary['cpu_seconds']:.2f}", "replay wall_s": f"{wall:.2f}"})
        print(f"=== {name}: safe presets (saving kept, % of the unrestricted oracle's mean; ksm pages_to_scan=1000) ===")
        print(table(rows))
        prep = tr.prepare(scope)
        times = []
        for preset in PRESETS[1:]:
            if preset == "read-only" and not tr.has_table("vmas"):
                continue
            _, wall, _ = timed(lambda: restrict_prepared(tr, prep, preset))
            times.append(f"{preset} {wall:.2f} s")
        print(f"content-id rewrite ({len(prep.ev_pg):,} events): " + ", ".join(times))
        print()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KSMTRACE_PROGRESS", "0")
    sys.exit(main())
