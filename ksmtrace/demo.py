"""``ksmtrace demo``: every policy on a real shipped trace, a Delay sweep, the table and the plots.

>>> from ksmtrace.demo import run_demo, format_report
>>> res = run_demo("vm", "ksmtrace-demo")          # a sample name or a trace directory
>>> print(format_report(res))
>>> res.rows[0]["pct_of_oracle"], res.plots["timeline"]

What it does, on one trace (default: the ``vm`` sample, three QEMU guests booting the same kernel):

1. replays every core policy with its default parameters (``oracle``, ``ksm``, ``pksm``,
   ``pksm-delay``, ``hashtable``), and -- when the real KSM ran during the capture (its ground
   truth is in the trace) -- ``ksm`` once more with the settings the kernel had and starting when
   the kernel's ksmd started, next to what the kernel itself reported;
2. sweeps ``pksm-delay``'s ``probation_passes`` (0 = plain PKSM): the founding notes' trade-off of
   delaying new pages (fewer COW breaks and less CPU, against a smaller and later saving);
3. writes every run's result files (``results/``, ``sweep-pksm-delay/``), the comparison table
   (``comparison.csv``, ``delay-sweep.csv``, ``summary.json``) and the plots (timeline, pareto,
   latency, breakdown, heatmap as PNG) into the output directory.

No root is needed: it only reads a trace.  Run ids are stable, so a second run reuses the sweep's
result files.
"""
from __future__ import annotations

import csv
import io
import json
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
PLOT_KINDS = ("timeline", "pareto", "latency", "breakdown", "heatmap")
DEFAULT_OUT = "ksmtrace-demo"
MIB_PER_FRAME = 4096 / 2**20
#: the ksm policy parameters a ground-truth KSM sample can set
_KSM_SETTINGS = ("pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "max_page_sharing")
TABLE_COLUMNS = ("label", "frames_saved_mean", "mib_saved_mean", "pct_of_oracle", "frames_saved_final", "cow_breaks",
                 "cpu_seconds", "merges", "merge_latency_p50_s", "merge_latency_p90_s")
TABLE_HEADERS = {"label": "policy", "frames_saved_mean": "saved(frames)", "mib_saved_mean": "saved(MiB)",
                 "pct_of_oracle": "%oracle", "frames_saved_final": "saved(final)", "cow_breaks": "COW breaks",
                 "cpu_seconds": "CPU s", "merge_latency_p50_s": "latency p50 s", "merge_latency_p90_s": "p90 s"}


@dataclass
class DemoResult:
    trace_name: str
    trace_path: str
    out_dir: str
    trace_facts: dict[str, Any]
    rows: list[dict[str, Any]]            # one per policy run (the comparison table)
    sweep_rows: list[dict[str, Any]]      # one per probation_passes value
    real_ksm: dict[str, Any] | None       # what the kernel's KSM reported during the capture
    plots: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    results: list = field(default_factory=list, repr=False)        # RunResult of the policy runs
    sweep_results: list = field(default_factory=list, repr=False)  # RunResult of the sweep

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace_name, "trace_path": self.trace_path, "out_dir": self.out_dir,
            "trace_facts": self.trace_facts, "rows": self.rows, "delay_sweep": self.sweep_rows,
            "real_ksm": self.real_ksm, "plots": self.plots, "files": self.files,
            "seconds": round(self.seconds, 3), "definition": FRAMES_SAVED_DEFINITION,
            "next_steps": next_steps(self),
        }


