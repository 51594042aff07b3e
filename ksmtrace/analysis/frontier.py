"""The frontier: what each policy saves for the CPU (and the COW breaks) it costs, on one trace.

>>> from ksmtrace.analysis.frontier import frontier
>>> fr = frontier("my-trace", ["ksm", "pksm", "pksm-delay", "hashtable"], "out/frontier")
>>> print(fr.text())
>>> fr.budget_rows()            # each policy's saving at 0.1 %, 1 % and 5 % of a core
>>> fr.target_rows()            # the CPU each needs to keep 50 / 80 / 95 % of the oracle, and when

Comparing policies at their own defaults mostly compares their budgets.  Here every policy is
swept over its *rate* parameters (:func:`rate_grid`: how many pages it may look at per wake-up and
how often it wakes), so each one is a curve, and the curves are compared at equal cost:

* **saving** is the mean over the snapshots of ``frames_saved``, in % of the oracle's mean
  (:mod:`ksmtrace.analysis.measures`); the oracle — a perfect, instantaneous dedup at no CPU — is
  the ceiling, 100 %, never a point on a front;
* **CPU** is the modelled daemon CPU over the trace's duration, in % of one core;
* a policy's **front** is its runs no other run of the same policy beats on both saving and CPU
  (or saving and COW breaks);
* **at a budget** B: the best saving among the policy's runs whose CPU is at most B;
* **to reach X %**: the cheapest run that keeps at least X % of the oracle's saving from some
  snapshot to the end of the trace, its CPU, and from when it keeps it.

Every policy is replayed under one scope (:func:`ksmtrace.replay.choose_scope` unless given),
starting at the first snapshot, the ksm profile following the traced kernel
(:func:`ksmtrace.replay.trace_params`).  The runs go through :func:`ksmtrace.sweep.sweep`, so
their result files are kept in the output directory and a second call reuses them.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from ksmtrace.analysis.measures import (MIB_PER_FRAME, cpu_pct, duration_s, finite, pct_of_oracle,
                                        time_to_oracle_share)
from ksmtrace.pareto import non_dominated
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make

BUDGETS_PCT = (0.1, 1.0, 5.0)
TARGETS_PCT = (50.0, 80.0, 95.0)
DEFAULT_POLICIES = ("ksm", "pksm", "pksm-delay", "hashtable", "uksm")
#: pages per wake-up, ×4 apart: from a trickle to more than any sample trace holds
PAGES = {"standard": (16, 64, 256, 1024, 4096, 16384), "coarse": (32, 256, 2048, 16384)}
#: sleep between wake-ups (ms): the kernel's default, 10x and 50x longer (fewer wake-ups, each costing tens of µs)
SLEEPS = {"standard": (20, 200, 1000), "coarse": (20, 500)}
#: scan-rate caps (pages/s); 0 = no cap
RATES = {"standard": (64, 256, 1024, 4096, 16384, 65536, 0), "coarse": (256, 4096, 65536, 0)}
RATE_SLEEPS = {"standard": (100, 1000), "coarse": (1000,)}
#: a CPU cap (% of a core: UKSM's max_cpu_percentage) with the governor's per-rung ratios below it
CPU_CAPS = {"standard": (1, 3, 10, 30, 95), "coarse": (2, 20, 95)}
#: UKSM's sleep (it stretches it by its own rule): its default and 10x
CAP_SLEEPS = {"standard": (100, 1000), "coarse": (1000,)}
LEVELS = tuple(PAGES)


def rate_grid(policy, level: str = "standard") -> dict[str, list[Any]]:
    """The grid of a policy's rate parameters, from the names in its ``Params``:

    * ``pages_to_scan`` (pages per wake-up: ``ksm``, ``pksm``, ``pksm-delay``) × ``sleep_millisecs``;
    * ``pages_per_second`` (a scan-rate cap: ``hashtable``), with ``process_pages_per_second`` = 0
      so that the total cap alone sets the rate, × ``sleep_millisecs``;
    * ``max_cpu_percentage`` (``uksm``: its rate is a CPU share, the governor's ladder below it)
      × ``sleep_millisecs``.

    Empty for a policy with none of these (``oracle``, or a plug-in: then it is one point at its
    defaults).  ``level``: ``standard`` (6 × 3 points for a pages-per-wake-up policy) or ``coarse``
    (4 × 2)."""
    from ksmtrace.policies.registry import get_policy

    if level not in LEVELS:
        raise KsmtraceError(f"unknown grid level {level!r} (levels: {', '.join(LEVELS)})")
    cls = get_policy(policy) if isinstance(policy, str) else policy
    names = {p["name"] for p in cls.parameter_table()}
    grid: dict[str, list[Any]] = {}
    if "pages_to_scan" in names:
        grid["pages_to_scan"] = list(PAGES[level])
        if "sleep_millisecs" in names:
            grid["sleep_millisecs"] = list(SLEEPS[level])
    elif "pages_per_second" in names:
        grid["pages_per_second"] = list(RATES[level])
        if "process_pages_per_second" in names:
            grid["process_pages_per_second"] = [0]
        if "sleep_millisecs" in names:
            grid["sleep_millisecs"] = list(RATE_SLEEPS[level])
    elif "max_cpu_percentage" in names:
        grid["max_cpu_percentage"] = list(CPU_CAPS[level])
        if "sleep_millisecs" in names:
            grid["sleep_millisecs"] = list(CAP_SLEEPS[level])
    return grid


def settings_text(params: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``pages_to_scan=1024 sleep_millisecs=200`` for the swept keys (caps of 0 read "no cap")."""
    parts = []
    for k in keys:
        v = params.get(k)
        if k.endswith("pages_per_second") and v == 0:
            parts.append(f"{k}=0 (no cap)")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts) if parts else "defaults"


