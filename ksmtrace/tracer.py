"""The library's one door to capture backends: a tracer is found by name in the
``ksmtrace.tracers`` entry-point group (``procfs = ksmtrace_tracers.procfs:ProcfsTracer``), so the
library never imports capture code by name and never at import time (see ``docs/packaging.md``).

:class:`Tracer` is the one small surface the CLI (``ksmtrace capture``) and ``validate`` use;
whatever records the memory — /proc reads, kernel events, a future eBPF or CRIU-image backend —
sits behind it as a recorder of the tracer's capture session.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, Protocol, runtime_checkable

from ksmtrace.errors import CaptureError

TRACER_GROUP = "ksmtrace.tracers"


@runtime_checkable
class Tracer(Protocol):
    """What a capture backend offers (``ksmtrace_tracers.procfs.ProcfsTracer`` is the reference).

    ``targets(pids, names, trees, cgroups, all)`` builds a target selection; ``options(**kw)`` the
    capture options (unknown keys are a TypeError); ``open(output, targets, options)`` a capture to
    step by hand (a context manager with ``snapshot()`` and ``close(reason)``); ``run(options,
    progress)`` the capture loop, returning the summary (with ``exit_status``);
    ``capabilities()`` what a capture on this host can see.
    """

    name: str
    version: str

    def targets(self, pids=(), names=(), trees=(), cgroups=(), all: bool = False) -> Any: ...

    def options(self, **kw: Any) -> Any: ...

    def open(self, output, targets, options=None, progress: Callable | None = None) -> Any: ...

    def run(self, options, progress: Callable | None = None) -> dict[str, Any]: ...

    def capabilities(self) -> dict[str, Any]: ...


def load_tracer(name: str = "procfs") -> Tracer:
    """An instance of the tracer registered as ``name`` in the ``ksmtrace.tracers`` group."""
    eps = list(entry_points(group=TRACER_GROUP))
    for ep in eps:
        if ep.name == name:
            try:
                tracer = ep.load()()
            except ImportError as exc:
                raise CaptureError(f"tracer {name!r} cannot be loaded: {exc}") from None
            if not isinstance(tracer, Tracer):
                raise CaptureError(f"tracer {name!r} ({ep.value}) does not offer the Tracer surface")
            return tracer
    have = ", ".join(sorted(ep.name for ep in eps)) or "none"
    raise CaptureError(f"no tracer named {name!r} is installed (installed tracers: {have})")
