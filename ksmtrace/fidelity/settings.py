"""Named KSM settings for ground-truth runs (``ksmtrace validate --settings NAME``): plain data,
shared by the live runner (:mod:`ksmtrace.lab.validate`) and the offline fidelity goals."""
from __future__ import annotations

from typing import Any, Mapping

from ksmtrace.errors import KsmtraceError

#: the kernel's defaults (Linux 6.x) — every preset sets every one of these
KERNEL_DEFAULTS: dict[str, Any] = {
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "smart_scan": 1,
    "use_zero_pages": 0,
    "max_page_sharing": 256,
    "stable_node_chains_prune_millisecs": 2000,
    "advisor_mode": "none",
}
#: named parameter sets (``--settings NAME``); "fast" is a 10x faster scan than the defaults
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": dict(KERNEL_DEFAULTS),
    "fast": dict(KERNEL_DEFAULTS, pages_to_scan=1000),
    "nosmart": dict(KERNEL_DEFAULTS, pages_to_scan=1000, smart_scan=0),
    "zero": dict(KERNEL_DEFAULTS, pages_to_scan=1000, use_zero_pages=1),
    "chains": dict(KERNEL_DEFAULTS, pages_to_scan=1000, max_page_sharing=8),
    "defaults-nosmart": dict(KERNEL_DEFAULTS, smart_scan=0),
}
SETTINGS_HELP = {
    "defaults": "the kernel defaults (pages_to_scan=100 sleep_millisecs=20 smart_scan=1 use_zero_pages=0 max_page_sharing=256)",
    "fast": "a 10x faster scan (pages_to_scan=1000)",
    "nosmart": "fast, smart_scan=0",
    "zero": "fast, use_zero_pages=1",
    "chains": "fast, max_page_sharing=8 (stable node chains)",
    "defaults-nosmart": "defaults, smart_scan=0",
}
_INT_SETTINGS = {"pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "max_page_sharing",
                 "stable_node_chains_prune_millisecs", "advisor_max_cpu", "advisor_min_pages_to_scan",
                 "advisor_max_pages_to_scan", "advisor_target_scan_time", "merge_across_nodes"}


def resolve_settings(preset: str = "fast", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A preset's settings with ``overrides`` applied (sysfs names; ``run`` is not allowed)."""
    if preset not in SETTINGS:
        raise KsmtraceError(f"unknown settings {preset!r} (settings: {', '.join(SETTINGS)})")
    out = dict(SETTINGS[preset])
    for k, v in (overrides or {}).items():
        k = k.strip().replace("-", "_")
        if k == "run":
            raise KsmtraceError("setting 'run' is managed by validate (0 until the first snapshot, then 1)")
        if k == "advisor_mode":
            if str(v) not in ("none", "scan-time"):
                raise KsmtraceError(f"setting advisor_mode={v!r}: must be none or scan-time")
            out[k] = str(v)
            continue
        if k not in _INT_SETTINGS:
            raise KsmtraceError(f"unknown KSM setting {k!r} (settings: {', '.join(sorted(_INT_SETTINGS | {'advisor_mode'}))})")
        try:
            out[k] = int(v)
        except (TypeError, ValueError):
            raise KsmtraceError(f"setting {k}={v!r}: must be an integer") from None
    if out.get("advisor_mode") == "scan-time":
        out.pop("pages_to_scan", None)  # the advisor owns pages_to_scan
    return out