@dataclass
class Frontier:
    trace_name: str
    trace_path: str
    scope: str
    scope_reason: str
    notes: list[str]
    duration_s: float
    oracle_saved_mean: float  # frames
    oracle_saved_final: int
    cost_model: str
    budgets_pct: tuple[float, ...]
    targets_pct: tuple[float, ...]
    grids: dict[str, dict[str, list[Any]]]
    runs: pl.DataFrame  # one row per run (see RUN_COLUMNS)
    out_dir: str | None = None
    results: dict[str, Any] = field(default_factory=dict, repr=False)  # run_id -> RunResult
    restrict: str | None = None  # the safe preset every run obeyed (the oracle's too), if any
    oracle: Any = field(default=None, repr=False)  # the oracle's RunResult (the ceiling)

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(self.runs["policy"].to_list()))

    def policy_runs(self, policy: str) -> pl.DataFrame:
        return self.runs.filter(pl.col("policy") == policy)

    def budget_rows(self) -> list[dict[str, Any]]:
        """One row per policy and budget: the best saving among the runs within the budget."""
        rows = []
        for pol in self.policies:
            d = self.policy_runs(pol).filter(pl.col("cpu_pct").is_not_null() & pl.col("pct_of_oracle").is_not_null())
            for b in self.budgets_pct:
                within = d.filter(pl.col("cpu_pct") <= b).sort(["pct_of_oracle", "cpu_pct"], descending=[True, False])
                row: dict[str, Any] = {"policy": pol, "budget_pct": b, "pct_of_oracle": None, "mib_saved_mean": None,
                                       "cpu_pct": None, "cow_breaks": None, "settings": None, "run_id": None}
                if within.height:
                    best = within.row(0, named=True)
                    row.update({k: best[k] for k in ("pct_of_oracle", "mib_saved_mean", "cpu_pct", "cow_breaks",
                                                      "settings", "run_id")})
                rows.append(row)
        return rows

    def target_rows(self) -> list[dict[str, Any]]:
        """One row per policy and target: the cheapest run that keeps the target share, and when."""
        rows = []
        for pol in self.policies:
            d = self.policy_runs(pol).filter(pl.col("cpu_pct").is_not_null())
            for x in self.targets_pct:
                col = _tcol(x)
                ok = d.filter(pl.col(col).is_not_null()).sort(["cpu_pct", col])
                row: dict[str, Any] = {"policy": pol, "target_pct": x, "cpu_pct": None, "reached_at_s": None,
                                       "pct_of_oracle": None, "settings": None, "run_id": None}
                if ok.height:
                    best = ok.row(0, named=True)
                    row.update({"cpu_pct": best["cpu_pct"], "reached_at_s": best[col],
                                "pct_of_oracle": best["pct_of_oracle"], "settings": best["settings"],
                                "run_id": best["run_id"]})
                rows.append(row)
        return rows

    def best(self, policy: str | None = None) -> dict[str, Any] | None:
        """The run that saves the most (of ``policy``, or of all), the cheapest among equals."""
        d = self.runs if policy is None else self.policy_runs(policy)
        d = d.filter(pl.col("pct_of_oracle").is_not_null()).sort(["pct_of_oracle", "cpu_pct"], descending=[True, False])
        return d.row(0, named=True) if d.height else None

    def saving_at(self, policy: str, budget_pct: float) -> float | None:
        """The best saving (% of the oracle) of ``policy`` within ``budget_pct`` % of a core."""
        d = self.policy_runs(policy).filter(pl.col("cpu_pct") <= budget_pct)
        v = d["pct_of_oracle"].drop_nulls()
        return float(v.max()) if len(v) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace_name, "trace_path": self.trace_path, "scope": self.scope,
            "scope_reason": self.scope_reason, "notes": self.notes, "duration_s": self.duration_s,
            "oracle_saved_mean_frames": self.oracle_saved_mean, "oracle_saved_mean_mib": self.oracle_saved_mean * MIB_PER_FRAME,
            "oracle_saved_final_frames": self.oracle_saved_final, "cost_model": self.cost_model,
            "budgets_pct": list(self.budgets_pct), "targets_pct": list(self.targets_pct), "grids": self.grids,
            "at_budget": self.budget_rows(), "to_reach": self.target_rows(),
            "runs": [{k: finite(v) for k, v in r.items()} for r in self.runs.to_dicts()],
            "out_dir": self.out_dir, "restrict": self.restrict, "definitions": DEFINITIONS,
        }

    def text(self) -> str:
        return format_frontier(self)


