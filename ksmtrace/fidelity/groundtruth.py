"""The real kernel's side of a fidelity comparison: what a ground-truth trace says KSM did.

A trace captured while the host ran KSM holds a time series of ``/sys/kernel/mm/ksm/*``,
``/proc/vmstat`` ``cow_ksm`` and ksmd's CPU time (the ``ksm`` table).  :func:`load_ground_truth`
turns it into a :class:`GroundTruth`:

* the samples, with time in seconds since the trace's first snapshot and the cumulative counters
  (``full_scans``, ``pages_scanned``, ``pages_skipped``, ``cow_ksm``, ``ksmd_cpu_ns``) re-based to
  KSM's start, so they compare with a replay that starts from nothing;
* when KSM started (``run`` became 1), by :func:`ksm_start`: exactly, from the ``validate`` record
  that ``ksmtrace validate`` writes into the manifest or the ``capture.json`` a sample trace ships
  with, else the midpoint between the last sample with ``run=0`` and the first with ``run=1``; 0
  when KSM already ran at the first sample (with a warning: the kernel then had a head start the
  replay cannot know);
* the kernel's settings while it ran, as ``ksm`` policy parameters (:func:`ksm_params`), and the
  policy profile that matches the kernel release (:func:`kernel_profile`).

:func:`as_captured` puts these together: how to replay ``ksm`` as the traced kernel ran it.  The
demo, ``ksmtrace replay --as-captured``, ``fidelity``, ``calibrate`` and ``advise`` all use it, so
they replay the same trace with the same profile from the same start.
* warnings about anything that makes the comparison less exact (settings changed mid-run, other
  processes on the host using KSM, KSM stopped before the end).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ksmtrace.errors import KsmtraceError
from ksmtrace.policies.ksm.releases import kernel_profile, profile_for_release, range_walk_for_release, release_tuple

#: counters that only grow (since boot, or since run=2 for full_scans): compared as increments
CUMULATIVE = ("full_scans", "pages_scanned", "pages_skipped", "cow_ksm", "ksmd_cpu_ns", "ksm_swpin_copy")

#: KSM settings that map one to one onto ``ksm`` policy parameters
SETTING_PARAMS = (
    "pages_to_scan",
    "sleep_millisecs",
    "smart_scan",
    "use_zero_pages",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)
_BOOL_PARAMS = ("smart_scan", "use_zero_pages")


class FidelityError(KsmtraceError):
    """A fidelity comparison is impossible (no ground truth, KSM never ran...)."""


@dataclass
class GroundTruth:
    samples: pl.DataFrame  # t_s (since the first snapshot) + every counter, cumulative ones re-based
    start_s: float  # when KSM started, s after the first snapshot
    start_exact: bool  # True: recorded (by `ksmtrace validate` or a sample's capture script); False: inferred
    start_source: str  # where start_s comes from (ksm_start)
    end_s: float  # the last sample (normally the last snapshot's start)
    settings: dict[str, Any]  # the kernel's settings while it ran (sysfs names)
    kernel_release: str | None
    hz: int
    warnings: list[str] = field(default_factory=list)
    validate: dict[str, Any] | None = None  # the manifest's validate record, if any

    def column(self, name: str) -> np.ndarray:
        return self.samples[name].to_numpy().astype(float)

    @property
    def times(self) -> np.ndarray:
        return self.samples["t_s"].to_numpy().astype(float)

    def final(self, name: str) -> float | None:
        v = self.samples[name].drop_nulls()
        return float(v[-1]) if len(v) else None

    def ksmd_sched(self) -> dict[str, int] | None:
        """ksmd's scheduler statistics over the run: ``run_ns`` (CPU), ``wait_ns`` (run-queue wait)
        and, when ``ksmtrace validate`` recorded them, ``timeslices`` (times it got a CPU) and
        ``nr_involuntary_switches`` (preemptions).  From the manifest's validate record, else from
        ksmd's run and wait times in the ground-truth samples of any capture (format 2:
        ``ksmd_wait_ns``), from KSM's start to the last sample.  None when the trace has neither."""
        v = self.validate or {}
        a, b = v.get("ksmd_sched_start"), v.get("ksmd_sched_end")
        if a and b:
            return {k: int(b[k]) - int(a[k]) for k in ("run_ns", "wait_ns", "timeslices", "nr_voluntary_switches",
                                                         "nr_involuntary_switches") if k in a and k in b}
        if "ksmd_wait_ns" in self.samples.columns:
            s = self.samples.filter(pl.col("t_s") >= self.start_s).drop_nulls(["ksmd_cpu_ns", "ksmd_wait_ns"])
            if s.height < 2:
                return None
            return {"run_ns": int(s["ksmd_cpu_ns"][-1] - s["ksmd_cpu_ns"][0]),
                    "wait_ns": int(s["ksmd_wait_ns"][-1] - s["ksmd_wait_ns"][0])}
        return None

    def ksmd_stretch(self) -> float | None:
        """Wall time over CPU time of ksmd during the run: (run + run-queue wait) / run
        (:meth:`ksmd_sched`).  None when the trace records neither."""
        st = self.ksmd_sched()
        if not st:
            return None
        run, wait = st.get("run_ns", 0), st.get("wait_ns", -1)
        if run <= 0 or wait < 0:
            return None
        return (run + wait) / run

    def full_scan_period_s(self) -> float | None:
        """Mean time of one real full scan over the run (None if no scan completed)."""
        n = self.final("full_scans")
        if not n:
            return None
        return (self.end_s - self.start_s) / n


