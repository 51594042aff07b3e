"""Fidelity of a trace: replay the ``ksm`` policy with the kernel's own settings and compare, counter
by counter, the kernel's counters over time with the simulated ones.

>>> from ksmtrace.fidelity import fidelity
>>> rep = fidelity(open_trace("run.trace"))
>>> print(rep.text())               # the table
>>> rep.row("pages_sharing")        # {"real_final": ..., "sim_final": ..., "nrmse": ..., ...}

The replay starts ksmd when the real one started (``run`` became 1), uses the traced host's HZ,
``scope=recorded`` (what ksmd scans) and the profile matching the kernel release.  Between
snapshots the page contents are constant, so the simulated daemon can be sampled more often than
the trace was: the replay runs on a *refined* time grid (empty snapshots inserted every
``sim_step`` seconds; values at the trace's own snapshots are identical to a plain replay), which
gives the simulated trajectories and time-to-90% a resolution finer than the capture interval.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import polars as pl

from ksmtrace.engine.cost import CostModel, resolve_cost_model
from ksmtrace.fidelity import metrics as M
from ksmtrace.fidelity.groundtruth import ksm_params, load_ground_truth, wall_clock_model
from ksmtrace.progress import ProgressFn


@dataclass(frozen=True)
class Counter:
    name: str  # shown in reports
    real: str  # column of the ground-truth samples
    sim: str  # column of the simulated table
    t90: bool = False  # report the time to 90% of the final value
    help: str = ""


COUNTERS: tuple[Counter, ...] = (
    Counter("pages_sharing", "pages_sharing", "pages_sharing", True, "mappings sharing a KSM page beyond the first"),
    Counter("pages_shared", "pages_shared", "pages_shared", True, "KSM pages in use"),
    Counter("pages_unshared", "pages_unshared", "pages_unshared", False, "items in the unstable tree (lazily counted)"),
    Counter("pages_volatile", "pages_volatile", "pages_volatile", False, "rmap items in no tree"),
    Counter("ksm_zero_pages", "ksm_zero_pages", "ksm_zero_pages", True, "pages merged with the zero page (use_zero_pages)"),
    Counter("full_scans", "full_scans", "full_scans", False, "full scans since KSM started"),
    Counter("pages_scanned", "pages_scanned", "pages_scanned", False, "pages handed to cmp_and_merge_page since KSM started"),
    Counter("pages_skipped", "pages_skipped", "pages_skipped", False, "smart_scan skips since KSM started"),
    Counter("cow_ksm", "cow_ksm", "cow_ksm", False, "real /proc/vmstat cow_ksm vs simulated COW breaks of KSM pages, since KSM started"),
    Counter("ksmd_cpu_s", "ksmd_cpu_s", "cpu_s", False, "real ksmd CPU seconds vs the cost model's, since KSM started"),
)
COUNTER_NAMES = tuple(c.name for c in COUNTERS)

NRMSE_NOTE = (
    "values are compared at the end of each snapshot's page reads; NRMSE = RMS of (simulated - real) at "
    "those times from KSM's start on, divided by the peak of the real values there; t90 = first time a "
    "counter reaches 90% of its final value, seconds after KSM started"
)

# the arrays of Prepared with one value per snapshot (repeated on a refined grid)
_PER_SNAPSHOT = ("base_pages", "base_frames", "oracle_frames", "zero_filled", "zero_page_mapped", "hash_dup_pages")


# ---------------------------------------------------------------------------------------------
# a finer time grid for the simulated daemon
def refine_prepared(prep, step_ns: int, anchors_ns=None, max_rows: int = 50_000):
    """A copy of ``prep`` with empty snapshots inserted: every ``step_ns`` within each interval, at
    each of ``anchors_ns`` (virtual times, ns), and past the last snapshot up to the last anchor.

    Returns ``(refined, index, grid)``: ``index[s]`` is the refined row of original snapshot ``s``,
    ``grid`` the refined rows' times.  Page contents only change at original snapshots, so a replay
    of the refined view gives exactly the plain replay's values at those rows (tested), plus the
    daemon's state in between and after.
    """
    times = np.asarray(prep.times_ns, dtype=np.int64)
    n = len(times)
    # every row of a replay walks every page once (per-process counts): bound the extra rows so a
    # refined replay of a large trace costs at most a few times 10^8 page visits
    max_rows = int(min(max_rows, max(2 * n, 3e8 / max(int(getattr(prep, "n_pages", 1)), 1))))
    parts = [times]
    if n >= 2 and step_ns and step_ns > 0:
        gaps = np.diff(times)
        k = np.maximum(1, np.ceil(gaps / float(step_ns)).astype(np.int64))
        if int(k.sum()) > max_rows:  # coarser steps for very long traces
            k = np.maximum(1, np.floor(k / (k.sum() / max_rows)).astype(np.int64))
        orig = np.repeat(np.arange(n - 1), k)
        frac = np.concatenate([np.arange(kk) / kk for kk in k.tolist()])
        parts.append(times[orig] + np.rint(frac * gaps[orig]).astype(np.int64))
    if anchors_ns is not None and len(anchors_ns):
        a = np.asarray(anchors_ns, dtype=np.int64)
        parts.append(a[a >= times[0]])
    grid = np.unique(np.concatenate(parts))
    total = len(grid)
    if total == n:
        return prep, np.arange(n), times
    index = np.searchsorted(grid, times).astype(np.int64)
    row_orig = np.searchsorted(times, grid, side="right") - 1  # snapshot whose state each row holds
    is_snap = np.zeros(total, dtype=bool)
    is_snap[index] = True
    off = np.asarray(prep.off, dtype=np.int64)
    new_off = np.empty(total + 1, np.int64)
    # a snapshot row keeps its events; an inserted row has none (it starts and ends at the next one's)
    new_off[:-1] = np.where(is_snap, off[row_orig], off[np.minimum(row_orig + 1, n)])
    new_off[-1] = off[n]

    def remap(a, never_is_n: bool):
        a = np.asarray(a).astype(np.int64)
        out = np.where((a >= 0) & (a < n), index[np.clip(a, 0, n - 1)], a)
        if never_is_n:
            out = np.where(a >= n, total, out)
        return out.astype(np.int32)

    changes: dict[str, Any] = {
        "times_ns": grid,
        "off": new_off,
        "proc_first_snap": remap(prep.proc_first_snap, True),
        "proc_reg_snap": remap(prep.proc_reg_snap, False),
        "proc_exit_snap": remap(prep.proc_exit_snap, True),
        "extras": dict(getattr(prep, "extras", {}) or {}, refined_from=n),
    }
    for name in _PER_SNAPSHOT:
        if hasattr(prep, name):
            changes[name] = np.asarray(getattr(prep, name))[row_orig]
    return dataclasses.replace(prep, **changes), index, grid


class _RefinedTrace:
    """A trace whose prepared view is refined (everything else is the wrapped trace's)."""

    def __init__(self, trace, step_ns: int, anchors_ns=None) -> None:
        self._trace = trace
        self._step_ns = int(step_ns)
        self._anchors = None if anchors_ns is None else np.asarray(anchors_ns, dtype=np.int64)
        self.index: np.ndarray | None = None
        self.grid: np.ndarray | None = None

    def __getattr__(self, name):
        return getattr(self._trace, name)

    @property
    def fingerprint(self) -> str:
        tag = f"~step{self._step_ns}"
        if self._anchors is not None and len(self._anchors):
            import hashlib

            tag += "~a" + hashlib.sha256(self._anchors.tobytes()).hexdigest()[:8]
        return self._trace.fingerprint + tag

    def prepare(self, scope: str = "recorded", cache: bool = True):
        prep = self._trace.prepare(scope, cache=cache)
        refined, index, grid = refine_prepared(prep, self._step_ns, self._anchors)
        refined = dataclasses.replace(refined, trace_fingerprint=self.fingerprint)
        self.index = index
        self.grid = grid
        return refined


def compare_times_ns(trace) -> np.ndarray:
    """When each snapshot is compared (ns since the first snapshot): the end of its page reads.

    The pages of snapshot ``s`` are read during ``[t_s, t_end_s]`` and a write in that window is in
    them, so the replay — which applies it at ``t_s`` — is compared with the kernel at ``t_end_s``,
    where the capture takes a ground-truth sample; the simulated daemon is sampled there too.
    """
    t0 = trace.t0_ns
    out = []
    for e in trace.snapshots:
        out.append(int(e.get("t_end_ns") or e["t_ns"]) - t0)
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
@dataclass
class FidelityReport:
    trace: str
    trace_name: str
    params: dict[str, Any]
    start_s: float
    start_exact: bool
    hz: int
    kernel_release: str | None
    rows: list[dict[str, Any]]
    full_scan_period_s: float | None
    interval_s: float | None
    n_snapshots: int
    duration_s: float
    cost_model: str
    timing_model: str
    warnings: list[str] = field(default_factory=list)
    real: pl.DataFrame | None = None  # ground-truth samples (t_s, counters; cumulative re-based)
    sim: pl.DataFrame | None = None  # simulated rows on the refined grid (t_s, counters, cpu_s; snapshot = the
    # snapshot compared at that row, else -1)
    snapshot_times: np.ndarray | None = None  # when each snapshot is compared (end of its reads), s
    result: Any = None  # the RunResult of the refined replay
    validate: dict[str, Any] | None = None
    events: dict[str, Any] | None = None  # event by event, from the ksm_events table (ksmtrace.fidelity.events)

    def row(self, name: str) -> dict[str, Any]:
        for r in self.rows:
            if r["counter"] == name:
                return r
        raise KeyError(name)

    def value(self, name: str, key: str):
        return self.row(name).get(key)

    def to_json(self) -> dict[str, Any]:
        return _jsonable({
            "trace": self.trace,
            "trace_name": self.trace_name,
            "policy": "ksm",
            "params": self.params,
            "scope": "recorded",
            "start_s": self.start_s,
            "start_exact": self.start_exact,
            "hz": self.hz,
            "kernel_release": self.kernel_release,
            "snapshots": self.n_snapshots,
            "interval_s": self.interval_s,
            "duration_s": self.duration_s,
            "full_scan_period_s": self.full_scan_period_s,
            "cost_model": self.cost_model,
            "timing_model": self.timing_model,
            "counters": self.rows,
            "warnings": self.warnings,
            "definitions": NRMSE_NOTE,
            "validate": self.validate,
            "events": None if self.events is None else {k: v for k, v in self.events.items() if not k.startswith("_")},
        })

    def text(self) -> str:
        from ksmtrace.textfmt import table

        head = [
            f"fidelity of {self.trace_name}: ksm replay ({_params_text(self.params)}) vs the real kernel "
            f"{self.kernel_release or '?'}",
            f"{self.n_snapshots} snapshots every {_f(self.interval_s)} s, KSM started {self.start_s:.3f} s after "
            f"the first ({'recorded' if self.start_exact else 'inferred'}), {self.duration_s - self.start_s:.1f} s "
            f"compared; HZ={self.hz}; real full-scan period {_f(self.full_scan_period_s)} s",
            f"CPU from cost model {self.cost_model!r}; the daemon's clock from {self.timing_model!r}",
        ]
        rows = []
        for r in self.rows:
            rows.append({
                "counter": r["counter"],
                "real": r["real_final"],
                "simulated": r["sim_final"],
                "error": _pct(r["rel_error"]) if r["rel_error"] is not None else (_num(r["diff"]) if r["diff"] is not None else "-"),
                "NRMSE": _pct(r["nrmse"], sign=False),
                "t90 real (s)": r.get("t90_real"),
                "t90 sim (s)": r.get("t90_sim"),
            })
        out = "\n".join(head) + "\n\n" + table(rows)
        if self.events is not None:
            from ksmtrace.fidelity.events import event_text

            out += "\n\n" + event_text(self.events)
        if self.warnings:
            out += "\n\n" + "\n".join(f"warning: {w}" for w in self.warnings)
        return out


def fidelity(
    trace,
    overrides: Mapping[str, Any] | None = None,
    *,
    engine: str = "fast",
    cost: CostModel | str | None = None,
    timing_cost: CostModel | str | None = None,
    sim_step: float | None = None,
    wall_clock: bool = True,
    progress: ProgressFn | None = None,
    writes: str | None = None,
) -> FidelityReport:
    """Compare the real KSM counters recorded in ``trace`` with a replay of the ``ksm`` policy.

    ``overrides``: ``ksm`` parameters that replace the ones read from the trace.  ``cost``: the
    cost model for the CPU comparison; ``timing_cost``: the one for the simulated daemon's clock
    (both default to the shipped, calibrated model).  ``wall_clock``: stretch the clock by ksmd's
    measured (run + run-queue wait) / run when the trace records it (``ksmtrace validate`` does), so
    that a busy host's slower batches are reproduced.  ``sim_step``: seconds between simulated
    samples (default: 0.05 s, never finer than needed).  ``writes``: how the replay learns of
    writes (:data:`ksmtrace.trace.faults.WRITE_MODES`; default ``faults`` when the trace recorded
    the write faults).  Raises FidelityError for a trace without ground truth.
    """
    from ksmtrace.replay import replay
    from ksmtrace.trace.reader import as_trace

    trace = as_trace(trace)

    gt = load_ground_truth(trace)
    params = ksm_params(gt, dict(overrides or {}))
    model = resolve_cost_model(cost)
    tmodel = resolve_cost_model(timing_cost)
    if wall_clock:
        tmodel = wall_clock_model(gt, tmodel)
    times = np.asarray(trace.times_s, dtype=float)
    interval = float(np.median(np.diff(times))) if len(times) > 1 else None
    step = sim_step if sim_step is not None else 0.05
    at_ns = compare_times_ns(trace)
    rtrace = _RefinedTrace(trace, int(round(step * 1e9)) if step and step > 0 else 0, at_ns)
    res = replay(rtrace, "ksm", params, engine=engine, scope="recorded", timing_cost=tmodel, report_cost=model,
                 start_s=gt.start_s, hz=gt.hz, progress=progress, writes=writes)
    rows_at = np.searchsorted(rtrace.grid, at_ns)
    sim = _sim_table(res, model, rows_at)
    real = gt.samples.with_columns((pl.col("ksmd_cpu_ns") / 1e9).alias("ksmd_cpu_s"))
    compare_at = at_ns / 1e9
    rows = compare_series(real, sim, compare_at, gt.start_s, params)
    rep = FidelityReport(
        trace=str(trace.path),
        trace_name=trace.name,
        params=params,
        start_s=gt.start_s,
        start_exact=gt.start_exact,
        hz=gt.hz,
        kernel_release=gt.kernel_release,
        rows=rows,
        full_scan_period_s=gt.full_scan_period_s(),
        interval_s=interval,
        n_snapshots=len(times),
        duration_s=float(times[-1]) if len(times) else 0.0,
        cost_model=model.name,
        timing_model=tmodel.name,
        warnings=list(gt.warnings),
        real=real,
        sim=sim,
        snapshot_times=compare_at,
        result=res,
        validate=gt.validate,
    )
    from ksmtrace.fidelity.events import event_fidelity

    rep.events = event_fidelity(trace, rep)
    return rep


def _sim_table(res, model: CostModel, index: np.ndarray) -> pl.DataFrame:
    t = res.table
    cpu = np.cumsum(res.cpu_per_snapshot(model))
    snap_of_row = np.full(t.height, -1, np.int64)
    snap_of_row[np.asarray(index, dtype=np.int64)] = np.arange(len(index))
    cols = {"t_s": t["t_s"], "snapshot": pl.Series(snap_of_row), "cpu_s": pl.Series(cpu),
            "cow_breaks": t["cow_breaks"], "frames_saved": t["frames_saved"]}
    for c in COUNTERS:
        if c.sim in t.columns and c.sim not in cols:
            cols[c.sim] = t[c.sim].cast(pl.Float64)
    return pl.DataFrame(cols)


def compare_series(real: pl.DataFrame, sim: pl.DataFrame, snapshot_times: np.ndarray, start_s: float,
                   params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per counter: finals, error, NRMSE over snapshot times from ``start_s``, t90."""
    snap_rows = sim.filter(pl.col("snapshot") >= 0).sort("snapshot")
    ts = np.asarray(snapshot_times, dtype=float)
    use = ts >= start_s - 1e-9
    if not use.any():
        use = np.ones(len(ts), dtype=bool)
    rt = real["t_s"].to_numpy().astype(float)
    st_all = sim["t_s"].to_numpy().astype(float)
    rows = []
    for c in COUNTERS:
        if c.real not in real.columns or c.sim not in sim.columns:
            continue
        rv = real[c.real].cast(pl.Float64).to_numpy()
        sv_all = sim[c.sim].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        sv = snap_rows[c.sim].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        ok = ~np.isnan(rv)
        if not ok.any() or np.isnan(sv).all():
            continue
        real_at = M.step_hold(rt[ok], rv[ok], ts)
        rf = float(real_at[-1])
        sf = float(sv[-1])
        row: dict[str, Any] = {
            "counter": c.name,
            "real_final": _int_or_float(rf),
            "sim_final": _int_or_float(sf),
            "diff": _int_or_float(sf - rf),
            "rel_error": M.relative_error(sf, rf),
            "nrmse": M.nrmse(sv[use], real_at[use]),
            "rmse": M.rmse(sv[use], real_at[use]),
            "real_max": _int_or_float(float(np.nanmax(real_at[use]))),
            "sim_max": _int_or_float(float(np.nanmax(sv[use]))),
            "real_mean": float(np.nanmean(real_at[use])),
            "sim_mean": float(np.nanmean(sv[use])),
        }
        if c.t90:
            t_end = ts[-1]
            rmask = ok & (rt <= t_end + 1e-9)
            row["t90_real"] = M.time_to_fraction(rt[rmask], rv[rmask], 0.9, final=rf, t_from=start_s)
            smask = ~np.isnan(sv_all)
            row["t90_sim"] = M.time_to_fraction(st_all[smask], sv_all[smask], 0.9, final=sf, t_from=start_s)
            if row["t90_real"] is not None and row["t90_sim"] is not None:
                row["t90_diff"] = row["t90_sim"] - row["t90_real"]
            else:
                row["t90_diff"] = None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
def _int_or_float(x: float):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return int(x) if float(x).is_integer() else float(x)


def _pct(x, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    sg = "+" if sign else ""
    return f"{100 * x:{sg}.1f}%" if abs(x) < 10 else f"{100 * x:{sg}.0f}%"


def _num(x) -> str:
    return f"{x:+,}" if isinstance(x, int) else f"{x:+.3g}"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _params_text(p: Mapping[str, Any]) -> str:
    keys = ("profile", "range_walk", "pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "max_page_sharing",
            "advisor_mode")
    return " ".join(f"{k}={int(p[k]) if isinstance(p[k], bool) else p[k]}" for k in keys if k in p)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