DEFINITIONS = {
    "pct_of_oracle": "mean frames_saved over mean oracle_saved (a perfect, instantaneous dedup), in %",
    "cpu_pct": "modelled daemon CPU seconds over the trace's duration, in % of one core",
    "at_budget": "the best saving among the policy's runs whose CPU is at most the budget",
    "to_reach": "the cheapest run that keeps at least X % of the oracle's saving from some snapshot to the end, "
                "its CPU and the time (s after the first snapshot) from which it keeps it",
    "front": "runs no other run of the same policy beats on saving and CPU (cpu front) or saving and COW breaks (cow front)",
}


def _tcol(x: float) -> str:
    return f"t{x:g}_s".replace(".", "_")


def frontier(trace, policies: Sequence[str] = DEFAULT_POLICIES, out_dir=None, *, level: str = "standard",
             grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None, scope: str | None = None,
             budgets_pct: Sequence[float] = BUDGETS_PCT, targets_pct: Sequence[float] = TARGETS_PCT,
             cost=None, workers: int | None = 1, executor=None, progress: ProgressFn | None = None,
             restrict: str | None = None) -> Frontier:
    """Sweep every policy of ``policies`` over its rate grid on ``trace`` (a path, sample name or
    Trace) and return the :class:`Frontier`.  ``out_dir``: where the sweeps keep their result files
    (one sub-directory per policy; default: a temporary directory, removed afterwards).
    ``grids``: a policy's own grid instead of :func:`rate_grid` (``{"ksm": {"pages_to_scan": [...]}}``).
    ``cost``: the cost model for the CPU column (the timing model is the shipped one).
    ``workers``, ``executor``: where the sweeps run (:func:`ksmtrace.sweep.sweep`; default: here,
    one run after another).  ``restrict``: a safe preset every run obeys, the oracle's ceiling
    included (:mod:`ksmtrace.trace.restrict`)."""
    from ksmtrace.engine.cost import resolve_cost_model
    from ksmtrace.policies.registry import get_policy
    from ksmtrace.replay import replay, resolve_scope, trace_params
    from ksmtrace.results import RunResult
    from ksmtrace.samples import resolve_trace
    from ksmtrace.sweep import sweep
    from ksmtrace.trace.reader import Trace, open_trace
    from ksmtrace.trace.restrict import parse_restriction

    tr = trace if isinstance(trace, Trace) else open_trace(resolve_trace(trace))
    restriction = parse_restriction(restrict)
    only = {"restrict": [restriction.spec]} if restriction else {}
    names = []
    for p in policies:
        n = get_policy(p).name
        if n not in names:
            names.append(n)
    if not names:
        raise KsmtraceError("frontier: no policies given")
    if not tr.n_snapshots > 1:
        raise KsmtraceError(f"{tr.path}: a frontier needs a trace of at least two snapshots (CPU is per second)")
    model = resolve_cost_model(cost)
    scope, why = resolve_scope(tr, scope)
    prog = make(progress)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ksmtrace-frontier-")
        base = Path(tmp.name)
    else:
        base = Path(out_dir)
    try:
        notes: list[str] = []
        plans: list[tuple[str, dict[str, list[Any]]]] = []
        for n in names:
            if n == "oracle":
                continue  # the ceiling, not a curve
            g = {k: list(v) for k, v in (grids or {}).get(n, rate_grid(n, level)).items()}
            implied, more = trace_params(tr, n, {k: None for k in g})
            notes += [m for m in more if m not in notes]
            if not g:
                notes.append(f"{n}: no rate parameter known (pages_to_scan, pages_per_second): one point at its defaults")
            plans.append((n, {**g, **{k: [v] for k, v in implied.items() if k not in g}, **(only if g else {})}))
        n_runs = sum(int(np.prod([len(v) for v in g.values()])) if g else 1 for _, g in plans) + 1
        done = 0
        prog(done, n_runs, "oracle")
        oracle = replay(tr, "oracle", scope=scope, restrict=restriction)
        done += 1
        rows: list[dict[str, Any]] = []
        results: dict[str, Any] = {}
        dur = duration_s(oracle)
        used_grids: dict[str, dict[str, list[Any]]] = {}
        for n, g in plans:
            swept = [k for k, v in g.items() if len(v) > 1]
            used_grids[n] = g
            if g:
                def sub(d, t, m, _n=n, _k=done):
                    prog(_k + d, n_runs, f"{_n} {m}")

                table = sweep(str(tr.path), n, g, base / n, workers=workers, progress=sub, scope=scope,
                              report_cost=model, executor=executor)
                run_ids = list(dict.fromkeys(table["run_id"].to_list()))
                done += table.height
            else:
                res = replay(tr, n, scope=scope, restrict=restriction)
                res.write(base / n)
                run_ids = [res.run_id]
                done += 1
            for rid in run_ids:
                res = RunResult.read(base / n / f"{rid}.json")
                results[rid] = res
                rows.append(_run_row(res, swept, targets_pct, model, dur))
            prog(done, n_runs, n)
        runs = _with_fronts(pl.DataFrame(rows, schema=_schema(targets_pct), orient="row"))
        return Frontier(
            trace_name=tr.name, trace_path=str(tr.path), scope=scope, scope_reason=why, notes=notes, duration_s=dur,
            oracle_saved_mean=float(oracle.summary["oracle_saved_mean"]),
            oracle_saved_final=int(oracle.summary["oracle_saved_final"]), cost_model=model.name,
            budgets_pct=tuple(float(b) for b in budgets_pct), targets_pct=tuple(float(x) for x in targets_pct),
            grids=used_grids, runs=runs, out_dir=None if tmp else str(base), results=results, oracle=oracle,
            restrict=restriction.spec if restriction else None)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _schema(targets: Sequence[float]) -> dict[str, Any]:
    sch: dict[str, Any] = {
        "policy": pl.String, "settings": pl.String, "params": pl.String, "run_id": pl.String,
        "cpu_s": pl.Float64, "cpu_pct": pl.Float64, "pct_of_oracle": pl.Float64, "frames_saved_mean": pl.Float64,
        "mib_saved_mean": pl.Float64, "frames_saved_final": pl.Int64, "cow_breaks": pl.Int64, "cow_per_s": pl.Float64,
        "merge_latency_p90_s": pl.Float64,
    }
    for x in targets:
        sch[_tcol(x)] = pl.Float64
    return sch