#: the sample traces' record of when their capture script started KSM (capture.json in the trace)
SAMPLE_INFO = "capture.json"


def _samples_on(trace) -> tuple[np.ndarray, np.ndarray] | None:
    """(t_s since the first snapshot, run) of the ground-truth samples, or None."""
    if not trace.has_ground_truth:
        return None
    raw = trace.read_table("ksm", columns=["t_ns", "run"]).sort("t_ns")
    raw = raw.filter(pl.col("t_ns").is_not_null())
    if raw.height == 0:
        return None
    t_s = (raw["t_ns"].to_numpy().astype(np.int64) - trace.t0_ns) / 1e9
    return t_s, raw["run"].fill_null(0).to_numpy().astype(np.int64)


def ksm_start(trace) -> tuple[float, bool, str] | None:
    """When the real KSM started merging during the capture, in seconds after the first snapshot:
    ``(start_s, exact, source)``.  None when the trace has no ground truth or KSM never ran.

    In order of preference: the ``validate`` record of the manifest (``ksmtrace validate`` writes
    when it set ``run=1``; exact); the ``capture.json`` a sample trace ships with
    (``ksm_started_after_snapshot0_s``, written by its capture script when it set ``run=1``;
    exact); the midpoint between the last ground-truth sample with ``run=0`` and the first with
    ``run=1`` (inferred; off by up to half the sampling interval); 0 when KSM already ran at the
    first sample.
    """
    sm = _samples_on(trace)
    if sm is None:
        return None
    t_s, run = sm
    merging = (run & 1) == 1
    if not merging.any():
        return None
    validate = trace.manifest.get("validate") if isinstance(trace.manifest.get("validate"), dict) else None
    if validate and validate.get("run_start_ns") is not None:
        return (int(validate["run_start_ns"]) - trace.t0_ns) / 1e9, True, "recorded by ksmtrace validate"
    try:
        info = json.loads((Path(trace.path) / SAMPLE_INFO).read_text())
        exact = info.get("ksm_started_after_snapshot0_s") if isinstance(info, dict) else None
        if exact is not None:
            return float(exact), True, f"recorded by the capture script ({SAMPLE_INFO})"
    except (OSError, ValueError, TypeError):
        pass
    first_on = int(np.flatnonzero(merging)[0])
    if first_on == 0:
        return 0.0, False, "KSM already ran at the first ground-truth sample"
    half = 0.5 * (t_s[first_on] - t_s[first_on - 1])
    return float(0.5 * (t_s[first_on - 1] + t_s[first_on])), False, \
        f"inferred from the ground-truth samples (± {half:.3f} s)"


