"""``advise``: the go/no-go before enabling KSM, and the settings for a CPU budget.

>>> from ksmtrace.analysis.advise import advise
>>> adv = advise("my-trace", cpu_budget_pct=1.0)
>>> print(adv.text())
>>> adv.settings            # {"pages_to_scan": ..., "sleep_millisecs": ..., "smart_scan": ..., ...}

What it does, on one trace (every number is a replay of the ``ksm`` policy, under the scope and
the kernel profile the trace implies, starting at the first snapshot):

1. **Search** (bounded: about 35 replays): the rate grid of :func:`ksmtrace.analysis.frontier.rate_grid`
   (``pages_to_scan`` × ``sleep_millisecs``), then one refinement round of the neighbours of the
   best setting at half and double its values, then each switch on its own at that rate
   (``smart_scan`` off, ``use_zero_pages`` on, ``max_page_sharing`` 4096), then the scan-time
   advisor (``advisor_mode=scan-time`` at the kernel's default sleep, ``advisor_max_cpu`` at the
   budget, three target scan times: the full-scan time of the best static setting, ten times it,
   and the kernel's default 200 s).  **Best** = the most saving (mean over the trace, % of the oracle) among the
   settings whose ksmd CPU stays within the budget (and whose p90 merge latency is at most the
   target latency, when one is given); savings within 0.5 percentage points count as equal and
   then the cheaper setting wins.  A switch or the advisor is recommended only when it beats the
   plain setting by that rule, so the kernel's defaults stay unless the trace says otherwise.
2. **Expected outcome** of the recommended settings: the saving at the end of the trace (MiB and
   the kernel's ``general_profit``), the time until 50 % and 90 % of it is there (and stays), ksmd
   CPU, COW breaks per second (mean and the worst snapshot interval), and the **unmerge
   headroom**: the most memory the merged pages ever saved, which the host must find at once if
   everything is un-merged (``echo 2 > /sys/kernel/mm/ksm/run``, or a burst of writes).
3. **Go / no-go**: go when the saving at the end is at least ``min_saving_pct`` % of the memory
   the candidate pages use and at least ``min_saving_mib`` MiB (a few KiB saved is not worth a
   daemon, whatever its share), and ``general_profit`` is positive.
4. **Confidence**: when the trace has ground truth, :func:`ksmtrace.fidelity.fidelity` replays
   ``ksm`` as the kernel ran and the errors it finds (``pages_sharing``, ksmd CPU) are the
   recommendation's error bars.
5. **Short-lived processes**: for processes that exit during the trace, the share of the saving a
   perfect dedup would have had from them that the recommended settings realise before they exit.
6. **Attribution** per process (per cgroup when the processes sit in several cgroups): its share
   of the saving (each snapshot's ``frames_saved`` split by merged pages) and of the rmap items
   (by candidate pages; 64 B each), what a perfect dedup could save through it, and — its opt-out
   replayed on the trace without it (:mod:`ksmtrace.trace.subset`) — the COW breaks and CPU it
   adds and how the host's saving changes without it.  A process is better opted out when it
   costs more rmap memory than it saves, or causes more than four times the host's COW breaks per
   MiB saved — the per-VM opt-out KubeVirt, Proxmox and libvirt offer.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from ksmtrace.analysis.measures import (MIB_PER_FRAME, cpu_pct, duration_s, finite, pct_of_oracle,
                                        time_to_own_share)
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make

RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on 64-bit, as general_profit counts it
EQUAL_PP = 0.5  # savings within this many percentage points of the oracle count as equal
KNOBS = (("smart_scan", False), ("use_zero_pages", True), ("max_page_sharing", 4096))
MAX_GROUPS = 8
COW_HEAVY = 4.0
DEFAULT_BUDGET_PCT = 1.0
KERNEL_DEFAULTS = {"pages_to_scan": 100, "sleep_millisecs": 20, "smart_scan": True, "use_zero_pages": False,
                   "max_page_sharing": 256, "advisor_mode": "none"}
SYSFS_KEYS = ("pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "max_page_sharing", "advisor_mode",
              "advisor_max_cpu", "advisor_target_scan_time", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan")


@dataclass
class Advice:
    trace_name: str
    trace_path: str
    scope: str
    scope_reason: str
    notes: list[str]
    cpu_budget_pct: float
    target_latency_s: float | None
    verdict: str  # "go" or "no-go"
    reasons: list[str]
    settings: dict[str, Any]  # the recommended sysfs settings (every one of SYSFS_KEYS that applies)
    why: list[str]  # how the search arrived at them
    expected: dict[str, Any]
    confidence: dict[str, Any]
    short_lived: dict[str, Any]
    attribution: list[dict[str, Any]]
    search: pl.DataFrame  # every replay the search made
    grid_best: dict[str, Any] | None  # the best grid setting within the budget (the frontier's ksm point)
    more_budget: list[dict[str, Any]]  # what 2x, 5x, 10x the budget would buy (from the replays made)
    duration_s: float
    oracle_saved_final: int
    base_frames_final: int
    result: Any = field(default=None, repr=False)  # RunResult of the recommended settings
    oracle: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace_name, "trace_path": self.trace_path, "scope": self.scope,
            "scope_reason": self.scope_reason, "notes": self.notes, "cpu_budget_pct": self.cpu_budget_pct,
            "target_latency_s": self.target_latency_s, "verdict": self.verdict, "reasons": self.reasons,
            "settings": self.settings, "why": self.why, "expected": _clean(self.expected),
            "confidence": _clean(self.confidence), "short_lived": _clean(self.short_lived),
            "attribution": [_clean(a) for a in self.attribution],
            "search": [_clean(r) for r in self.search.to_dicts()],
            "grid_best": _clean(self.grid_best) if self.grid_best else None,
            "more_budget": [_clean(r) for r in self.more_budget],
            "duration_s": self.duration_s, "oracle_saved_final_frames": self.oracle_saved_final,
            "candidate_frames_final": self.base_frames_final,
            "run_id": self.result.run_id if self.result is not None else None,
            "definitions": DEFINITIONS,
        }

    def text(self) -> str:
        return format_advice(self)


DEFINITIONS = {
    "saving": "frames_saved at the last snapshot (MiB): physical memory the merged pages no longer use",
    "general_profit": "the kernel's general_profit: (pages_sharing + ksm_zero_pages) x 4096 - rmap_items x 64 bytes",
    "t50_s / t90_s": "seconds after KSM starts until the saving reaches and keeps 50 % / 90 % of its final value",
    "cpu_pct": "modelled ksmd CPU seconds over the trace's duration, in % of one core",
    "cow_per_s": "COW breaks of merged pages per second, mean over the trace; peak: the worst snapshot interval",
    "unmerge_headroom_mib": "the most memory merging saved at any snapshot: what the host needs at once if "
                            "everything is un-merged (run=2, or a burst of writes)",
    "could_save_mib": "what a perfect dedup loses without the process (its duplicates, with everyone's): what "
                      "it can save once KSM has reached its pages",
    "rmap_mib": "the rmap items of its candidate pages (64 B each; ksmd keeps one per page once it has scanned it)",
    "net_mib": "could_save_mib - rmap_mib: negative means opt it out",
    "saves_mib": "its share of the mean saving within the trace: each snapshot's frames_saved split in proportion "
                 "to the pages of each process that are merged (early in a scan this favours the processes ksmd "
                 "reaches first)",
    "cow_breaks": "COW breaks the host has with the process in, minus without it (its opt-out replayed; a negative "
                  "value: the others merge sooner and break more without it)",
    "opt_out_saving_change_mib": "how the host's mean saving changes when the process opts out (replayed)",
}


def _clean(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_clean(v) for v in d]
    return finite(d)


# --- the search ----------------------------------------------------------------------------------
@dataclass
class _Run:
    stage: str
    params: dict[str, Any]
    result: Any
    cpu_pct: float | None
    pct: float | None
    p90: float | None

    def feasible(self, budget: float, latency: float | None) -> bool:
        return self.within(budget) and self.fast_enough(latency)

    def within(self, budget: float) -> bool:
        return self.cpu_pct is not None and self.cpu_pct <= budget + 1e-12

    def fast_enough(self, latency: float | None) -> bool:
        return latency is None or (self.p90 is not None and self.p90 <= latency)


def _better(a: _Run, b: _Run | None) -> bool:
    """Is ``a`` better than ``b`` (both feasible): more saving, equal savings to the cheaper."""
    if b is None:
        return True
    pa, pb = a.pct or 0.0, b.pct or 0.0
    if pa > pb + EQUAL_PP:
        return True
    if pa < pb - EQUAL_PP:
        return False
    return (a.cpu_pct or 0.0) < (b.cpu_pct or 0.0) * 0.9


def _pick(runs: Sequence[_Run], budget: float, latency: float | None) -> _Run | None:
    feas = [r for r in runs if r.feasible(budget, latency)]
    if not feas:
        return None
    top = max(r.pct or 0.0 for r in feas)
    near = [r for r in feas if (r.pct or 0.0) >= top - EQUAL_PP]
    return min(near, key=lambda r: (r.cpu_pct or 0.0, -(r.pct or 0.0)))


class _Search:
    def __init__(self, tr, scope: str, base: dict[str, Any], out: Path, cost, dur: float, workers, executor, prog,
                 total: int):
        self.tr, self.scope, self.base, self.out, self.cost, self.dur = tr, scope, base, out, cost, dur
        self.workers, self.executor, self.prog, self.total = workers, executor, prog, total
        self.runs: list[_Run] = []
        self.by_key: dict[str, _Run] = {}
        self.done = 0

    def _key(self, params: dict[str, Any]) -> str:
        return repr(sorted(params.items()))

    def grid(self, stage: str, grid: dict[str, list[Any]]) -> list[_Run]:
        """Replay every point of ``grid`` (on top of the base parameters) through ksmtrace.sweep."""
        from ksmtrace.results import RunResult
        from ksmtrace.sweep import sweep

        full = {**{k: [v] for k, v in self.base.items() if k not in grid}, **grid}
        n = int(np.prod([len(v) for v in grid.values()]))

        def sub(d, t, m):
            self.prog(min(self.done + d, self.total), self.total, f"{stage} {m}")

        table = sweep(str(self.tr.path), "ksm", full, self.out, workers=self.workers, progress=sub, scope=self.scope,
                      write_table=False, executor=self.executor)
        self.done += n
        out = []
        for row in table.iter_rows(named=True):
            res = RunResult.read(self.out / f"{row['run_id']}.json")
            params = dict(res.spec["params"])
            key = self._key(params)
            if key in self.by_key:
                out.append(self.by_key[key])
                continue
            run = _Run(stage=stage, params=params, result=res, cpu_pct=cpu_pct(res, self.cost, self.dur),
                       pct=pct_of_oracle(res), p90=finite(res.summary.get("merge_latency_p90_s")))
            self.by_key[key] = run
            self.runs.append(run)
            out.append(run)
        return out

    def one(self, stage: str, params: dict[str, Any]) -> _Run:
        return self.grid(stage, {k: [v] for k, v in params.items()})[0]

    def table(self, budget: float, latency: float | None, chosen: _Run | None) -> pl.DataFrame:
        rows = []
        for r in self.runs:
            p = r.params
            rows.append({
                "stage": r.stage,
                "settings": _settings_text(p),
                "cpu_pct": r.cpu_pct, "pct_of_oracle": r.pct, "merge_latency_p90_s": r.p90,
                "mib_saved_final": r.result.summary["frames_saved_final"] * MIB_PER_FRAME,
                "cow_breaks": int(r.result.summary["cow_breaks"]),
                "within_budget": r.within(budget), "meets_latency": r.fast_enough(latency),
                "recommended": r is chosen, "run_id": r.result.run_id,
            })
        return pl.DataFrame(rows, schema={"stage": pl.String, "settings": pl.String, "cpu_pct": pl.Float64,
                                          "pct_of_oracle": pl.Float64, "merge_latency_p90_s": pl.Float64,
                                          "mib_saved_final": pl.Float64, "cow_breaks": pl.Int64,
                                          "within_budget": pl.Boolean, "meets_latency": pl.Boolean,
                                          "recommended": pl.Boolean, "run_id": pl.String}, orient="row")


def _settings_text(p: dict[str, Any]) -> str:
    keys = [k for k in SYSFS_KEYS if k in p and (k in ("pages_to_scan", "sleep_millisecs") or
                                                 p[k] != KERNEL_DEFAULTS.get(k, p[k]) or
                                                 (p.get("advisor_mode") == "scan-time" and k.startswith("advisor")))]
    if p.get("advisor_mode") == "scan-time":
        keys = [k for k in keys if k != "pages_to_scan"]
    return " ".join(f"{k}={_sysfs(p[k])}" for k in keys)


def _sysfs(v: Any) -> Any:
    return int(v) if isinstance(v, bool) else v


def _neighbours(values: Sequence[int], lo: int) -> list[int]:
    return sorted({max(lo, int(v)) for v in values})


def advise(trace, *, cpu_budget_pct: float = DEFAULT_BUDGET_PCT, target_latency_s: float | None = None,
           min_saving_pct: float = 1.0, min_saving_mib: float = 1.0, out_dir=None, cost=None,
           workers: int | None = 1, executor=None, attribution: bool = True,
           progress: ProgressFn | None = None) -> Advice:
    """Search ``ksm`` settings for ``trace`` (a path, sample name or Trace) within ``cpu_budget_pct``
    % of one core (and a p90 merge latency of at most ``target_latency_s``), and return the
    :class:`Advice`.  ``out_dir``: where the replays' result files are kept (default: a temporary
    directory); a second call with the same directory reuses them.  ``workers``, ``executor``: where the
    search's sweeps run (:func:`ksmtrace.sweep.sweep`; default: here, one run after another)."""
    from ksmtrace.analysis.frontier import rate_grid
    from ksmtrace.engine.cost import resolve_cost_model
    from ksmtrace.replay import replay, resolve_scope, trace_params
    from ksmtrace.samples import resolve_trace
    from ksmtrace.trace.reader import Trace, open_trace

    if not cpu_budget_pct > 0 or not math.isfinite(cpu_budget_pct):
        raise KsmtraceError(f"advise: the CPU budget must be a positive percentage of a core (got {cpu_budget_pct!r})")
    if target_latency_s is not None and not target_latency_s > 0:
        raise KsmtraceError(f"advise: the target latency must be positive seconds (got {target_latency_s!r})")
    for name, v in (("saving share", min_saving_pct), ("saving", min_saving_mib)):
        if not (v >= 0 and math.isfinite(v)):
            raise KsmtraceError(f"advise: the minimum {name} must be a non-negative number (got {v!r})")
    tr = trace if isinstance(trace, Trace) else open_trace(resolve_trace(trace))
    if not tr.n_snapshots > 1:
        raise KsmtraceError(f"{tr.path}: advise needs a trace of at least two snapshots")
    model = resolve_cost_model(cost)
    scope, scope_why = resolve_scope(tr, None)
    base, notes = trace_params(tr, "ksm", {})
    prog = make(progress)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ksmtrace-advise-")
        out = Path(tmp.name)
    else:
        out = Path(out_dir)
    try:
        oracle = replay(tr, "oracle", scope=scope)
        dur = duration_s(oracle)
        grid = rate_grid("ksm")
        n_grid = int(np.prod([len(v) for v in grid.values()]))
        total = n_grid + 2 * len(grid['sleep_millisecs']) + 2 + len(KNOBS) + 1 + 3
        search = _Search(tr, scope, base, out / "ksm", model, dur, workers, executor, prog, total)
        budget, latency = float(cpu_budget_pct), target_latency_s
        why: list[str] = []

        # 1. the coarse grid
        coarse = search.grid("grid", grid)
        best = _pick(coarse, budget, latency)
        grid_best = _pick(coarse, budget, None)
        if best is None and latency is not None and grid_best is not None:
            why.append(f"no grid setting within {budget:g} % CPU merges with a p90 latency of {latency:g} s or less; "
                       "the latency target is dropped")
            latency = None
            best = grid_best
        # 2. refine: for every sleep of the grid, bisect pages_to_scan (geometrically, twice) between the
        #    largest value that fits the budget and the smallest that does not; then the best rate with
        #    half and double the sleep (the same pages per second, fewer or more wake-ups)
        if best is not None:
            for s in grid["sleep_millisecs"]:
                for _ in range(2):
                    at = [r for r in search.runs if r.params["sleep_millisecs"] == s and r.params.get("advisor_mode") == "none"
                          and r.params.get("smart_scan") and not r.params.get("use_zero_pages")
                          and r.params.get("max_page_sharing") == 256]
                    lo = [r.params["pages_to_scan"] for r in at if r.feasible(budget, latency)]
                    hi = [r.params["pages_to_scan"] for r in at if not r.within(budget)]
                    p_lo = max(lo) if lo else None
                    p_hi = min((v for v in hi if p_lo is None or v > p_lo), default=None)
                    if p_lo is None or p_hi is None or p_hi <= p_lo + 1:
                        break
                    search.one("refine", {**best.params, "pages_to_scan": int(round(math.sqrt(p_lo * p_hi))),
                                          "sleep_millisecs": s})
            best = _pick(search.runs, budget, latency)
            p, s = best.params["pages_to_scan"], best.params["sleep_millisecs"]
            for f in (0.5, 2.0):
                if int(s * f) >= 10 and int(p * f) >= 1:
                    search.one("refine", {**best.params, "pages_to_scan": int(p * f), "sleep_millisecs": int(s * f)})
            best = _pick(search.runs, budget, latency)
            why.append(f"rate: pages_to_scan={best.params['pages_to_scan']} every {best.params['sleep_millisecs']} ms "
                       f"({best.params['pages_to_scan'] / best.params['sleep_millisecs'] * 1000:,.0f} pages/s), the most "
                       f"saving within {budget:g} % of a core among {len(search.runs)} settings (the {n_grid}-point grid, "
                       "pages_to_scan bisected to the budget at each sleep, the best rate at half and double the sleep)")
            # 3. the switches, one at a time at that rate
            adopted: dict[str, Any] = {}
            for k, v in KNOBS:
                if best.params.get(k) == v:
                    continue
                r = search.one("switches", {**best.params, k: v})
                if r.feasible(budget, latency) and _better(r, best):
                    adopted[k] = v
                    why.append(f"{k}={_sysfs(v)}: saves {r.pct:.1f} % of the oracle against {best.pct:.1f} % "
                               f"({r.cpu_pct:.3g} % CPU against {best.cpu_pct:.3g} %)")
                else:
                    why.append(f"{k} stays {_sysfs(best.params.get(k))}: {k}={_sysfs(v)} "
                               + ("exceeds the budget" if not r.within(budget) else
                                  "misses the latency target" if not r.fast_enough(latency) else
                                  f"does not do better ({_fmt_pct(r.pct)} of the oracle at {r.cpu_pct:.3g} % CPU)"))
            if adopted:
                r = search.one("switches", {**best.params, **adopted})
                if r.feasible(budget, latency) and _better(r, best):
                    best = r
                else:
                    why.append("the switches together do not beat the plain setting: none adopted")
            # 4. the scan-time advisor at this budget
            adv_best = None
            t_scan = _full_scan_s(best)
            targets = sorted({max(1, int(round(t_scan))), max(1, int(round(10 * t_scan))), 200}) if t_scan else [200]
            for ts in targets:  # the advisor sets pages_to_scan itself; it runs at the kernel's default sleep
                r = search.one("advisor", {**best.params, "advisor_mode": "scan-time", "sleep_millisecs": 20,
                                           "advisor_max_cpu": max(1, min(100, int(budget))),
                                           "advisor_target_scan_time": ts})
                if r.feasible(budget, latency) and (adv_best is None or _better(r, adv_best)):
                    adv_best = r
            if adv_best is not None and _better(adv_best, best):
                why.append(f"advisor: scan-time with advisor_target_scan_time={adv_best.params['advisor_target_scan_time']} s "
                           f"saves {adv_best.pct:.1f} % against {best.pct:.1f} % for the static setting")
                best = adv_best
            else:
                why.append("advisor_mode stays none: the scan-time advisor "
                           + (f"does no better within the budget (best {adv_best.pct:.1f} % of the oracle)" if adv_best
                              else "exceeds the budget (its CPU cap advisor_max_cpu cannot go below 1 % of a core)"
                              if budget < 1 else "exceeds the budget or misses the latency target"))
        chosen = best
        table = search.table(budget, latency, chosen)
        grid_row = _row_of(grid_best, table)
        more = []
        for f in (2, 5, 10):
            r = _pick(search.runs, budget * f, latency)
            if r is not None and (chosen is None or (r.pct or 0) > (chosen.pct or 0) + EQUAL_PP):
                more.append({"budget_pct": budget * f, "pct_of_oracle": r.pct, "cpu_pct": r.cpu_pct,
                             "mib_saved_final": r.result.summary["frames_saved_final"] * MIB_PER_FRAME,
                             "settings": _settings_text(r.params)})

        # 5. the outcome, the verdict, the confidence, short-lived processes, attribution
        bd_final = int(oracle.table["base_frames"][-1])
        if chosen is None:
            cheapest = min((r for r in search.runs if r.cpu_pct is not None), key=lambda r: r.cpu_pct, default=None)
            reasons = [f"no setting tried keeps ksmd within {budget:g} % of a core"
                       + (f" (the cheapest, {_settings_text(cheapest.params)}, needs {cheapest.cpu_pct:.3g} %)"
                          if cheapest else "")]
            return Advice(
                trace_name=tr.name, trace_path=str(tr.path), scope=scope, scope_reason=scope_why, notes=notes,
                cpu_budget_pct=budget, target_latency_s=target_latency_s, verdict="no-go", reasons=reasons,
                settings={}, why=why, expected={}, confidence=_confidence(tr), short_lived={}, attribution=[],
                search=table, grid_best=None, more_budget=more, duration_s=dur, oracle_saved_final=int(oracle.summary["oracle_saved_final"]),
                base_frames_final=bd_final, result=None, oracle=oracle)
        res = chosen.result
        expected = _expected(res, oracle, model, dur)
        verdict, reasons = _verdict(expected, bd_final, min_saving_pct, min_saving_mib, scope)
        prog(total, total, "fidelity")
        conf = _confidence(tr)
        short = _short_lived(tr, res, oracle)
        attr = _attribution(tr, scope, chosen.params, res, model, dur, out) if attribution else []
        settings = {k: _sysfs(chosen.params[k]) for k in SYSFS_KEYS if k in chosen.params}
        if settings.get("advisor_mode") != "scan-time":
            for k in list(settings):
                if k.startswith("advisor_") and k != "advisor_mode":
                    settings.pop(k)
        return Advice(
            trace_name=tr.name, trace_path=str(tr.path), scope=scope, scope_reason=scope_why, notes=notes,
            cpu_budget_pct=budget, target_latency_s=target_latency_s, verdict=verdict, reasons=reasons,
            settings=settings, why=why, expected=expected, confidence=conf, short_lived=short, attribution=attr,
            search=table, grid_best=grid_row, more_budget=more, duration_s=dur, oracle_saved_final=int(oracle.summary["oracle_saved_final"]),
            base_frames_final=bd_final, result=res, oracle=oracle)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _fmt_pct(v) -> str:
    return "-" if v is None else f"{v:.1f} %"