def _run_row(res, swept: Sequence[str], targets: Sequence[float], model, dur: float) -> dict[str, Any]:
    s = res.summary
    params = res.spec.get("params", {})
    cpu = res.cpu_seconds(model)
    row: dict[str, Any] = {
        "policy": res.policy,
        "settings": settings_text(params, swept),
        "params": json.dumps({k: params[k] for k in swept}, sort_keys=True),
        "run_id": res.run_id,
        "cpu_s": cpu,
        "cpu_pct": cpu_pct(res, model, dur),
        "pct_of_oracle": pct_of_oracle(res),
        "frames_saved_mean": float(s["frames_saved_mean"]),
        "mib_saved_mean": float(s["frames_saved_mean"]) * MIB_PER_FRAME,
        "frames_saved_final": int(s["frames_saved_final"]),
        "cow_breaks": int(s["cow_breaks"]),
        "cow_per_s": s["cow_breaks"] / dur if dur > 0 else None,
        "merge_latency_p90_s": finite(s.get("merge_latency_p90_s")),
    }
    for x in targets:
        row[_tcol(x)] = time_to_oracle_share(res, x)
    return row


def _with_fronts(runs: pl.DataFrame) -> pl.DataFrame:
    """Mark each policy's non-dominated runs: saving vs CPU, and saving vs COW breaks."""
    cpu_front = np.zeros(runs.height, dtype=bool)
    cow_front = np.zeros(runs.height, dtype=bool)
    pol = runs["policy"].to_numpy()
    y = runs["pct_of_oracle"].fill_null(float("nan")).to_numpy().astype(float)
    cpu = runs["cpu_pct"].fill_null(float("nan")).to_numpy().astype(float)
    cow = runs["cow_breaks"].to_numpy().astype(float)
    for p in dict.fromkeys(pol.tolist()):
        idx = np.flatnonzero(pol == p)
        cpu_front[idx] = non_dominated(maximize=[y[idx]], minimize=[cpu[idx]]) & np.isfinite(y[idx])
        cow_front[idx] = non_dominated(maximize=[y[idx]], minimize=[cow[idx]]) & np.isfinite(y[idx])
    return runs.with_columns(pl.Series("on_cpu_front", cpu_front), pl.Series("on_cow_front", cow_front))


