"""The library's one door to capture backends: a tracer is found by name in the
``ksmtrace.tracers`` entry-point group (``procfs = ksmtrace_tracers.procfs:ProcfsTracer``), so the
library never imports capture code by name and never at import time (see ``docs/packaging.md``)."""
from __future__ import annotations

from importlib.metadata import entry_points

from ksmtrace.errors import CaptureError

TRACER_GROUP = "ksmtrace.tracers"


def load_tracer(name: str = "procfs"):
    """An instance of the tracer registered as ``name`` in the ``ksmtrace.tracers`` group."""
    eps = list(entry_points(group=TRACER_GROUP))
    for ep in eps:
        if ep.name == name:
            try:
                return ep.load()()
            except ImportError as exc:
                raise CaptureError(f"tracer {name!r} cannot be loaded: {exc}") from None
    have = ", ".join(sorted(ep.name for ep in eps)) or "none"
    raise CaptureError(f"no tracer named {name!r} is installed (installed tracers: {have})")