def _row_of(run: _Run | None, table: pl.DataFrame) -> dict[str, Any] | None:
    if run is None:
        return None
    t = table.filter(pl.col("run_id") == run.result.run_id)
    return t.row(0, named=True) if t.height else None


def _full_scan_s(run: _Run) -> float | None:
    """Seconds one full scan takes at this run's rate: candidate pages over pages per second."""
    p = run.params
    if not p.get("sleep_millisecs"):
        return None
    cand = float(run.result.table["candidate_pages"].mean() or 0.0)
    rate = p["pages_to_scan"] / (p["sleep_millisecs"] / 1000.0)
    return cand / rate if rate > 0 and cand > 0 else None


def _expected(res, oracle, model, dur: float) -> dict[str, Any]:
    t = res.table
    saved = t["frames_saved"].to_numpy().astype(float)
    times = t["t_s"].to_numpy().astype(float)
    cows = t["cow_breaks"].to_numpy().astype(float)
    gaps = np.diff(times)
    peak = float(np.max(cows[1:] / np.where(gaps > 0, gaps, np.nan))) if len(times) > 1 and np.isfinite(
        cows[1:] / np.where(gaps > 0, gaps, np.nan)).any() else None
    s = res.summary
    profit = s.get("general_profit")
    rmap = s.get("rmap_items")
    return {
        "saving_mib_final": saved[-1] * MIB_PER_FRAME,
        "saving_frames_final": int(saved[-1]),
        "saving_mib_mean": float(saved.mean()) * MIB_PER_FRAME,
        "pct_of_oracle_mean": pct_of_oracle(res),
        "pct_of_oracle_final": 100.0 * saved[-1] / s["oracle_saved_final"] if s["oracle_saved_final"] else None,
        "oracle_mib_final": s["oracle_saved_final"] * MIB_PER_FRAME,
        "general_profit_bytes": profit,
        "general_profit_mib": None if profit is None else profit / 2**20,
        "rmap_items": rmap,
        "rmap_mib": None if rmap is None else rmap * RMAP_ITEM_BYTES / 2**20,
        "t50_s": time_to_own_share(res, 50.0),
        "t90_s": time_to_own_share(res, 90.0),
        "cpu_pct": cpu_pct(res, model, dur),
        "cpu_seconds": res.cpu_seconds(model),
        "cow_breaks": int(s["cow_breaks"]),
        "cow_per_s": s["cow_breaks"] / dur if dur > 0 else None,
        "cow_peak_per_s": peak,
        "unmerge_headroom_mib": float(saved.max()) * MIB_PER_FRAME if saved.size else 0.0,
        "merge_latency_p50_s": finite(s.get("merge_latency_p50_s")),
        "merge_latency_p90_s": finite(s.get("merge_latency_p90_s")),
        "cost_model": model.name,
    }


