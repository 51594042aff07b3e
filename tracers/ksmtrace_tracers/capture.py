"""The procfs capture: a :class:`~ksmtrace_tracers.session.Session` with the standard recorders.

>>> from ksmtrace_tracers.capture import Capture, CaptureOptions
>>> with Capture("out-trace", [pid], CaptureOptions(scope="mergeable")) as cap:
...     cap.snapshot()          # snapshot 0 (a keyframe)
...     step_the_workload()
...     cap.snapshot()          # snapshot 1: only pages that appeared, changed or vanished
>>> # the trace is closed (manifest complete, end_reason "closed") when the block ends

The recorders, in the order their hooks run:

* :class:`~ksmtrace_tracers.groundtruth.GroundTruth` — the ``ksm`` table (when the host has KSM
  and ``ground_truth`` is on);
* :class:`~ksmtrace_tracers.procfs_reader.ProcfsReader` — ``pages``, ``processes``, ``vmas``,
  ``ksm_stat`` (and ``contents``);
* :class:`~ksmtrace_tracers.pagecache.PageCacheRecorder` — ``files`` and ``filepages`` (with
  ``--scope all`` or ``--files PATH``; the reader adds ``vma_files`` with ``--scope all``);
* :class:`~ksmtrace_tracers.kernel_events.KernelEvents` — ``faults`` and ``ksm_events`` (root, when
  tracefs and the events exist).

:func:`run_capture` is the CLI loop (:func:`~ksmtrace_tracers.session.run_session`).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ksmtrace.progress import ProgressFn
from ksmtrace_tracers import TRACER_NAME, TRACER_VERSION, ksmsysfs
from ksmtrace_tracers import pagemap as PM
from ksmtrace_tracers.groundtruth import GroundTruth
from ksmtrace_tracers.kernel_events import KernelEvents
from ksmtrace_tracers.options import CaptureOptions
from ksmtrace_tracers.pagecache import PageCacheRecorder
from ksmtrace_tracers.procfs_reader import ProcfsReader
from ksmtrace_tracers.session import Recorder, Session, run_session

__all__ = ["Capture", "CaptureOptions", "host_capabilities", "run_capture"]


def host_capabilities() -> dict[str, Any]:
    """What this host lets a capture see (recorded in the manifest, shown by ``info``)."""
    kpf = PM.KpageflagsReader()
    caps = {
        "root": os.geteuid() == 0,
        "pfn_readable": PM.pfn_readable(),
        "kpageflags_readable": kpf.readable,
        "soft_dirty": PM.soft_dirty_available(),
        "ksm_available": ksmsysfs.available(),
    }
    kpf.close()
    return caps


class Capture(Session):
    """A capture in progress through /proc: one trace directory, snapshots taken on demand.

    ``Capture(output, targets, options)``: ``targets`` is a :class:`TargetSpec`, a pid or a list
    of pids.  Raises :class:`~ksmtrace.errors.TargetError` when a target does not exist or
    nothing matches, :class:`~ksmtrace.errors.CaptureError` for a bad option or output.
    """

    tracer_info = {"name": TRACER_NAME, "version": TRACER_VERSION, "module": "ksmtrace_tracers.procfs"}

    def _recorders(self) -> list[Recorder]:
        opts = self.options
        out: list[Recorder] = []
        gt = opts.ground_truth and ksmsysfs.available()
        if gt:
            out.append(GroundTruth(opts.ksm_sample_interval))
        self.pages = ProcfsReader(opts, ground_truth=gt, note=self.note)
        out.append(self.pages)
        if opts.scope == "all" or opts.files:
            out.append(PageCacheRecorder(tuple(opts.files), opts.scope == "all", self.pages))
        self.kernel_events = KernelEvents(opts, self.note, self.pages.state_of)
        out.append(self.kernel_events)
        return out

    # the procfs reader's state, as the tests and tools see it
    @property
    def pool(self):
        pages = getattr(self, "pages", None)
        return pages.pool if pages is not None else None

    @property
    def denied(self) -> set[int]:
        return self.pages.denied

    @property
    def coverage(self) -> dict[int, dict[str, Any]]:
        return self.pages.coverage

    @property
    def sd_enabled(self) -> bool:
        return self.pages.sd_enabled

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        secs = out.get("capture_seconds") or 0.0
        present = out.get("present_pages", 0)
        out["gib_per_s"] = (present * 4096 / 2**30 / secs) if secs > 0 else None
        out["pages_per_s"] = (present / secs) if secs > 0 else None
        return out


def run_capture(
    options: CaptureOptions,
    progress: ProgressFn | None = None,
    *,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The capture loop over a :class:`Capture` (see :func:`~ksmtrace_tracers.session.run_session`)."""
    return run_session(Capture, options, progress, on_snapshot=on_snapshot)
