"""Ground-truth runs: run a workload under the real KSM with chosen settings while capturing it,
then compare the kernel with the replay (``ksmtrace validate``).

One run, in order (every step undone on every path — normal end, error, Ctrl-C, SIGTERM):

1. take the KSM settings lock and save every setting (:class:`ksmtrace.lab.kernelksm.ksm_settings`);
   write the chosen settings with ``run=0`` (``run=2`` first when ``max_page_sharing`` changes);
2. ``run=2`` (unmerge everything: no rmap items left, the scan cursor back at the list head,
   ``full_scans`` = 0), then ``run=0``: every run starts from the same kernel state;
3. start the workload and wait until it is ready (warn about other processes with mergeable
   memory: ksmd would scan them too);
4. start the capture (``scope=mergeable``, what ksmd scans; ground truth sampled at every snapshot
   and every ``ksm_sample_interval`` s; page contents are read through /proc/PID/mem, which never
   pins a page, so the capture causes no COW break of its own);
5. snapshot 0 (nothing merged yet), then ``run=1``; the exact monotonic time goes into the trace
   manifest (``validate.run_start_ns``) so the replay's ksmd starts at the same instant;
6. snapshots every ``interval`` s until ``duration`` s after snapshot 0;
7. stop the workload, close the capture, restore the settings (unmerging first: ``run=2``, then
   ``run`` as found);
8. replay and compare (:func:`ksmtrace.fidelity.fidelity`).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ksmtrace.fidelity.settings import resolve_settings
from ksmtrace.lab import kernelksm as K
from ksmtrace._version import __version__
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make as make_progress
from ksmtrace.tracer import load_tracer

@dataclass
class ValidateOptions:
    workload: str = "static"
    workload_params: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    settings: str = "fast"
    setting_overrides: dict[str, Any] = field(default_factory=dict)
    duration: float = 10.0
    interval: float = 0.25
    runs: int = 1
    output: str | os.PathLike = "validate-out"
    ksm_sample_interval: float = 0.1
    label: str | None = None
    sim_step: float | None = None
    plot: bool = True
    fidelity_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.duration > 0:
            raise KsmtraceError(f"--duration must be > 0 (got {self.duration})")
        if not self.interval > 0:
            raise KsmtraceError(f"--interval must be > 0 (got {self.interval})")
        if self.runs < 1:
            raise KsmtraceError(f"--runs must be >= 1 (got {self.runs})")
        if not self.ksm_sample_interval > 0:
            raise KsmtraceError(f"--ksm-sample-interval must be > 0 (got {self.ksm_sample_interval})")

    @property
    def name(self) -> str:
        return "command" if self.command is not None else self.workload

    def default_label(self) -> str:
        lab = f"{self.name}-{self.settings}"
        if self.setting_overrides:
            lab += "-" + "-".join(f"{k}{v}" for k, v in sorted(self.setting_overrides.items()))
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", lab)


@dataclass
class RunRecord:
    label: str
    index: int
    trace: str
    report: Any  # FidelityReport
    settings: dict[str, Any]
    workload: dict[str, Any]
    racy: bool
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "trace": self.trace, "settings": self.settings,
                "workload": self.workload, "racy": self.racy, "wall_s": self.wall_s,
                "fidelity": self.report.to_json() if self.report is not None else None}


# ---------------------------------------------------------------------------------------------
def _sched(pid: int | None) -> dict[str, int] | None:
    """ksmd's scheduler statistics: run and run-queue wait time (ns), timeslices, switches."""
    from ksmtrace_tracers import ksmsysfs, procinfo

    st = ksmsysfs.schedstat(pid)
    if st is None:
        return None
    out = {"run_ns": st[0], "wait_ns": st[1], "timeslices": st[2]}
    out.update(procinfo.read_switches(pid) or {})
    return out


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def ground_truth_run(
    opts: ValidateOptions,
    trace_dir: Path,
    index: int = 0,
    *,
    progress: ProgressFn | None = None,
    on_running: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Capture one run of ``opts``'s workload under real KSM into ``trace_dir``; returns its record.

    Every KSM setting is restored on the way out, whatever happens (see the module docstring).
    ``on_running`` (tests) is called with the running workload after KSM started.
    """
    from ksmtrace.lab.programs import other_mergeable, start_source

    prog = make_progress(progress)
    if not K.available():
        raise KsmtraceError(f"{K.KSM_DIR}: missing: this kernel has no KSM (CONFIG_KSM), nothing to validate against")
    if os.geteuid() != 0:
        raise KsmtraceError("validate changes KSM settings and reads other processes' memory: run it as root")
    settings = resolve_settings(opts.settings, opts.setting_overrides)
    tracer = load_tracer("procfs")
    t_wall = time.monotonic()
    ksmd = K.ksmd_pid()
    record: dict[str, Any] = {}
    with K.ksm_settings(run=0, **settings) as ks:
        K.unmerge_all()
        K.write("run", 0)
        with start_source(opts.workload, opts.workload_params, opts.command) as wl:
            roots = wl.roots()
            others = other_mergeable(set(roots))
            targets = tracer.targets(trees=roots)
            copts = tracer.options(
                scope="mergeable",
                interval=opts.interval,
                duration=opts.duration,
                ksm_sample_interval=opts.ksm_sample_interval,
                command_line=["ksmtrace", "validate", opts.name, f"settings={opts.settings}"],
            )
            with tracer.open(trace_dir, targets, copts) as cap:
                st = cap.snapshot()
                t0 = st["t_ns"]
                sched0 = _sched(ksmd)
                t_run = time.monotonic_ns()
                K.write("run", 1)
                record = {
                    "run_start_ns": t_run,
                    "label": opts.label or opts.default_label(),
                    "run_index": index,
                    "workload": opts.name,
                    "workload_params": dict(opts.workload_params),
                    "racy": bool(getattr(wl, "racy", False)),
                    "settings_preset": opts.settings,
                    "settings": settings,
                    "saved_settings": dict(ks.saved),
                    "interval_s": opts.interval,
                    "duration_s": opts.duration,
                    "ksm_sample_interval_s": opts.ksm_sample_interval,
                    "other_mergeable": others,
                    "loadavg_start": _loadavg(),
                    "ksmtrace_version": __version__,
                }
                cap.writer.update_manifest(validate=record)
                if on_running is not None:
                    on_running(wl)
                k = 1
                n = int(opts.duration / opts.interval + 1e-9)
                while k <= n:
                    target = t0 + int(round(k * opts.interval * 1e9))
                    delay = (target - time.monotonic_ns()) / 1e9
                    if delay > 0:
                        time.sleep(delay)
                    wl.check()
                    cap.snapshot()
                    prog(k, n, f"run {index + 1}: snapshot {k}/{n}")
                    k += 1
                sched1 = _sched(ksmd)
                record.update(
                    ksmd_sched_start=sched0,
                    ksmd_sched_end=sched1,
                    loadavg_end=_loadavg(),
                    workload_info=wl.describe(),
                    ksm_end=K.read_all(),
                )
                cap.writer.update_manifest(validate=record)
    record["wall_s"] = time.monotonic() - t_wall
    return record


def validate(opts: ValidateOptions, *, progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> list[RunRecord]:
    """Run ``opts.runs`` ground-truth runs and compare each; writes, under ``opts.output``,
    ``<label>/run-<i>.trace`` (the trace), ``run-<i>.fidelity.json`` and ``run-<i>.png`` (the plot)."""
    from ksmtrace.fidelity.compare import fidelity
    from ksmtrace.trace.reader import open_trace

    opts.validate()
    label = opts.label or opts.default_label()
    out = Path(opts.output) / label
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda m: None)
    records: list[RunRecord] = []
    for i in range(opts.runs):
        trace_dir = out / f"run-{i + 1}.trace"
        if trace_dir.exists() and any(trace_dir.iterdir()):
            raise KsmtraceError(f"{trace_dir}: exists and is not empty (choose another -o)")
        say(f"{label}: run {i + 1}/{opts.runs}: {opts.name} under real KSM ({opts.settings}), {opts.duration:g} s")
        rec = ground_truth_run(opts, trace_dir, i, progress=progress)
        tr = open_trace(trace_dir)
        rep = fidelity(tr, opts.fidelity_overrides or None, sim_step=opts.sim_step)
        (out / f"run-{i + 1}.fidelity.json").write_text(json.dumps(rep.to_json(), indent=1) + "\n")
        if opts.plot:
            from ksmtrace.fidelity.plot import trajectories
            from ksmtrace.plot import save

            save(trajectories(rep), out / f"run-{i + 1}.png")
        records.append(RunRecord(label, i, str(trace_dir), rep, rec.get("settings", {}), rec.get("workload_info", {}),
                                 bool(rec.get("racy")), float(rec.get("wall_s", 0.0))))
    return records
