"""The policy contract suite, usable by third-party policies (``from ksmtrace.testing import contract``).

Every registered policy must:

* construct with its defaults, and round-trip ``describe()``;
* reject unknown parameters with :class:`~ksmtrace.errors.PolicyParamError`;
* never merge unequal content (the engine counts violations; the replay fails on one);
* respect its budget (``Policy.budget_limit``: a counter that may grow by at most N per wake-up);
* be deterministic for a seed;
* never save more than the oracle at any snapshot;
* give identical tables with the reference and the fast engine (its readable runtime on the
  first, its numba kernel, if it has one, on the second);
* have every parameter change some result (``Policy.sensitivity``: parameter -> (other value,
  scenario, base parameters)), on both engines alike; a parameter without a sensitivity case is a
  failure.  Base parameters may include ``timing_cost`` (unit -> ns) to give the daemon a heavier
  clock.
"""
from __future__ import annotations

import dataclasses

import polars as pl

from ksmtrace.engine.cost import DEFAULT_NS, CostModel
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.base import Policy
from ksmtrace.replay import replay


class ContractFailure(AssertionError):
    pass


def check_construct(cls: type[Policy]) -> None:
    pol = cls()
    desc = pol.describe()
    again = cls(desc)
    if again.describe() != desc:
        raise ContractFailure(f"{cls.name}: describe() does not round-trip: {desc} vs {again.describe()}")
    try:
        cls({"no_such_parameter_xyz": 1})
    except PolicyParamError:
        pass
    else:
        raise ContractFailure(f"{cls.name}: an unknown parameter was accepted")


def run(trace, cls: type[Policy], params=None, engine="fast", seed=0):
    """Replay; ``params`` may carry ``timing_cost`` (unit -> ns) for the daemon's clock."""
    params = dict(params or {})
    timing = params.pop("timing_cost", None)
    cost = CostModel(ns={**DEFAULT_NS, **timing}, name="test") if timing else None
    return replay(trace, cls, params, engine=engine, seed=seed, timing_cost=cost)


def check_trace(trace, cls: type[Policy], params=None) -> None:
    """Budget, determinism, oracle bound and reference == fast on one trace."""
    a = run(trace, cls, params, "fast", seed=3)
    b = run(trace, cls, params, "fast", seed=3)
    if not a.table.equals(b.table):
        raise ContractFailure(f"{cls.name}: two runs with the same seed differ")
    over = a.table.filter(pl.col("frames_saved") > pl.col("oracle_saved"))
    if over.height:
        raise ContractFailure(f"{cls.name}: saves more than the oracle at snapshot {over['snap'][0]}")
    ref = run(trace, cls, params, "reference", seed=3)
    if not ref.table.equals(a.table):
        diff = [c for c in a.table.columns if not ref.table[c].equals(a.table[c])]
        raise ContractFailure(f"{cls.name}: reference and fast engines differ in {diff[:5]}")
    if a.procs is not None and ref.procs is not None and not ref.procs.equals(a.procs):
        raise ContractFailure(f"{cls.name}: reference and fast per-process tables differ")
    limit = cls.budget_limit(cls(params or {}).params) if hasattr(cls, "budget_limit") else None
    if limit is not None:
        counter, per_wake = limit
        if counter in a.table.columns:
            grow = a.table[counter].diff().fill_null(0)
            cap = a.table["u_wakeups"] * per_wake
            bad = a.table.filter(grow > cap)
            if bad.height:
                raise ContractFailure(f"{cls.name}: {counter} grew beyond {per_wake} per wake-up at snapshot {bad['snap'][0]}")


def check_sensitivity(cls: type[Policy], make_scenario) -> None:
    """Every parameter changes some result on its scenario."""
    cases = dict(getattr(cls, "sensitivity", {}) or {})
    names = [f.name for f in dataclasses.fields(cls.Params)]
    missing = [n for n in names if n not in cases]
    if missing:
        raise ContractFailure(f"{cls.name}: no sensitivity case for parameter(s) {missing}")
    for name in names:
        alt, scen, base = cases[name]
        tr = make_scenario(scen)
        p0 = dict(base)
        p1 = dict(base)
        p1[name] = alt
        for engine in ("fast", "reference"):
            r0 = run(tr, cls, p0, engine)
            r1 = run(tr, cls, p1, engine)
            if r0.table.drop("snap", "t_s").equals(r1.table.drop("snap", "t_s")):
                raise ContractFailure(f"{cls.name}: parameter {name}={alt!r} changes nothing on scenario {scen!r} "
                                      f"(base {base}, {engine} engine)")
            if engine == "fast":
                fast1 = r1
            elif not r1.table.equals(fast1.table):
                raise ContractFailure(f"{cls.name}: with {name}={alt!r} on scenario {scen!r} the engines differ")
