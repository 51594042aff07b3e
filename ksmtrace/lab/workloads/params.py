"""Workload parameters: frozen dataclasses with typed, documented fields, built from keyword
arguments (or strings, as a command line would pass them) with one-line errors."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from ksmtrace.errors import WorkloadError


def param(default, help: str):  # noqa: A002 - "help" is the natural name here
    """A dataclass field with a default and a one-line help text (``metadata["help"]``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CommonParams:
    """Parameters every workload takes."""

    seed: int = param(0, "seed of every content and schedule choice (>= 0)")
    duration: float | None = param(
        None, "seconds after READY after which the processes exit by themselves; "
              "None = run until stopped")
    thp: bool = param(False, "madvise MADV_HUGEPAGE instead of MADV_NOHUGEPAGE")

    def __post_init__(self):
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        if self.duration is not None:
            check(self.duration > 0, "duration", self.duration, "must be > 0 (or None)")


def check(ok: bool, name: str, value, requirement: str) -> None:
    """Raise WorkloadError ``parameter NAME=VALUE REQUIREMENT`` unless ``ok``."""
    if not ok:
        raise WorkloadError(f"parameter {name}={value!r} {requirement}")


def check_fraction(name: str, value: float) -> None:
    check(0.0 <= value <= 1.0, name, value, "must be between 0 and 1")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(workload: str, name: str, value, tp):
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        tp = args[0]
    if value is None or (optional and isinstance(value, str)
                         and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise WorkloadError(f"parameter {name} of workload {workload!r} cannot be None")
    bad = WorkloadError(f"parameter {name}={value!r} of workload {workload!r} "
                        f"must be {'an' if tp is int else 'a'} {tp.__name__}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip(), 0)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(result):
            raise bad
        return result
    return value  # pragma: no cover - only int/float/bool fields exist


def build_params(cls, workload: str, given: dict):
    """``cls(**given)`` after rejecting unknown names and coercing values to the field types.

    Raises WorkloadError with a one-line message on an unknown name or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise WorkloadError(f"unknown parameter {unknown[0]!r} for workload {workload!r}; "
                            f"known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(workload, name, value, hints[name]) for name, value in given.items()}
    return cls(**values)


def describe(cls) -> list[dict]:
    """``[{"name", "type", "default", "help"}]`` for every field of a Params class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out.append({"name": f.name,
                    "type": getattr(tp, "__name__", None) or str(tp).replace("typing.", ""),
                    "default": f.default, "help": f.metadata.get("help", "")})
    return out
