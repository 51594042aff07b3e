"""``scan-time``: the kernel's own scan-time advisor (Linux 6.8+, Stefan Roesch), as a controller.

Unlike ksmtuned and KubeVirt, the advisor is not a program outside the kernel: ksmd runs it at the
end of every full scan (``scan_time_advisor`` in ``mm/ksm.c``), from the scan's duration and
ksmd's CPU time, and sets ``pages_to_scan`` so that a full scan takes about
``advisor_target_scan_time`` seconds within ``advisor_max_cpu`` % of a CPU.  The ``ksm`` policy
models it exactly (``advisor_mode=scan-time``: its integer arithmetic, with the modelled ksmd CPU
time; ``tests/policies/test_ksm_rules.py``).  As a controller it is that setting, switched on
before the run (``echo scan-time > advisor_mode`` resets the advisor and sets ``pages_to_scan`` to
``advisor_min_pages_to_scan``: ``set_advisor_defaults``), so that it can be compared with the
controllers outside the kernel on the same footing; its ``pages_to_scan`` trajectory is the
policy's ``pages_to_scan`` counter.  It needs no host size: it looks at time, not memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ksmtrace.controllers import Controller
from ksmtrace.errors import PolicyParamError
from ksmtrace.policies.base import Params, param


@dataclass(frozen=True)
class ScanTimeParams(Params):
    target_scan_time: int = param(200, "advisor_target_scan_time: the full-scan time it aims at", "s", minimum=1)
    max_cpu: int = param(70, "advisor_max_cpu: ksmd's CPU cap", "%", minimum=1, maximum=100)
    min_pages_to_scan: int = param(500, "advisor_min_pages_to_scan: pages_to_scan at the start", "pages", minimum=1)
    max_pages_to_scan: int = param(30000, "advisor_max_pages_to_scan: the highest pages_to_scan", "pages", minimum=1)

    def check(self) -> None:
        if self.min_pages_to_scan > self.max_pages_to_scan:
            raise PolicyParamError("min_pages_to_scan must not exceed max_pages_to_scan")


class ScanTimeAdvisor(Controller):
    """The kernel's scan-time advisor (see the module docstring)."""

    name = "scan-time"
    summary = "the kernel's scan-time advisor (6.8+): pages_to_scan set by ksmd at each full scan's end"
    source = "torvalds/linux mm/ksm.c: scan_time_advisor(), set_advisor_defaults(), advisor_mode_store()"
    Params = ScanTimeParams
    needs_host_memory = False
    controls = ("pages_to_scan",)

    def initial_params(self) -> dict[str, Any]:
        p = self.p
        return {"advisor_mode": "scan-time", "advisor_target_scan_time": p.target_scan_time,
                "advisor_max_cpu": p.max_cpu, "advisor_min_pages_to_scan": p.min_pages_to_scan,
                "advisor_max_pages_to_scan": p.max_pages_to_scan}
