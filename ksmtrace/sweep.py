"""Parameter sweeps: one policy over a grid of parameter values, in parallel, resumable.

>>> from ksmtrace.sweep import sweep, pareto_front
>>> df = sweep("my-trace", "ksm", {"pages_to_scan": [100, 1000], "sleep_millisecs": [20, 200]}, "out/", workers=4)
>>> pareto_front(df)            # the runs no other run beats on saving, CPU and COW breaks at once

Every grid point is one replay, run by an executor (:mod:`ksmtrace.executor`: local worker
processes by default, or Dask; each worker opens the trace itself; the prepared trace and the
numba-compiled code are cached on disk, so workers start quickly).  An output directory holds one
study: it is bound to the trace, the policy and the run settings (``sweep.json``), and two sweeps
into it serialise on a lock (:func:`open_sweep_dir`).  Each run writes its result files ``<run_id>.json/.parquet`` into the output directory
as soon as it finishes.  Run ids are derived from everything that determines a run (trace, policy,
parameters, engine, scope, timing cost model, start, seed, ksmtrace version), so a run whose
result file already exists is not run again: a sweep that was interrupted (Ctrl-C, killed, a
crash) and is started again does only the missing runs, and its table is the same as that of one
uninterrupted sweep.  The table is built from the result files alone.

Grid syntax (the CLI's ``-p key=LIST``): ``LIST`` is a comma-separated list of values and ranges.
A range is ``START:STOP`` (step 1), ``START:STOP:STEP`` (add STEP) or ``START:STOP:xFACTOR``
(multiply by FACTOR); STOP is included when the sequence hits it.  ``100:1000:x2`` is
100,200,400,800; ``0:6:2`` is 0,2,4,6; ``10,100:300:100`` is 10,100,200,300.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl

from ksmtrace.pareto import non_dominated
from ksmtrace.errors import KsmtraceError, PolicyParamError, ResultError
from ksmtrace.executor import Executor, WorkerLost, make_executor
from ksmtrace.progress import ProgressFn, make

MAX_VALUES = 10_000
TABLE_NAME = "sweep"
METRICS = (
    "frames_saved_mean", "frames_saved_final", "oracle_saved_mean", "pct_of_oracle", "cow_breaks",
    "cow_breaks_max_interval", "cpu_seconds", "merges", "merge_latency_p50_s", "merge_latency_p90_s",
    "merge_latency_mean_s", "exposed_merges",
)
SPEC_COLUMNS = ("policy", "scope", "engine", "run_id")
PARETO_MAXIMIZE = ("frames_saved_mean",)
PARETO_MINIMIZE = ("cpu_seconds", "cow_breaks")

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^\s*({_NUM})\s*:\s*({_NUM})\s*(?::\s*(x|\*)?\s*({_NUM}))?\s*$")


class SweepError(KsmtraceError):
    """A sweep cannot be planned or did not complete."""

    exit_code = 2


# --- grid ----------------------------------------------------------------------------------------
def _num(text: str) -> int | float:
    v = float(text)
    if re.fullmatch(r"[-+]?\d+", text.strip()):
        return int(text)
    return v


def _fmt(v: float, integral: bool) -> str:
    if integral:
        return str(int(round(v)))
    return repr(round(v, 12))


def expand_values(key: str, text: str) -> list[str]:
    """The values of one ``key=LIST`` (strings, converted to the parameter's type later)."""
    out: list[str] = []
    if not text.strip():
        raise SweepError(f"grid {key}=: no values (give a comma-separated list, e.g. {key}=1,2,3)")
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise SweepError(f"grid {key}={text}: empty value in the list")
        m = _RANGE.match(item)
        if not m:
            if ":" in item:
                raise SweepError(f"grid {key}={item}: bad range (use START:STOP, START:STOP:STEP or START:STOP:xFACTOR)")
            out.append(item)
            continue
        a, b, mul, step = m.group(1), m.group(2), m.group(3), m.group(4)
        start, stop = _num(a), _num(b)
        if mul:
            f = float(step)
            if not f > 1 or not 0 < start <= stop:
                raise SweepError(f"grid {key}={item}: a multiplicative range needs FACTOR > 1 and 0 < START <= STOP")
            integral = isinstance(start, int) and float(f).is_integer()
            vals, v = [], float(start)
            while v <= stop * (1 + 1e-12):
                vals.append(v)
                v *= f
                if len(vals) > MAX_VALUES:
                    break
        else:
            d = _num(step) if step is not None else 1
            if d == 0 or (stop - start) * d < 0:
                raise SweepError(f"grid {key}={item}: the step must be non-zero and go from START towards STOP")
            integral = all(isinstance(x, int) for x in (start, stop, d))
            n = int(math.floor((stop - start) / d + 1e-9)) + 1
            if n > MAX_VALUES:
                raise SweepError(f"grid {key}={item}: more than {MAX_VALUES} values")
            vals = [start + i * d for i in range(n)]
        if len(vals) > MAX_VALUES:
            raise SweepError(f"grid {key}={item}: more than {MAX_VALUES} values")
        out.extend(_fmt(v, integral) for v in vals)
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["pages_to_scan=100,1000", "sleep_millisecs=10:30:10"]`` -> ``{key: [values...]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"grid {item!r}: expected key=v1,v2,... (or key=START:STOP[:STEP])")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise SweepError(f"grid {item!r}: empty parameter name")
        if key in grid:
            raise SweepError(f"grid: parameter {key!r} given twice (put every value in one list: {key}=a,b,c)")
        grid[key] = expand_values(key, text)
    return grid


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the value lists, in order (the last key varies fastest).

    A value list given as one string is parsed with the grid syntax (``"100:1000:x2,5000"``).
    """
    keys = list(grid)
    lists = []
    for k in keys:
        vals = grid[k]
        if isinstance(vals, str):
            vals = expand_values(k, vals)
        elif isinstance(vals, bytes) or not hasattr(vals, "__iter__"):
            vals = [vals]
        vals = [v.item() if isinstance(v, np.generic) else v for v in vals]
        if len(vals) == 0:
            raise SweepError(f"grid {k}: no values")
        lists.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


# --- plan ------------------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    index: int
    given: dict[str, Any]  # the grid point as given
    params: dict[str, Any]  # the policy's effective parameters (all of them, typed)
    run_id: str
    done: bool


@dataclass
class SweepPlan:
    trace_path: str
    trace_name: str
    trace_fingerprint: str
    policy: str
    keys: list[str]
    out_dir: Path
    engine: str
    scope: str
    runs: list[PlannedRun] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def todo(self) -> list[PlannedRun]:
        """Runs still to do, one per distinct run id, in grid order."""
        seen: set[str] = set()
        out = []
        for r in self.runs:
            if not r.done and r.run_id not in seen:
                seen.add(r.run_id)
                out.append(r)
        return out


def _result_complete(out_dir: Path, run_id: str) -> bool:
    # the JSON is written last (RunResult.write), so its presence marks a complete result
    return (out_dir / f"{run_id}.json").is_file() and (out_dir / f"{run_id}.parquet").is_file()


def plan_sweep(trace_path, policy: str, grid: Mapping[str, Sequence[Any]], out_dir, *, engine: str = "fast",
               scope: str | None = None, timing_cost=None, start_s: float = 0.0, seed: int = 0,
               writes: str | None = None) -> SweepPlan:
    """Check the grid against the policy's parameters and work out every run's id and whether its
    result already exists in ``out_dir``.  Nothing is run.  ``writes``: as for
    :func:`ksmtrace.replay.replay` (``auto``, ``faults``, ``snapshots``)."""
    from ksmtrace.policies.registry import get_policy
    from ksmtrace.replay import ENGINES, RUN_PARAMS, run_spec, split_run_params
    from ksmtrace.trace.faults import resolve_writes
    from ksmtrace.trace.reader import open_trace
    from ksmtrace.trace.restrict import parse_restriction

    if engine not in ENGINES:
        raise SweepError(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})")
    cls = get_policy(policy)
    known = [p["name"] for p in cls.parameter_table()]
    grid = {str(k).replace("-", "_"): v for k, v in grid.items()}
    if not grid:
        raise SweepError("empty grid: give at least one parameter and its values (-p key=v1,v2)")
    for k in grid:
        if k not in known and k not in RUN_PARAMS:
            raise PolicyParamError(f"unknown parameter {k!r} for policy {cls.name!r} (parameters: {', '.join(known) or 'none'}; "
                                   f"and for every policy: {', '.join(RUN_PARAMS)})")
    trace = open_trace(trace_path)
    out = Path(out_dir)
    points = expand_grid(grid)
    mode = resolve_writes(trace, writes, cls)  # one line for a mode this trace or policy cannot take
    plan = SweepPlan(trace_path=str(trace.path), trace_name=trace.name, trace_fingerprint=trace.fingerprint, policy=cls.name, keys=list(grid), out_dir=out,
                     engine=engine, scope=scope or cls.default_scope,
                     options={"timing_cost": timing_cost, "start_s": start_s, "seed": seed, "writes": mode})
    for i, point in enumerate(points):
        own, run = split_run_params(point)  # a safe preset is a run option every policy takes
        try:
            pol = cls(own)
            restrict = parse_restriction(run.get("restrict"))
        except KsmtraceError as exc:
            where = ",".join(f"{k}={v}" for k, v in point.items())
            raise type(exc)(f"sweep point {where}: {exc}") from None
        rid = run_spec(trace, pol, engine=engine, scope=scope, timing_cost=timing_cost, start_s=start_s, seed=seed,
                       restrict=restrict, writes=mode)["run_id"]
        extra = {"restrict": restrict.spec if restrict else None} if "restrict" in run else {}
        plan.runs.append(PlannedRun(index=i, given=dict(point), params={**pol.describe(), **extra}, run_id=rid,
                                    done=_result_complete(out, rid)))
    return plan


# --- the sweep directory ---------------------------------------------------------------------------
MANIFEST_NAME = "sweep.json"
MANIFEST_FORMAT = "ksmtrace-sweep"
LOCK_NAME = ".sweep.lock"
BOUND = ("trace_fingerprint", "policy", "engine", "scope", "timing_cost", "start_ns", "seed", "writes", "ksmtrace_version")


def _binding(plan: SweepPlan) -> dict[str, Any]:
    """What a sweep directory is bound to: everything that decides what a row of its table means
    except the swept parameters (a grid may grow: more values, another parameter)."""
    from ksmtrace.engine.cost import resolve_cost_model
    from ksmtrace._version import __version__

    return {"trace_fingerprint": plan.trace_fingerprint, "policy": plan.policy, "engine": plan.engine,
            "scope": plan.scope, "timing_cost": resolve_cost_model(plan.options.get("timing_cost")).digest(),
            "start_ns": int(round(float(plan.options.get("start_s", 0.0)) * 1e9)), "seed": int(plan.options.get("seed", 0)),
            # a run spec names its write mode only when it is "faults" (see ksmtrace.replay.run_spec)
            "writes": "faults" if plan.options.get("writes") == "faults" else None,
            "ksmtrace_version": __version__}


def _mismatch(have: Mapping[str, Any], want: Mapping[str, Any], where: str, trace_name: str | None) -> str | None:
    for k in BOUND:
        if k == "ksmtrace_version":
            continue  # another version only means new run ids; the table stays one study
        if have.get(k) != want.get(k):
            if k == "trace_fingerprint":
                return (f"{where} holds a sweep of another trace ({trace_name or '?'}, fingerprint "
                        f"{have.get(k)}); give this sweep its own -o directory")
            return (f"{where} holds a sweep with {k} {have.get(k)!r}, this one has {want.get(k)!r}: the two would mix "
                    "in one table; give this sweep its own -o directory")
    return None


class SweepDir:
    """An open, locked sweep directory (see :func:`open_sweep_dir`)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``name`` atomically, relative to the directory's descriptor: a temporary file
        created with ``O_EXCL|O_NOFOLLOW`` (never through a planted link), renamed over ``name``."""
        tmp = f".{name}.tmp{os.getpid()}"
        try:
            os.unlink(tmp, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        return self.path / name

    def write_table(self, table: pl.DataFrame) -> tuple[Path, Path]:
        import io

        pq, csv = io.BytesIO(), io.BytesIO()
        table.write_parquet(pq)
        table.write_csv(csv)
        return (self.write_bytes(f"{TABLE_NAME}.parquet", pq.getvalue()),
                self.write_bytes(f"{TABLE_NAME}.csv", csv.getvalue()))


def _open_output_dir(path: Path) -> int:
    """Create ``path`` if needed and open it; refuse a directory another user owns or that group
    or others can write (anyone who can write it could plant links among our files)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise SweepError(f"{path}: not a directory") from None
    except OSError as exc:
        raise SweepError(f"{path}: cannot create or open the sweep directory ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"writable by group or others (mode {st.st_mode & 0o7777:04o}; chmod go-w it)"
    if problem:
        os.close(fd)
        raise SweepError(f"{path}: {problem}; refusing to write sweep results there")
    return fd


@contextmanager
def open_sweep_dir(plan: SweepPlan, on_wait: Callable[[str], None] | None = None):
    """Open the plan's output directory for a sweep: create it (safely), take its lock (a second
    sweep into the same directory waits here until the first is done), check that it holds
    nothing but this study (same trace, policy and run settings; :data:`BOUND`), record the
    binding in ``DIR/sweep.json``, and refresh which runs are done.  Yields a :class:`SweepDir`.
    ``on_wait(message)`` is called once if the directory is locked by another sweep."""
    import fcntl

    fd = _open_output_dir(plan.out_dir)
    lock = -1
    try:
        lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for another sweep into {plan.out_dir} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        d = SweepDir(plan.out_dir, fd)
        _bind(plan, d)
        for r in plan.runs:
            r.done = _result_complete(plan.out_dir, r.run_id)
        yield d
    finally:
        if lock >= 0:
            os.close(lock)  # releases the flock
        os.close(fd)


def read_sweep_manifest(out_dir) -> dict[str, Any] | None:
    """``DIR/sweep.json`` (the binding of a sweep directory), or None when there is none."""
    p = Path(out_dir) / MANIFEST_NAME
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SweepError(f"{p}: not a readable sweep manifest ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise SweepError(f"{p}: not a ksmtrace sweep manifest")
    return obj


def _bind(plan: SweepPlan, d: SweepDir) -> None:
    want = _binding(plan)
    where = str(plan.out_dir)
    have = read_sweep_manifest(plan.out_dir)
    if have is not None:
        msg = _mismatch(have.get("binding", {}), want, where, have.get("trace_name"))
        if msg:
            raise SweepError(msg)
        grid = {k: list(v) for k, v in have.get("grid", {}).items()}
    else:
        # no manifest (an older sweep, or results of replay/compare -o): the result files decide
        from ksmtrace.results import RESULT_FORMAT

        grid = {}
        for f in sorted(plan.out_dir.glob("*.json")):
            try:
                obj = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(obj, dict) or obj.get("format") != RESULT_FORMAT:
                continue
            spec = obj.get("spec", {})
            have_b = {k: spec.get(k) for k in BOUND}
            msg = _mismatch(have_b, want, where, spec.get("trace_name"))
            if msg:
                raise SweepError(msg + f" (found in {f.name})")
    for r in plan.runs:  # the grid so far: every value of every swept parameter, in first-seen order
        for k in plan.keys:
            vals = grid.setdefault(k, [])
            if r.params.get(k) not in vals:
                vals.append(r.params.get(k))
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "trace": plan.trace_path, "trace_name": plan.trace_name,
                "binding": want, "grid": grid}
    text = json.dumps(manifest, indent=1, default=str) + "\n"
    if have is None or json.dumps(have, indent=1, default=str) + "\n" != text:
        d.write_bytes(MANIFEST_NAME, text.encode())


# --- running -------------------------------------------------------------------------------------
def _run_one(task: dict[str, Any]) -> tuple[str, str]:
    """One grid point (in a worker, or in-process): :func:`ksmtrace.replay.replay_task`, which
    keeps the worker's opened trace and writes the result files."""
    from ksmtrace.replay import replay_task

    opts = ("policy", "params", "engine", "scope", "timing_cost", "start_s", "seed", "writes", "out_dir")
    res = replay_task({"trace": task["trace_path"], **{k: task.get(k) for k in opts}})
    return task["run_id"], res.run_id


def _clean_partial(out_dir: Path, run_ids: Sequence[str]) -> None:
    """Remove temporary files an interrupted run of these ids may have left."""
    for rid in run_ids:
        for tmp in out_dir.glob(f".{rid}.*tmp*"):
            try:
                tmp.unlink()
            except OSError:
                pass


def run_plan(plan: SweepPlan, *, workers: int | None = None, progress: ProgressFn | None = None,
             executor: Executor | str | None = None) -> dict[str, str]:
    """Run every run the plan still needs.  Returns ``{predicted run id: actual run id}``.

    ``executor``: ``"local"`` (default: ``workers`` worker processes, default one per CPU, at most
    one per run; ``workers=1`` runs here), ``"dask"``, ``"dask://HOST:PORT"`` or an
    :class:`~ksmtrace.executor.Executor` (left open).  Call it inside :func:`open_sweep_dir` (as
    :func:`sweep` does) so that two sweeps into one directory do not run the same points."""
    todo = plan.todo
    prog = make(progress)
    n_done_before = len({r.run_id for r in plan.runs if r.done})
    if not todo:
        prog(0, 0, f"all {n_done_before} runs already in {plan.out_dir}")
        return {}
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    _clean_partial(plan.out_dir, [r.run_id for r in todo])
    opts = plan.options
    tasks = [{
        "trace_path": plan.trace_path, "policy": plan.policy, "params": r.given, "engine": plan.engine,
        "scope": plan.scope, "timing_cost": opts.get("timing_cost"), "start_s": opts.get("start_s", 0.0),
        "seed": opts.get("seed", 0), "writes": opts.get("writes"), "out_dir": str(plan.out_dir), "run_id": r.run_id,
    } for r in todo]
    labels = {r.run_id: " ".join(f"{k}={v}" for k, v in r.given.items()) for r in todo}
    skipped = f" ({n_done_before} already done)" if n_done_before else ""
    n = len(tasks)
    if workers is None:
        workers = min(os.cpu_count() or 1, n)
    workers = max(1, min(int(workers), n))
    ids: dict[str, str] = {}
    errors: list[tuple[str, BaseException]] = []
    prog(0, n, f"starting{skipped}")
    ex = make_executor(executor, workers)
    try:
        if ex.warm() and not os.environ.get("KSMTRACE_NO_CACHE"):
            from ksmtrace.trace.reader import open_trace

            open_trace(plan.trace_path).prepare(plan.scope)  # fill the disk cache once, not in every worker
        # the module attribute, looked up now: tests replace it
        for k, done in enumerate(ex.run(globals()["_run_one"], tasks)):
            t = tasks[done.index]
            if done.error is None:
                pred, actual = done.value
                ids[pred] = actual
            elif isinstance(done.error, KsmtraceError):
                errors.append((t["run_id"], done.error))
            else:
                raise done.error
            prog(k + 1, n, labels[t["run_id"]] + skipped)
    except WorkerLost as exc:
        raise SweepError(f"{exc}; run the same sweep again to resume") from None
    finally:
        if ex is not executor:
            ex.close()
    for pred, actual in ids.items():
        if pred != actual:
            warnings.warn(f"run id {actual} differs from the predicted {pred}: resuming this sweep will re-run it",
                          stacklevel=2)
    if errors:
        rid, exc = errors[0]
        raise SweepError(f"{len(errors)} of {n} runs failed (first: {labels[rid]}: {exc}); "
                         "the others are saved, fix the cause and run the sweep again")
    return ids


def sweep(trace_path, policy: str, grid: Mapping[str, Sequence[Any]], out_dir, *, workers: int | None = None,
          progress: ProgressFn | None = None, engine: str = "fast", scope: str | None = None, timing_cost=None,
          report_cost=None, start_s: float = 0.0, seed: int = 0, write_table: bool = True,
          executor: Executor | str | None = None, writes: str | None = None) -> pl.DataFrame:
    """Replay ``policy`` on the trace at ``trace_path`` for every point of ``grid`` (a dict of
    parameter -> list of values; strings are converted to the parameter's type), in ``workers``
    processes (default: one per CPU) of ``executor`` (default ``"local"``; ``"dask"`` or
    ``"dask://HOST:PORT"``), writing each run's result files into ``out_dir`` and skipping runs
    whose result file is already there.  Returns the sweep table (one row per grid point, in grid
    order; see :func:`sweep_table`) and writes it to ``out_dir/sweep.parquet`` and
    ``out_dir/sweep.csv``.  ``report_cost``: the cost model for the table's CPU seconds.

    ``out_dir`` is bound to this trace, policy and run settings (``out_dir/sweep.json``): a sweep
    of another trace into it is a :class:`SweepError`; two sweeps into it run one after the other."""
    trace_path = getattr(trace_path, "path", trace_path)  # an opened trace or its path
    plan = plan_sweep(trace_path, policy, grid, out_dir, engine=engine, scope=scope, timing_cost=timing_cost,
                      start_s=start_s, seed=seed, writes=writes)
    with open_sweep_dir(plan, on_wait=lambda msg: make(progress)(0, 0, msg)) as d:
        ids = run_plan(plan, workers=workers, progress=progress, executor=executor)
        table = sweep_table(plan, cost=report_cost, actual_ids=ids)
        if write_table:
            d.write_table(table)
    return table


# --- the table -------------------------------------------------------------------------------------
def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def result_row(result, keys: Sequence[str], cost=None) -> dict[str, Any]:
    """One table row: the spec columns, the swept parameters' effective values, the metrics."""
    s = result.compute_summary(cost)
    spec = result.spec
    params = spec.get("params", {})
    frac = s.get("fraction_of_oracle_mean")
    row: dict[str, Any] = {"policy": spec.get("policy")}
    for k in keys:
        row[k] = params[k] if k in params else spec.get(k)  # a run option (restrict) is in the spec
    row.update({"scope": spec.get("scope"), "engine": spec.get("engine"), "run_id": result.run_id})
    row.update({
        "frames_saved_mean": s["frames_saved_mean"],
        "frames_saved_final": s["frames_saved_final"],
        "oracle_saved_mean": s["oracle_saved_mean"],
        "pct_of_oracle": None if frac is None or frac != frac else 100.0 * frac,
        "cow_breaks": s["cow_breaks"],
        "cow_breaks_max_interval": s["cow_breaks_max_interval"],
        "cpu_seconds": s["cpu_seconds"],
        "merges": s["merges"],
        "merge_latency_p50_s": s["merge_latency_p50_s"],
        "merge_latency_p90_s": s["merge_latency_p90_s"],
        "merge_latency_mean_s": s["merge_latency_mean_s"],
        "exposed_merges": s["exposed_merges"],
    })
    return {k: _clean(v) for k, v in row.items()}


def results_table(results: Sequence, keys: Sequence[str] | None = None, cost=None) -> pl.DataFrame:
    """The sweep table of any runs (e.g. ``read_results(["dir/"])``).  ``keys``: parameter columns
    (default: every parameter whose value differs between the runs)."""
    if keys is None:
        keys = []
        allkeys: list[str] = []
        for r in results:
            for k in r.spec.get("params", {}):
                if k not in allkeys:
                    allkeys.append(k)
        for k in allkeys:
            if len({repr(r.spec.get("params", {}).get(k)) for r in results}) > 1:
                keys.append(k)
        if len({r.spec.get("restrict") for r in results}) > 1:  # a run option: a safe preset
            keys.append("restrict")
    rows = [result_row(r, keys, cost) for r in results]
    return _frame(rows, list(keys))


def _frame(rows: list[dict[str, Any]], keys: list[str]) -> pl.DataFrame:
    floats = {"frames_saved_mean", "oracle_saved_mean", "pct_of_oracle", "cpu_seconds", "merge_latency_p50_s",
              "merge_latency_p90_s", "merge_latency_mean_s"}
    schema: dict[str, Any] = {"policy": pl.String}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals and all(isinstance(v, bool) for v in vals):
            schema[k] = pl.Boolean
        elif vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            schema[k] = pl.Int64
        elif vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            schema[k] = pl.Float64
        else:
            schema[k] = pl.String
            for r in rows:
                if r.get(k) is not None:
                    r[k] = str(r[k])
    schema.update({"scope": pl.String, "engine": pl.String, "run_id": pl.String})
    for m in METRICS:
        schema[m] = pl.Float64 if m in floats else pl.Int64
    return pl.DataFrame([{c: r.get(c) for c in schema} for r in rows], schema=schema, orient="row")


def sweep_table(plan: SweepPlan, cost=None, actual_ids: Mapping[str, str] | None = None) -> pl.DataFrame:
    """The table of a planned sweep, read from its result files (one row per grid point)."""
    from ksmtrace.results import RunResult

    actual_ids = actual_ids or {}
    rows = []
    cache: dict[str, Any] = {}
    for r in plan.runs:
        rid = actual_ids.get(r.run_id, r.run_id)
        if rid not in cache:
            path = plan.out_dir / f"{rid}.json"
            if not path.exists():
                raise ResultError(f"{path}: missing; run the sweep (again) to produce it")
            cache[rid] = RunResult.read(path)
        row = result_row(cache[rid], plan.keys, cost)
        rows.append(row)
    return _frame(rows, plan.keys)


def write_sweep_table(table: pl.DataFrame, out_dir) -> tuple[Path, Path]:
    """Write the table to ``out_dir/sweep.parquet`` and ``sweep.csv`` (atomically, through the
    directory's descriptor; the directory is checked as for a sweep)."""
    d = Path(out_dir)
    fd = _open_output_dir(d)
    try:
        return SweepDir(d, fd).write_table(table)
    finally:
        os.close(fd)


def read_sweep_table(path) -> pl.DataFrame:
    """``DIR`` (reads ``DIR/sweep.parquet``) or the Parquet file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{TABLE_NAME}.parquet"
    try:
        return pl.read_parquet(p)
    except FileNotFoundError:
        raise ResultError(f"{p}: no sweep table here") from None
    except Exception as exc:
        raise ResultError(f"{p}: not a readable sweep table ({str(exc).splitlines()[0][:120]})") from None


# --- Pareto ----------------------------------------------------------------------------------------
def pareto_front(df: pl.DataFrame, maximize: Sequence[str] = PARETO_MAXIMIZE,
                 minimize: Sequence[str] = PARETO_MINIMIZE) -> pl.DataFrame:
    """The rows of ``df`` that no other row dominates: at least as good in every objective and
    strictly better in one (``maximize`` columns: more is better; ``minimize``: less is better;
    nulls count as the worst).  Row order is kept."""
    for c in list(maximize) + list(minimize):
        if c not in df.columns:
            raise SweepError(f"pareto: no column {c!r} in the table (columns: {', '.join(df.columns)})")
    if df.height == 0:
        return df
    col = lambda c: df[c].cast(pl.Float64).fill_null(float("nan")).to_numpy()  # noqa: E731
    mask = non_dominated([col(c) for c in maximize], [col(c) for c in minimize])
    return df.filter(pl.Series(mask))
