"""The ``procfs`` tracer: the facade the CLI loads through the ``ksmtrace.tracers`` entry point.

>>> from importlib.metadata import entry_points
>>> tracer = entry_points(group="ksmtrace.tracers")["procfs"].load()()
>>> opts = tracer.options(output="t", targets=tracer.targets(pids=[1234]), count=3)
>>> summary = tracer.run(opts, progress=None)

The CLI never imports :mod:`ksmtrace_tracers` by name; everything it needs is here.
"""
from __future__ import annotations

from typing import Any

from ksmtrace.progress import ProgressFn
from ksmtrace_tracers import TRACER_NAME, TRACER_VERSION
from ksmtrace_tracers.capture import Capture, host_capabilities, run_capture
from ksmtrace_tracers.options import CaptureOptions
from ksmtrace_tracers.procmaps import SCOPES
from ksmtrace_tracers.targets import TargetSpec


class ProcfsTracer:
    """Captures live processes through /proc (pagemap, kpageflags, /proc/PID/mem)."""

    name = TRACER_NAME
    version = TRACER_VERSION
    scopes = SCOPES
    description = __doc__

    def targets(
        self,
        pids=(),
        names=(),
        trees=(),
        cgroups=(),
        all: bool = False,
    ) -> TargetSpec:
        return TargetSpec(tuple(int(p) for p in pids), tuple(names), tuple(int(p) for p in trees), tuple(cgroups), bool(all))

    def options(self, **kw: Any) -> CaptureOptions:
        """CaptureOptions from keyword arguments (unknown keys are a TypeError)."""
        return CaptureOptions(**kw)

    def open(self, output, targets, options: CaptureOptions | None = None, progress: ProgressFn | None = None) -> Capture:
        """A :class:`Capture` for stepping snapshots by hand."""
        return Capture(output, targets, options, progress=progress)

    def run(self, options: CaptureOptions, progress: ProgressFn | None = None) -> dict[str, Any]:
        """The capture loop (:func:`run_capture`); returns the summary."""
        return run_capture(options, progress)

    def capabilities(self) -> dict[str, Any]:
        """What a capture on this host can see (root, PFNs, kpageflags, soft-dirty, KSM)."""
        return host_capabilities()
