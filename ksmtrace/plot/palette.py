"""One colour and one marker per policy, the same in every figure.

A reader who learns in one figure that ``pksm`` is the red square must find it red and square in
every other one, whatever else the figure shows and in whatever order the runs come.  So the style
of a run depends on its policy name alone, never on its position in a list:

* the policies ksmtrace ships have fixed styles (:data:`KNOWN`);
* any other policy (a plug-in) gets a colour and a marker picked by a stable hash of its name
  (CRC-32, the same in every process and on every machine) from sets the shipped policies do not
  use, so it keeps its style from figure to figure too;
* several runs of one policy in one figure (a sweep, ``ksm`` at two settings) share the policy's
  colour and marker and differ in line style (:func:`run_styles`: the n-th run of a policy in the
  list gets the n-th line style).

The reference lines have styles of their own: the oracle is black and dashed, the naive hash-only
count grey and dotted.  Controllers (runs of ``ksm`` retuned by ksmtuned, KubeVirt or the kernel's
advisor) have fixed styles too (:func:`controller_style`), with markers no policy uses.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

#: the shipped policies: name -> (colour, marker)
KNOWN: dict[str, tuple[str, str]] = {
    "oracle": ("#000000", "*"),
    "ksm": ("#1f77b4", "o"),
    "pksm": ("#d62728", "s"),
    "pksm-delay": ("#9467bd", "D"),
    "hashtable": ("#2ca02c", "^"),
    "uksm": ("#e6ab02", "d"),
    "pagecache": ("#1b9e77", "H"),
}
#: colours and markers for policies not in KNOWN (none of them is used by a shipped policy)
FALLBACK_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39")
FALLBACK_MARKERS = ("v", "P", "X", "<", ">", "h", "p", "8")
#: line styles of the 1st, 2nd, ... run of one policy in one figure
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 1, 2)))

#: the shipped controllers: name -> (colour, marker); other controllers get a stable pick
CONTROLLERS: dict[str, tuple[str, str]] = {
    "ksmtuned": ("#ff7f0e", "P"),
    "kubevirt": ("#17becf", "X"),
    "scan-time": ("#e377c2", "h"),
}
CONTROLLER_MARKERS = ("p", "8", "<", ">")

ORACLE_COLOR = "#000000"
ORACLE_LINESTYLE = "--"
HASH_ONLY_COLOR = "#888888"
HASH_ONLY_LINESTYLE = ":"


@dataclass(frozen=True)
class PolicyStyle:
    color: str
    marker: str


def _stable(name: str, salt: str) -> int:
    return zlib.crc32(f"{salt}:{name}".encode())


def policy_style(policy: str | None) -> PolicyStyle:
    """The colour and marker of ``policy`` (a shipped policy's fixed pair, else a stable pick)."""
    name = str(policy or "?")
    if name in KNOWN:
        c, m = KNOWN[name]
        return PolicyStyle(c, m)
    return PolicyStyle(FALLBACK_COLORS[_stable(name, "colour") % len(FALLBACK_COLORS)],
                       FALLBACK_MARKERS[_stable(name, "marker") % len(FALLBACK_MARKERS)])


def controller_style(name: str | None) -> PolicyStyle:
    """The colour and marker of a controller (by its name, the part before any ``:``)."""
    base = str(name or "?").partition(":")[0]
    if base in CONTROLLERS:
        c, m = CONTROLLERS[base]
        return PolicyStyle(c, m)
    return PolicyStyle(FALLBACK_COLORS[_stable(base, "ctl-colour") % len(FALLBACK_COLORS)],
                       CONTROLLER_MARKERS[_stable(base, "ctl-marker") % len(CONTROLLER_MARKERS)])


def policy_color(policy: str | None) -> str:
    return policy_style(policy).color


def policy_marker(policy: str | None) -> str:
    return policy_style(policy).marker


def run_styles(results: Sequence) -> list[dict[str, Any]]:
    """Matplotlib keyword arguments (``color``, ``marker``, ``linestyle``) for each run: the policy's
    colour and marker, and the n-th line style for the n-th run of that policy in ``results``."""
    seen: dict[str, int] = {}
    out = []
    for r in results:
        pol = r.spec.get("policy") if hasattr(r, "spec") else str(r)
        n = seen.get(pol, 0)
        seen[pol] = n + 1
        st = policy_style(pol)
        out.append({"color": st.color, "marker": st.marker, "linestyle": LINESTYLES[n % len(LINESTYLES)]})
    return out
