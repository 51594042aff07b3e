"""The policy interface.

A policy is one unit (a module, or a package for the larger ones) holding:

* a frozen dataclass of typed parameters (``Params``, a subclass of :class:`Params`), each field
  with ``help`` and ``unit`` metadata (:func:`param`);
* a :class:`Policy` subclass: name, one-line summary, the scope it scans by default, the kernel
  counters it reports, and a docstring that says which kernel behaviour it models and where it
  deliberately differs;
* its **readable runtime** (``Policy.Runtime``): plain Python written against the engine's
  primitive surface (:class:`ksmtrace.engine.api.Engine`), usually a
  :class:`~ksmtrace.engine.daemon.Daemon` subclass.  It is the policy, and it runs on both engines;
* optionally a **numba kernel** (``Policy.kernel``, ``"module:Class"``, imported only when used):
  the accelerator of the readable runtime's hot loop, on the fast engine's arrays, built on the
  shared kernel daemon (:mod:`ksmtrace.engine.daemon`) with parameter slots generated from the same
  ``Params``.  The differential suite holds it equal to the readable runtime.

The engine owns the truth (contents, frames, COW breaks); a runtime owns its scan order, its
index and per-page state, decides what to compare and merge through the engine's primitives, and
counts its work in the named units of :mod:`ksmtrace.engine.cost`.  The driver's calls are
:class:`ksmtrace.engine.api.Runtime`.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from ksmtrace.engine.api import RUNTIMES, RunContext
from ksmtrace.errors import KsmtraceError, PolicyParamError

__all__ = ["Params", "Policy", "RunContext", "param", "parse_params", "parse_assignments"]


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


def params_table(params_cls: type[Params]) -> list[dict[str, Any]]:
    """One row per parameter of ``params_cls``: name, type, default, unit, choices, help."""
    hints = typing.get_type_hints(params_cls)
    rows = []
    for f in fields(params_cls):
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


class Policy:
    """Base of every policy.  Subclasses set the class attributes and implement :meth:`runtime`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    default_scope: ClassVar[str] = "recorded"
    #: the runtime stays consistent when the engine applies a recorded write fault between two
    #: snapshots (``--writes faults``): it re-reads page state from the engine, or it hears of the
    #: write through an ``on_fault_write(pg, now)`` hook.  A policy that keeps its own per-page view
    #: and has no such hook says False: its replays take the writes at the snapshots.
    fault_writes: ClassVar[bool] = True
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

    #: the readable runtime class, constructed as ``Runtime(params, ctx, **runtime_options())``
    Runtime: ClassVar[type | None] = None
    #: optional numba kernel runtime, ``"package.module:Class"`` (same constructor)
    kernel: ClassVar[str | None] = None

    def runtime_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the runtime's constructor (values derived from the
        parameters that the runtime should not have to know how to derive)."""
        return {}

    def runtime(self, ctx: RunContext):
        """The runtime that replays this policy on ``ctx.engine`` (see ``RunContext.runtime``)."""
        choice = getattr(ctx, "runtime", "auto")
        if choice not in RUNTIMES:
            raise KsmtraceError(f"unknown runtime {choice!r} (runtimes: {', '.join(RUNTIMES)})")
        use_kernel = bool(self.kernel) and ctx.engine.kind == "fast" and choice in ("auto", "kernel")
        if choice == "kernel" and not use_kernel:
            why = "it has none" if not self.kernel else "the reference engine runs readable runtimes only"
            raise KsmtraceError(f"policy {self.name!r}: no numba kernel to run ({why})")
        if use_kernel:
            mod, _, cls_name = self.kernel.partition(":")
            cls = getattr(importlib.import_module(mod), cls_name)
        elif self.Runtime is not None:
            cls = self.Runtime
        else:  # pragma: no cover - a policy must define one
            raise KsmtraceError(f"policy {self.name!r} defines no runtime")
        return cls(self.params, ctx, **self.runtime_options())

    @classmethod
    def has_kernel(cls) -> bool:
        return bool(cls.kernel)

    @classmethod
    def parameter_table(cls) -> list[dict[str, Any]]:
        return params_table(cls.Params)

    @classmethod
    def docstring(cls) -> str:
        import inspect

        return inspect.getdoc(cls) or ""
