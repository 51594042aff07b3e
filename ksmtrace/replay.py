"""Replay: feed a trace through a policy in virtual time and collect one metrics row per snapshot.

>>> from ksmtrace.replay import replay
>>> res = replay("t", "ksm", {"pages_to_scan": 1000})          # a path or an opened trace
>>> res.summary["frames_saved_final"], res.table["cow_breaks"].sum()

Two run options apply to any policy: ``restrict`` (a safe preset: merges the policy may not make,
:mod:`ksmtrace.trace.restrict`; also accepted as ``params["restrict"]``) and ``controller`` with
``host_memory`` (a program that retunes the policy's parameters during the run, such as ksmtuned:
:mod:`ksmtrace.controllers`).  Both are recorded in the run's spec and change its run id; without
them a run is exactly what it was before they existed.

Virtual time: snapshot ``s`` is taken at ``t_s``; its content holds during ``[t_s, t_{s+1})``.  A page
written between two snapshots is written, as far as the snapshots know, at the later snapshot; a
trace with a faults table (``capture --kernel-events``) also says when, and by default
(``writes="faults"``) the replay applies every recorded write fault at its own time, the daemon
running up to it first (:mod:`ksmtrace.trace.faults`, ``docs/replay-semantics.md``).  The
row of snapshot ``s`` holds the state at ``t_s`` right after its writes are applied, plus the
activity of the interval ``(t_{s-1}, t_s]`` (COW breaks, merges, work units).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import polars as pl

from ksmtrace._version import __version__
from ksmtrace.engine.api import RUNTIMES, RunContext
from ksmtrace.engine.cost import N_UNITS, UNIT_NAMES, CostModel, resolve_cost_model
from ksmtrace.errors import KsmtraceError, PolicyContractError
from ksmtrace.policies.base import Policy
from ksmtrace.policies.registry import get_policy
from ksmtrace.progress import ProgressFn, make
from ksmtrace.results import RunResult, make_run_id
from ksmtrace.trace.reader import as_trace

ENGINES = ("fast", "reference")
AUTO = "auto"
#: options every policy takes besides its own parameters (split off ``params`` before they are parsed)
RUN_PARAMS = ("restrict",)


def split_run_params(params: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` -> (the policy's own parameters, the run options among them: :data:`RUN_PARAMS`)."""
    own = dict(params or {})
    run = {k: own.pop(k) for k in RUN_PARAMS if k in own}
    return own, run


def choose_scope(trace) -> tuple[str, str]:
    """The scope every policy is replayed under when none is given, and why.

    ``recorded`` (the pages of mergeable VMAs: what ksmd scans) when the trace holds any such page;
    else ``anon`` (every private anonymous page: what KSM would scan if the processes opted in with
    ``madvise(MADV_MERGEABLE)`` or ``prctl(PR_SET_MEMORY_MERGE)``).  One scope for every policy, so
    that their savings and the oracle's are counted over the same pages."""
    rec = trace.prepare("recorded")
    n_rec = int(rec.base_pages.max()) if rec.n_snaps else 0
    if n_rec > 0:
        procs = int(np.count_nonzero(np.bincount(rec.page_proc, minlength=rec.n_procs) > 0)) if rec.n_pages else 0
        return "recorded", (f"scope recorded: up to {n_rec:,} pages in mergeable VMAs (madvise/prctl) of {procs} "
                            f"traced process{'es' if procs != 1 else ''}, what ksmd scans")
    anon = trace.prepare("anon")
    n_anon = int(anon.base_pages.max()) if anon.n_snaps else 0
    return "anon", (f"scope anon: no traced page is in a mergeable VMA (no madvise(MADV_MERGEABLE) or "
                    f"prctl(PR_SET_MEMORY_MERGE)), so every private anonymous page ({n_anon:,} at most) is a candidate: "
                    "what KSM would scan if the processes opted in")