def _verdict(e: dict[str, Any], base_frames: int, min_pct: float, min_mib: float, scope: str) -> tuple[str, list[str]]:
    reasons = []
    share = 100.0 * e["saving_frames_final"] / base_frames if base_frames else 0.0
    mib = e["saving_frames_final"] * MIB_PER_FRAME
    ok = True
    if share < min_pct:
        ok = False
        reasons.append(f"it saves {share:.2f} % of the {base_frames * MIB_PER_FRAME:,.1f} MiB the candidate pages use, "
                       f"under the {min_pct:g} % worth enabling KSM for")
    elif mib < min_mib:
        ok = False
        reasons.append(f"it saves {mib * 1024:,.0f} KiB ({share:.1f} % of the {base_frames * MIB_PER_FRAME:,.1f} MiB the "
                       f"candidate pages use), under the {min_mib:g} MiB worth running ksmd for")
    else:
        reasons.append(f"it saves {e['saving_mib_final']:,.1f} MiB, {share:.1f} % of the "
                       f"{base_frames * MIB_PER_FRAME:,.1f} MiB the candidate pages use")
    gp = e.get("general_profit_bytes")
    if gp is not None:
        if gp <= 0:
            ok = False
            reasons.append(f"general_profit is {_mib(gp / 2**20)} MiB: the rmap items cost more than the merges save")
        else:
            reasons.append(f"general_profit is {gp / 2**20:,.1f} MiB after the rmap items' "
                           f"{(e.get('rmap_mib') or 0.0):,.1f} MiB")
    if scope == "anon":
        reasons.append("the traced processes have no mergeable memory yet: they must opt in (madvise(MADV_MERGEABLE), "
                       "prctl(PR_SET_MEMORY_MERGE), QEMU mem-merge=on; see `ksmtrace doctor`)")
    return ("go" if ok else "no-go"), reasons


