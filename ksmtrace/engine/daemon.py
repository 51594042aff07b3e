"""The scanner daemon every policy runs on: wake-ups, the clock, the budget's cost, cost units.

A policy's daemon (ksmd, pksmd, uksmd, ESX's page-sharing thread) wakes at a virtual time, does a
batch of work, and sleeps.  The work is counted in the named units of :mod:`ksmtrace.engine.cost`;
the timing cost model turns the batch's units into the time it takes, which advances the clock
before the sleep (:func:`ksmtrace.engine.clock.next_wake`), so aggressive settings scan slower than
budget ÷ sleep, as on a real host.  This module is that skeleton, written once, in two faces:

* :class:`Daemon` — for readable runtimes (plain Python): ``charge(unit, n)``, ``timed_batch(work,
  sleep_ms)``, ``work_so_far()``, ``units()``, ``busy_ns()``.
* the **kernel block** — for numba kernels: one int64 array ``sc`` whose first slots are the
  daemon's (``D_*``: next wake-up, busy time, the batch's start, error flag; then the unit counts
  at ``DU``, the counts at the batch start at ``DB``, picoseconds per unit at ``DT``), followed by
  the policy's own scalars from ``D_END`` on and its parameters at an offset it chooses.
  :func:`wake_up`, :func:`work_so_far` and :func:`sleep` are the loop's steps (inlined), and
  :class:`KernelRuntime` is the Python object around a kernel (units, busy time, error check,
  counters by name).  :func:`param_slots` and :func:`params_array` generate a kernel's parameter
  slots from the policy's ``Params`` dataclass, so a parameter keeps its name down to the loop::

      P = param_slots(KsmParams, derived=("hz",))      # P.pages_to_scan == 0, ..., P.hz == 12
      ... sc[OP + P.pages_to_scan] ...                  # in the jitted loop

A kernel's loop is therefore::

      while wake_up(sc, t_end):
          do_the_policys_batch(...)
          sleep(sc, sc[OP + P.sleep_millisecs], sc[OP + P.hz])
"""
from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any, Callable, Mapping

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine.clock import next_wake, work_ns
from ksmtrace.engine.cost import N_UNITS, UNIT_INDEX
from ksmtrace.errors import PolicyContractError

U_WAKEUPS = UNIT_INDEX["wakeups"]


# =================================================================================================
# The readable face
# =================================================================================================
class Daemon:
    """What every readable runtime's daemon shares: its cost-unit counts, its modelled busy time,
    and the timed batch (``timed_batch`` runs one wake-up's work at ``self.now``; the work's cost
    under the timing model advances the clock, then the daemon sleeps ``sleep_ms``).

    Subclasses set ``self.t_wake`` when the daemon should first wake (``ctx.start_ns`` by default)
    and call :meth:`timed_batch` from their ``run_until``.
    """

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.unit_counts = np.zeros(N_UNITS, dtype=np.int64)
        self.busy = 0
        self.now = 0
        self.t_wake = ctx.start_ns
        self._batch_units = self.unit_counts.copy()

    def charge(self, unit: str, n: int = 1) -> None:
        self.unit_counts[UNIT_INDEX[unit]] += n

    def timed_batch(self, work: Callable[[], None], sleep_ms: int) -> None:
        """One wake-up at ``self.t_wake``: charge it, run ``work()``, advance the clock."""
        self._batch_units = self.unit_counts.copy()
        self.now = self.t_wake
        self.charge("wakeups")
        work()
        w = int(work_ns(self._batch_units, self.unit_counts, self.ctx.timing_ps))
        self.busy += w
        self.t_wake = int(next_wake(self.t_wake + w, sleep_ms, self.ctx.hz))

    def work_so_far(self) -> int:
        """Modelled ns of the batch in progress."""
        return int(work_ns(self._batch_units, self.unit_counts, self.ctx.timing_ps))

    def units(self) -> np.ndarray:
        return self.unit_counts

    def busy_ns(self) -> int:
        return self.busy

    def extras(self) -> dict:
        return {}


class NoDaemon:
    """A runtime without a scanner (the oracle): no work, no time."""

    def run_until(self, t_end: int) -> None:
        return None

    def counters(self) -> dict:
        return {}

    def units(self) -> np.ndarray:
        return np.zeros(N_UNITS, dtype=np.int64)

    def busy_ns(self) -> int:
        return 0

    def extras(self) -> dict:
        return {}


