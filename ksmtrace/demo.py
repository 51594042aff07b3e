"""``ksmtrace demo``: the policies compared at equal cost on a real shipped trace, the simulated KSM
against the real one, the Delay study, and the figures.

>>> from ksmtrace.demo import run_demo, format_report
>>> res = run_demo("vm", "ksmtrace-demo")          # a sample name or a trace directory
>>> print(format_report(res))
>>> res.frontier.budget_rows(), res.plots["frontier-cpu"]

What it does, on one trace (default: the ``vm`` sample, three QEMU guests booting the same kernel):

1. **the frontier** (:mod:`ksmtrace.analysis.frontier`): every core policy (``ksm``, ``pksm``,
   ``pksm-delay``, ``hashtable``) swept over its scan rate, the oracle as the ceiling; the table of
   each policy's saving at matched CPU budgets and of the CPU each needs to keep 50 / 80 / 95 % of
   the oracle's saving.  Comparing policies at their own defaults would compare their budgets;
2. **each policy at its best setting within one budget** (the middle one of the frontier's, 1 % of
   a core by default), next to the oracle: the runs the timeline, latency and heatmap figures show;
3. **KSM as captured** — when the real KSM ran during the capture (its ground truth is in the
   trace) — ``ksm`` replayed with the kernel's settings, profile and start
   (:func:`ksmtrace.fidelity.groundtruth.as_captured`, the same as ``fidelity`` uses), its
   counters beside the kernel's counters of the same name;
4. **the Delay trade-off**: ``pksm-delay``'s ``probation_passes`` swept (0 = plain PKSM);
5. writes every run's result files (``frontier/``, ``results/``, ``sweep-pksm-delay/``), the
   tables (``frontier.csv``, ``comparison.csv``, ``delay-sweep.csv``, ``summary.json``) and the
   figures (frontier-cpu, frontier-cow, timeline, latency, breakdown, heatmap as PNG).

Every replay uses one scope, chosen from the trace (:func:`ksmtrace.replay.choose_scope`), and the
ksm profile of the traced kernel.  No root is needed: it only reads a trace.  Run ids are stable,
so a second run reuses the result files.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ksmtrace.outputs import open_output_dir
from ksmtrace.progress import ProgressFn, make
from ksmtrace.results import FRAMES_SAVED_DEFINITION
from ksmtrace.samples import DEFAULT_SAMPLE, resolve_trace

CORE_POLICIES = ("oracle", "ksm", "pksm", "pksm-delay", "hashtable")
DEFAULT_PROBATION = (0, 1, 2, 4, 8)
PLOT_KINDS = ("frontier-cpu", "frontier-cow", "timeline", "latency", "breakdown", "heatmap")
DEFAULT_OUT = "ksmtrace-demo"
MIB_PER_FRAME = 4096 / 2**20
#: the kernel's counters the demo sets beside the simulated ksm's counters of the same name
KERNEL_COUNTERS = ("pages_sharing", "pages_shared", "pages_unshared", "ksm_zero_pages", "general_profit", "full_scans")
TABLE_COLUMNS = ("label", "settings", "cpu_pct", "frames_saved_mean", "mib_saved_mean", "pct_of_oracle", "frames_saved_final",
                 "cow_breaks", "merge_latency_p50_s", "merge_latency_p90_s")
TABLE_HEADERS = {"label": "policy", "settings": "best setting within the budget", "cpu_pct": "CPU %core",
                 "frames_saved_mean": "saved(frames)", "mib_saved_mean": "saved(MiB)", "pct_of_oracle": "%oracle",
                 "frames_saved_final": "saved(final)", "cow_breaks": "COW breaks", "merge_latency_p50_s": "latency p50 s",
                 "merge_latency_p90_s": "p90 s"}


@dataclass
class DemoResult:
    trace_name: str
    trace_path: str
    out_dir: str
    trace_facts: dict[str, Any]
    rows: list[dict[str, Any]]            # the oracle and each policy at its best setting within the budget
    sweep_rows: list[dict[str, Any]]      # one per probation_passes value
    real_ksm: dict[str, Any] | None       # ksm as captured: the kernel's counters beside the simulated ones
    budget_pct: float = 1.0
    frontier: Any = field(default=None, repr=False)  # ksmtrace.analysis.frontier.Frontier
    plots: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    results: list = field(default_factory=list, repr=False)        # RunResult of the rows
    sweep_results: list = field(default_factory=list, repr=False)  # RunResult of the sweep

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace_name, "trace_path": self.trace_path, "out_dir": self.out_dir,
            "trace_facts": self.trace_facts, "frontier": self.frontier.to_json() if self.frontier else None,
            "budget_pct": self.budget_pct, "rows": self.rows, "delay_sweep": self.sweep_rows,
            "real_ksm": self.real_ksm, "plots": self.plots, "files": self.files,
            "seconds": round(self.seconds, 3), "definition": FRAMES_SAVED_DEFINITION,
            "next_steps": next_steps(self),
        }


# --- ground truth ------------------------------------------------------------------------------------
def real_ksm(trace) -> dict[str, Any] | None:
    """When the kernel's KSM ran during the capture: how to replay it as captured (settings,
    profile, start: :func:`ksmtrace.fidelity.groundtruth.as_captured`) and its counters at the last
    snapshot.  None if it never ran (or no ground truth)."""
    from ksmtrace.fidelity.groundtruth import as_captured

    cap = as_captured(trace)
    if cap is None:
        return None
    settings = {k: v for k, v in cap.params.items() if k in ("pages_to_scan", "sleep_millisecs", "smart_scan",
                                                              "use_zero_pages", "max_page_sharing", "advisor_mode")}
    return {
        "params": cap.params,
        "settings": settings,
        "profile": cap.params.get("profile"),
        "profile_source": cap.profile_source,
        "start_s": cap.start_s,
        "start_source": cap.start_source,
        "kernel": cap.kernel,
        "note": "the kernel's counters are host-wide: they include any other mergeable process of the host",
    }


# --- the run -----------------------------------------------------------------------------------------
def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _row(label: str, res, settings: str = "", cpu_pct: float | None = None) -> dict[str, Any]:
    s = res.summary
    frac = _clean(s.get("fraction_of_oracle_mean"))
    return {
        "label": label,
        "policy": res.spec["policy"],
        "settings": settings,
        "params": res.spec.get("params", {}),
        "start_s": res.spec.get("start_ns", 0) / 1e9,
        "run_id": res.run_id,
        "cpu_pct": None if cpu_pct is None else round(cpu_pct, 4),
        "frames_saved_mean": round(float(s["frames_saved_mean"]), 1),
        "mib_saved_mean": round(float(s["frames_saved_mean"]) * MIB_PER_FRAME, 1),
        "pct_of_oracle": None if frac is None else round(100.0 * frac, 1),
        "frames_saved_final": s["frames_saved_final"],
        "oracle_saved_mean": round(float(s["oracle_saved_mean"]), 1),
        "cow_breaks": s["cow_breaks"],
        "cpu_seconds": round(float(s["cpu_seconds"]), 4),
        "merges": s["merges"],
        "merge_latency_p50_s": _clean(s["merge_latency_p50_s"]),
        "merge_latency_p90_s": _clean(s["merge_latency_p90_s"]),
    }


def trace_facts(trace) -> dict[str, Any]:
    host = trace.host or {}
    cap = trace.capture or {}
    return {
        "snapshots": trace.n_snapshots,
        "duration_s": round(trace.times_s[-1], 3),
        "kernel": host.get("kernel_release") or host.get("kernel"),
        "thp": host.get("thp_enabled") or host.get("thp"),
        "capture_scope": cap.get("scope"),
        "interval_s": cap.get("interval_s"),
        "ground_truth": bool(trace.has_ground_truth),
    }


def run_demo(trace: str | Path = DEFAULT_SAMPLE, out_dir: str | Path = DEFAULT_OUT, *,
             policies: Sequence[str] = CORE_POLICIES, probation_passes: Sequence[int] = DEFAULT_PROBATION,
             budget_pct: float | None = None, level: str = "standard", plots: bool = True, workers: int = 1,
             progress: ProgressFn | None = None) -> DemoResult:
    """Run the demo on ``trace`` (a sample name or a trace directory), writing into ``out_dir``.
    ``budget_pct``: the matched CPU budget of the comparison table (default: the frontier's middle
    budget); ``level``: the frontier's rate grid (``standard`` or ``coarse``)."""
    from ksmtrace.analysis.frontier import BUDGETS_PCT, frontier
    from ksmtrace.replay import replay, resolve_scope
    from ksmtrace.results import RunResult
    from ksmtrace.sweep import sweep
    from ksmtrace.trace.reader import open_trace

    t_start = time.monotonic()
    prog = make(progress)
    path = resolve_trace(trace)
    tr = open_trace(path)
    out = Path(out_dir)
    open_output_dir(out).close()  # created, and the user's own, before any replay (ksmtrace.outputs)
    scope, scope_why = resolve_scope(tr, None)
    budget = float(budget_pct) if budget_pct is not None else BUDGETS_PCT[len(BUDGETS_PCT) // 2]
    if not budget > 0 or not math.isfinite(budget):
        from ksmtrace.errors import KsmtraceError

        raise KsmtraceError(f"demo: the budget must be a positive percentage of a core (got {budget_pct!r})")
    swept = [p for p in policies if p != "oracle"]
    steps = 4 + (len(PLOT_KINDS) if plots else 0)

    # 1. the frontier
    def fprog(d, t, m):
        prog(d / max(t, 1), steps, f"frontier: {m}")

    fr = frontier(tr, swept, out / "frontier", level=level, scope=scope, workers=workers, progress=fprog)
    # 2. the oracle and each policy at its best setting within the budget
    prog(1, steps, f"each policy within {budget:g} % of a core")
    oracle = fr.oracle
    oracle.write(out / "results")
    rows = [_row("oracle", oracle, "perfect, instantaneous; no CPU", 0.0)]
    results = [oracle]
    for r in fr.budget_rows():
        if r["budget_pct"] != budget:
            continue
        if r["run_id"] is None:
            rows.append({"label": r["policy"], "policy": r["policy"], "settings": f"none within {budget:g} % of a core",
                         "run_id": None})
            continue
        res = fr.results[r["run_id"]]
        res.write(out / "results")
        results.append(res)
        rows.append(_row(r["policy"], res, r["settings"], r["cpu_pct"]))
    if budget not in fr.budgets_pct:  # a budget of its own: pick from the frontier's runs
        rows, results = rows[:1], results[:1]
        for pol in fr.policies:
            d = fr.policy_runs(pol)
            d = d.filter(d["cpu_pct"] <= budget).sort(["pct_of_oracle", "cpu_pct"], descending=[True, False])
            if d.height:
                best = d.row(0, named=True)
                res = fr.results[best["run_id"]]
                res.write(out / "results")
                results.append(res)
                rows.append(_row(pol, res, best["settings"], best["cpu_pct"]))
    # 3. ksm as captured, beside the kernel
    truth = real_ksm(tr)
    if truth and "ksm" in policies:
        prog(2, steps, "replay ksm as captured")
        res = replay(tr, "ksm", truth["params"], start_s=truth["start_s"], scope="recorded")
        res.spec["label"] = "ksm (as captured)"
        res.write(out / "results")
        last = res.table.row(res.table.height - 1, named=True)
        truth["simulated"] = {k: last.get(k) for k in KERNEL_COUNTERS if last.get(k) is not None}
        truth["simulated"]["ksmd_cpu_seconds"] = round(res.cpu_seconds(), 4)
        truth["simulated_frames_saved_final"] = res.summary["frames_saved_final"]
        truth["counters"] = [{"counter": k, "kernel": truth["kernel"].get(k), "simulated": truth["simulated"].get(k)}
                             for k in KERNEL_COUNTERS + ("ksmd_cpu_seconds",)
                             if truth["kernel"].get(k) is not None or truth["simulated"].get(k) is not None]
    # 4. the Delay sweep
    prog(3, steps, f"pksm-delay sweep over probation_passes={','.join(map(str, probation_passes))}")
    sweep_dir = out / "sweep-pksm-delay"
    table = sweep(str(path), "pksm-delay", {"probation_passes": list(probation_passes)}, sweep_dir,
                  workers=workers, progress=None, scope=scope)
    sweep_rows, sweep_results = [], []
    for r in table.iter_rows(named=True):
        res = RunResult.read(sweep_dir / f"{r['run_id']}.json")
        sweep_results.append(res)
        row = _row(f"pksm-delay N={r['probation_passes']}", res)
        row["probation_passes"] = r["probation_passes"]
        sweep_rows.append(row)
    base = sweep_rows[0] if sweep_rows else None
    for row in sweep_rows:  # what the delay bought and cost against the first point (N=0: plain PKSM)
        row["cow_breaks_avoided"] = base["cow_breaks"] - row["cow_breaks"]
        row["cpu_seconds_avoided"] = round(base["cpu_seconds"] - row["cpu_seconds"], 4)
        row["frames_saved_lost"] = int(round(base["frames_saved_mean"] - row["frames_saved_mean"]))
    facts = trace_facts(tr)
    facts["scope"], facts["scope_reason"] = scope, scope_why
    res_obj = DemoResult(trace_name=tr.name, trace_path=str(path), out_dir=str(out), trace_facts=facts,
                         rows=rows, sweep_rows=sweep_rows, real_ksm=truth, budget_pct=budget, frontier=fr,
                         results=results, sweep_results=sweep_results)
    res_obj.files = _write_tables(res_obj, out)
    if plots:
        res_obj.plots = _write_plots(res_obj, tr, out, lambda i, msg: prog(4 + i, steps, msg))
    res_obj.seconds = time.monotonic() - t_start
    from ksmtrace.textfmt import dumps

    with open_output_dir(out) as d:
        d.write_bytes("summary.json", (dumps(res_obj.to_json()) + "\n").encode())
    res_obj.files["summary"] = str(out / "summary.json")
    prog(steps, steps, "done")
    return res_obj


def _write_tables(res: DemoResult, out: Path) -> dict[str, str]:
    files = {}
    cols = ["label", "policy", "settings", "cpu_pct", "frames_saved_mean", "mib_saved_mean", "pct_of_oracle",
            "frames_saved_final", "oracle_saved_mean", "cow_breaks", "cpu_seconds", "merges", "merge_latency_p50_s",
            "merge_latency_p90_s", "start_s", "run_id"]
    for name, rows, extra in (("comparison", res.rows, []),
                              ("delay-sweep", res.sweep_rows, ["probation_passes", "cow_breaks_avoided",
                                                               "cpu_seconds_avoided", "frames_saved_lost"])):
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=cols + extra, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        with open_output_dir(out) as d:
            files[name] = str(d.write_bytes(f"{name}.csv", text.getvalue().encode()))
    if res.frontier is not None:
        with open_output_dir(out) as d:
            files["frontier"] = str(d.write_atomic("frontier.csv", res.frontier.runs.write_csv))
    return files


def _write_plots(res: DemoResult, tr, out: Path, note) -> dict[str, str]:
    from ksmtrace import plot

    paths: dict[str, str] = {}
    runs = res.results
    merged = [r for r in runs if r.summary.get("merges") and r.policy != "oracle"]
    makers = {
        "frontier-cpu": lambda: plot.frontier_cpu(res.frontier),
        "frontier-cow": lambda: plot.frontier_cow(res.frontier),
        "timeline": lambda: plot.timeline(runs),
        "latency": lambda: plot.latency([r for r in runs if r.policy != "oracle"] + res.sweep_results[1:]),
        "breakdown": lambda: plot.breakdown(tr, scope=res.trace_facts["scope"]),
        "heatmap": lambda: plot.heatmap(merged[:4] or runs[:1], value="fraction"),
    }
    for i, kind in enumerate(PLOT_KINDS):
        note(i, f"plot {kind}")
        p = out / f"{kind}.png"
        plot.save(makers[kind](), p)
        paths[kind] = str(p)
    return paths


# --- text --------------------------------------------------------------------------------------------
def next_steps(res: DemoResult) -> list[str]:
    o = res.out_dir
    return [
        "capture your own processes (root):  ksmtrace capture --name qemu --interval 2 --duration 120 "
        "--scope anon --fingerprints -o my.trace",
        "                                    ksmtrace capture --tree PID --interval 1 --count 30 --fingerprints -o my.trace",
        "why is it not merging?              ksmtrace doctor my.trace",
        "should I enable KSM, and how?       ksmtrace advise my.trace --cpu-budget 1",
        "compare policies at equal cost:     ksmtrace frontier my.trace -o frontier/",
        "look at it:                         ksmtrace info my.trace; ksmtrace breakdown my.trace",
        "replay one policy:                  ksmtrace replay my.trace --policy ksm -p pages_to_scan=1000",
        "tune one policy:                    ksmtrace sweep my.trace -P ksm -p pages_to_scan=100:6400:x4 "
        "-p sleep_millisecs=20,200 -o sweeps/ksm --pareto",
        f"this demo's runs, re-plotted:       ksmtrace plot {o}/results --kind timeline -o timeline.svg",
        "other sample traces:                ksmtrace demo --trace python-sci   (or prefork; ksmtrace demo --list)",
    ]


def format_report(res: DemoResult) -> str:
    from ksmtrace.analysis.frontier import budget_table_rows, target_table_rows
    from ksmtrace.textfmt import table

    f = res.trace_facts
    fr = res.frontier
    lines = [
        f"ksmtrace demo: trace {res.trace_name!r} ({res.trace_path})",
        f"  {f['snapshots']} snapshots over {f['duration_s']:.0f} s, captured with scope {f['capture_scope']}, "
        f"interval {f['interval_s']} s, kernel {f['kernel']}, ground truth: {'yes' if f['ground_truth'] else 'no'}",
        f"  {f['scope_reason']}",
        *(f"  {n}" for n in (fr.notes if fr else [])),
        "",
    ]
    if fr is not None:
        lines += [
            f"1. The frontier: every policy swept over its scan rate ({fr.runs.height} runs), compared at equal CPU. "
            f"The ceiling, a perfect instantaneous dedup (the oracle), saves {fr.oracle_saved_mean * MIB_PER_FRAME:,.1f} MiB "
            "on average.",
            "",
            "   Mean saving in % of the oracle at a matched CPU budget (% of one core; best setting within it):",
            _indent(table(budget_table_rows(fr))),
            "",
            "   CPU each needs to keep 50 / 80 / 95 % of the oracle's saving, and from when:",
            _indent(table(target_table_rows(fr))),
            "",
        ]
    lines += [f"2. Each policy at its best setting within {res.budget_pct:g} % of a core (saved = mean over the snapshots):",
              _indent(table(res.rows, TABLE_COLUMNS, TABLE_HEADERS)), ""]
    rk = res.real_ksm
    if rk and rk.get("counters"):
        s = ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in rk["settings"].items())
        lines += [f"3. The real KSM ran during this capture ({s}), from {rk['start_s']:.3f} s after snapshot 0 "
                  f"({rk['start_source']}); replayed the same way (profile {rk['profile']}: {rk['profile_source']}), "
                  "the simulated ksm's counters beside the kernel's, at the last snapshot:",
                  _indent(table(rk["counters"], ["counter", "kernel", "simulated"])),
                  f"   (the kernel's counters are host-wide; ksmd_cpu_seconds is since KSM started, the simulated one "
                  f"from the cost model; the replay's frames_saved, {rk['simulated_frames_saved_final']:,}, is physical "
                  "frames, a different quantity: see the definition below)", ""]
    lines += ["4. The Delay trade-off: pksm-delay with new pages on probation for N passes of the new list "
              "(N=0 is plain PKSM):",
              _indent(table(res.sweep_rows, ("label", "frames_saved_mean", "pct_of_oracle", "cow_breaks",
                                             "cow_breaks_avoided", "frames_saved_lost", "cpu_seconds",
                                             "merge_latency_p50_s"),
                            {"label": "run", "frames_saved_mean": "saved(frames)", "pct_of_oracle": "%oracle",
                             "cow_breaks": "COW breaks", "cow_breaks_avoided": "COW avoided",
                             "frames_saved_lost": "saved lost", "cpu_seconds": "CPU s",
                             "merge_latency_p50_s": "latency p50 s"})),
              "", FRAMES_SAVED_DEFINITION, "CPU: simulated ksmd CPU under the shipped cost model (ksmtrace calibrate fits "
              "one for your host); % of a core = CPU seconds / trace duration. -: undefined (nothing to time) or none "
              "within the budget."]
    lines += ["", f"Written to {res.out_dir}/ in {res.seconds:.1f} s:"]
    for kind, p in list(res.plots.items()) + list(res.files.items()):
        lines.append(f"  {kind:<13} {p}")
    lines.append(f"  {'results':<13} {res.out_dir}/frontier/, results/ and sweep-pksm-delay/ (one .json + .parquet per run)")
    lines += ["", "Next:"] + ["  " + s for s in next_steps(res)]
    return "\n".join(lines)


def _indent(text: str, by: str = "   ") -> str:
    return "\n".join(by + ln for ln in text.splitlines())
