"""Calibrating the cost model: per-unit nanoseconds from microbenchmarks on this host, and a fit of
the units ksmd spends its time on to ksmd's measured CPU in ground-truth runs.

* :func:`microbenchmark` (``ksmtrace calibrate``): times user-space proxies of the kernel's work
  units — xxhash64 of 4 KiB (``checksums``), jhash2 (``jhash2_checksums``), PKSM's 64-word sampled
  hash, memcmp of equal pages, an all-zero check, a page copy, ``mprotect`` of one page (a PTE
  write-protect with its TLB flush), a copy-on-write fault — and keeps the built-in values for
  units without a faithful user-space proxy (rmap-item bookkeeping, tree node visits, wake-ups).
* :func:`fit_from_runs` (``ksmtrace calibrate --from-runs``): replays every ground-truth trace with
  the kernel's settings, and fits, with non-negative least squares, a few *groups* of units (each
  group scales its units' base costs together, so the model stays small and physically plausible)
  to ksmd's real CPU time per window of about a second.  Runs are split into fitting and held-out
  runs; the report gives each held-out run's error of total ksmd CPU.

CPU seconds are always computed at report time from a run's raw unit counts and a cost file, so a
new fit never needs a re-run.  See ``docs/cost-model.md``.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ksmtrace.engine.cost import DAEMON_MASK, DEFAULT_NS, UNIT_NAMES, CostModel, resolve_cost_model
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make as make_progress

PAGE = 4096


# =============================================================================================
# fitting to ksmd's real CPU
# =============================================================================================
#: unit groups fitted together (each group's units keep their base ratios); units in no group
#: keep their base cost.  Few groups keep the fit identifiable and the costs plausible.  Wake-ups
#: and full-scan starts are separate groups: their ratio varies a lot between workloads (one scan
#: per ~1.3 wake-ups for a zero-heavy workload at use_zero_pages=1, one per ~10 for a static one).
GROUPS: dict[str, tuple[str, ...]] = {
    "page_visit": ("pages_visited", "addresses_walked", "rmap_allocs", "rmap_frees"),
    "checksum": ("checksums", "jhash2_checksums"),
    "wakeup": ("wakeups",),
    "scan_start": ("scan_starts",),
    "tree": ("stable_node_visits", "unstable_node_visits"),
    "merge": ("write_protects", "remaps", "memcmp_pages", "zero_checks", "stale_prunes", "page_copies"),
}


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None, tol: float = 1e-10) -> np.ndarray:
    """Non-negative least squares: argmin ||A x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    A = np.asarray(A, dtype=float)
    b = np.asarray(b, dtype=float)
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (b - A @ x)
    it = 0
    max_iter = max_iter or 3 * n + 30
    while (~passive).any() and w[~passive].max() > tol * max(1.0, np.abs(w).max()):
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            it += 1
            if it > max_iter * 10:
                return x
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = A.T @ (b - A @ x)
    return x


@dataclass
class RunData:
    """One ground-truth run prepared for fitting: unit counts and real CPU per window."""

    trace: str
    label: str
    workload: str
    settings: str
    units: np.ndarray  # [windows, N_UNITS] simulated unit counts
    real_cpu_s: np.ndarray  # [windows] ksmd CPU seconds (real)
    duration_s: float

    @property
    def total_units(self) -> np.ndarray:
        return self.units.sum(axis=0)

    @property
    def total_real_s(self) -> float:
        return float(self.real_cpu_s.sum())


@dataclass
class FitResult:
    model: CostModel
    scales: dict[str, float]
    train: list[dict[str, Any]] = field(default_factory=list)
    holdout: list[dict[str, Any]] = field(default_factory=list)
    base: str = ""

    def summary(self) -> dict[str, Any]:
        def stats(rows):
            e = [abs(r["rel_error"]) for r in rows if r.get("rel_error") is not None]
            return {"runs": len(rows), "mean_abs_error": float(np.mean(e)) if e else None,
                    "max_abs_error": float(np.max(e)) if e else None,
                    "within_25pct": sum(1 for x in e if x <= 0.25)}
        return {"train": stats(self.train), "holdout": stats(self.holdout), "scales": self.scales}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "scales": self.scales, "base": self.base,
                "train": self.train, "holdout": self.holdout, "summary": self.summary()}