def _confidence(tr) -> dict[str, Any]:
    """What the fidelity comparison says about this trace's replay (when it has ground truth)."""
    from ksmtrace.fidelity.groundtruth import ksm_start

    if ksm_start(tr) is None:
        return {"source": "none",
                "text": "not checked on this host: the trace has no ground truth (capture it while the real KSM runs "
                        "to get one); docs/fidelity.md gives the model's accuracy on the reference workloads"}
    from ksmtrace.fidelity import fidelity

    rep = fidelity(tr)
    sh, cpu = rep.row("pages_sharing"), rep.row("ksmd_cpu_s")
    err, nrmse, cerr = sh.get("rel_error"), sh.get("nrmse"), cpu.get("rel_error")
    bits = []
    if err is not None:
        bits.append(f"pages_sharing {100 * err:+.1f} % at the end")
    if nrmse is not None:
        bits.append(f"NRMSE {100 * nrmse:.0f} % over time")
    if cerr is not None:
        bits.append(f"ksmd CPU {100 * cerr:+.0f} %")
    settings = " ".join(f"{k}={_sysfs(v)}" for k, v in rep.params.items() if k in ("pages_to_scan", "sleep_millisecs"))
    text = (f"the replay of ksm as the kernel ran it during the capture ({settings}, from {rep.start_s:.2f} s) "
            f"agrees with the kernel's counters: {', '.join(bits) or 'no comparable counter'}; read the saving to about "
            f"±{100 * max(abs(err or 0), nrmse or 0):.0f} % and the CPU to about ±{100 * abs(cerr or 0):.0f} %")
    return {"source": "fidelity", "text": text, "pages_sharing_error": err, "pages_sharing_nrmse": nrmse,
            "ksmd_cpu_error": cerr, "kernel_pages_sharing": sh.get("real_final"), "simulated_pages_sharing": sh.get("sim_final"),
            "warnings": rep.warnings}