def load_ground_truth(trace) -> GroundTruth:
    """The ground truth of ``trace`` (or the path of one); raises :class:`FidelityError` when it has none."""
    from ksmtrace.trace.reader import as_trace

    trace = as_trace(trace)
    if not trace.has_ground_truth:
        raise FidelityError(
            f"{trace.path}: this trace has no ground truth (no samples of /sys/kernel/mm/ksm: it was "
            "captured on a host without KSM or with --no-ground-truth); fidelity needs a trace captured "
            "while the host ran KSM, e.g. one made by `ksmtrace validate`"
        )
    raw = trace.read_table("ksm").sort("t_ns")
    raw = raw.filter(pl.col("t_ns").is_not_null())
    if raw.height == 0:
        raise FidelityError(f"{trace.path}: the ground-truth table is empty")
    t0 = trace.t0_ns
    warnings: list[str] = []
    t_s = (raw["t_ns"].to_numpy().astype(np.int64) - t0) / 1e9
    run = raw["run"].fill_null(0).to_numpy().astype(np.int64)
    merging = (run & 1) == 1
    if not merging.any():
        raise FidelityError(
            f"{trace.path}: KSM never ran while this trace was captured (run was {sorted(set(run.tolist()))} "
            "in every ground-truth sample); there is nothing to compare with"
        )
    validate = trace.manifest.get("validate") if isinstance(trace.manifest.get("validate"), dict) else None
    first_on = int(np.flatnonzero(merging)[0])
    start_s, exact, source = ksm_start(trace)
    if first_on == 0 and not exact:
        r0 = raw.row(0, named=True)
        warnings.append(
            "KSM was already running when the capture started (first sample: pages_shared="
            f"{r0.get('pages_shared')}, pages_sharing={r0.get('pages_sharing')}); the replay starts "
            "with nothing merged at the first snapshot, so early values cannot agree — compare the "
            "steady state"
        )
    elif not exact:
        warnings.append(
            f"KSM's start time was inferred from the samples ({start_s:.3f} s ± "
            f"{0.5 * (t_s[first_on] - t_s[first_on - 1]):.3f} s after the first snapshot)"
        )
    off_after = np.flatnonzero(~merging[first_on:])
    if len(off_after):
        warnings.append(
            f"KSM was stopped (run={int(run[first_on + off_after[0]])}) {t_s[first_on + off_after[0]] - start_s:.2f} s "
            "after it started; the replay keeps scanning to the end of the trace"
        )

    # re-base the cumulative counters at KSM's start (the last sample before it, else the first)
    base_idx = int(np.searchsorted(t_s, start_s, side="right")) - 1
    base_idx = max(base_idx, 0)
    cols = [pl.Series("t_s", t_s)]
    for name in raw.columns:
        if name in ("t_ns", "snap"):
            continue
        s = raw[name]
        if name in CUMULATIVE and s.dtype.is_numeric():
            base = s[base_idx]
            if base is None:
                nn = s.drop_nulls()
                base = nn[0] if len(nn) else None
            s = (s - base) if base is not None else s
        cols.append(s.alias(name))
    cols.append(raw["snap"].alias("snap"))
    samples = pl.DataFrame(cols)

    settings = _settings(raw, merging, first_on, warnings)
    release = trace.host.get("kernel_release")
    if release_tuple(release) is None:
        warnings.append(f"unknown kernel release {release!r}: assuming Linux 6.12+ behaviour")
    hz = int(trace.host.get("hz") or 250)
    if not trace.host.get("hz"):
        warnings.append("the trace does not record the kernel's HZ: assuming 250")
    if validate and validate.get("other_mergeable"):
        others = validate["other_mergeable"]
        warnings.append(
            f"{len(others)} other process(es) on the host had mergeable memory during the run "
            f"({', '.join(str(o) for o in others[:5])}); ksmd scanned them too, the replay does not"
        )
    _check_other_users(trace, samples, warnings)
    return GroundTruth(
        samples=samples,
        start_s=float(start_s),
        start_exact=exact,
        start_source=source,
        end_s=float(t_s[-1]),
        settings=settings,
        kernel_release=release,
        hz=hz,
        warnings=warnings,
        validate=validate,
    )