# --- ground truth ------------------------------------------------------------------------------------
def real_ksm(trace) -> dict[str, Any] | None:
    """When the kernel's KSM ran during the capture: its settings, when it started (seconds after
    snapshot 0) and its counters at the last snapshot.  None if it never ran (or no ground truth)."""
    if not trace.has_ground_truth:
        return None
    try:
        df = trace.read_table("ksm")
    except Exception:
        return None
    if df.height == 0 or "run" not in df.columns:
        return None
    df = df.sort("t_ns")
    on = df.filter(df["run"] == 1)
    if on.height == 0:
        return None
    first_on = on.row(0, named=True)
    start_s = max(0.0, (int(first_on["t_ns"]) - trace.t0_ns) / 1e9)
    where = "first ground-truth sample with run=1"
    info_path = Path(trace.path) / "capture.json"
    try:  # a sample trace knows exactly when KSM was started
        exact = json.loads(info_path.read_text()).get("ksm_started_after_snapshot0_s")
        if exact is not None:
            start_s, where = float(exact), "capture.json"
    except (OSError, ValueError):
        pass
    last_snap = trace.n_snapshots - 1
    at_end = df.filter(df["snap"] <= last_snap)
    last = at_end.row(at_end.height - 1, named=True) if at_end.height else df.row(df.height - 1, named=True)
    settings = {k: last_on_value for k in _KSM_SETTINGS if (last_on_value := first_on.get(k)) is not None}
    for k in ("smart_scan", "use_zero_pages"):
        if k in settings:
            settings[k] = bool(settings[k])
    cpu0 = df.row(0, named=True).get("ksmd_cpu_ns")
    cpu1 = last.get("ksmd_cpu_ns")
    return {
        "settings": settings,
        "start_s": start_s,
        "start_source": where,
        "pages_shared": last.get("pages_shared"),
        "pages_sharing": last.get("pages_sharing"),
        "full_scans": (last.get("full_scans") or 0) - (df.row(0, named=True).get("full_scans") or 0),
        "ksmd_cpu_seconds": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / 1e9,
        "note": "the kernel's counters are host-wide: they include any other mergeable process of the host",
    }


# --- the run -----------------------------------------------------------------------------------------
def _row(label: str, res) -> dict[str, Any]:
    s = res.summary
    frac = s.get("fraction_of_oracle_mean")
    pct = None if frac is None or (isinstance(frac, float) and math.isnan(frac)) else 100.0 * frac
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {
        "label": label,
        "policy": res.spec["policy"],
        "params": res.spec.get("params", {}),
        "start_s": res.spec.get("start_ns", 0) / 1e9,
        "run_id": res.run_id,
        "frames_saved_mean": round(float(s["frames_saved_mean"]), 1),
        "mib_saved_mean": round(float(s["frames_saved_mean"]) * MIB_PER_FRAME, 1),
        "pct_of_oracle": None if pct is None else round(pct, 1),
        "frames_saved_final": s["frames_saved_final"],
        "oracle_saved_mean": round(float(s["oracle_saved_mean"]), 1),
        "cow_breaks": s["cow_breaks"],
        "cpu_seconds": round(float(s["cpu_seconds"]), 4),
        "merges": s["merges"],
        "merge_latency_p50_s": clean(s["merge_latency_p50_s"]),
        "merge_latency_p90_s": clean(s["merge_latency_p90_s"]),
    }


def trace_facts(trace) -> dict[str, Any]:
    host = trace.host or {}
    cap = trace.capture or {}
    return {
        "snapshots": trace.n_snapshots,
        "duration_s": round(trace.times_s[-1], 3),
        "kernel": host.get("kernel_release") or host.get("kernel"),
        "thp": host.get("thp_enabled") or host.get("thp"),
        "scope": cap.get("scope"),
        "interval_s": cap.get("interval_s"),
        "ground_truth": bool(trace.has_ground_truth),
    }