def _process_index(tr) -> pl.DataFrame:
    """Every traced process: proc, pid, comm, cgroup, first snapshot, exit snapshot (the snapshot
    that records it ``exited``, else the one after the last that lists it; None: alive at the end)."""
    p = tr.read_table("processes", columns=["snap", "proc", "pid", "comm", "cgroup", "state"])
    if p.height == 0:
        return pl.DataFrame(schema={"proc": pl.Int64, "pid": pl.Int64, "comm": pl.String, "cgroup": pl.String,
                                    "first_snap": pl.Int64, "exit_snap": pl.Int64})
    last = tr.n_snapshots - 1
    return (p.group_by("proc").agg(pl.col("pid").first().cast(pl.Int64), pl.col("comm").first(), pl.col("cgroup").first(),
                                   pl.col("snap").min().cast(pl.Int64).alias("first_snap"),
                                   pl.col("snap").filter(pl.col("state") == "exited").min().cast(pl.Int64).alias("exited"),
                                   pl.col("snap").max().cast(pl.Int64).alias("seen"))
            .with_columns(pl.col("proc").cast(pl.Int64),
                          pl.coalesce(pl.col("exited"), pl.when(pl.col("seen") < last).then(pl.col("seen") + 1))
                          .alias("exit_snap"))
            .drop("exited", "seen").sort("proc"))