def _settings(raw: pl.DataFrame, merging: np.ndarray, first_on: int, warnings: list[str]) -> dict[str, Any]:
    on = raw.filter(pl.Series(merging))
    out: dict[str, Any] = {}
    adv = on["advisor_mode"].drop_nulls() if "advisor_mode" in on.columns else pl.Series([], dtype=pl.Utf8)
    out["advisor_mode"] = str(adv[0]) if len(adv) else "none"
    for name in SETTING_PARAMS:
        if name not in on.columns:
            continue
        vals = on[name].drop_nulls()
        if not len(vals):
            continue
        out[name] = int(vals[0])
        distinct = sorted(set(vals.to_list()))
        if len(distinct) > 1 and not (name == "pages_to_scan" and out["advisor_mode"] == "scan-time"):
            warnings.append(
                f"{name} changed while KSM ran ({', '.join(map(str, distinct[:6]))}); the replay uses "
                f"the first value, {out[name]}"
            )
    if len(adv.unique()) > 1:
        warnings.append(f"advisor_mode changed while KSM ran; the replay uses {out['advisor_mode']!r}")
    return out


def _check_other_users(trace, samples: pl.DataFrame, warnings: list[str]) -> None:
    """Warn when the host's KSM counters exceed what the traced processes' ksm_stat accounts for."""
    if not trace.has_table("ksm_stat"):
        return
    try:
        ks = trace.read_table("ksm_stat", columns=["snap", "ksm_merging_pages"])
    except KsmtraceError:
        return
    if ks.height == 0:
        return
    last = int(ks["snap"].max())
    mine = ks.filter(pl.col("snap") == last)["ksm_merging_pages"].fill_null(0).sum()
    at = samples.filter(pl.col("snap") == last)
    if at.height == 0:
        return
    row = at.row(at.height - 1, named=True)
    glob = (row.get("pages_shared") or 0) + (row.get("pages_sharing") or 0)
    if glob > mine + max(16, 0.01 * glob):
        warnings.append(
            f"at the last snapshot the host had {glob} KSM-merged mappings but the traced processes "
            f"only {mine}: other processes use KSM and their pages are not in the trace"
        )