def run_demo(trace: str | Path = DEFAULT_SAMPLE, out_dir: str | Path = DEFAULT_OUT, *,
             policies: Sequence[str] = CORE_POLICIES, probation_passes: Sequence[int] = DEFAULT_PROBATION,
             plots: bool = True, workers: int = 1, progress: ProgressFn | None = None) -> DemoResult:
    """Run the demo on ``trace`` (a sample name or a trace directory), writing into ``out_dir``."""
    from ksmtrace.replay import replay
    from ksmtrace.sweep import sweep
    from ksmtrace.trace.reader import open_trace

    t_start = time.monotonic()
    prog = make(progress)
    path = resolve_trace(trace)
    tr = open_trace(path)
    out = Path(out_dir)
    open_output_dir(out).close()  # created, and the user's own, before any replay (ksmtrace.outputs)
    truth = real_ksm(tr)
    steps = len(policies) + (1 if truth else 0) + 1 + (len(PLOT_KINDS) if plots else 0)
    k = 0
    results, rows = [], []
    for name in policies:
        prog(k, steps, f"replay {name}")
        res = replay(tr, name)
        res.write(out / "results")
        results.append(res)
        rows.append(_row(name, res))
        k += 1
    if truth and "ksm" in policies:
        prog(k, steps, "replay ksm as captured")
        res = replay(tr, "ksm", truth["settings"], start_s=truth["start_s"])
        res.spec["label"] = "ksm (as captured)"
        res.write(out / "results")
        results.append(res)
        row = _row("ksm (as captured)", res)
        rows.append(row)
        truth["simulated_frames_saved_final"] = row["frames_saved_final"]
        truth["simulated_cpu_seconds"] = row["cpu_seconds"]
        k += 1
    prog(k, steps, f"pksm-delay sweep over probation_passes={','.join(map(str, probation_passes))}")
    sweep_dir = out / "sweep-pksm-delay"
    table = sweep(str(path), "pksm-delay", {"probation_passes": list(probation_passes)}, sweep_dir,
                  workers=workers, progress=None)
    sweep_rows = []
    from ksmtrace.results import RunResult

    sweep_results = []
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
    k += 1
    res_obj = DemoResult(trace_name=tr.name, trace_path=str(path), out_dir=str(out), trace_facts=trace_facts(tr),
                         rows=rows, sweep_rows=sweep_rows, real_ksm=truth, results=results,
                         sweep_results=sweep_results)
    res_obj.files = _write_tables(res_obj, out)
    if plots:
        res_obj.plots = _write_plots(res_obj, tr, out, lambda msg: prog(k, steps, msg))
        k += len(PLOT_KINDS)
    res_obj.seconds = time.monotonic() - t_start
    with open_output_dir(out) as d:
        d.write_bytes("summary.json", (json.dumps(res_obj.to_json(), indent=1, default=str) + "\n").encode())
    res_obj.files["summary"] = str(out / "summary.json")
    prog(steps, steps, "done")
    return res_obj


def _write_tables(res: DemoResult, out: Path) -> dict[str, str]:
    files = {}
    cols = ["label", "policy", "frames_saved_mean", "mib_saved_mean", "pct_of_oracle", "frames_saved_final",
            "oracle_saved_mean", "cow_breaks", "cpu_seconds", "merges", "merge_latency_p50_s", "merge_latency_p90_s",
            "start_s", "run_id"]
    for name, rows, extra in (("comparison", res.rows, []),
                              ("delay-sweep", res.sweep_rows, ["probation_passes", "cow_breaks_avoided",
                                                               "cpu_seconds_avoided", "frames_saved_lost"])):
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=cols + extra, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        with open_output_dir(out) as d:
            files[name] = str(d.write_bytes(f"{name}.csv", text.getvalue().encode()))
    return files


def _write_plots(res: DemoResult, tr, out: Path, note) -> dict[str, str]:
    from ksmtrace import plot

    paths: dict[str, str] = {}
    core = res.results
    merged = [r for r in core if r.summary.get("merges")]

    def one(kind: str, make_fig) -> None:
        note(f"plot {kind}")
        p = out / f"{kind}.png"
        plot.save(make_fig(), p)
        paths[kind] = str(p)

    one("timeline", lambda: plot.timeline(core))
    one("pareto", lambda: plot.pareto(core + res.sweep_results, y="pct"))
    one("latency", lambda: plot.latency(core + res.sweep_results[1:]))
    one("breakdown", lambda: plot.breakdown(tr))
    one("heatmap", lambda: plot.heatmap([r for r in merged if r.policy != "oracle"][:4] or core[:1], value="fraction"))
    return paths