def _short_lived(tr, res, oracle) -> dict[str, Any]:
    """For the processes that exit during the trace: the share of the oracle's merges of their
    pages (summed over their snapshots) that the run realised before they exited."""
    idx = _process_index(tr)
    gone = idx.filter(pl.col("exit_snap").is_not_null())
    if gone.height == 0:
        return {"processes": 0, "text": "no traced process exited during the capture"}
    if res.procs is None or oracle.procs is None:
        return {"processes": gone.height, "text": "the results have no per-process table"}
    got = want = 0
    lives = []
    for r in gone.iter_rows(named=True):
        sel = (pl.col("pid") == r["pid"]) & (pl.col("snap") >= r["first_snap"]) & (pl.col("snap") < r["exit_snap"])
        g = int(res.procs.filter(sel)["merged_pages"].sum())
        w = int(oracle.procs.filter(sel)["merged_pages"].sum())
        got += g
        want += w
        lives.append(float(tr.times_s[r["exit_snap"]] - tr.times_s[r["first_snap"]]))
    share = 100.0 * got / want if want else None
    life = float(np.median(lives)) if lives else None
    text = (f"{gone.height} process{'es' if gone.height != 1 else ''} exited during the capture (median life "
            f"{life:.0f} s in the trace): "
            + (f"the recommended settings realised {share:.0f} % of the merges a perfect dedup would have had in them "
               "before they exited" if share is not None else "a perfect dedup would have merged nothing in them"))
    return {"processes": gone.height, "median_life_s": life, "share_realised_pct": share, "text": text}