def ksm_params(gt: GroundTruth, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ksm`` policy parameters reproducing the traced kernel (``overrides`` win)."""
    p: dict[str, Any] = {"profile": profile_for_release(gt.kernel_release),
                         "range_walk": range_walk_for_release(gt.kernel_release)}
    for name in SETTING_PARAMS:
        if name in gt.settings:
            v = gt.settings[name]
            p[name] = bool(v) if name in _BOOL_PARAMS else int(v)
    mode = gt.settings.get("advisor_mode", "none")
    p["advisor_mode"] = mode if mode in ("none", "scan-time") else "none"
    if p["profile"] == "3.18":
        for k in ("smart_scan", "use_zero_pages", "advisor_mode"):
            p.pop(k, None)
        p.pop("max_page_sharing", None)
    if "smart_scan" not in gt.settings and p["profile"] != "3.18":
        p["smart_scan"] = False  # a kernel before 6.7 has no smart_scan file: it never skips
    if overrides:
        p.update(overrides)
    return p


@dataclass
class AsCaptured:
    """How to replay ``ksm`` as the traced kernel ran it (:func:`as_captured`)."""

    params: dict[str, Any]  # ksm policy parameters: the kernel's settings and the profile of its release
    start_s: float  # when ksmd started, s after the first snapshot
    start_exact: bool
    start_source: str
    profile_source: str  # why this profile
    kernel: dict[str, Any]  # the kernel's own counters at the last snapshot (pages_sharing, ...)
    warnings: list[str] = field(default_factory=list)

    def replay_kwargs(self) -> dict[str, Any]:
        return {"params": dict(self.params), "start_s": self.start_s}


def as_captured(trace) -> AsCaptured | None:
    """The ``ksm`` parameters and start time that replay ``trace`` as its kernel ran, or None when
    the trace has no ground truth or KSM never ran during the capture.  The one place that says
    which profile (:func:`kernel_profile`) and which start (:func:`ksm_start`) that is."""
    if ksm_start(trace) is None:
        return None
    gt = load_ground_truth(trace)
    prof, why = kernel_profile(trace)
    if prof is None:
        why += ": assuming Linux 6.12+ behaviour"
    last_snap = trace.n_snapshots - 1
    at_end = gt.samples.filter(pl.col("snap") <= last_snap)
    last = at_end.row(at_end.height - 1, named=True) if at_end.height else gt.samples.row(gt.samples.height - 1, named=True)
    kernel = {k: last.get(k) for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                                       "ksm_zero_pages", "general_profit", "full_scans", "pages_scanned")
              if last.get(k) is not None}
    cpu = last.get("ksmd_cpu_ns")
    if cpu is not None:
        kernel["ksmd_cpu_seconds"] = cpu / 1e9  # re-based at KSM's start
    cow = last.get("cow_ksm")
    if cow is not None:
        kernel["cow_ksm"] = cow
    return AsCaptured(params=ksm_params(gt), start_s=gt.start_s, start_exact=gt.start_exact,
                      start_source=gt.start_source, profile_source=why, kernel=kernel, warnings=list(gt.warnings))


def wall_clock_model(gt: GroundTruth, model):
    """The daemon's clock for a replay of ``gt``: the CPU cost model ``model`` plus the time ksmd
    waited for a CPU during the run (:meth:`GroundTruth.ksmd_sched`); ``model`` itself when the
    trace records no wait.

    On a busy host the wait is several times ksmd's CPU time, so *where* it goes decides the pace.
    With the time slices and preemptions ``ksmtrace validate`` records, each time slice waited
    ``w = wait / timeslices`` on average, and the wait goes where the scheduler makes ksmd wait:

    * every wake-up by the timer: a wait of mean ``w`` before the batch starts, drawn per wake-up
      (``CostModel.wake_wait_ns``, :func:`ksmtrace.engine.clock.wake_wait`): the timer is armed
      when the batch ends, so a long wait costs a whole jiffy and a short one nothing;
    * inside a batch: ``w`` per preemption, at the measured rate of preemptions per CPU second
      (the time of every unit × ``1 + rate · w``);
    * every start of a full scan: ``w`` (``scan_starts``): ``scan_get_next_rmap_item()`` calls
      ``lru_add_drain_all()``, which sleeps in ``flush_work()`` until the per-CPU kworkers drained,
      and ksmd waits for a CPU again after it.

    The charges add up to the measured wait when the replay wakes, is preempted and starts scans
    as often as the kernel did.  Without the time slices (a plain capture records only run and
    wait) every unit is stretched by ``(run + wait) / run``, which puts the wait where the CPU
    work is: too much of it on the merging batches at the start, too little on the light batches
    of a settled scan (docs/fidelity.md).
    """
    from ksmtrace.engine.cost import CostModel

    st = gt.ksmd_sched()
    if not st or st.get("run_ns", 0) <= 0 or st.get("wait_ns", -1) <= 0:
        return model
    run, wait = st["run_ns"], st["wait_ns"]
    slices, preempt = st.get("timeslices"), st.get("nr_involuntary_switches")
    if not slices or preempt is None:
        k = (run + wait) / run
        return CostModel(ns={u: float(v) * k for u, v in model.ns.items()}, name=f"{model.name} x{k:.2f} (ksmd run-queue wait)",
                         source=f"{model.source}; stretched by ksmd's measured (run + wait) / run = {k:.3f}")
    w = wait / slices
    per_cpu = 1.0 + preempt / run * w
    ns = {u: float(v) * per_cpu for u, v in model.ns.items()}
    ns["scan_starts"] = ns.get("scan_starts", 0.0) + w
    return CostModel(ns=ns, name=f"{model.name} + ksmd's run-queue wait ({w / 1e6:.3g} ms per time slice)",
                     source=f"{model.source}; ksmd waited {wait / 1e9:.3f} s for a CPU in {slices} time slices "
                            f"({preempt} preemptions in {run / 1e9:.3f} s of CPU): a mean {w / 1e6:.3f} ms per wake-up, "
                            "preemption and full-scan start",
                     wake_wait_ns=w)


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
