"""Controllers against the best static setting: does retuning ksm while it runs beat fixed settings?

>>> from ksmtrace.analysis.controllers import compare_controllers
>>> cc = compare_controllers("vms.trace", host_memory="1G", out_dir="out/controllers")
>>> print(cc.text())

Each controller (:mod:`ksmtrace.controllers`: ksmtuned, KubeVirt's handler, the kernel's scan-time
advisor) drives the ``ksm`` policy over the trace on a host of the stated size, starting from the
kernel's defaults (``pages_to_scan=100``, ``sleep_millisecs=20``) and the traced kernel's profile.
Its run is placed on the ``ksm`` frontier (:mod:`ksmtrace.analysis.frontier`: ``ksm`` swept over
``pages_to_scan`` x ``sleep_millisecs`` at fixed values, the same scope, profile and cost model),
with the measures of :mod:`ksmtrace.analysis.measures` — saving (mean, % of the oracle), ksmd CPU
(% of one core), COW breaks — and compared with two static settings:

* **at equal CPU**: the static setting that saves the most within the controller's CPU;
* **for equal saving**: the cheapest static setting that saves at least as much as the controller.

A controller that saves more than the first (or costs less than the second) beats every fixed
setting of the sweep; one that does worse shows what its rules leave on the table.  A controller
whose host has no memory pressure may stop ksmd altogether (ksmtuned, KubeVirt): then it saves
nothing and costs nothing, which is its answer for that host.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from ksmtrace.analysis.measures import MIB_PER_FRAME, cpu_pct, finite, pct_of_oracle, time_to_oracle_share
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make

DEFAULT_CONTROLLERS = ("ksmtuned", "kubevirt", "scan-time")
TARGET_PCT = 80.0


@dataclass
class ControllerComparison:
    trace_name: str
    trace_path: str
    scope: str
    scope_reason: str
    host_kib: int | None
    duration_s: float
    oracle_saved_mean: float
    cost_model: str
    notes: list[str]
    frontier: Any  # the ksm Frontier the controllers are placed on
    rows: list[dict[str, Any]]  # one per controller
    results: dict[str, Any] = field(default_factory=dict, repr=False)  # controller spec -> RunResult
    statics: dict[str, Any] = field(default_factory=dict, repr=False)  # run_id -> RunResult of the static runs quoted

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace_name, "trace_path": self.trace_path, "scope": self.scope,
            "scope_reason": self.scope_reason, "host_kib": self.host_kib, "duration_s": self.duration_s,
            "oracle_saved_mean_frames": self.oracle_saved_mean, "cost_model": self.cost_model, "notes": self.notes,
            "controllers": [{k: finite(v) for k, v in r.items()} for r in self.rows],
            "static_runs": self.frontier.runs.height, "definitions": DEFINITIONS,
        }

    def text(self) -> str:
        return format_comparison(self)


DEFINITIONS = {
    "pct_of_oracle": "mean frames_saved over mean oracle_saved, in %",
    "cpu_pct": "modelled ksmd CPU seconds over the trace's duration, in % of one core",
    "static_at_cpu": "the static ksm setting of the frontier that saves the most within the controller's CPU",
    "static_for_saving": "the cheapest static ksm setting of the frontier that saves at least as much as the controller",
    "running_pct": "share of the snapshots at which ksmd was running (run=1)",
    f"t{TARGET_PCT:g}_s": f"time from which the run keeps {TARGET_PCT:g} % of the oracle's saving to the end (s)",
}


def compare_controllers(trace, controllers: Sequence[str] = DEFAULT_CONTROLLERS, host_memory: str | int | None = None,
                        out_dir=None, *, level: str = "standard", scope: str | None = None, cost=None,
                        workers: int | None = 1, executor=None, progress: ProgressFn | None = None,
                        frontier=None, grid: dict[str, Sequence[Any]] | None = None) -> ControllerComparison:
    """Replay ``ksm`` under each controller of ``controllers`` (names or ``NAME:key=value,...``) on
    ``trace`` with a host of ``host_memory`` (``"16G"``), and compare each with the ``ksm`` frontier
    (``frontier``: one already computed with ``ksm`` in it; else swept here at ``level`` into
    ``out_dir/ksm``, reused by a second call; ``grid``: the static settings instead of the frontier's
    rate grid, e.g. ``{"pages_to_scan": [64, 1024], "sleep_millisecs": [20]}``)."""
    from ksmtrace.analysis.frontier import frontier as make_frontier
    from ksmtrace.controllers import make_controller, parse_memory_size
    from ksmtrace.engine.cost import resolve_cost_model
    from ksmtrace.replay import replay, resolve_scope, trace_params
    from ksmtrace.samples import resolve_trace
    from ksmtrace.trace.reader import Trace, open_trace

    tr = trace if isinstance(trace, Trace) else open_trace(resolve_trace(trace))
    ctls = [make_controller(c) for c in controllers]
    if not ctls:
        raise KsmtraceError("controllers: none given")
    host_kib = parse_memory_size(host_memory)
    need = [c.name for c in ctls if c.needs_host_memory]
    if need and host_kib is None:
        raise KsmtraceError(f"{', '.join(need)} need the host's memory size (--host-memory 16G): their rules compare free "
                            "memory with it")
    model = resolve_cost_model(cost)
    scope, why = resolve_scope(tr, scope)
    prog = make(progress)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ksmtrace-controllers-")
        base = Path(tmp.name)
    else:
        base = Path(out_dir)
    try:
        if frontier is None:
            def sub(d, t, m):
                prog(d, t + len(ctls), f"static ksm {m}")

            frontier = make_frontier(tr, ["ksm"], base, level=level, scope=scope, cost=model, workers=workers,
                                     executor=executor, progress=sub, grids={"ksm": grid} if grid else None)
        if "ksm" not in frontier.policies:
            raise KsmtraceError("controllers: the frontier given has no ksm runs")
        params, notes = trace_params(tr, "ksm", {})
        static = frontier.policy_runs("ksm")
        rows, results, quoted = [], {}, {}
        n0 = frontier.runs.height
        for i, ctl in enumerate(ctls):
            spec = _spec_text(ctl)
            prog(n0 + i, n0 + len(ctls), spec)
            res = replay(tr, "ksm", params, scope=scope, controller=ctl, report_cost=model,
                         host_memory=f"{host_kib}K" if host_kib else None)
            if out_dir is not None:
                res.write(base / "controllers")
            results[spec] = res
            row = _row(res, spec, ctl, model, frontier.duration_s)
            row.update(_statics(static, row))
            for k in ("static_at_cpu_run_id", "static_for_saving_run_id"):
                rid = row.get(k)
                if rid and rid in frontier.results:
                    quoted[rid] = frontier.results[rid]
            rows.append(row)
        prog(n0 + len(ctls), n0 + len(ctls), "done")
        return ControllerComparison(
            trace_name=tr.name, trace_path=str(tr.path), scope=scope, scope_reason=why, host_kib=host_kib,
            duration_s=frontier.duration_s, oracle_saved_mean=frontier.oracle_saved_mean, cost_model=model.name,
            notes=notes, frontier=frontier, rows=rows, results=results, statics=quoted)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _spec_text(ctl) -> str:
    """``ksmtuned`` or ``ksmtuned:monitor_interval=5`` (only what differs from its defaults)."""
    changed = {f["name"]: v for f in ctl.parameter_table() if (v := ctl.describe()[f["name"]]) != f["default"]}
    text = ",".join(f"{k}={int(v) if isinstance(v, bool) else (f'{v:g}' if isinstance(v, float) else v)}"
                    for k, v in changed.items())
    return ctl.name + (":" + text if text else "")


def _row(res, spec: str, ctl, model, dur: float) -> dict[str, Any]:
    t = res.table
    s = res.summary
    log = res.extras["controller"]["log"]
    pts = t["pages_to_scan"] if "pages_to_scan" in t.columns else None
    row: dict[str, Any] = {
        "controller": spec, "name": ctl.name, "run_id": res.run_id,
        "pct_of_oracle": pct_of_oracle(res), "mib_saved_mean": float(s["frames_saved_mean"]) * MIB_PER_FRAME,
        "cpu_pct": cpu_pct(res, model, dur), "cpu_s": res.cpu_seconds(model), "cow_breaks": int(s["cow_breaks"]),
        f"t{TARGET_PCT:g}_s": time_to_oracle_share(res, TARGET_PCT),
        "running_pct": 100.0 * float(t["run"].mean()) if "run" in t.columns and t.height else 100.0,
        "adjustments": len(log), "refused_writes": sum(1 for e in log if e.get("refused")),
        "pages_to_scan_min": int(pts.min()) if pts is not None and t.height else None,
        "pages_to_scan_max": int(pts.max()) if pts is not None and t.height else None,
        "sleep_millisecs_min": int(t["sleep_millisecs"].min()) if "sleep_millisecs" in t.columns and t.height else None,
        "sleep_millisecs_max": int(t["sleep_millisecs"].max()) if "sleep_millisecs" in t.columns and t.height else None,
    }
    return row


def _statics(static: pl.DataFrame, row: dict[str, Any]) -> dict[str, Any]:
    """The static settings the controller is held against (see the module docstring)."""
    out: dict[str, Any] = {}
    d = static.filter(pl.col("cpu_pct").is_not_null() & pl.col("pct_of_oracle").is_not_null())
    cpu, pct = row["cpu_pct"], row["pct_of_oracle"]
    for prefix, cand in (
        ("static_at_cpu", d.filter(pl.col("cpu_pct") <= (cpu if cpu is not None else -1.0) * (1 + 1e-9))
         .sort(["pct_of_oracle", "cpu_pct"], descending=[True, False])),
        ("static_for_saving", d.filter(pl.col("pct_of_oracle") >= (pct if pct is not None else float("inf")) * (1 - 1e-9))
         .sort(["cpu_pct", "pct_of_oracle"], descending=[False, True])),
    ):
        best = cand.row(0, named=True) if cand.height else None
        out[f"{prefix}_settings"] = best["settings"] if best else None
        out[f"{prefix}_pct_of_oracle"] = best["pct_of_oracle"] if best else None
        out[f"{prefix}_cpu_pct"] = best["cpu_pct"] if best else None
        out[f"{prefix}_cow_breaks"] = best["cow_breaks"] if best else None
        out[f"{prefix}_run_id"] = best["run_id"] if best else None
    best = d.sort(["pct_of_oracle", "cpu_pct"], descending=[True, False])
    if best.height:
        b = best.row(0, named=True)
        out.update({"best_static_settings": b["settings"], "best_static_pct_of_oracle": b["pct_of_oracle"],
                    "best_static_cpu_pct": b["cpu_pct"], "best_static_cow_breaks": b["cow_breaks"]})
    return out


# --- text ----------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f} %"


def _cpu(v) -> str:
    return "-" if v is None else f"{v:.3g} %"


def table_rows(cc: ControllerComparison) -> list[dict[str, Any]]:
    """The comparison as text rows: each controller, then the two static settings it is held against."""
    out = []
    for r in cc.rows:
        pts = "-" if r["pages_to_scan_min"] is None else (
            f"{r['pages_to_scan_min']}" if r["pages_to_scan_min"] == r["pages_to_scan_max"]
            else f"{r['pages_to_scan_min']}-{r['pages_to_scan_max']}")
        out.append({"run": r["controller"], "saved": _pct(r["pct_of_oracle"]), "mib": f"{r['mib_saved_mean']:,.1f}",
                    "cpu": _cpu(r["cpu_pct"]), "cow": f"{r['cow_breaks']:,}",
                    "note": f"ksmd on {r['running_pct']:.0f} % of snapshots, pages_to_scan {pts}"})
        for prefix, what in (("static_at_cpu", "best static within its CPU"),
                             ("static_for_saving", "cheapest static saving as much")):
            if r.get(f"{prefix}_settings") is None:
                out.append({"run": f"  {what}", "saved": "-", "mib": "-", "cpu": "-", "cow": "-",
                            "note": "no static setting of the sweep" + (" within that CPU" if prefix == "static_at_cpu"
                                                                        else " saves that much")})
                continue
            out.append({"run": f"  {what}", "saved": _pct(r[f"{prefix}_pct_of_oracle"]),
                        "mib": f"{r[f'{prefix}_pct_of_oracle'] / 100 * cc.oracle_saved_mean * MIB_PER_FRAME:,.1f}",
                        "cpu": _cpu(r[f"{prefix}_cpu_pct"]), "cow": f"{r[f'{prefix}_cow_breaks']:,}",
                        "note": r[f"{prefix}_settings"]})
    return out


def format_comparison(cc: ControllerComparison) -> str:
    from ksmtrace.controllers import format_kib
    from ksmtrace.textfmt import table

    host = format_kib(cc.host_kib) if cc.host_kib else "not stated"
    lines = [f"controllers on trace {cc.trace_name!r}: ksm retuned during the run, against {cc.frontier.policy_runs('ksm').height} "
             f"static ksm settings over {cc.duration_s:.0f} s; host memory {host}",
             cc.scope_reason, *cc.notes,
             f"ceiling: the oracle saves {cc.oracle_saved_mean * MIB_PER_FRAME:,.1f} MiB on average; CPU from cost model "
             f"{cc.cost_model!r}", ""]
    lines.append(table(table_rows(cc), ["run", "saved", "mib", "cpu", "cow", "note"],
                       {"saved": "saved (% oracle)", "mib": "saved (MiB)", "cpu": "CPU (% core)", "cow": "COW breaks",
                        "note": "settings / what it did"}))
    b = cc.rows[0] if cc.rows else None
    if b and b.get("best_static_settings"):
        lines += ["", f"best static setting overall: {b['best_static_settings']}: {_pct(b['best_static_pct_of_oracle'])} of "
                      f"the oracle at {_cpu(b['best_static_cpu_pct'])} of a core, {b['best_static_cow_breaks']:,} COW breaks"]
    lines += ["", "saved = mean frames_saved over the mean oracle saving; CPU = modelled ksmd CPU / trace duration; "
                  "the controllers start from pages_to_scan=100, sleep_millisecs=20 (docs/controllers.md)."]
    return "\n".join(lines)
