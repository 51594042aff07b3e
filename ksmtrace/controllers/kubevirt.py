"""``kubevirt``: KubeVirt's node KSM handler (virt-handler), its memory-pressure rule.

Source: ``kubevirt/kubevirt`` ``pkg/virt-handler/ksm/ksm.go``, ``calculateNewRunSleepAndPages``
("inspired from oVirt's mom ksm.rules") and ``writeKsmValuesToFiles``; the loop of its
``Handler``: one pass when the handler starts (``Start``: ``spin``), one more as its loop starts
(``loop``: ``spin``), then one every 3 minutes (``time.NewTicker(3 * time.Minute)``).  Sizes in KiB
from ``/proc/meminfo``:

* ``sleep = sleepMsBaseline * (16 * 1024 * 1024) / (MemTotal - MemAvailable)`` (unsigned integer
  division), at least ``sleepMsBaseline / 10``;
* no pressure — ``float32(MemAvailable) > float32(MemTotal) * freePercent``: if KSM runs,
  ``pages = pages_to_scan + pagesDecay``, and below ``nPagesMin`` it is ``nPagesMin`` and KSM
  stops; if it does not run, it stays stopped;
* pressure: if KSM runs, ``pages = pages_to_scan + pagesBoost``, at most ``nPagesMax``; if it does
  not, it starts with ``pages = nPagesInit``;
* the writes: when KSM is to run, ``sleep_millisecs``, ``pages_to_scan``, then ``run = 1``;
  otherwise only ``run = 0``.

Defaults (``pagesBoostDefault`` ...): boost 300, decay -50, min 64, max 1250, init 100, sleep
baseline 100 ms ("10ms in oVirt seemed really low"), free percent 0.2; each is a node annotation
override in KubeVirt, a parameter here.  ``pages_to_scan`` is read from the kernel (ksmd's own value,
the ``ksm`` policy's ``pages_to_scan`` counter) and ``running`` from ``run``.  KSM starts stopped
(the kernel's ``run = 0``) unless ``initial_run=1``.  ``MemTotal - MemAvailable`` of 0 divides by
zero in KubeVirt; here it counts as 1 KiB (the longest sleep).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ksmtrace.controllers import ControlState, Controller, periodic
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.base import Params, param


@dataclass(frozen=True)
class KubeVirtParams(Params):
    pages_boost: int = param(300, "pagesBoost: added to pages_to_scan under memory pressure", "pages", minimum=0)
    pages_decay: int = param(-50, "pagesDecay: added to pages_to_scan without pressure", "pages", maximum=0)
    npages_min: int = param(64, "nPagesMin: below this, KSM stops", "pages", minimum=0)
    npages_max: int = param(1250, "nPagesMax: highest pages_to_scan", "pages", minimum=0)
    npages_init: int = param(100, "nPagesInit: pages_to_scan when KSM starts", "pages", minimum=0)
    sleep_ms_baseline: int = param(100, "sleepMsBaseline: sleep on a 16 GiB host out of memory, scaled by "
                                        "16 GiB / memory in use", "ms", minimum=1)
    free_percent: float = param(0.2, "freePercent: MemAvailable above this share of MemTotal is no pressure", "",
                                minimum=0.0, maximum=1.0)
    interval: float = param(180.0, "seconds between passes (the handler's 3-minute ticker)", "s", minimum=0.001)
    initial_run: bool = param(False, "KSM runs when the trace starts (the kernel's default is run=0)")

    def check(self) -> None:
        if self.npages_min > self.npages_max:
            raise PolicyParamError("npages_min must not exceed npages_max")
        if not self.npages_min <= self.npages_init <= self.npages_max:
            raise PolicyParamError("npages_init must lie between npages_min and npages_max")


class KubeVirt(Controller):
    """KubeVirt's memory-pressure rule (see the module docstring)."""

    name = "kubevirt"
    summary = "KubeVirt's node KSM handler: run KSM while MemAvailable is under 20 % of MemTotal, boost/decay pages_to_scan"
    source = "github.com/kubevirt/kubevirt pkg/virt-handler/ksm/ksm.go: calculateNewRunSleepAndPages(), Handler.loop()"
    Params = KubeVirtParams

    def ticks(self, duration_s: float) -> list[float]:
        return [0.0] + periodic(0.0, self.p.interval, duration_s)  # Start()'s spin, then loop()'s

    def initial_run(self) -> bool:
        return bool(self.p.initial_run)

    def sleep_ms(self, total_kib: int, available_kib: int) -> int:
        base = self.p.sleep_ms_baseline
        s = base * (16 * 1024 * 1024) // max(total_kib - available_kib, 1)
        return base // 10 if s < base // 10 else s

    def pressure(self, total_kib: int, available_kib: int) -> bool:
        return not (np.float32(available_kib) > np.float32(total_kib) * np.float32(self.p.free_percent))

    def step(self, state: ControlState) -> dict[str, Any]:
        total, available = state.host_kib, state.free_kib
        running = state.running
        pages = int(state.counters.get("pages_to_scan") or state.params.get("pages_to_scan") or 0)
        sleep = self.sleep_ms(total, available)
        if not self.pressure(total, available):
            if not running:
                return {"run": 0}
            pages += self.p.pages_decay
            if pages < self.p.npages_min:
                return {"run": 0}  # ksm.pages = nPagesMin, running = false: only run is written
        else:
            if running:
                pages = min(pages + self.p.pages_boost, self.p.npages_max)
            else:
                pages = self.p.npages_init
        return {"sleep_millisecs": sleep, "pages_to_scan": pages, "run": 1}