def resolve_scope(trace, scope: str | None, policy: str | Policy | type[Policy] | None = None) -> tuple[str, str]:
    """``scope`` as given (``recorded``, ``anon`` or ``file``), or for ``auto``/None
    :func:`choose_scope` — except for a policy whose default scope is ``file`` (the page cache:
    other pages than any anonymous scope, so nothing to share a scope with), which gets ``file``."""
    if scope in (None, AUTO):
        if policy is not None and _default_scope(policy) == "file":
            return "file", "scope file: the page cache (resident file pages, one per device, inode and index)"
        return choose_scope(trace)
    if scope == "file" and not _has_page_cache(trace):
        return scope, (f"scope file: as given; the trace records no page cache (capture with --scope all --files PATH), "
                       "so there is nothing to merge")
    return scope, f"scope {scope}: as given"


def _has_page_cache(trace) -> bool:
    from ksmtrace.trace import schema as S

    return all(trace.has_table(t) for t in S.PAGECACHE_TABLES)


def _default_scope(policy: str | Policy | type[Policy]) -> str:
    cls = get_policy(policy) if isinstance(policy, str) else policy
    return cls.default_scope


def trace_params(trace, policy: str | Policy | type[Policy], params: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``params`` plus what the trace implies for ``policy`` and the caller did not set, and why:
    a policy with a kernel ``profile`` parameter (``ksm``) gets the profile of the traced kernel
    (:func:`ksmtrace.policies.ksm.releases.kernel_profile`) when the trace names its kernel
    release.  The commands (replay, compare, sweep, frontier, advise, demo) apply it; the library's
    :func:`replay` replays exactly the parameters it is given."""
    from ksmtrace.policies.ksm.releases import kernel_profile

    out = dict(params or {})
    notes: list[str] = []
    cls = type(policy) if isinstance(policy, Policy) else (get_policy(policy) if isinstance(policy, str) else policy)
    table = {p["name"]: p for p in cls.parameter_table()}
    if "profile" in table and "profile" not in out:
        prof, why = kernel_profile(trace)
        if prof is not None and table["profile"]["choices"] and prof in table["profile"]["choices"]:
            out["profile"] = prof
            notes.append(f"{cls.name} profile {prof}: {why}")
    return out, notes


def make_policy(policy: str | Policy | type[Policy], params: Mapping[str, Any] | None = None) -> Policy:
    if isinstance(policy, Policy):
        if params:
            return type(policy)({**policy.describe(), **dict(params)})
        return policy
    cls = get_policy(policy) if isinstance(policy, str) else policy
    return cls(params or {})


def replay(
    trace,
    policy: str | Policy | type[Policy],
    params: Mapping[str, Any] | None = None,
    *,
    engine: str = "fast",
    scope: str | None = None,
    timing_cost: CostModel | str | None = None,
    report_cost: CostModel | str | None = None,
    start_s: float = 0.0,
    hz: int | None = None,
    seed: int = 0,
    runtime: str = "auto",
    progress: ProgressFn | None = None,
    restrict: str | None = None,
    controller=None,
    host_memory: str | int | None = None,
    writes: str | None = None,
) -> RunResult:
    """Replay ``trace`` (a :class:`~ksmtrace.trace.reader.Trace` or the path of one) through ``policy``.

    ``engine``: ``fast`` (default) or ``reference`` (the page-by-page executable spec of the
    engine).  ``runtime``: ``auto`` (the policy's numba kernel on the fast engine when it has one,
    else its readable runtime), ``readable`` or ``kernel`` (see :data:`ksmtrace.engine.api.RUNTIMES`);
    every choice gives the same results.
    ``scope``: ``recorded`` or ``anon`` (default: the policy's; ``auto``: :func:`choose_scope`).
    ``timing_cost``: the cost model the daemon's clock uses (default: the shipped one).
    ``start_s``: when the daemon starts, in seconds after the first snapshot.  ``hz``: tick rate for sleep quantisation (default:
    the traced host's HZ, else 250).
    ``restrict``: a safe preset (``zero-pages``, ``same-domain[:DOMAIN]``, ``windows[:DOMAIN]``,
    ``read-only``, joined with ``+``; :mod:`ksmtrace.trace.restrict`).  ``controller``: a controller
    (``"ksmtuned"``, ``"kubevirt:interval=10"``, ``"scan-time"`` or a
    :class:`~ksmtrace.controllers.Controller`) that changes the policy's parameters during the run;
    ``host_memory``: the host's size for its memory rules (``"16G"``, or bytes).
    ``writes``: ``faults`` (the trace's recorded write faults are writes at their own time: a COW
    break of a page merged in the replay even when its content did not change), ``snapshots``
    (writes are the content changes the snapshots show, at the snapshot), ``auto`` (default:
    ``faults`` when the trace has a faults table; :mod:`ksmtrace.trace.faults`).
    """
    from ksmtrace.trace.faults import fault_writes
    from ksmtrace.trace.restrict import parse_restriction, restrict_prepared

    trace = as_trace(trace)
    if runtime not in RUNTIMES:
        raise KsmtraceError(f"unknown runtime {runtime!r} (runtimes: {', '.join(RUNTIMES)})")
    params, run_opts = split_run_params(params)
    restriction = parse_restriction(restrict if restrict is not None else run_opts.get("restrict"))
    ctl, host_kib = _controller(policy, params, controller, host_memory)
    if ctl is not None:
        params = _with_initial(ctl, params)
    pol = make_policy(policy, params)
    if ctl is not None and ctl.policies is not None and pol.name not in ctl.policies:
        raise KsmtraceError(f"controller {ctl.name!r} writes the parameters of {', '.join(ctl.policies)}, not of {pol.name!r}")
    if scope == AUTO:
        scope = resolve_scope(trace, AUTO, pol)[0]
    spec = run_spec(trace, pol, engine=engine, scope=scope, timing_cost=timing_cost, start_s=start_s, hz=hz, seed=seed,
                    restrict=restriction, controller=ctl, host_kib=host_kib, writes=writes)
    scope, hz, start_ns = spec["scope"], spec["hz"], spec["start_ns"]
    tcost = resolve_cost_model(timing_cost)
    prep = restrict_prepared(trace, trace.prepare(scope), restriction)
    missing = [r for r in pol.requires if not _trace_has(trace, r)]
    if missing:
        raise KsmtraceError(f"policy {pol.name!r} needs a trace with {missing[0]!r} (capture with --fingerprints)")
    spec["snapshots"] = prep.n_snaps
    fw = fault_writes(trace, prep) if spec.get("writes") == "faults" else None
    if engine == "fast":
        from ksmtrace.engine.fast import FastEngine

        eng = FastEngine(prep, len(fw) if fw is not None else 0)
    else:
        from ksmtrace.engine.reference import ReferenceEngine

        eng = ReferenceEngine(prep)
    ctx = RunContext(prep=prep, engine=eng, timing_ps=tcost.timing_ps(), hz=hz, start_ns=start_ns, seed=int(seed),
                     runtime=runtime, trace=trace, wake_wait_ns=int(round(tcost.wake_wait_ns)))
    rt = pol.runtime(ctx)
    control = None
    if ctl is not None:
        from ksmtrace.controllers.loop import ControlLoop

        control = ControlLoop(ctl, trace, prep, eng, rt, pol, host_kib, start_ns)
    wstats: dict[str, int] = {}
    table, procs = _run(prep, eng, rt, pol, make(progress), control, fw, wstats)
    counters = eng.counters()
    extras = {
        "contract_violations": counters["contract_violations"],
        "merge_latency_sum_ns": counters["merge_latency_sum_ns"],
        "thp_zero_remapped": counters["thp_zero_remapped"],
        "thp_splits": counters["thp_splits"],
        "policy": rt.extras(),
    }
    if control is not None:
        extras["controller"] = control.extras()
    if fw is not None:
        extras["writes"] = {"mode": "faults", "recorded": fw.recorded, "unknown_page": fw.unknown, **wstats}
    if restriction is not None:
        extras["restrict"] = {"spec": restriction.spec, "rules": restriction.describe()}
    if counters["contract_violations"]:
        raise PolicyContractError(
            f"policy {pol.name!r} broke the engine contract {counters['contract_violations']} times "
            "(merged unequal content or a page it does not own)"
        )
    res = RunResult(spec=spec, table=table, latency_hist=eng.latency_hist(), extras=extras, procs=procs,
                    first_merge_ns=eng.first_merge_ns())
    res.summary = res.compute_summary(report_cost)
    return res


def _controller(policy, params: Mapping[str, Any], controller, host_memory) -> tuple[Any, int | None]:
    """The run's controller and the host's size in KiB (None and None without a controller)."""
    if controller is None:
        return None, None
    from ksmtrace.controllers import make_controller, parse_memory_size

    ctl = make_controller(controller)
    ctl = type(ctl)(ctl.params)  # a fresh one: a controller keeps state during a run (ksmtuned's npages)
    host_kib = parse_memory_size(host_memory)
    if ctl.needs_host_memory and host_kib is None:
        raise KsmtraceError(f"controller {ctl.name!r} needs the host's memory size (host_memory, --host-memory 16G): "
                            "its rules compare free memory with it")
    return ctl, host_kib


def _with_initial(ctl, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with what the controller sets before the run; a different value given for one of
    those is an error (the controller owns it)."""
    init = ctl.initial_params()
    clash = [k for k, v in init.items() if k in params and params[k] is not None and str(params[k]) != str(v)]
    if clash:
        raise KsmtraceError(f"controller {ctl.name!r} sets {', '.join(clash)} itself ({', '.join(f'{k}={init[k]}' for k in clash)})")
    return {**dict(params), **init}


def run_spec(trace, pol: Policy, *, engine: str = "fast", scope: str | None = None, timing_cost=None,
             start_s: float = 0.0, hz: int | None = None, seed: int = 0, restrict=None, controller=None,
             host_kib: int | None = None, writes: str | None = None) -> dict[str, Any]:
    """What a replay of ``pol`` on ``trace`` is, including its run id, without running it.

    The run id names a result file, so sweeps use this to skip runs they already have.  A
    restriction and a controller (with the host size it was given) are run options: recorded in
    ``options`` (so in the run id) only when present; so is ``writes`` when it is ``faults``
    (:func:`ksmtrace.trace.faults.resolve_writes`: the default on a trace with a faults table)."""
    from ksmtrace.trace.faults import resolve_writes

    if engine not in ENGINES:
        raise KsmtraceError(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})")
    if not (math.isfinite(start_s) and start_s >= 0):
        raise KsmtraceError(f"the daemon's start must be a time at or after the first snapshot, in seconds (got {start_s!r})")
    scope = scope or pol.default_scope
    tcost = resolve_cost_model(timing_cost)
    if hz is None:
        hz = int(trace.host.get("hz") or 250)
    spec = {
        "trace": str(trace.path),
        "trace_name": trace.name,
        "trace_fingerprint": trace.fingerprint,
        "policy": pol.name,
        "params": pol.describe(),
        "engine": engine,
        "scope": scope,
        "timing_cost": tcost.digest(),
        "timing_cost_name": tcost.name,
        "hz": hz,
        "start_ns": int(round(start_s * 1e9)),
        "seed": int(seed),
        "options": {"hz": hz},
        "ksmtrace_version": __version__,
        "kernel_counters": list(pol.kernel_counters),
    }
    if restrict is not None:
        from ksmtrace.trace.restrict import parse_restriction

        spec["restrict"] = spec["options"]["restrict"] = parse_restriction(restrict).spec
    if controller is not None:
        from ksmtrace.controllers import describe_controller, make_controller

        ctl = make_controller(controller)
        spec["controller"] = spec["options"]["controller"] = describe_controller(ctl)
        spec["host_kib"] = spec["options"]["host_kib"] = int(host_kib) if host_kib else None
    if resolve_writes(trace, writes, pol) == "faults":
        spec["writes"] = spec["options"]["writes"] = "faults"
    spec["run_id"] = make_run_id(spec)
    return spec


def _trace_has(trace, capability: str) -> bool:
    if capability == "sample":
        return trace.has_sample_hash
    if capability == "prefix":
        return trace.has_prefix_hashes
    if capability == "ground_truth":
        return trace.has_ground_truth
    return False


def _run(prep, eng, rt, pol: Policy, progress, control=None, writes=None, wstats=None) -> pl.DataFrame:
    n = prep.n_snaps
    unrestricted = prep.extras.get("unrestricted_oracle_frames")
    times = prep.times_ns
    rows: list[dict[str, Any]] = []
    prev_eng = eng.counters()
    prev_units = np.zeros(N_UNITS, dtype=np.int64)
    prev_busy = 0
    kc = list(pol.kernel_counters)
    proc_parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    # a runtime may apply the snapshots itself, fused with its own step (the oracle's fast route);
    # not with recorded write faults: the fused step cannot tell the arrivals a fault already wrote
    # from the others, so the engine applies the snapshot and the runtime's on_snapshot runs unfused
    applier = rt if hasattr(rt, "apply_snapshot") and writes is None else eng
    advance = control.run_until if control is not None else rt.run_until
    on_write = getattr(rt, "on_fault_write", None)
    fault_cows = 0
    for s in range(n):
        now = int(times[s])
        cows = applier.apply_snapshot(s, now) + fault_cows
        rt.on_snapshot(s, now)
        if control is not None:
            control.at_snapshot(s, now)
        c = eng.counters()
        units = np.array(rt.units(), dtype=np.int64)  # a copy: runtimes keep counting in place
        busy = int(rt.busy_ns())
        kvals = rt.counters()
        frames = c["frames_in_use"]
        base = int(prep.base_frames[s])
        row: dict[str, Any] = {
            "snap": s,
            "t_s": now / 1e9,
            "candidate_pages": c["candidate_pages"],
            "base_frames": base,
            "frames_in_use": frames,
            "frames_saved": base - frames,
            "oracle_saved": int(prep.oracle_saved[s]),
            "hash_only_saved": int(prep.hash_dup_pages[s]),
            "zero_filled_pages": int(prep.zero_filled[s]),
            "cow_breaks": cows,
            "cow_ksm": c["cow_ksm"],
            "cow_zero": c["cow_zero"],
            "merges": c["merges"] - prev_eng["merges"],
            "exposed_merges": c["exposed_merges"] - prev_eng["exposed_merges"],
            "merge_latency_sum_s": (c["merge_latency_sum_ns"] - prev_eng["merge_latency_sum_ns"]) / 1e9,
            "thp_zero_remapped": c["thp_zero_remapped"],
            "daemon_busy_s": (busy - prev_busy) / 1e9,
        }
        if unrestricted is not None:
            row["unrestricted_oracle_saved"] = base - int(unrestricted[s])
        for k in kc:
            row[k] = kvals.get(k)
        if control is not None:
            row.update(control.row(row))
        for i, u in enumerate(UNIT_NAMES):
            row[f"u_{u}"] = int(units[i] - prev_units[i])
        rows.append(row)
        cand, merged = eng.per_process()
        live = np.flatnonzero(cand > 0)
        proc_parts.append((s, live, cand[live], merged[live]))
        prev_eng, prev_units, prev_busy = c, units, busy
        if s + 1 < n:
            fault_cows = _fault_writes(writes, times, s, eng, advance, on_write, wstats) if writes is not None else 0
            advance(int(times[s + 1]))
        progress(s + 1, n, f"snapshot {s + 1}/{n}")
    schema = {k: (pl.Int64 if k not in ("t_s", "merge_latency_sum_s", "daemon_busy_s") else pl.Float64) for k in rows[0]}
    table = pl.DataFrame(rows, schema=schema)
    snaps = np.concatenate([np.full(len(live), s, np.int64) for s, live, _, _ in proc_parts]) if proc_parts else np.zeros(0, np.int64)
    idx = np.concatenate([live for _, live, _, _ in proc_parts]).astype(np.int64) if proc_parts else np.zeros(0, np.int64)
    procs = pl.DataFrame({
        "snap": snaps,
        "proc": idx,
        "pid": prep.proc_pid[idx] if len(idx) else np.zeros(0, np.int64),
        "comm": [prep.proc_comm[i] for i in idx.tolist()],
        "candidate_pages": np.concatenate([c for _, _, c, _ in proc_parts]) if proc_parts else np.zeros(0, np.int64),
        "merged_pages": np.concatenate([m for _, _, _, m in proc_parts]) if proc_parts else np.zeros(0, np.int64),
    })
    return table, procs


def _fault_writes(writes, times, s: int, eng, advance, on_write, stats: dict[str, int]) -> int:
    """The recorded write faults between snapshots ``s`` and ``s+1``, each at its time: the daemon
    works up to the fault, the engine applies the write (a COW break if the page maps a KSM page
    in the replay), a runtime with an ``on_fault_write`` hook hears of it.  Returns the KSM COW
    breaks; ``stats`` counts the writes applied and those on pages that were not candidates."""
    cows = 0
    sl = writes.between(int(times[s]), int(times[s + 1]))
    for t, pg, c, u in zip(writes.t_ns[sl].tolist(), writes.pg[sl].tolist(), writes.cid[sl].tolist(),
                           writes.until_ns[sl].tolist()):
        advance(t)
        r = eng.write_fault(pg, c, t, u)
        if r < 0:
            stats["not_candidate"] = stats.get("not_candidate", 0) + 1
            continue
        stats["applied"] = stats.get("applied", 0) + 1
        cows += r
        if on_write is not None:
            on_write(pg, t)
    return cows


_OPEN_TRACES: dict[str, Any] = {}


def replay_task(task: Mapping[str, Any]) -> RunResult:
    """One replay described by plain data, for an executor (:mod:`ksmtrace.executor`): ``trace``
    (a path: the worker opens it, once per process), ``policy``, ``params`` and any keyword of
    :func:`replay` except ``progress``.  With ``out_dir`` the result files are written there too."""
    from ksmtrace.trace.reader import open_trace

    path = str(task["trace"])
    tr = _OPEN_TRACES.get(path)
    if tr is None:
        tr = _OPEN_TRACES[path] = open_trace(path)
    opts = {k: v for k, v in task.items() if k not in ("trace", "policy", "params", "out_dir", "label")}
    res = replay(tr, task["policy"], task.get("params"), **opts)
    if task.get("label") is not None:
        res.spec["label"] = task["label"]
    if task.get("out_dir") is not None:
        try:
            res.write(task["out_dir"])
        except OSError as exc:
            raise KsmtraceError(f"{task['out_dir']}: cannot write the result of {res.run_id} ({exc.strerror or exc})") from None
    return res


def compare(
    trace,
    policies: list[str | tuple[str, Mapping[str, Any]]],
    *,
    engine: str = "fast",
    scope: str | None = None,
    report_cost: CostModel | str | None = None,
    progress: ProgressFn | None = None,
    executor=None,
    workers: int | None = 1,
    **kwargs: Any,
) -> list[RunResult]:
    """Replay several policies on one trace, in the order given, all under one scope: ``scope``, or
    the one :func:`choose_scope` picks (so every saving is counted over the same pages as the
    oracle's).

    ``executor``: where the runs execute (an :class:`~ksmtrace.executor.Executor` or a spec such as
    ``"local"``, ``"dask"``, ``"dask://HOST:PORT"``; see :mod:`ksmtrace.executor`) with ``workers``
    workers.  By default (``workers=1``, no executor) the runs are replayed here, one after another.
    A run whose policy raises a :class:`~ksmtrace.errors.KsmtraceError` raises it here."""
    trace = as_trace(trace)
    auto = scope in (None, AUTO)
    items = [(item, None) if isinstance(item, str) else item for item in policies]
    if auto and any(_default_scope(name) != "file" for name, _ in items):
        scope = choose_scope(trace)[0]

    def scope_for(name):  # the page-cache policy keeps its own scope under auto
        return "file" if auto and _default_scope(name) == "file" else scope

    if executor is None and (workers or 1) == 1:
        return [replay(trace, name, params, engine=engine, scope=scope_for(name), report_cost=report_cost,
                       progress=progress, **kwargs)
                for name, params in items]
    from ksmtrace.executor import make_executor

    tasks = [{"trace": str(trace.path), "policy": name, "params": dict(params or {}), "engine": engine,
              "scope": scope_for(name), **kwargs} for name, params in items]
    out: list[RunResult | None] = [None] * len(tasks)
    prog = make(progress)
    ex = make_executor(executor, min(workers or len(tasks), len(tasks)))
    try:
        if ex.warm() and not os.environ.get("KSMTRACE_NO_CACHE"):
            for sc in sorted({t["scope"] for t in tasks}):
                trace.prepare(sc)  # fill the disk cache once, not in every worker
        for k, done in enumerate(ex.run(replay_task, tasks)):
            if done.error is not None:
                raise done.error
            res = done.value
            res.summary = res.compute_summary(report_cost)
            out[done.index] = res
            prog(k + 1, len(tasks), res.policy)
    finally:
        if ex is not executor:
            ex.close()
    return out  # type: ignore[return-value]
