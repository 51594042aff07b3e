"""The policy interface.

A policy is one module holding:

* a frozen dataclass of typed parameters (``Params``, a subclass of :class:`Params`), each field
  with ``help`` and ``unit`` metadata (:func:`param`);
* a :class:`Policy` subclass: name, one-line summary, the scope it scans by default, the kernel
  counters it reports, and a docstring that says which kernel behaviour it models and where it
  deliberately differs;
* a *reference* runtime (readable, page by page, the executable spec) and a *fast* runtime
  (numba-jitted loops over the engine's arrays).  Both must give identical results.

The engine owns the truth (contents, frames, COW breaks); a runtime owns its scan order, its
index and per-page state, decides what to compare and merge through the engine's primitives, and
counts its work in the named units of :mod:`ksmtrace.engine.cost`.

Runtime protocol (what the replay driver calls, in this order, for every snapshot ``s``)::

    rt.on_snapshot(s, t_s)        # the engine has just applied snapshot s's page events
    rt.counters() / rt.units()    # read for the metrics row of snapshot s
    rt.run_until(t_{s+1})         # the daemon works during [t_s, t_{s+1})
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

import numpy as np

from ksmtrace.engine.cost import N_UNITS, UNIT_INDEX
from ksmtrace.errors import PolicyParamError


def param(default, help: str, unit: str = "", choices: tuple | None = None, minimum=None, maximum=None):
    """A policy parameter: default, one-line help, unit, allowed values or range."""
    return field(
        default=default,
        metadata={"help": help, "unit": unit, "choices": choices, "min": minimum, "max": maximum},
    )


@dataclass(frozen=True)
class Params:
    """Base of every policy's parameters."""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            md = f.metadata
            if md.get("choices") is not None and v not in md["choices"]:
                raise PolicyParamError(
                    f"parameter {f.name}={v!r}: must be one of {', '.join(map(str, md['choices']))}"
                )
            if md.get("min") is not None and v < md["min"]:
                raise PolicyParamError(f"parameter {f.name}={v!r}: must be >= {md['min']}")
            if md.get("max") is not None and v > md["max"]:
                raise PolicyParamError(f"parameter {f.name}={v!r}: must be <= {md['max']}")
        self.check()

    def check(self) -> None:
        """Cross-field validation (override)."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _convert(cls, name: str, ftype, raw: Any):
    if not isinstance(raw, str):
        return raw
    s = raw.strip()
    if ftype is bool or ftype == "bool":
        low = s.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise PolicyParamError(f"parameter {name}={raw!r}: expected a boolean (0/1, true/false)")
    if ftype is int or ftype == "int":
        try:
            return int(s, 0) if not s.lstrip("-").isdigit() else int(s)
        except ValueError:
            try:
                f = float(s)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
            raise PolicyParamError(f"parameter {name}={raw!r}: expected an integer") from None
    if ftype is float or ftype == "float":
        try:
            return float(s)
        except ValueError:
            raise PolicyParamError(f"parameter {name}={raw!r}: expected a number") from None
    return s


def parse_params(params_cls: type[Params], values: Mapping[str, Any] | None) -> Params:
    """Build ``params_cls`` from a mapping of (possibly string) values; unknown keys are errors."""
    values = dict(values or {})
    hints = typing.get_type_hints(params_cls)
    known = {f.name: f for f in fields(params_cls)}
    for key in values:
        if key not in known:
            raise PolicyParamError(
                f"unknown parameter {key!r} (parameters: {', '.join(sorted(known)) or 'none'})"
            )
    kwargs = {k: _convert(params_cls, k, hints.get(k, str), v) for k, v in values.items()}
    try:
        return params_cls(**kwargs)
    except TypeError as exc:
        raise PolicyParamError(str(exc)) from None


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (the CLI's ``-p key=value``)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise PolicyParamError(f"parameter {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise PolicyParamError(f"parameter {item!r}: empty key")
        out[k] = v
    return out


@dataclass
class RunContext:
    """What a runtime receives besides its parameters."""

    prep: Any  # ksmtrace.trace.prepare.Prepared
    engine: Any  # FastEngine or ReferenceEngine
    timing_ps: np.ndarray  # int64 picoseconds per cost unit (daemon units)
    hz: int  # kernel tick rate for sleep quantisation (0 = none)
    start_ns: int  # virtual time at which the daemon starts
    seed: int
    options: dict = dataclasses.field(default_factory=dict)


class Policy:
    """Base of every policy.  Subclasses set the class attributes and implement :meth:`runtime`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    default_scope: ClassVar[str] = "recorded"
    kernel_counters: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    # parameter -> (another value, scenario name, base parameters): the contract suite checks that
    # the other value changes some result on that scenario (ksmtrace.testing.scenarios)
    sensitivity: ClassVar[dict] = {}

    @classmethod
    def budget_limit(cls, params: "Params"):
        """``(counter, n)``: the counter may grow by at most n per wake-up (None: no budget)."""
        return None

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(params, Params):
            if kwargs:
                params = dataclasses.replace(params, **kwargs)
            self.params = params
        else:
            merged = dict(params or {})
            merged.update(kwargs)
            self.params = parse_params(self.Params, merged)

    def describe(self) -> dict[str, Any]:
        """Effective parameters (stored in every result)."""
        return self.params.as_dict()

    def runtime(self, ctx: RunContext):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def parameter_table(cls) -> list[dict[str, Any]]:
        hints = typing.get_type_hints(cls.Params)
        rows = []
        for f in fields(cls.Params):
            md = f.metadata
            t = hints.get(f.name, str)
            rows.append(
                {
                    "name": f.name,
                    "type": getattr(t, "__name__", str(t)),
                    "default": f.default,
                    "unit": md.get("unit", ""),
                    "choices": list(md["choices"]) if md.get("choices") else None,
                    "help": md.get("help", ""),
                }
            )
        return rows

    @classmethod
    def docstring(cls) -> str:
        import inspect

        return inspect.getdoc(cls) or ""