def _dense_procs(tr, res) -> dict[int, int]:
    """Trace ``proc`` id of each dense process index of a result's per-process table (prepare
    numbers the processes in ``proc`` order); checked against the pids."""
    idx = _process_index(tr)
    if res.procs is None or res.procs.height == 0:
        return {}
    procs = idx["proc"].to_list()
    pids = dict(zip(idx["proc"].to_list(), idx["pid"].to_list()))
    seen = res.procs.group_by("proc").agg(pl.col("pid").first())
    out = {}
    for d, pid in zip(seen["proc"].to_list(), seen["pid"].to_list()):
        if d < len(procs) and pids.get(procs[d]) == pid:
            out[int(d)] = int(procs[d])
        else:  # fall back to the pid (unique within a trace unless a pid was reused)
            match = [p for p, q in pids.items() if q == pid]
            if match:
                out[int(d)] = int(match[0])
    return out


def _attribution(tr, scope: str, params: dict[str, Any], res, model, dur: float, out: Path) -> list[dict[str, Any]]:
    """Per process (or cgroup): its share of the run's saving and rmap items, what a perfect dedup
    could save through it, and what its opt-out changes (replayed)."""
    from ksmtrace.replay import replay
    from ksmtrace.trace.subset import without_processes

    idx = _process_index(tr)
    if idx.height < 2 or res.procs is None:
        return []
    n_cg = idx["cgroup"].n_unique()
    by_cgroup = 1 < n_cg < idx.height
    key = "cgroup" if by_cgroup else "proc"
    dense = _dense_procs(tr, res)
    pr = res.procs.with_columns(pl.col("proc").replace_strict(dense, default=-1).alias("tproc"))
    t = res.table
    # each snapshot's frames_saved and rmap items, split in proportion to merged and candidate pages
    per = (pr.group_by("snap").agg(pl.col("merged_pages").sum().alias("M"), pl.col("candidate_pages").sum().alias("C")))
    snaps = pl.DataFrame({"snap": t["snap"], "saved": t["frames_saved"],
                          "rmap": t["rmap_items"] if "rmap_items" in t.columns else pl.Series([0] * t.height)})
    pr = (pr.join(per, on="snap").join(snaps, on="snap")
          .with_columns((pl.col("saved") * pl.col("merged_pages") / pl.when(pl.col("M") > 0).then(pl.col("M")).otherwise(None))
                        .fill_null(0.0).alias("saved_p"),
                        (pl.col("rmap").cast(pl.Float64) * pl.col("candidate_pages") /
                         pl.when(pl.col("C") > 0).then(pl.col("C")).otherwise(None)).fill_null(0.0).alias("rmap_p")))
    n = t.height
    per_proc = pr.group_by("tproc").agg((pl.col("saved_p").sum() / n).alias("saved"), (pl.col("rmap_p").sum() / n).alias("rmap"),
                                        (pl.col("candidate_pages").sum() / n).alias("cand"))
    idx = idx.join(per_proc.rename({"tproc": "proc"}).with_columns(pl.col("proc").cast(pl.Int64)), on="proc", how="left") \
        .with_columns(pl.col("saved").fill_null(0.0), pl.col("rmap").fill_null(0.0), pl.col("cand").fill_null(0.0))
    groups = (idx.with_columns(pl.col(key).cast(pl.String).alias("gkey"))
              .group_by("gkey").agg(pl.col("proc").alias("procs"), pl.col("pid").first(), pl.col("comm").first(),
                                    pl.col("cgroup").first(), pl.col("cand").sum(), pl.col("saved").sum(),
                                    pl.col("rmap").sum(), pl.len().alias("n"))
              .sort(["cand", "gkey"], descending=[True, False]).head(MAX_GROUPS))
    full_saved = float(t["frames_saved"].mean())
    full_cow = int(res.summary["cow_breaks"])
    full_cpu = res.cpu_seconds(model)
    oracle_full = float(t["oracle_saved"].mean())
    host_could = oracle_full * MIB_PER_FRAME
    host_cow_per_mib = full_cow / host_could if host_could > 0 else None
    rows = []
    for g in groups.iter_rows(named=True):
        view = without_processes(tr, g["procs"])
        could = (oracle_full - float(view.prepare(scope).oracle_saved.mean())) * MIB_PER_FRAME
        r = replay(view, "ksm", params, scope=scope)
        rmap_mib = g["cand"] * RMAP_ITEM_BYTES / 2**20
        net = could - rmap_mib
        cow = full_cow - int(r.summary["cow_breaks"])
        cow_per_mib = cow / could if could > 0 else None
        if net <= 0:
            verdict = "opt out: its rmap items cost more than its duplicates can save"
        elif host_cow_per_mib is not None and cow_per_mib is not None and cow > 0 and \
                cow_per_mib > COW_HEAVY * max(host_cow_per_mib, 1e-9):
            verdict = f"consider opting out: {cow_per_mib:,.0f} COW breaks per MiB it can save, over {COW_HEAVY:g}x the host's"
        else:
            verdict = "keep"
        name = g["cgroup"] if by_cgroup else f"{g['comm']} ({g['pid']})"
        rows.append({
            "group": name, "by": key, "processes": int(g["n"]), "candidate_mib": g["cand"] * MIB_PER_FRAME,
            "could_save_mib": could, "rmap_mib": rmap_mib, "net_mib": net,
            "saves_mib": g["saved"] * MIB_PER_FRAME,
            "share_of_saving_pct": 100.0 * g["saved"] / full_saved if full_saved > 0 else None,
            "opt_out_saving_change_mib": (float(r.table["frames_saved"].mean()) - full_saved) * MIB_PER_FRAME,
            "cow_breaks": cow, "cow_per_s": cow / dur if dur > 0 else None,
            "cpu_pct": 100.0 * (full_cpu - r.cpu_seconds(model)) / dur if dur > 0 else None,
            "verdict": verdict,
        })
    return rows