# --- text ----------------------------------------------------------------------------------------
def _pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f} %"


def _cpu(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g} %"


def budget_table_rows(fr: Frontier) -> list[dict[str, Any]]:
    """The at-budget table as text rows: one per policy, one column per budget."""
    out = []
    rows = fr.budget_rows()
    for pol in fr.policies:
        row: dict[str, Any] = {"policy": pol}
        for r in rows:
            if r["policy"] == pol:
                cell = "-" if r["pct_of_oracle"] is None else f"{r['pct_of_oracle']:.1f} % ({r['mib_saved_mean']:,.1f} MiB)"
                row[f"≤ {r['budget_pct']:g} % CPU"] = cell
        out.append(row)
    return out


def target_table_rows(fr: Frontier) -> list[dict[str, Any]]:
    out = []
    rows = fr.target_rows()
    for pol in fr.policies:
        row: dict[str, Any] = {"policy": pol}
        for r in rows:
            if r["policy"] == pol:
                if r["cpu_pct"] is None:
                    cell = "never"
                elif r["reached_at_s"] >= fr.duration_s - 1e-9:
                    cell = f"{_cpu(r['cpu_pct'])} CPU, only at the end"
                else:
                    cell = f"{_cpu(r['cpu_pct'])} CPU, from {r['reached_at_s']:.0f} s"
                row[f"{r['target_pct']:g} % of oracle"] = cell
        out.append(row)
    return out


def format_frontier(fr: Frontier) -> str:
    from ksmtrace.textfmt import table

    n = fr.runs.height
    lines = [
        f"frontier of {', '.join(fr.policies)} on trace {fr.trace_name!r}: {n} runs over {fr.duration_s:.0f} s",
        fr.scope_reason,
        *([f"every run obeys the safe preset {fr.restrict} (the oracle's ceiling too): docs/safe-presets.md"]
          if fr.restrict else []),
        *fr.notes,
        f"ceiling: the oracle (perfect, instantaneous dedup) saves {fr.oracle_saved_mean * MIB_PER_FRAME:,.1f} MiB on "
        f"average ({fr.oracle_saved_mean:,.0f} frames; {fr.oracle_saved_final:,} at the end); CPU from cost model "
        f"{fr.cost_model!r}",
        *(["no duplicate pages in this scope: a perfect dedup saves nothing, so every share of it is undefined (-)"]
          if fr.oracle_saved_mean <= 0 else []),
        "",
        "Saving at a matched CPU budget (mean saving in % of the oracle; best setting within the budget):",
        table(budget_table_rows(fr)),
        "",
        "CPU needed to keep 50 / 80 / 95 % of the oracle's saving, and from when (s after the first snapshot):",
        table(target_table_rows(fr)),
        "",
        "Each policy's front (no other setting of it saves more for less CPU):",
    ]
    front = fr.runs.filter(pl.col("on_cpu_front")).sort(["policy", "cpu_pct"])
    lines.append(table([{**r, "cpu": _cpu(r["cpu_pct"]), "saved": _pct(r["pct_of_oracle"]),
                         "mib_saved_mean": round(r["mib_saved_mean"], 1)} for r in front.to_dicts()],
                       ["policy", "settings", "cpu", "saved", "mib_saved_mean", "cow_breaks"],
                       {"mib_saved_mean": "saved (MiB)", "cow_breaks": "COW breaks", "saved": "saved (% oracle)",
                        "cpu": "CPU (% core)"}))
    lines += ["", "-: no setting of the sweep fits the budget; never: no setting keeps that share to the end of the trace; "
                  "only at the end: reached at the last snapshot, so whether it lasts is not known.",
              "CPU (% core) = modelled ksmd CPU seconds / trace duration x 100 (docs/cost-model.md)."]
    return "\n".join(lines)