# =================================================================================================
# The kernel face: the daemon's slots at the head of a kernel's scalar array
# =================================================================================================
D_TWAKE = 0  # virtual time (ns) of the next wake-up
D_BUSY = 1  # cumulative modelled busy time (ns)
D_NOW = 2  # virtual time of the batch in progress (its wake-up)
D_WAKES = 3  # wake-ups so far
D_ERR = 4  # a kernel's internal error code (0 = none); the runtime raises on it
D_IDLE = 5  # 1 = waiting for work (set and cleared by the policy)
N_DAEMON = 8
DU = N_DAEMON  # cumulative unit counts
DB = DU + N_UNITS  # unit counts at the start of the batch in progress
DT = DB + N_UNITS  # picoseconds per unit (the timing model)
D_END = DT + N_UNITS  # the policy's own scalars start here


def scalar_slots(n: int) -> range:
    """Slot numbers of a kernel's ``n`` own scalars (after the daemon's)."""
    return range(D_END, D_END + n)


def new_block(n_scalars: int, n_params: int, ctx, extra: int = 0) -> np.ndarray:
    """A kernel's scalar array: the daemon's slots, ``n_scalars`` of the policy's, ``n_params``
    parameter slots (at ``D_END + n_scalars``), then ``extra`` slots for the kernel's own use."""
    sc = np.zeros(D_END + n_scalars + n_params + extra, np.int64)
    sc[D_TWAKE] = ctx.start_ns
    sc[DT : DT + N_UNITS] = ctx.timing_ps
    return sc


@njit(inline="always")
def wake_up(sc, t_end):
    """Start the next batch if the daemon wakes before ``t_end``; False when it does not."""
    if sc[D_TWAKE] >= t_end:
        return False
    for i in range(N_UNITS):
        sc[DB + i] = sc[DU + i]
    sc[D_NOW] = sc[D_TWAKE]
    sc[D_WAKES] += 1
    sc[DU + U_WAKEUPS] += 1
    return True


@njit(inline="always")
def work_so_far(sc):
    """Modelled ns of the batch in progress (its units under the timing model)."""
    tot = 0
    for i in range(N_UNITS):
        tot += (sc[DU + i] - sc[DB + i]) * sc[DT + i]
    return tot // 1000


@njit(inline="always")
def sleep(sc, sleep_ms, hz):
    """End the batch: its work advances the clock, then the daemon sleeps ``sleep_ms``."""
    w = work_so_far(sc)
    sc[D_BUSY] += w
    sc[D_TWAKE] = next_wake(sc[D_TWAKE] + w, sleep_ms, hz)


def param_slots(params_cls: type, derived: tuple[str, ...] = ()) -> tuple:
    """A namedtuple instance: every field of ``params_cls`` (in order), then ``derived`` names,
    each mapped to its slot number.  Used as a compile-time constant in a kernel."""
    names = [f.name for f in dataclasses.fields(params_cls)] + list(derived)
    return namedtuple(f"{params_cls.__name__}Slots", names)(*range(len(names)))


def params_array(params: Any, slots: tuple, derived: Mapping[str, int] | None = None) -> np.ndarray:
    """The int64 parameter array of ``slots`` from a ``Params`` instance: booleans and integers as
    they are, a string with ``choices`` as its index in them; ``derived`` gives the extra slots'
    values and overrides any field whose value is not an integer (floats, free strings)."""
    derived = dict(derived or {})
    fields = {f.name: f for f in dataclasses.fields(params)}
    out = np.zeros(len(slots), np.int64)
    for name, i in slots._asdict().items():
        if name in derived:
            out[i] = int(derived.pop(name))
            continue
        if name not in fields:
            raise KeyError(f"parameter slot {name!r} has no value (pass it in derived)")
        v = getattr(params, name)
        choices = fields[name].metadata.get("choices")
        if isinstance(v, (bool, int, np.bool_, np.integer)):
            out[i] = int(v)
        elif isinstance(v, str) and choices:
            out[i] = list(choices).index(v)
        else:
            raise TypeError(f"parameter {name}={v!r} is not an integer: pass its slot value in derived")
    if derived:
        raise KeyError(f"derived values without a slot: {sorted(derived)}")
    return out


class KernelRuntime:
    """The Python object around a policy's numba kernel: what the replay driver calls that is the
    same for every kernel.  A subclass sets ``self.sc`` (from :func:`new_block`), implements
    ``on_snapshot``/``run_until`` by calling its jitted functions and then :meth:`check`, and maps
    its scalars to counter names in :meth:`counters`."""

    name = "kernel"
    sc: np.ndarray

    def __init__(self, params, ctx) -> None:
        self.p = params
        self.ctx = ctx
        self.prep = ctx.prep
        self.E = ctx.engine.E  # the fast engine's arrays

    def check(self) -> None:
        err = int(self.sc[D_ERR])
        if err:
            raise PolicyContractError(f"{self.name} kernel: internal error {err}")

    def units(self) -> np.ndarray:
        return self.sc[DU : DU + N_UNITS]

    def busy_ns(self) -> int:
        return int(self.sc[D_BUSY])

    def extras(self) -> dict:
        return {}
