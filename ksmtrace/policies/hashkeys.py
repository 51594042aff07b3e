"""Tree keys from the sampled hash a trace records, at a chosen hash strength (``pksm``, ``uksm``).

PKSM and UKSM key their trees by the sampled hash (``ksmtrace.trace.sampled``), so two different
contents whose sampled hashes agree meet in the trees: a collision, which costs a full compare and
a failed merge.  A replay reproduces collisions only as far as the trace recorded the hash:

* a trace with the strength columns (format version 2) records the hash at every strength of
  ``SAMPLE_STRENGTHS`` of one permutation: each strength is exact;
* a trace with only ``sample`` records strength 64: a requested strength that is not recorded
  takes its collisions from the recorded one (weaker strengths then understate collisions,
  stronger ones overstate them slightly) -- every result says which (``describe``);
* a trace with neither models every strength collision-free (keys = content ids).

Keys are dense integers: equal key = equal sampled hash at that strength.
"""
from __future__ import annotations

import numpy as np

from ksmtrace.engine.api import EV_APPEAR, EV_WRITE
from ksmtrace.trace.sampled import zero_sample
from ksmtrace.trace.schema import SAMPLE_STRENGTHS, SAMPLE_WORDS


def recorded_strengths(prep) -> tuple[int, ...]:
    """The strengths whose sampled hash the trace recorded."""
    if getattr(prep, "ev_strength", None) is not None:
        return SAMPLE_STRENGTHS
    if prep.ev_sample is not None:
        return (SAMPLE_WORDS,)
    return ()


def source_strength(prep, strength: int) -> int | None:
    """The recorded strength whose collisions model ``strength`` (None: collision-free)."""
    rec = recorded_strengths(prep)
    if not rec:
        return None
    if strength in rec:
        return strength
    return min(rec, key=lambda r: (abs(np.log2(r) - np.log2(strength)), -r))


def describe(prep, strength: int) -> str:
    src = source_strength(prep, strength)
    if src is None:
        return "modelled collision-free"
    if src == strength:
        return "from trace"
    return f"from trace at strength {src} (strength {strength} not recorded)"


def event_samples(prep, strength: int) -> np.ndarray | None:
    """Per event, the recorded sampled hash that models ``strength`` (None: not recorded)."""
    src = source_strength(prep, strength)
    if src is None:
        return None
    if getattr(prep, "ev_strength", None) is not None:
        return prep.ev_strength[:, SAMPLE_STRENGTHS.index(src)]
    return prep.ev_sample


def _first_arrivals(prep) -> tuple[np.ndarray, np.ndarray]:
    """(content ids, the index of each one's first arrival event)."""
    arrival = ((prep.ev_kind == EV_APPEAR) | (prep.ev_kind == EV_WRITE)) & (prep.ev_cid >= 0)
    ev = np.flatnonzero(arrival)
    cids, first = np.unique(prep.ev_cid[ev], return_index=True)
    return cids.astype(np.int64), ev[first]


def content_samples(prep, strength: int, _first=None) -> np.ndarray | None:
    """Per content id, its recorded sampled hash modelling ``strength`` (from its first arrival;
    the zero content always gets the zero page's hash), as int64; None if not recorded."""
    samp = event_samples(prep, strength)
    if samp is None:
        return None
    cids, first = _first if _first is not None else _first_arrivals(prep)
    out = np.zeros(max(int(prep.n_cids), 1), np.int64)
    out[cids] = samp[first]
    out[0] = zero_sample(source_strength(prep, strength))
    return out


def content_keys(prep, strengths) -> list[tuple[np.ndarray, int, int]]:
    """For each of ``strengths``: (key per content id, number of keys, the zero page's key); a
    content id is its own key when the trace recorded no sampled hash."""
    n = max(int(prep.n_cids), 1)
    first = _first_arrivals(prep) if recorded_strengths(prep) else None
    done: dict = {}
    out = []
    for s in strengths:
        src = source_strength(prep, s)
        if src not in done:
            vals = content_samples(prep, s, first)
            if vals is None:
                done[src] = (np.arange(n, dtype=np.int64), n, 0)
            else:
                uniq, inv = np.unique(vals, return_inverse=True)
                done[src] = (inv.astype(np.int64), len(uniq), int(inv[0]))
        out.append(done[src])
    return out


def hash_cost(strength: int) -> tuple[str, int]:
    """The cost unit and count of one sampled hash at ``strength`` (64 words: one ``sampled_hashes``)."""
    return ("sampled_hashes", 1) if strength == SAMPLE_WORDS else ("sampled_words", int(strength))
