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

**Parameters that change mid-run** (a controller's writes, :mod:`ksmtrace.controllers`): the replay
driver calls ``set_params(changes, now)`` between batches — after every batch that woke before
``now`` — on either face.  The readable face replaces ``self.p`` (the runtime's ``Params``, checked
as at construction); the kernel face also rewrites its parameter slots ``sc[OP + P.name]`` from the
new ``Params`` (:meth:`KernelRuntime.set_params`).  Both then call the runtime's hooks:
``refuse_params`` (what its kernel would reject, and why) and ``params_changed`` (state derived
from a parameter, such as ksm's own ``pages_to_scan``).  The run switch (the kernel's
``/sys/kernel/mm/ksm/run``) is the driver's: while it is off the driver does not run the daemon,
and switching it on calls ``wake_at(now)``.
"""
from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any, Callable, Mapping

import numpy as np
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
from numba import njit

from ksmtrace.engine.clock import next_wake, wake_wait, work_ns
from ksmtrace.engine.cost import N_UNITS, UNIT_INDEX
from ksmtrace.errors import PolicyContractError, PolicyParamError

U_WAKEUPS = UNIT_INDEX["wakeups"]


# =================================================================================================
# Parameters changed mid-run (both faces)
# =================================================================================================
def replace_params(params: Any, changes: Mapping[str, Any]) -> Any:
    """A copy of ``params`` (a frozen ``Params`` dataclass) with ``changes``, checked as at
    construction (its ``__post_init__``); an unknown name, a boolean that is not 0/1 and an
    out-of-range value are :class:`PolicyParamError`."""
    current = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    out = {}
    for k, v in changes.items():
        if k not in current:
            raise PolicyParamError(f"unknown parameter {k!r} (parameters: {', '.join(current)})")
        if isinstance(current[k], bool):
            if v not in (0, 1):
                raise PolicyParamError(f"parameter {k}={v!r}: expected a boolean (0/1)")
            v = bool(v)
        out[k] = v
    try:
        return dataclasses.replace(params, **out)
    except TypeError as exc:
        raise PolicyParamError(str(exc)) from None


class ParamsMixin:
    """``set_params`` for a runtime whose parameters are ``self.p``; see the module docstring."""

    p: Any

    def set_params(self, changes: Mapping[str, Any], now: int) -> dict[str, str]:
        """Apply ``changes`` (parameter name -> value) at virtual time ``now``, between batches; the
        daemon sees them from its next batch on.  Returns the changes refused, with why
        (:meth:`refuse_params`); the others are applied together."""
        changes = dict(changes)
        if not hasattr(self, "p"):
            raise PolicyParamError(f"{type(self).__name__} keeps no parameters (self.p) to change")
        replace_params(self.p, changes)  # every change valid, or none applied
        refused = self.refuse_params(changes)
        accepted = {k: v for k, v in changes.items() if k not in refused}
        if accepted:
            old = self.p
            self.p = replace_params(old, accepted)
            self._store_params()
            self.params_changed(old, accepted, now)
        return refused

    def refuse_params(self, changes: Mapping[str, Any]) -> dict[str, str]:
        """Changes this runtime's kernel would reject now: name -> why (none by default)."""
        return {}

    def params_changed(self, old: Any, changes: Mapping[str, Any], now: int) -> None:
        """Hook after ``self.p`` changed (``old``: the previous ``Params``): update what the runtime
        derived from its parameters.  Nothing by default."""

    def _store_params(self) -> None:
        """Where the face keeps its parameters besides ``self.p`` (the kernel's slots)."""


# =================================================================================================
# The readable face
# =================================================================================================
class Daemon(ParamsMixin):
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
        self.wait_ns = int(getattr(ctx, "wake_wait_ns", 0) or 0)
        self.t_wake = ctx.start_ns + int(wake_wait(0, self.wait_ns))
        self._batch_units = self.unit_counts.copy()

    def charge(self, unit: str, n: int = 1) -> None:
        self.unit_counts[UNIT_INDEX[unit]] += n

    def timed_batch(self, work: Callable[[], int | None], sleep_ms: int) -> None:
        """One wake-up at ``self.t_wake``: charge it, run ``work()``, advance the clock.  A daemon
        whose batch decides its own sleep (UKSM's) returns it from ``work()`` (ms)."""
        self._batch_units = self.unit_counts.copy()
        self.now = self.t_wake
        self.charge("wakeups")
        decided = work()
        if decided is not None:
            sleep_ms = decided
        w = int(work_ns(self._batch_units, self.unit_counts, self.ctx.timing_ps))
        self.busy += w
        k = int(self.unit_counts[UNIT_INDEX["wakeups"]])
        self.t_wake = int(next_wake(self.t_wake + w, sleep_ms, self.ctx.hz)) + int(wake_wait(k, self.wait_ns))

    def work_so_far(self) -> int:
        """Modelled ns of the batch in progress."""
        return int(work_ns(self._batch_units, self.unit_counts, self.ctx.timing_ps))

    def batch_end(self) -> int:
        """Virtual time at which the last batch's work ended (0 before the first batch)."""
        return int(self.now + self.work_so_far())

    def wake_at(self, t: int) -> None:
        """Woken at ``t`` (the run switch turned on): the next batch is at ``t``, or later if the
        daemon's sleep ends later."""
        self.t_wake = max(int(self.t_wake), int(t))

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

    def set_params(self, changes: Mapping[str, Any], now: int) -> dict[str, str]:
        if changes:
            raise PolicyParamError(f"this policy has no daemon whose parameters could change: {', '.join(changes)}")
        return {}

    def wake_at(self, t: int) -> None:
        return None


# =================================================================================================
# The kernel face: the daemon's slots at the head of a kernel's scalar array
# =================================================================================================
D_TWAKE = 0  # virtual time (ns) of the next wake-up
D_BUSY = 1  # cumulative modelled busy time (ns)
D_NOW = 2  # virtual time of the batch in progress (its wake-up)
D_WAKES = 3  # wake-ups so far
D_ERR = 4  # a kernel's internal error code (0 = none); the runtime raises on it
D_IDLE = 5  # 1 = waiting for work (set and cleared by the policy)
D_WAIT = 6  # mean wait for a CPU after a wake-up, ns (ctx.wake_wait_ns; ksmtrace.engine.clock.wake_wait)
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
    sc[D_WAIT] = int(getattr(ctx, "wake_wait_ns", 0) or 0)
    sc[D_TWAKE] = ctx.start_ns + wake_wait(0, sc[D_WAIT])
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
    sc[D_TWAKE] = next_wake(sc[D_TWAKE] + w, sleep_ms, hz) + wake_wait(sc[DU + U_WAKEUPS], sc[D_WAIT])


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


class KernelRuntime(ParamsMixin):
    """The Python object around a policy's numba kernel: what the replay driver calls that is the
    same for every kernel.  A subclass sets ``self.sc`` (from :func:`new_block`), implements
    ``on_snapshot``/``run_until`` by calling its jitted functions and then :meth:`check`, and maps
    its scalars to counter names in :meth:`counters`.  To take parameter changes mid-run it names
    its parameter slots: ``param_slots`` (from :func:`param_slots`), ``param_offset`` (``OP``) and
    :meth:`derived_params` (the values of its derived slots)."""

    name = "kernel"
    sc: np.ndarray
    #: the kernel's parameter slots (:func:`param_slots`) and where they start in ``sc``; None: the
    #: kernel reads its parameters once (they cannot change mid-run)
    param_slots: Any = None
    param_offset: int = 0

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

    def derived_params(self, params: Any) -> dict[str, int]:
        """Values of the derived slots (and of fields that are not integers) for ``params``."""
        return {}

    def _store_params(self) -> None:
        if self.param_slots is None:
            raise PolicyParamError(f"the {self.name} kernel reads its parameters once: they cannot change mid-run "
                                   "(run it with runtime='readable')")
        n = len(self.param_slots)
        self.sc[self.param_offset: self.param_offset + n] = params_array(self.p, self.param_slots,
                                                                         self.derived_params(self.p))

    def batch_end(self) -> int:
        """Virtual time at which the last batch's work ended (0 before the first batch)."""
        if int(self.sc[D_WAKES]) == 0:
            return 0
        w = int(((self.sc[DU: DU + N_UNITS] - self.sc[DB: DB + N_UNITS]) * self.sc[DT: DT + N_UNITS]).sum()) // 1000
        return int(self.sc[D_NOW]) + w

    def wake_at(self, t: int) -> None:
        """Woken at ``t`` (see :meth:`Daemon.wake_at`)."""
        self.sc[D_TWAKE] = max(int(self.sc[D_TWAKE]), int(t))
