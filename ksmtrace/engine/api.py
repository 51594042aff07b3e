"""The two contracts of a replay: what an engine offers a policy, and what a policy's runtime offers
the replay driver.

The engine owns the truth about pages and frames (contents, which frame each candidate page
maps, KSM pages, COW breaks, all accounting).  A policy's runtime owns its scan order, its index
and per-page state, decides what to compare and merge through the engine's primitives, and counts
its work in the named units of :mod:`ksmtrace.engine.cost`.

Both engines (:class:`~ksmtrace.engine.fast.FastEngine`, numpy arrays, the default; and
:class:`~ksmtrace.engine.reference.ReferenceEngine`, the page-by-page executable spec) implement
:class:`Engine`, so a runtime written against it runs on either.  A numba kernel (a policy's
optional accelerator) works on the fast engine's arrays directly (``FastEngine.E``) through the
jitted twins of these primitives in :mod:`ksmtrace.engine.state`.

Page ids are dense indices into the prepared trace (``prep``); frame ids are engine-specific
(compare them, key dictionaries by them, never do arithmetic on them); frame 0 is the kernel's
shared zero page.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ksmtrace.trace.prepared import EV_APPEAR, EV_GONE, EV_THP, EV_UNMERGE, EV_WRITE

ZERO_FRAME = 0

__all__ = [
    "EV_APPEAR", "EV_GONE", "EV_THP", "EV_UNMERGE", "EV_WRITE", "ZERO_FRAME", "Engine", "Runtime",
    "RunContext", "RUNTIMES",
]

#: which implementation of a policy runs: ``auto`` (its numba kernel on the fast engine when it has
#: one, else its readable runtime), ``readable`` (always the readable runtime), ``kernel`` (the
#: kernel; an error if the policy has none or the engine is the reference engine)
RUNTIMES = ("auto", "readable", "kernel")


@runtime_checkable
class Engine(Protocol):
    """The primitive surface every engine offers a runtime."""

    kind: str  # "fast" or "reference"
    prep: Any  # the prepared trace (ksmtrace.trace.prepared.Prepared)
    now: int  # virtual time (ns) of the snapshot applied last

    # --- queries ---------------------------------------------------------------------------------
    def is_candidate(self, pg: int) -> bool:
        """The page is present and in scope now."""

    def cid(self, pg: int) -> int:
        """The page's content id now (dense; 0 is the all-zero page), -1 if not a candidate."""

    def frame(self, pg: int) -> int:
        """The frame the page maps (ZERO_FRAME: the zero page), -1 if not a candidate."""

    def page_is_ksm(self, pg: int) -> bool:
        """The page maps a KSM page (not the zero page)."""

    def frame_alive(self, f: int, gen: int) -> bool:
        """Keyhole check: frame ``f`` is still the KSM page of generation ``gen``."""

    def frame_refs(self, f: int) -> int:
        """Candidate pages mapping frame ``f`` now (its mapcount, as far as the trace sees)."""

    # --- proposals (the engine checks each; a violation fails the run) ---------------------------
    def stabilize(self, pg: int) -> int:
        """Make the frame ``pg`` maps a KSM page (write-protect it); returns its generation."""

    def merge(self, pg: int, f: int, now: int) -> bool:
        """Map ``pg`` onto KSM page ``f`` (equal content required)."""

    def merge_zero(self, pg: int, now: int) -> bool:
        """Map the all-zero page ``pg`` onto the kernel zero page."""

    def split_thp(self, pg: int, remap_zero: bool) -> int:
        """Split the huge page ``pg`` belongs to; with ``remap_zero`` (6.12+) its all-zero subpages
        map the zero page.  Returns the number of subpages remapped."""

    # --- the driver's side -----------------------------------------------------------------------
    def apply_snapshot(self, s: int, now: int) -> int:
        """Apply snapshot ``s``'s page events at ``now``; returns the COW breaks of KSM pages they
        caused (writes to pages the policy mapped to the zero page count in ``cow_zero``)."""

    def write_fault(self, pg: int, cid: int, now: int, until: int) -> int:
        """A recorded write fault on ``pg`` at ``now`` (``--writes faults``), leaving content ``cid``
        (-1: the same bytes): the page ends on a frame of its own (a KSM page or a frame a fork
        shares is copied; the policy's zero page gives a fresh page, ``cow_zero``), and its
        ``EV_WRITE`` at the snapshot at ``until`` (the trace's next) counts as already applied.  Returns the COW breaks of
        KSM pages (0 or 1), -1 when the page is not a candidate now."""

    def counters(self) -> dict[str, int]:
        """The engine's counters (ksmtrace.engine.state.COUNTER_NAMES)."""

    def per_process(self) -> tuple[np.ndarray, np.ndarray]:
        """(candidate pages, merged pages) per process now."""

    def latency_hist(self) -> np.ndarray:
        """Merge-latency histogram (ksmtrace.engine.state.lat_bin bins)."""

    def first_merge_ns(self) -> np.ndarray:
        """Per page, the virtual time of its first merge (-1: never merged)."""


@runtime_checkable
class Runtime(Protocol):
    """What the replay driver calls, in this order, for every snapshot ``s``::

        rt.on_snapshot(s, t_s)        # the engine has just applied snapshot s's page events
        rt.counters() / rt.units()    # read for the metrics row of snapshot s
        rt.run_until(t_{s+1})         # the daemon works during [t_s, t_{s+1})

    A kernel may also define ``apply_snapshot(s, now) -> cow breaks``: it then applies the
    snapshot's events itself, fused with its own step and through the engine's own code (the
    oracle's fast route, :mod:`ksmtrace.policies.oracle.kernel`), and the driver calls it instead
    of the engine's -- except with recorded write faults, when the engine applies the snapshot and
    the kernel's ``on_snapshot`` does its step unfused.

    With ``--writes faults`` the driver splits the interval at every recorded write fault:
    ``rt.run_until(t_fault)``, the engine's ``write_fault``, then ``rt.on_fault_write(pg, t_fault)``
    if the runtime has that (optional) hook, and on to the next fault or ``t_{s+1}``.
    """

    def on_snapshot(self, s: int, now: int) -> None: ...

    def run_until(self, t_end: int) -> None: ...

    def counters(self) -> dict[str, Any]:
        """The policy's own counters (its ``kernel_counters``), as its kernel would export them."""

    def units(self) -> np.ndarray:
        """Cumulative work per cost unit (ksmtrace.engine.cost.UNIT_NAMES order)."""

    def busy_ns(self) -> int:
        """Cumulative modelled daemon busy time."""

    def extras(self) -> dict[str, Any]:
        """Anything else worth keeping in the result (tree sizes, ...)."""


@dataclasses.dataclass
class RunContext:
    """What a runtime receives besides its parameters."""

    prep: Any  # ksmtrace.trace.prepared.Prepared
    engine: Any  # an Engine
    timing_ps: np.ndarray  # int64 picoseconds per cost unit (daemon units)
    hz: int  # kernel tick rate for sleep quantisation (0 = none)
    start_ns: int  # virtual time at which the daemon starts
    seed: int
    runtime: str = "auto"  # one of RUNTIMES
    options: dict = dataclasses.field(default_factory=dict)
    trace: Any = None  # the opened trace (ksmtrace.trace.reader.Trace), for tables prep does not hold
    wake_wait_ns: int = 0  # mean wait for a CPU after each wake-up (ksmtrace.engine.clock.wake_wait)
