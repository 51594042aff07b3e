#!/usr/bin/env python3
"""Fidelity of the ksm replay against the real kernel: the full matrix (run as root; 20-40 min).

    python bench/fidelity.py -o fidelity-bench            # everything
    python bench/fidelity.py -o fb --only static,rewrite  # a subset of workloads
    python bench/fidelity.py -o fb --install-costs        # also ship the fitted cost model
    python bench/fidelity.py -o fb --load-study           # only ksmd's pace beside CPU-bound processes (~8 min)

Steps (every KSM setting is restored after each run; no process is left running):

1. prepares the real programs: ``sample-traces/vm/prepare.sh`` (QEMU guests) and a temporary venv
   with gunicorn (the pre-fork server pool; not a ksmtrace dependency);
2. ground-truth runs: every workload x parameter set of MATRIX, each real workload at least twice
   (``--runs``), captured under real KSM (``ksmtrace.lab.validate.ground_truth_run``); an
   existing complete trace in the output directory is reused (the bench can be resumed);
3. calibration: microbenchmarks (the base costs), then ``fit_from_runs`` on the runs, holding out
   the second run of every workload x parameter set; the fitted model is written to
   ``OUT/fitted-costs.json`` (and to ``ksmtrace/engine/default_costs.json`` with --install-costs);
4. fidelity of every run with the fitted model (CPU and the daemon's clock) and, per workload and
   parameter set, every goal's measured value and PASS/FAIL (``OUT/goals.md``, ``OUT/bench.json``);
5. the interval studies: one capture of the rewrite workload (and of the pre-fork pool) at a short
   interval, subsampled, with the recommendation (``OUT/interval-<name>.png``).

``--load-study`` runs only the load study instead: the deterministic workloads of LOAD_STUDY at the
default and the 10x scan rate, beside 0, 1 and 2 CPU-bound processes (``--neighbours``), ``--runs``
times each, and prints per run ``full_scans`` and t90 real vs simulated — with the daemon's clock
that charges ksmd's measured run-queue wait per wake-up, preemption and full-scan start
(``wall_clock_model``) and, for comparison, with the wait spread over the CPU time in proportion
(what a plain capture allows) — against the goals (±1 full scan; t90 within one full-scan period).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KSMTRACE_PROGRESS", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ksmtrace.lab import kernelksm as K  # noqa: E402
from ksmtrace.cli._options import table  # noqa: E402

# workload -> (params, [(settings, duration s, interval s)])
SMALL = {"processes": 3, "pages": 4096}
MATRIX: list[tuple[str, dict, list[tuple[str, float, float]]]] = [
    ("static", dict(SMALL), [("defaults", 20, 0.5), ("fast", 10, 0.25), ("nosmart", 10, 0.25), ("zero", 10, 0.25),
                             ("chains", 10, 0.25)]),
    ("zero", {"processes": 2, "pages": 4096}, [("defaults", 16, 0.5), ("fast", 10, 0.25), ("zero", 10, 0.25)]),
    ("rewrite", {"processes": 2, "pages": 4096, "period": 2.0, "rewrite_fraction": 0.05},
     [("defaults", 20, 0.25), ("fast", 12, 0.25), ("nosmart", 12, 0.25), ("chains", 12, 0.25)]),
    ("forkdiverge", {"pages": 4096, "children": 2}, [("fast", 12, 0.25), ("defaults", 16, 0.5), ("chains", 12, 0.25)]),
    ("churn", {"processes": 2, "region_pages": 1024, "regions": 4, "lifetime": 2.0}, [("fast", 12, 0.25), ("nosmart", 12, 0.25)]),
    ("vms", {"guests": 3, "mem": 256}, [("fast", 30, 1.0), ("zero", 30, 1.0)]),
    ("prefork", {"workers": 4, "table_mb": 24, "rate": 50}, [("fast", 20, 0.5)]),
]
INTERVAL_STUDIES = [
    # name, workload, params, settings, duration, interval, rewrite period
    ("rewrite", "rewrite", {"processes": 2, "pages": 4096, "period": 1.0, "rewrite_fraction": 0.05}, "fast", 12.0, 0.05, 1.0),
    ("prefork", "prefork", {"workers": 4, "table_mb": 24, "rate": 50}, "fast", 16.0, 0.2, None),
]


# the load study: workload, params, [(settings, duration s, interval s)]
LOAD_STUDY: list[tuple[str, dict, list[tuple[str, float, float]]]] = [
    ("static", {"processes": 2, "pages": 2048}, [("defaults", 10, 0.5), ("fast", 6, 0.25)]),
    ("zero", {"processes": 2, "pages": 2048}, [("defaults", 10, 0.5), ("zero", 6, 0.25)]),
]


def say(msg: str) -> None:
    print(msg, flush=True)


def leftovers() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu|workload|gunicorn|ksmtrace_prefork"], capture_output=True, text=True).stdout
    mine = str(os.getpid())
    return [ln for ln in out.splitlines() if ln.strip() and not ln.startswith(mine + " ") and "pgrep" not in ln]


def prepare_vms() -> str | None:
    script = ROOT / "sample-traces" / "vm" / "prepare.sh"
    say(f"## preparing the QEMU guests ({script})")
    env = dict(os.environ)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        say(f"prepare.sh failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}; skipping vms")
        return None
    return None


def prepare_gunicorn(work: Path) -> str | None:
    venv = work / "gunicorn-venv"
    exe = venv / "bin" / "gunicorn"
    if exe.exists():
        return str(exe)
    say(f"## installing gunicorn into a temporary venv ({venv})")
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        say(f"venv failed: {r.stderr.strip()[-200:]}; skipping prefork")
        return None
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "gunicorn"], capture_output=True, text=True)
    if r.returncode != 0 or not exe.exists():
        say(f"pip install gunicorn failed: {r.stderr.strip()[-300:]}; skipping prefork")
        return None
    return str(exe)


def complete(trace_dir: Path) -> bool:
    try:
        m = json.loads((trace_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(m.get("complete")) and bool((m.get("validate") or {}).get("ksm_end"))


def capture_runs(out: Path, matrix, runs: int, gunicorn: str | None, vms_ok: bool) -> list[dict]:
    from ksmtrace.lab.validate import ValidateOptions, ground_truth_run

    done = []
    for workload, params, sets in matrix:
        p = dict(params)
        if workload == "prefork":
            if not gunicorn:
                continue
            p["gunicorn"] = gunicorn
        if workload == "vms" and not vms_ok:
            continue
        for preset, duration, interval in sets:
            label = f"{workload}-{preset}"
            for i in range(runs):
                d = out / "runs" / label / f"run-{i + 1}.trace"
                if complete(d):
                    say(f"{label} run {i + 1}: reusing {d}")
                else:
                    if d.exists():
                        shutil.rmtree(d)
                    d.parent.mkdir(parents=True, exist_ok=True)
                    opts = ValidateOptions(workload=workload, workload_params=p, settings=preset, duration=duration,
                                           interval=interval, runs=runs, output=out / "runs", label=label)
                    t = time.monotonic()
                    ground_truth_run(opts, d, i)
                    say(f"{label} run {i + 1}: captured in {time.monotonic() - t:.1f} s")
                    left = leftovers()
                    if left:
                        say(f"WARNING: processes left after {label}: {left}")
                done.append({"label": label, "workload": workload, "settings": preset, "params": params, "run": i,
                             "trace": str(d)})
    return done


def load_study(out: Path, neighbours: list[int], runs: int) -> tuple[str, bool]:
    """ksmd's pace beside CPU-bound processes (see the module doc); returns the report and
    whether every goal held with the measured clock."""
    from ksmtrace.engine.cost import CostModel, resolve_cost_model
    from ksmtrace.fidelity.compare import fidelity
    from ksmtrace.fidelity.groundtruth import load_ground_truth
    from ksmtrace.lab.programs import cpu_neighbours
    from ksmtrace.lab.validate import ValidateOptions, ground_truth_run
    from ksmtrace.trace.reader import open_trace

    base = resolve_cost_model(None)
    rows = []
    all_ok = True
    for workload, params, sets in LOAD_STUDY:
        for preset, duration, interval in sets:
            for n in neighbours:
                for i in range(runs):
                    label = f"{workload}-{preset}-n{n}"
                    d = out / "load" / label / f"run-{i + 1}.trace"
                    if not complete(d):
                        if d.exists():
                            shutil.rmtree(d)
                        d.parent.mkdir(parents=True, exist_ok=True)
                        with cpu_neighbours(n):
                            ground_truth_run(ValidateOptions(workload=workload, workload_params=params, settings=preset,
                                                             duration=duration, interval=interval, label=label), d, i)
                    tr = open_trace(d)
                    gt = load_ground_truth(tr)
                    st = gt.ksmd_sched() or {}
                    k = gt.ksmd_stretch() or 1.0
                    prop = CostModel(ns={u: v * k for u, v in base.ns.items()}, name="proportional", source="")
                    rep = fidelity(tr)
                    old = fidelity(tr, timing_cost=prop, wall_clock=False)
                    fs, t9, ofs, ot9 = rep.row("full_scans"), rep.row("pages_sharing"), old.row("full_scans"), old.row("pages_sharing")
                    per = rep.full_scan_period_s or float("nan")
                    d_scans = fs["sim_final"] - fs["real_final"]
                    d_t90 = (t9["t90_sim"] - t9["t90_real"]) / per
                    ok = abs(d_scans) <= 1 and abs(d_t90) <= 1
                    all_ok &= ok
                    v = gt.validate or {}
                    rows.append({
                        "workload": workload, "settings": preset, "neighbours": n, "run": i + 1,
                        "load": "/".join(f"{x:.1f}" for x in (v.get("loadavg_end") or [])[:1]) or "-",
                        "ksmd wait/CPU": f"{st.get('wait_ns', 0) / max(st.get('run_ns', 1), 1):.2f}",
                        "full_scans real": fs["real_final"],
                        "sim": f"{fs['sim_final']} ({d_scans:+d})",
                        "sim prop.": f"{ofs['sim_final']} ({ofs['sim_final'] - fs['real_final']:+d})",
                        "t90 real (s)": f"{t9['t90_real']:.3f}",
                        "sim (s)": f"{t9['t90_sim']:.3f} ({d_t90:+.2f} scans)",
                        "sim prop. (s)": f"{ot9['t90_sim']:.3f} ({(ot9['t90_sim'] - t9['t90_real']) / per:+.2f} scans)",
                        "scan period (s)": f"{per:.3f}",
                        "goals": "PASS" if ok else "FAIL",
                    })
                    say(f"{label} run {i + 1}: full_scans {fs['real_final']} real, {fs['sim_final']} sim; t90 "
                        f"{t9['t90_real']:.3f} s real, {t9['t90_sim']:.3f} s sim")
    text = ("## ksmd's pace beside CPU-bound processes (sim = the measured clock; sim prop. = the wait spread over the "
            "CPU time)\n\n" + table(rows) +
            f"\n\n{sum(r['goals'] == 'PASS' for r in rows)} of {len(rows)} runs meet both goals (full_scans ±1, t90 within "
            "one full-scan period)")
    return text, all_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="fidelity-bench")
    ap.add_argument("--runs", type=int, default=2, help="real runs per workload x parameter set (>= 2)")
    ap.add_argument("--only", default=None, help="comma-separated workloads")
    ap.add_argument("--skip-vms", action="store_true")
    ap.add_argument("--skip-prefork", action="store_true")
    ap.add_argument("--skip-interval", action="store_true")
    ap.add_argument("--install-costs", action="store_true", help="write the fitted model to ksmtrace/engine/default_costs.json")
    ap.add_argument("--base-costs", default=None, help="base cost file for the fit (default: microbenchmarks now)")
    ap.add_argument("--load-study", action="store_true", help="run only the load study (ksmd's pace beside CPU-bound processes)")
    ap.add_argument("--neighbours", default="0,1,2", help="the load study's numbers of CPU-bound processes")
    args = ap.parse_args()
    if os.geteuid() != 0 or not K.available():
        print("bench/fidelity.py needs root and /sys/kernel/mm/ksm", file=sys.stderr)
        return 1
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KSMTRACE_CACHE_DIR", str(out / "cache"))
    before = K.settled_settings()
    t_start = time.monotonic()
    say(f"# ksmtrace fidelity bench: {os.uname().release}, {os.cpu_count()} CPUs, output {out}")
    say(f"KSM settings at start: {before}")
    if args.load_study:
        try:
            text, _ = load_study(out, [int(x) for x in args.neighbours.split(",")], max(1, args.runs))
        finally:
            after = K.settled_settings()
            left = leftovers()
        text += (f"\nKSM settings restored: {after == before}; processes left: {left or 'none'}; bench took "
                 f"{(time.monotonic() - t_start) / 60:.1f} min")
        print(text)
        (out / "load-study.md").write_text(text + "\n")
        return 0 if after == before and not left else 1
    matrix = [m for m in MATRIX if not args.only or m[0] in args.only.split(",")]
    gunicorn = None
    vms_ok = False
    try:
        if any(m[0] == "vms" for m in matrix) and not args.skip_vms:
            prepare_vms()
            cache = Path(os.environ.get("KSMTRACE_VM_CACHE") or Path.home() / ".cache" / "ksmtrace" / "vm")
            vms_ok = (cache / "vmlinuz").exists()
        if any(m[0] == "prefork" for m in matrix) and not args.skip_prefork:
            gunicorn = prepare_gunicorn(out)

        # --- 0. ksmd's real wake-up cycle (the timer behind sleep_millisecs) -------------------------
        from ksmtrace.lab.microbench import ksmd_wakeup_cycle

        cycles = [ksmd_wakeup_cycle(ms, 4.0) for ms in (20, 20, 100)]
        for c in cycles:
            say(f"ksmd wake-up cycle at sleep_millisecs={c['sleep_ms']}: {c['mean_cycle_ms']:.2f} ms real vs "
                f"{c['model_cycle_ms']:.1f} ms modelled ({c['wakeups']} wake-ups)")

        # --- 1. ground-truth runs -------------------------------------------------------------
        say("## ground-truth runs")
        runs = capture_runs(out, matrix, max(1, args.runs), gunicorn, vms_ok)

        # --- 2. calibration ---------------------------------------------------------------------
        say("## calibration")
        from ksmtrace.calibrate import fit_from_runs
        from ksmtrace.lab.microbench import microbenchmark
        from ksmtrace.engine.cost import CostModel

        if args.base_costs:
            base = CostModel.load(args.base_costs)
        else:
            base = microbenchmark(seconds=2.0)
            base.save(out / "microbench-costs.json")
        fitres = fit_from_runs([r["trace"] for r in runs], base=base, holdout_every=3, log=say)
        fitted = fitres.model
        fitted.save(out / "fitted-costs.json")
        (out / "calibration.json").write_text(json.dumps(fitres.to_json(), indent=1) + "\n")
        held = {r["trace"] for r in fitres.holdout}
        cal_rows = []
        for side, items in (("fit", fitres.train), ("held out", fitres.holdout)):
            for r in items:
                cal_rows.append({"run": f"{r['label']}/{Path(r['trace']).name}", "set": side,
                                 "real CPU (s)": round(r["real_cpu_s"], 4), "model CPU (s)": round(r["model_cpu_s"], 4),
                                 "error": None if r["rel_error"] is None else f"{100 * r['rel_error']:+.1f}%"})
        if args.install_costs:
            dst = ROOT / "ksmtrace" / "engine" / "default_costs.json"
            fitted.save(dst)
            say(f"installed the fitted cost model as {dst}")

        # --- 3. fidelity and goals --------------------------------------------------------------
        say("## fidelity with the fitted model")
        from ksmtrace.fidelity.compare import fidelity
        from ksmtrace.fidelity.goals import evaluate_goals
        from ksmtrace.fidelity.plot import trajectories
        from ksmtrace.lab.programs import RACY
        from ksmtrace.plot import save
        from ksmtrace.trace.reader import open_trace

        groups: dict[str, list] = {}
        for r in runs:
            rep = fidelity(open_trace(r["trace"]), cost=fitted, timing_cost=fitted)
            save(trajectories(rep), Path(r["trace"]).with_suffix(".png"))
            Path(r["trace"]).with_suffix(".fidelity.json").write_text(json.dumps(rep.to_json(), indent=1) + "\n")
            r["report"] = rep
            groups.setdefault(r["label"], []).append(r)
        goal_rows = []
        run_rows = []
        for label, rs in groups.items():
            w = rs[0]["workload"]
            goal_rows += evaluate_goals([r["report"] for r in rs], workload=w, settings=rs[0]["settings"], racy=w in RACY,
                                        params=rs[0]["params"], held_out=[r["trace"] in held for r in rs])
            for r in rs:
                rep = r["report"]
                row = {"workload": w, "settings": r["settings"], "run": r["run"] + 1}
                for c in ("pages_sharing", "pages_shared", "ksm_zero_pages", "full_scans", "cow_ksm", "ksmd_cpu_s"):
                    x = rep.row(c)
                    row[c] = f"{x['real_final']}/{x['sim_final']}"
                x = rep.row("pages_sharing")
                row["t90 real/sim (s)"] = f"{_f(x.get('t90_real'))}/{_f(x.get('t90_sim'))}"
                row["scan period (s)"] = _f(rep.full_scan_period_s)
                row["NRMSE sharing"] = f"{100 * (x['nrmse'] or 0):.1f}%"
                run_rows.append(row)

        # --- 4. interval study ----------------------------------------------------------------
        studies = []
        if not args.skip_interval:
            say("## interval study")
            from ksmtrace.fidelity.interval import interval_study, recommend
            from ksmtrace.fidelity.plot import interval_plot
            from ksmtrace.lab.validate import ValidateOptions, ground_truth_run

            for name, w, p, preset, duration, interval, period in INTERVAL_STUDIES:
                if w == "prefork":
                    if not gunicorn:
                        continue
                    p = dict(p, gunicorn=gunicorn)
                if args.only and w not in args.only.split(","):
                    continue
                d = out / "interval" / name / "fine.trace"
                if not complete(d):
                    if d.exists():
                        shutil.rmtree(d)
                    d.parent.mkdir(parents=True, exist_ok=True)
                    ground_truth_run(ValidateOptions(workload=w, workload_params=p, settings=preset, duration=duration,
                                                     interval=interval, label=f"interval-{name}"), d)
                rows = interval_study(d, every=(1, 2, 4, 8, 16, 32, 64), workdir=out / "interval" / name,
                                      cost=fitted, timing_cost=fitted, keep=True)
                advice = recommend(rows, rewrite_period=period)
                save(interval_plot(rows, rewrite_period=period, full_scan_s=rows[0].get("full_scan_period_s") if rows else None),
                     out / f"interval-{name}.png")
                studies.append({"name": name, "workload": w, "settings": preset, "interval_s": interval,
                                "period": period, "rows": rows, "recommendation": advice})
    finally:
        after = K.settled_settings()
        left = leftovers()

    # --- report ---------------------------------------------------------------------------------
    lines = []
    lines.append("## Goals per workload and parameter set (fitted cost model; CPU goal on held-out runs marked)\n")
    lines.append(table([{"workload": g["workload"], "settings": g["settings"], "goal": g["goal"],
                         "result": "n/a" if g["ok"] is None else ("PASS" if g["ok"] else "FAIL"),
                         "measured": g["measured"]} for g in goal_rows]))
    lines.append("\n## Per run: real/simulated final values\n")
    lines.append(table(run_rows))
    lines.append("\n## Calibration (ksmd CPU, fitted model)\n")
    lines.append(table(cal_rows))
    s = fitres.summary()
    lines.append(f"\ngroup scales: " + ", ".join(f"{g}={v:.3g}" for g, v in fitres.scales.items()))
    for side in ("train", "holdout"):
        st = s[side]
        if st["runs"]:
            lines.append(f"{side}: {st['runs']} runs, mean |error| {100 * st['mean_abs_error']:.1f}%, max "
                         f"{100 * st['max_abs_error']:.1f}%, {st['within_25pct']} within 25%")
    lines.append("\n## ksmd wake-up cycle (tiny workload: one full scan per wake-up)\n")
    lines.append(table([{"sleep_millisecs": c["sleep_ms"], "real cycle (ms)": round(c["mean_cycle_ms"], 2),
                         "modelled (ms)": c["model_cycle_ms"], "late (ms)": round(c["late_ms"], 2),
                         "wake-ups": c["wakeups"]} for c in cycles]))
    lines.append(f"\nfitted per-unit costs (ns): " + ", ".join(f"{u}={v:g}" for u, v in sorted(fitted.ns.items())))
    for st in studies:
        per = f", rewrite period {st['period']:g} s" if st["period"] else ""
        lines.append(f"\n## Interval study: {st['workload']} ({st['settings']} scan{per}), captured every {st['interval_s']:g} s\n")
        lines.append(table([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                             if k in ("every", "interval_s", "sharing_real", "sharing_sim", "sharing_final_err", "sharing_nrmse",
                                      "t90_err_scans", "cow_real", "cow_sim", "cow_ratio", "full_scans_diff")}
                            for r in st["rows"]]))
        lines.append(f"\nrecommendation: {st['recommendation']}")
    n_pass = sum(1 for g in goal_rows if g["ok"])
    n_fail = sum(1 for g in goal_rows if g["ok"] is False)
    lines.append(f"\n{n_pass} goals passed, {n_fail} failed, {len(goal_rows) - n_pass - n_fail} n/a; "
                 f"bench took {(time.monotonic() - t_start) / 60:.1f} min")
    lines.append(f"KSM settings restored: {after == before} ({after})")
    lines.append(f"processes left: {left or 'none'}")
    text = "\n".join(lines)
    print(text)
    (out / "goals.md").write_text(text + "\n")
    bench = {"cycles": cycles, "goals": goal_rows, "runs": run_rows, "calibration": fitres.to_json(), "interval": studies,
             "settings_restored": after == before, "leftovers": left}
    (out / "bench.json").write_text(json.dumps(bench, indent=1, default=str) + "\n")
    return 0 if after == before and not left else 1


def _f(x) -> str:
    return "-" if x is None else f"{x:.3g}"


if __name__ == "__main__":
    sys.exit(main())
