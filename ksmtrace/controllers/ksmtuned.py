"""``ksmtuned``: Red Hat's KSM tuning daemon (Fedora, RHEL, CentOS; Dan Kenigsberg, 2009).

Source: the ``ksmtuned`` shell script — upstream ``ksmtuned/ksmtuned`` ``src/ksmtuned.sh.in``,
the same rules as Fedora's ``qemu`` package's ``ksmtuned`` (``osuosl/fedpkg-qemu``).  Its rules,
in its own integer (bash ``$[ ]``) arithmetic, with sizes in KiB as ``/proc/meminfo`` gives them:

* at start-up: ``total`` = MemTotal; ``sleep = KSM_SLEEP_MSEC * 16 * 1024 * 1024 / total``,
  at least 10 (ms; "for a 16 GB server: smaller servers sleep more, bigger sleep less");
  ``thres = total * KSM_THRES_COEF / 100``, at least ``KSM_THRES_CONST``; ``npages = 0``;
* every ``KSM_MONITOR_INTERVAL`` seconds (``loop``: it sleeps first, then ``adjust``):
  ``committed`` = the summed RSS (``ps -o rsz``) of the qemu processes, ``free`` =
  MemFree + Buffers + Cached;
* if ``committed + thres < total`` and ``free > thres``: ``echo 0 > run`` (stop; the merged pages
  stay merged) and nothing else;
* otherwise ``npages += KSM_NPAGES_BOOST`` if ``free < thres``, else ``npages +=
  KSM_NPAGES_DECAY`` (negative), clamped to ``[KSM_NPAGES_MIN, KSM_NPAGES_MAX]``; then it writes
  ``pages_to_scan = npages``, ``sleep_millisecs = sleep`` and ``run = 1``.

Defaults: interval 60 s, sleep 10 ms, boost 300, decay -50, min 64, max 1250, coef 20 %, const
2048 KiB.  Before the first adjustment ksmd runs as ``ksm.service`` left it (``ksmctl start``:
``run = 1``, the policy's own ``pages_to_scan``/``sleep_millisecs``); ``ksm_service=0`` starts with
ksmd stopped.

In the replay, ``committed`` is the RSS of every traced process (the trace's targets stand for
the qemu processes), ``free`` is the stated host less the memory the traced processes use now
(:mod:`ksmtrace.controllers`).  A ``pages_to_scan`` write the kernel refuses (the scan-time
advisor on) is refused here too, and ksmtuned carries on, as the script does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ksmtrace.controllers import ControlState, Controller, periodic
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.base import Params, param


@dataclass(frozen=True)
class KsmtunedParams(Params):
    monitor_interval: float = param(60.0, "KSM_MONITOR_INTERVAL: seconds between adjustments", "s", minimum=0.001)
    sleep_msec: int = param(10, "KSM_SLEEP_MSEC: sleep between scans on a 16 GiB host (scaled by 16 GiB / MemTotal, "
                                "at least 10)", "ms", minimum=0)
    npages_boost: int = param(300, "KSM_NPAGES_BOOST: added to pages_to_scan when free memory is below thres", "pages")
    npages_decay: int = param(-50, "KSM_NPAGES_DECAY: added to pages_to_scan otherwise", "pages")
    npages_min: int = param(64, "KSM_NPAGES_MIN: lowest pages_to_scan", "pages", minimum=0)
    npages_max: int = param(1250, "KSM_NPAGES_MAX: highest pages_to_scan", "pages", minimum=0)
    thres_coef: int = param(20, "KSM_THRES_COEF: free memory below this % of MemTotal is pressure", "%", minimum=0)
    thres_const: int = param(2048, "KSM_THRES_CONST: the threshold is at least this", "KiB", minimum=0)
    ksm_service: bool = param(True, "ksm.service started ksmd (run=1) before ksmtuned's first adjustment")

    def check(self) -> None:
        if self.npages_min > self.npages_max:
            raise PolicyParamError("npages_min must not exceed npages_max")


class Ksmtuned(Controller):
    """ksmtuned's rules (see the module docstring)."""

    name = "ksmtuned"
    summary = "Red Hat's ksmtuned: start KSM when the qemu processes' RSS nears MemTotal, boost pages_to_scan under pressure"
    source = "github.com/ksmtuned/ksmtuned src/ksmtuned.sh.in (= Fedora qemu's ksmtuned): adjust(), increase_npages()"
    Params = KsmtunedParams

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.npages = 0  # the script's npages=0 at start-up

    def ticks(self, duration_s: float) -> list[float]:
        return periodic(self.p.monitor_interval, self.p.monitor_interval, duration_s)

    def initial_run(self) -> bool:
        return bool(self.p.ksm_service)

    def sleep_ms(self, total_kib: int) -> int:
        """``sleep=$[KSM_SLEEP_MSEC * 16 * 1024 * 1024 / total]; [ $sleep -le 10 ] && sleep=10``."""
        s = self.p.sleep_msec * 16 * 1024 * 1024 // total_kib
        return 10 if s <= 10 else s

    def thres_kib(self, total_kib: int) -> int:
        """``thres=$[total * KSM_THRES_COEF / 100]``, at least ``KSM_THRES_CONST``."""
        t = total_kib * self.p.thres_coef // 100
        return self.p.thres_const if self.p.thres_const > t else t

    def increase_npages(self, delta: int) -> int:
        n = self.npages + delta
        if n < self.p.npages_min:
            n = self.p.npages_min
        elif n > self.p.npages_max:
            n = self.p.npages_max
        return n

    def step(self, state: ControlState) -> dict[str, Any]:
        total, free, committed = state.host_kib, state.free_kib, state.rss_kib
        thres = self.thres_kib(total)
        if committed + thres < total and free > thres:
            return {"run": 0}  # KSMCTL stop
        self.npages = self.increase_npages(self.p.npages_boost if free < thres else self.p.npages_decay)
        return {"pages_to_scan": self.npages, "sleep_millisecs": self.sleep_ms(total), "run": 1}
