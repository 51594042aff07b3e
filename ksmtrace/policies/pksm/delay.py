"""``pksm-delay``: the founding notes' "Delay" plan on top of :mod:`ksmtrace.policies.pksm`.

A new page waits on the new list on *probation*: each wake-up pksmd walks the new list from its
head (up to n+2 visits, the budget PKSM spends taking new pages) and every visit counts one pass;
a page becomes a merge candidate on the visit after it has completed ``probation_passes`` passes
(and, with ``probation_seconds`` > 0, has waited at least that long in virtual time since it was
registered or its probation restarted).  Until then it goes back to the tail.  So the wait is
about list length ÷ scan rate × N.  Each pass visits a page at most once per wake-up: when the walk
comes back to a page it already sent to the tail in this wake-up, the pass ends (the reveriel
fork's loop instead cycles a short list within one wake-up, so there a page can finish its
probation at once; we do not reproduce that).

A visit that keeps a page on probation takes its sampled hash (charged as ``sampled_hashes``) to
see whether it changed since the previous visit; ``on_change`` says what a change does:
``restart`` (the pass count and the probation clock start again) or ``keep`` (keep counting).  The
final visit takes no hash: the page is hashed by ``cmp_and_merge_page`` right after, as in PKSM.

Everything else is PKSM, unchanged (same parameters, same quirk switches).  With
``probation_passes = 0`` and ``probation_seconds = 0`` the policy is exactly ``pksm`` (a test
holds every column equal).  Reported per run (counters, cumulative, and extras):
``probation_ended`` (pages that finished probation), ``probation_changed`` (pages seen to change
while on probation), ``probation_died`` (pages freed while on probation, after at least one
probation visit).  :func:`ksmtrace.analysis.delay.delay_report` replays ``pksm`` and ``pksm-delay`` on one trace and returns
what the delay avoided (COW breaks, CPU) and what it cost (frames saved).
"""
from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.policies.base import param
from ksmtrace.policies.pksm import PKSM, PksmParams
from ksmtrace.policies.pksm.runtime import Probation


@dataclass(frozen=True)
class PksmDelayParams(PksmParams):
    probation_passes: int = param(3, "passes over the new list a page waits before it becomes a merge candidate (0 = off)", "passes", minimum=0)
    probation_seconds: float = param(0.0, "minimum virtual time a page waits on probation (0 = off)", "s", minimum=0.0)
    on_change: str = param("restart", "a page seen to change while on probation: restart its probation, or keep counting", choices=("restart", "keep"))


class PKSMDelay(PKSM):
    """PKSM with a probation period for new pages (see the module docstring)."""

    name = "pksm-delay"
    aliases = ("pksm_delay", "delayed-pksm")
    summary = "PKSM whose new pages wait N passes (or T seconds) on the new list before they become merge candidates"
    Params = PksmDelayParams
    default_scope = "anon"
    kernel_counters = PKSM.kernel_counters + ("probation_ended", "probation_changed", "probation_died")
    sensitivity = {
        **PKSM.sensitivity,
        "period_seconds": (1, "mixed", {**PKSM._RECHECK, "probation_passes": 0}),
        "recheck_rotate": (True, "mixed", {**PKSM._RECHECK, "period_seconds": 1, "probation_passes": 0}),
        "collision_counts_as_merge": (False, "random-2", {"probation_passes": 0}),
        "probation_passes": (0, "mixed", {}),
        "probation_seconds": (0.3, "mixed", {"probation_passes": 0}),
        "on_change": ("keep", "mixed", {"probation_passes": 20}),
    }

    def runtime_options(self) -> dict:
        p = self.params
        return {"probation": Probation(passes=int(p.probation_passes), ns=int(round(float(p.probation_seconds) * 1e9)),
                                       restart=p.on_change == "restart")}
