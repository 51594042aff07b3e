"""Everything a capture can be told: one flat set of options, as the CLI and ``tracer.options(**kw)``
give them.  The session reads the session fields (output, targets, timing, --freeze, priority);
each recorder reads its own (the procfs reader: scope, hashing, reading; ground truth; kernel
events)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ksmtrace.errors import CaptureError
from ksmtrace_tracers.procmaps import SCOPES


@dataclass
class CaptureOptions:
    """Everything a capture can be told.  ``output`` and ``targets`` may instead be given to
    :class:`~ksmtrace_tracers.capture.Capture` directly."""

    # --- the session ------------------------------------------------------------------------
    output: str | os.PathLike | None = None
    targets: Any = None  # TargetSpec, a pid, or pids
    interval: float = 1.0  # seconds between snapshot starts (run_capture)
    duration: float | None = None  # run_capture: stop after this many seconds
    count: int | None = None  # run_capture: stop after this many snapshots
    keyframe_every: int = 0
    freeze: bool = False
    freeze_unsafe: bool = False  # also stop ancestors, session leaders, init, sshd, other users' processes
    command_line: list[str] | None = None
    hold_frozen_s: float = 0.0  # test hook: stay frozen this long after reading (env KSMTRACE_TEST_HOLD_FROZEN)
    notify: Callable[[str], None] | None = None  # where notes go (default: "ksmtrace: note: ..." on stderr)
    nice: int | None = None  # run the capture (all its threads and workers) at this nice value
    sched_idle: bool = False  # run it under SCHED_IDLE: only on CPU time nothing else wants
    # --- the procfs reader ------------------------------------------------------------------
    scope: str = "anon"  # mergeable | anon | all
    fingerprints: bool = False
    contents: bool = False
    hash_key: str | os.PathLike | None = None  # key file shared across hosts
    key: int | None = None  # an explicit key (library use; never stored)
    soft_dirty: bool = True  # use soft-dirty when the kernel has it
    workers: int = 0
    # --- the page cache ---------------------------------------------------------------------
    files: tuple[str, ...] = ()  # --files PATH: also record the resident page cache of the files under PATH
    # --- ground truth -----------------------------------------------------------------------
    ground_truth: bool = True  # sample the real KSM when /sys/kernel/mm/ksm exists
    ksm_sample_interval: float | None = None
    # --- kernel events ----------------------------------------------------------------------
    kernel_events: bool | None = None  # None: when root and the events exist; False: never
    kernel_events_buffer_kb: int = 4096  # per CPU and trace instance
    tracefs: str | os.PathLike | None = None  # tracefs to use (default: $KSMTRACE_TRACEFS, else where it is mounted)

    def validate(self) -> None:
        if not (self.interval > 0):
            raise CaptureError(f"--interval must be > 0 (got {self.interval})")
        if self.duration is not None and not (self.duration >= 0):
            raise CaptureError(f"--duration must be >= 0 (got {self.duration})")
        if self.count is not None and self.count < 1:
            raise CaptureError(f"--count must be >= 1 (got {self.count})")
        if self.scope not in SCOPES:
            raise CaptureError(f"--scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if self.keyframe_every < 0:
            raise CaptureError(f"--keyframe-every must be >= 0 (got {self.keyframe_every})")
        if self.ksm_sample_interval is not None and not (self.ksm_sample_interval > 0):
            raise CaptureError(f"--ksm-sample-interval must be > 0 (got {self.ksm_sample_interval})")
        if self.nice is not None and not (-20 <= self.nice <= 19):
            raise CaptureError(f"--nice must be between -20 and 19 (got {self.nice})")
        if self.freeze_unsafe and not self.freeze:
            raise CaptureError("--freeze-unsafe only makes sense with --freeze")
        if not (64 <= self.kernel_events_buffer_kb <= 1 << 20):
            raise CaptureError(f"--kernel-events-buffer must be 64..1048576 KiB (got {self.kernel_events_buffer_kb})")
        for path in self.files:
            if not os.path.exists(path):
                raise CaptureError(f"--files {path}: no such file or directory")
        if self.workers < 0:
            raise CaptureError(f"--workers must be >= 0 (got {self.workers})")