# --- text ----------------------------------------------------------------------------------------
def _mib(v: float) -> str:
    return f"{v:,.1f}" if abs(v) >= 0.05 else f"{v:,.3f}"


def _t(v) -> str:
    return "never within the trace" if v is None else f"{v:.0f} s"


def format_advice(a: Advice) -> str:
    from ksmtrace.textfmt import table

    lat = f", p90 merge latency at most {a.target_latency_s:g} s" if a.target_latency_s else ""
    lines = [f"advise for trace {a.trace_name!r} ({a.duration_s:.0f} s), ksmd CPU budget {a.cpu_budget_pct:g} % of a core{lat}",
             a.scope_reason, *a.notes, ""]
    lines.append(f"VERDICT: {a.verdict.upper()}: " + "; ".join(a.reasons))
    more = [f"{m['budget_pct']:g} % of a core: {m['settings']} saves {_fmt_pct(m['pct_of_oracle'])} of the oracle on average "
            f"({m['mib_saved_final']:,.1f} MiB at the end)" for m in a.more_budget]
    if not a.settings:
        lines += ["", *("  " + w for w in a.why)]
        if more:
            lines += ["", "More CPU would buy:"] + [f"  {m}" for m in more]
        return "\n".join(lines)
    e = a.expected
    if a.verdict == "go":
        lines += ["", "Recommended settings (/sys/kernel/mm/ksm/):"]
    else:
        lines += ["", "Recommendation: leave KSM off (run=0).  The best settings within the budget, for reference:"]
    lines += [f"  {k:<26} {v}" for k, v in a.settings.items()]
    lines += ["", "Why:"] + [f"  - {w}" for w in a.why]
    gp = e.get("general_profit_mib")
    lines += ["", "Expected with these settings (replayed on this trace):",
              f"  saving at the end          {e['saving_mib_final']:,.1f} MiB ({_fmt_pct(e['pct_of_oracle_final'])} of the "
              f"{e['oracle_mib_final']:,.1f} MiB a perfect dedup frees); mean over the trace {e['saving_mib_mean']:,.1f} MiB",
              "  general_profit             " + ("-" if gp is None else f"{_mib(gp)} MiB (the kernel's counter counts "
                                                           "mappings, not frames: fork-shared pages it merges count as "
                                                           "saved, zero subpages a THP split frees do not)"),
              "  time to 50 % / 90 % of it  " + ("never within the trace" if e["t50_s"] is None and e["t90_s"] is None else
                                                f"{_t(e['t50_s'])} / {_t(e['t90_s'])} after KSM starts"),
              f"  ksmd CPU                   {e['cpu_pct']:.3g} % of a core ({e['cpu_seconds']:.2f} s over {a.duration_s:.0f} s, "
              f"cost model {e['cost_model']!r})",
              f"  COW breaks                 {e['cow_per_s']:,.1f} per s on average, {(e['cow_peak_per_s'] or 0):,.0f} per s in "
              f"the worst interval ({e['cow_breaks']:,} in all)",
              f"  unmerge headroom           {e['unmerge_headroom_mib']:,.1f} MiB: free memory the host needs at once if "
              "everything is un-merged (run=2, or a burst of writes)",
              "  merge latency p50 / p90    " + " / ".join("-" if v is None else f"{v:.3g} s"
                                                        for v in (e['merge_latency_p50_s'], e['merge_latency_p90_s']))]
    if a.grid_best:
        g = a.grid_best
        lines.append(f"  the frontier's best ksm setting within the budget: {g['settings']} at {g['cpu_pct']:.3g} % CPU saves "
                     f"{_fmt_pct(g['pct_of_oracle'])} of the oracle (mean); the recommendation "
                     f"{_fmt_pct(e['pct_of_oracle_mean'])} at {e['cpu_pct']:.3g} %")
    if more:
        lines += ["", "More CPU would buy:"] + [f"  {m}" for m in more]
    lines += ["", "Confidence: " + a.confidence.get("text", "-")]
    if a.short_lived:
        lines += ["Short-lived processes: " + a.short_lived.get("text", "-")]
    if a.attribution:
        lines += ["", f"Per {'cgroup' if a.attribution[0]['by'] == 'cgroup' else 'process'} (each one's opt-out "
                      "replayed: what it adds to the saving and costs):",
                  table([{**r, "saves_mib": round(r["saves_mib"], 1), "rmap_mib": round(r["rmap_mib"], 2),
                          "net_mib": round(r["net_mib"], 1), "candidate_mib": round(r["candidate_mib"], 1),
                          "could_save_mib": round(r["could_save_mib"], 1),
                          "share": None if r["share_of_saving_pct"] is None else f"{r['share_of_saving_pct']:.0f} %"}
                         for r in a.attribution],
                        ["group", "candidate_mib", "could_save_mib", "rmap_mib", "net_mib", "saves_mib", "share",
                         "cow_breaks", "verdict"],
                        {"candidate_mib": "memory (MiB)", "could_save_mib": "can save (MiB)", "rmap_mib": "rmap (MiB)",
                         "net_mib": "net (MiB)", "saves_mib": "saved in trace", "share": "of saving",
                         "cow_breaks": "COW breaks"}),
                  "can save: what a perfect dedup loses without it; rmap: 64 B per candidate page; net = can save - rmap; "
                  "saved in trace: its share of the replay's mean saving; COW breaks: what its opt-out (replayed) removes"]
    lines += ["", f"{a.search.height} replays searched (ksmtrace advise --json lists them)."]
    return "\n".join(lines)
