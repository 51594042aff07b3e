"""Progress reporting for long work (capture, replay, sweeps): one updating line on stderr.

Shown when stderr is a terminal (or ``KSMTRACE_PROGRESS=1``), never with ``quiet``.  The library
takes any callable ``progress(done, total, message)``; this is the CLI's implementation.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

ProgressFn = Callable[[float, float, str], None]


class Progress:
    def __init__(self, label: str, quiet: bool = False, stream=None, min_interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        forced = os.environ.get("KSMTRACE_PROGRESS")
        if forced is not None:
            enabled = forced not in ("0", "", "no")
        else:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled and not quiet
        self.label = label
        self.t0 = time.monotonic()
        self._last = 0.0
        self.min_interval = min_interval
        self._shown = False

    def __call__(self, done: float, total: float, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval and done < total:
            return
        self._last = now
        el = now - self.t0
        if total and total > 0:
            frac = min(1.0, done / total)
            eta = (el / frac - el) if frac > 0 else 0.0
            bar = "#" * int(frac * 20)
            text = f"\r{self.label} [{bar:<20}] {done:.0f}/{total:.0f} {message}  {el:5.1f}s eta {eta:5.1f}s"
        else:
            text = f"\r{self.label} {done:.0f} {message}  {el:5.1f}s"
        self.stream.write(text[:160].ljust(80))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\n")
            self.stream.flush()


def noop(done: float, total: float, message: str = "") -> None:
    return None


def make(progress: Optional[ProgressFn]) -> ProgressFn:
    return progress if progress is not None else noop
