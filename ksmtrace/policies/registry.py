"""Policy discovery through the ``ksmtrace.policies`` entry-point group (built-ins included).

A third-party package registers a policy exactly as ksmtrace registers its own::

    [project.entry-points."ksmtrace.policies"]
    mypolicy = "mypackage.mypolicy:MyPolicy"

``KSMTRACE_LOAD_PLUGINS=none`` loads only ksmtrace's own policies (tests use it);
``KSMTRACE_LOAD_PLUGINS=a,b`` loads only the named entry points besides the built-ins.
"""
from __future__ import annotations

import os
from importlib.metadata import entry_points

from ksmtrace.errors import PolicyNotFoundError
from ksmtrace.policies.base import Policy

_REGISTRY: dict[str, type[Policy]] | None = None
_ORIGIN: dict[str, str] = {}
_BROKEN: dict[str, str] = {}


def _load() -> dict[str, type[Policy]]:
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    reg: dict[str, type[Policy]] = {}
    allow = os.environ.get("KSMTRACE_LOAD_PLUGINS")
    allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip() and a.strip() != "none"}
    for ep in sorted(entry_points(group="ksmtrace.policies"), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        builtin = ep.value.startswith("ksmtrace.")
        if not builtin and allowed is not None and ep.name not in allowed:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break the tool
            _BROKEN[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            _BROKEN[ep.name] = "entry point is not a ksmtrace Policy subclass"
            continue
        name = cls.name or ep.name
        if name in reg and reg[name] is not cls:
            _BROKEN[ep.name] = f"name {name!r} already registered by {_ORIGIN[name]}"
            continue
        reg[name] = cls
        _ORIGIN[name] = f"{dist} ({ep.value})"
    _REGISTRY = reg
    return reg


def list_policies() -> list[type[Policy]]:
    return [cls for _, cls in sorted(_load().items())]


def policy_names() -> list[str]:
    return sorted(_load())


def get_policy(name: str) -> type[Policy]:
    reg = _load()
    if name in reg:
        return reg[name]
    for cls in reg.values():
        if name in cls.aliases:
            return cls
    raise PolicyNotFoundError(f"unknown policy {name!r} (policies: {', '.join(sorted(reg))})")


def origin(name: str) -> str:
    _load()
    return _ORIGIN.get(name, "?")


def broken_plugins() -> dict[str, str]:
    _load()
    return dict(_BROKEN)