class ReferenceDaemon:
    """What every reference runtime's daemon shares: its cost-unit counts, its modelled busy time,
    and the timed batch (``batch`` runs one wake-up's work at ``self.now``; the work's cost under
    the timing model advances the clock, then the daemon sleeps ``sleep_ms`` as ksmd does).

    Subclasses set ``self.t_wake`` (usually ``ctx.start_ns``) and call :meth:`timed_batch`.
    """

    def __init__(self, ctx: "RunContext") -> None:
        self.ctx = ctx
        self.unit_counts = np.zeros(N_UNITS, dtype=np.int64)
        self.busy = 0
        self.now = 0
        self.t_wake = ctx.start_ns
        self._batch_units = self.unit_counts.copy()

    def charge(self, unit: str, n: int = 1) -> None:
        self.unit_counts[UNIT_INDEX[unit]] += n

    def timed_batch(self, work, sleep_ms: int) -> None:
        """One wake-up at ``self.t_wake``: charge it, run ``work()``, advance the clock."""
        from ksmtrace.engine.clock import next_wake, work_ns

        self._batch_units = self.unit_counts.copy()
        self.now = self.t_wake
        self.charge("wakeups")
        work()
        w = int(work_ns(self._batch_units, self.unit_counts, self.ctx.timing_ps))
        self.busy += w
        self.t_wake = int(next_wake(self.t_wake + w, sleep_ms, self.ctx.hz))

    def work_so_far(self) -> int:
        """Modelled ns of the batch in progress."""
        from ksmtrace.engine.clock import work_ns

        return int(work_ns(self._batch_units, self.unit_counts, self.ctx.timing_ps))

    def units(self) -> np.ndarray:
        return self.unit_counts

    def busy_ns(self) -> int:
        return self.busy
