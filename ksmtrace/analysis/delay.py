"""The Delay plan's study: ``pksm`` against ``pksm-delay`` with the same base parameters."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ksmtrace.policies.pksm.delay import PKSMDelay

DELAY_KEYS = ("probation_passes", "probation_seconds", "on_change")


def delay_report(trace, params: Mapping[str, Any] | None = None, engine: str = "fast", **replay_kwargs: Any) -> dict[str, Any]:
    """Replay ``pksm`` (the same base parameters) and ``pksm-delay`` on ``trace`` and compare them.

    Returns the COW breaks and daemon CPU seconds the delay avoided (positive = fewer with the
    delay), the saving it lost (``frames_saved`` mean and final, positive = less saved with the
    delay), the probation totals, and both results (``pksm``, ``pksm_delay``).
    """
    from ksmtrace.replay import replay
    from ksmtrace.trace.reader import as_trace

    trace = as_trace(trace)

    full = dataclasses.asdict(PKSMDelay(params or {}).params)
    base = {k: v for k, v in full.items() if k not in DELAY_KEYS}
    a = replay(trace, "pksm", base, engine=engine, **replay_kwargs)
    b = replay(trace, "pksm-delay", full, engine=engine, **replay_kwargs)
    sa, sb = a.summary, b.summary
    ex = b.extras.get("policy", {})
    return {
        "params": full,
        "cow_breaks_pksm": sa["cow_breaks"],
        "cow_breaks_delay": sb["cow_breaks"],
        "cow_breaks_avoided": sa["cow_breaks"] - sb["cow_breaks"],
        "cpu_seconds_pksm": a.cpu_seconds(),
        "cpu_seconds_delay": b.cpu_seconds(),
        "cpu_seconds_avoided": a.cpu_seconds() - b.cpu_seconds(),
        "frames_saved_mean_pksm": sa["frames_saved_mean"],
        "frames_saved_mean_delay": sb["frames_saved_mean"],
        "frames_saved_mean_lost": sa["frames_saved_mean"] - sb["frames_saved_mean"],
        "frames_saved_final_pksm": sa["frames_saved_final"],
        "frames_saved_final_delay": sb["frames_saved_final"],
        "frames_saved_final_lost": sa["frames_saved_final"] - sb["frames_saved_final"],
        "merges_pksm": sa["merges"],
        "merges_delay": sb["merges"],
        "probation_ended": ex.get("probation_ended", 0),
        "probation_changed": ex.get("probation_changed", 0),
        "probation_died": ex.get("probation_died", 0),
        "pksm": a,
        "pksm_delay": b,
    }