def find_ground_truth_traces(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Trace directories (with ground truth) given directly or found under the given directories."""
    from ksmtrace.trace import schema

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / schema.MANIFEST).is_file():
            out.append(p)
            continue
        if not p.is_dir():
            raise KsmtraceError(f"{p}: no such trace or directory")
        found = sorted(m.parent for m in p.rglob(schema.MANIFEST))
        out.extend(found)
    seen: set[Path] = set()
    uniq = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def run_data(trace_path: str | os.PathLike, window_s: float = 1.0, timing_cost: CostModel | str | None = None) -> RunData:
    """Replay one ground-truth trace and return its unit counts and real CPU per window."""
    from ksmtrace.fidelity.groundtruth import ksm_params, load_ground_truth, wall_clock_model
    from ksmtrace.fidelity.metrics import step_hold
    from ksmtrace.replay import replay
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace_path)
    gt = load_ground_truth(tr)
    params = ksm_params(gt)
    clock = wall_clock_model(gt, resolve_cost_model(timing_cost))
    res = replay(tr, "ksm", params, scope="recorded", timing_cost=clock, start_s=gt.start_s, hz=gt.hz)
    t = res.table["t_s"].to_numpy()
    units = np.column_stack([res.table[f"u_{u}"].to_numpy().astype(float) if f"u_{u}" in res.table.columns
                             else np.zeros(len(t)) for u in UNIT_NAMES])
    real = step_hold(gt.times, gt.column("ksmd_cpu_ns") / 1e9, t)
    real = np.nan_to_num(real)
    d_real = np.diff(real, prepend=real[0])
    # windows of >= window_s from KSM's start (the rows before it carry no work)
    start = gt.start_s
    keep = t > start
    t, units, d_real = t[keep], units[keep], d_real[keep]
    if len(t) == 0:
        raise KsmtraceError(f"{trace_path}: no snapshot after KSM started")
    win = np.floor((t - start) / window_s).astype(np.int64)
    nwin = int(win.max()) + 1
    U = np.zeros((nwin, units.shape[1]))
    R = np.zeros(nwin)
    np.add.at(U, win, units)
    np.add.at(R, win, d_real)
    used = U.sum(axis=1) > 0
    v = gt.validate or {}
    return RunData(trace=str(trace_path), label=str(v.get("label", Path(trace_path).parent.name)),
                   workload=str(v.get("workload", "?")), settings=str(v.get("settings_preset", "?")),
                   units=U[used], real_cpu_s=R[used], duration_s=float(gt.end_s - start))


def split_holdout(runs: Sequence[RunData], every: int = 3) -> tuple[list[RunData], list[RunData]]:
    """Deterministic split: within each workload x settings group (in trace order), every
    ``every``-th run is held out — and the second run of a group of two — so every group that has
    two or more runs is represented on both sides."""
    groups: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.settings), []).append(r)
    train: list[RunData] = []
    hold: list[RunData] = []
    i = 0
    for key in sorted(groups):
        g = sorted(groups[key], key=lambda r: r.trace)
        if len(g) == 1:
            # single runs alternate between the sides
            (hold if i % every == every - 1 else train).append(g[0])
            i += 1
            continue
        for j, r in enumerate(g):
            (hold if j % max(2, every) == 1 else train).append(r)
    return train, hold


def fit(runs: Sequence[RunData], base: CostModel, groups: Mapping[str, Sequence[str]] = GROUPS) -> tuple[CostModel, dict[str, float]]:
    """NNLS fit of group scales: real CPU per window ≈ Σ_g scale_g · Σ_{u in g} base_u · count_u.

    Each run's windows are weighted equally per run (a long run does not dominate).  Units in no
    group keep ``base``'s cost.  Returns the fitted model and the scales."""
    bvec = base.vector()
    gnames = list(groups)
    rows_A, rows_b = [], []
    for r in runs:
        if len(r.real_cpu_s) == 0:
            continue
        wgt = 1.0 / math.sqrt(len(r.real_cpu_s)) / max(r.total_real_s / max(len(r.real_cpu_s), 1), 1e-6)
        fixed = np.zeros(len(r.real_cpu_s))
        cols = []
        in_group = np.zeros(len(UNIT_NAMES), dtype=bool)
        for g in gnames:
            idx = [UNIT_NAMES.index(u) for u in groups[g]]
            in_group[idx] = True
            cols.append(r.units[:, idx] @ bvec[idx] / 1e9)
        rest = (~in_group) & DAEMON_MASK
        fixed = r.units[:, rest] @ bvec[rest] / 1e9
        rows_A.append(np.column_stack(cols) * wgt)
        rows_b.append((r.real_cpu_s - fixed) * wgt)
    if not rows_A:
        raise KsmtraceError("no ground-truth windows to fit")
    A = np.vstack(rows_A)
    b = np.concatenate(rows_b)
    # groups with no work in any run cannot be fitted: keep them at scale 1
    active = np.abs(A).sum(axis=0) > 0
    x = np.ones(len(gnames))
    if active.any():
        x[active] = nnls(A[:, active], b)
    scales = {g: float(s) for g, s in zip(gnames, x)}
    ns = dict(base.ns)
    for g, s in scales.items():
        for u in groups[g]:
            # whole nanoseconds: the replay's clock works in integer picoseconds and floors each
            # batch to a nanosecond, so whole-ns costs keep clock and report CPU exactly equal
            ns[u] = float(round(float(base.ns.get(u, DEFAULT_NS[u])) * s))
    return CostModel(ns=ns, name="fitted", source=""), scales


def evaluate(model: CostModel, runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Per run: real ksmd CPU, the model's, and the relative error."""
    out = []
    vec = np.where(DAEMON_MASK, model.vector(), 0.0)
    for r in runs:
        sim = float(r.total_units @ vec) / 1e9
        real = r.total_real_s
        out.append({"trace": r.trace, "label": r.label, "workload": r.workload, "settings": r.settings,
                    "real_cpu_s": real, "model_cpu_s": sim,
                    "rel_error": (sim - real) / real if real > 0 else None, "duration_s": r.duration_s})
    return out


def fit_from_runs(
    paths: Sequence[str | os.PathLike],
    *,
    base: CostModel | str | None = None,
    holdout_every: int = 3,
    window_s: float = 1.0,
    iterations: int = 2,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit the cost model to ksmd's CPU in the ground-truth traces under ``paths``.

    ``base``: the per-unit costs the group scales multiply (default: the built-in table, or a
    microbenchmark cost file).  ``holdout_every``: see :func:`split_holdout` (0 = no held-out
    runs).  The replays' clock uses the model being fitted; ``iterations`` re-replays with the
    previous fit as the clock (the unit counts depend slightly on it).
    """
    prog = make_progress(progress)
    say = log or (lambda m: None)
    base_model = resolve_cost_model(base) if base is not None else CostModel()
    traces = find_ground_truth_traces(paths)
    if not traces:
        raise KsmtraceError("no traces found under " + ", ".join(map(str, paths)))
    timing: CostModel = base_model
    model = base_model
    scales: dict[str, float] = {}
    runs: list[RunData] = []
    skipped: list[str] = []
    for it in range(max(1, iterations)):
        runs = []
        for i, p in enumerate(traces):
            try:
                runs.append(run_data(p, window_s, timing_cost=timing))
            except KsmtraceError as exc:
                if it == 0:
                    skipped.append(f"{p}: {exc}")
            prog(it * len(traces) + i + 1, len(traces) * max(1, iterations), f"replay {Path(p).name}")
        if not runs:
            raise KsmtraceError("none of the traces has ground truth: " + "; ".join(skipped[:3]))
        train, hold = split_holdout(runs, holdout_every) if holdout_every else (list(runs), [])
        if not train:
            train, hold = list(runs), []
        model, scales = fit(train, base_model)
        timing = model
        say(f"iteration {it + 1}: scales " + ", ".join(f"{g}={s:.3g}" for g, s in scales.items()))
    for s in skipped:
        say(f"skipped {s}")
    train, hold = split_holdout(runs, holdout_every) if holdout_every else (list(runs), [])
    if not train:
        train, hold = list(runs), []
    tr_eval, ho_eval = evaluate(model, train), evaluate(model, hold)
    he = [abs(r["rel_error"]) for r in ho_eval if r["rel_error"] is not None]
    host = platform.node()
    source = (
        f"fitted by `ksmtrace calibrate --from-runs` on {host} ({cpu_model()}, {os.cpu_count()} CPUs, Linux "
        f"{platform.release()}) {time.strftime('%Y-%m-%d')}: NNLS of ksmd CPU per {window_s:g} s window over "
        f"{len(train)} ground-truth runs ({', '.join(sorted({f'{r.workload}/{r.settings}' for r in train}))}); "
        f"group scales {', '.join(f'{g}={s:.3g}' for g, s in scales.items())} on base {base_model.name!r}; "
        + (f"held-out error of ksmd CPU over {len(he)} runs: mean {100 * np.mean(he):.1f}%, max {100 * np.max(he):.1f}%"
           if he else "no held-out runs")
    )
    model = CostModel(ns=dict(model.ns), name=f"fitted-{host}", source=source)
    return FitResult(model=model, scales=scales, train=tr_eval, holdout=ho_eval, base=base_model.name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