# --- text --------------------------------------------------------------------------------------------
def next_steps(res: DemoResult) -> list[str]:
    o = res.out_dir
    return [
        "capture your own processes (root):  ksmtrace capture --name qemu --interval 2 --duration 120 "
        "--scope mergeable --fingerprints -o my.trace",
        "                                    ksmtrace capture --tree PID --interval 1 --count 30 --fingerprints -o my.trace",
        "look at it:                         ksmtrace info my.trace; ksmtrace breakdown my.trace",
        "replay one policy:                  ksmtrace replay my.trace --policy ksm -p pages_to_scan=1000",
        "compare policies:                   ksmtrace compare my.trace --policies oracle,ksm,pksm,pksm-delay,hashtable -o results/",
        "plot them:                          ksmtrace plot results/ --kind timeline -o timeline.png",
        "tune KSM:                           ksmtrace sweep my.trace -P ksm -p pages_to_scan=100:6400:x4 "
        "-p sleep_millisecs=20,200 -o sweeps/ksm --pareto",
        f"this demo's runs, re-plotted:       ksmtrace plot {o}/results {o}/sweep-pksm-delay --kind pareto -o pareto.svg",
        "other sample traces:                ksmtrace demo --trace python-sci   (or prefork; ksmtrace demo --list)",
    ]


def format_report(res: DemoResult) -> str:
    from ksmtrace.textfmt import table  # plain text helper (no click needed to format)

    f = res.trace_facts
    lines = [
        f"ksmtrace demo: trace {res.trace_name!r} ({res.trace_path})",
        f"  {f['snapshots']} snapshots over {f['duration_s']:.0f} s, scope {f['scope']}, interval {f['interval_s']} s, "
        f"kernel {f['kernel']}, ground truth: {'yes' if f['ground_truth'] else 'no'}",
        "",
        "Every core policy with its default parameters (saved = mean over the snapshots; %oracle = of a perfect "
        "instantaneous dedup):",
        table(res.rows, TABLE_COLUMNS, TABLE_HEADERS),
    ]
    rk = res.real_ksm
    if rk:
        s = ", ".join(f"{k}={v}" for k, v in rk["settings"].items())
        lines += ["", f"The real kernel KSM ran during this capture ({s}), started {rk['start_s']:.2f} s after "
                      f"snapshot 0: at the last snapshot it reported pages_sharing={rk['pages_sharing']:,} "
                      f"(pages_shared={rk['pages_shared']:,}; ksmd CPU "
                      + (f"{rk['ksmd_cpu_seconds']:.2f} s" if rk.get("ksmd_cpu_seconds") is not None else "n/a")
                      + f"); the simulated 'ksm (as captured)' run saved {rk.get('simulated_frames_saved_final', 0):,} "
                      "frames at the last snapshot."]
    lines += ["", "The Delay trade-off: pksm-delay with new pages on probation for N passes of the new list "
                  "(N=0 is plain PKSM):",
              table(res.sweep_rows, ("label", "frames_saved_mean", "pct_of_oracle", "cow_breaks", "cow_breaks_avoided",
                                     "frames_saved_lost", "cpu_seconds", "merge_latency_p50_s"),
                    {"label": "run", "frames_saved_mean": "saved(frames)", "pct_of_oracle": "%oracle",
                     "cow_breaks": "COW breaks", "cow_breaks_avoided": "COW avoided", "frames_saved_lost": "saved lost",
                     "cpu_seconds": "CPU s", "merge_latency_p50_s": "latency p50 s"}),
              "", FRAMES_SAVED_DEFINITION, "CPU s: simulated ksmd CPU seconds under the shipped cost model "
              "(ksmtrace calibrate fits one for your host)."]
    lines += ["", f"Written to {res.out_dir}/ in {res.seconds:.1f} s:"]
    for kind, p in list(res.plots.items()) + list(res.files.items()):
        lines.append(f"  {kind:<12} {p}")
    lines.append(f"  {'results':<12} {res.out_dir}/results/ and {res.out_dir}/sweep-pksm-delay/ (one .json + .parquet per run)")
    lines += ["", "Next:"] + ["  " + s for s in next_steps(res)]
    return "\n".join(lines)
