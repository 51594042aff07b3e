"""The daemon's clock: when a scanner that finished a batch wakes up again (virtual time, ns).

Shared by every runtime, reference and fast, so that both agree to the nanosecond.
"""
from ksmtrace import _jit  # noqa: F401  (numba cache location: before any decorator)
import math

from numba import njit


@njit
def next_wake(t_done, sleep_ms, hz):
    """Wake-up time of a daemon that finished its work at ``t_done`` and sleeps ``sleep_ms``.

    Mainline ksmd sleeps with ``wait_event_freezable_timeout(..., msecs_to_jiffies(sleep_ms))``:
    a timer ``n = ceil(sleep_ms * HZ / 1000)`` jiffies after the current jiffy, which the timer
    wheel rounds *up* to its level's granularity (``calc_index``: 1 jiffy below 63 jiffies, 8 below
    504, 64 below 4032, else 512) and one bucket later, so a timer never fires early.  At HZ=250 a
    20 ms sleep therefore lasts 20-24 ms (see docs/kernel-notes.md 2f).  ``hz = 0`` sleeps exactly
    ``sleep_ms``.  A wake-up is always at least 1 us after ``t_done`` so that an empty batch cannot
    stall virtual time.
    """
    if hz <= 0:
        t = t_done + sleep_ms * 1000000
    else:
        jiffy = 1000000000 // hz
        n = (sleep_ms * hz + 999) // 1000
        if n < 63:
            gran = 1
        elif n < 504:
            gran = 8
        elif n < 4032:
            gran = 64
        else:
            gran = 512
        expires = t_done // jiffy + n
        t = (expires // gran + 1) * gran * jiffy
    if t < t_done + 1000:
        t = t_done + 1000
    return t


@njit
def work_ns(units_before, units_after, timing_ps):
    """Virtual time a batch of work takes: the units it used times their cost (integer ps)."""
    tot = 0
    for i in range(len(timing_ps)):
        tot += (units_after[i] - units_before[i]) * timing_ps[i]
    return tot // 1000


#: the golden ratio's fractional part: ``frac(k * GOLDEN)`` spreads any run of wake-ups evenly over [0, 1)
GOLDEN = 0.6180339887498949


@njit
def wake_wait(k, mean_ns):
    """How long the daemon's ``k``-th wake-up (0, 1, ...) waits for a CPU before its batch starts,
    ns: on a busy host the timer's wake-up puts it on a run queue, and it runs when the scheduler
    picks it.  Drawn deterministically (the golden-ratio sequence through the inverse of the
    exponential distribution, so any stretch of wake-ups has the right mean and spread) with mean
    ``mean_ns``; 0 when ``mean_ns`` is 0.  The spread matters, not only the mean: the timer is
    armed when the batch ends, so a wait that pushes the batch's end past a jiffy boundary costs a
    whole jiffy (measured ksmd waits: docs/fidelity.md)."""
    if mean_ns <= 0:
        return 0
    u = (k + 1) * GOLDEN
    u = u - math.floor(u)
    return int(-mean_ns * math.log(1.0 - u))
