"""Which ``ksm`` behaviour a kernel release has: the policy profile (``profile``) and the range
walk over holes (``range_walk``), from the release string a trace records (``host.kernel_release``).
Used by every command that replays a trace as its kernel ran it (replay, fidelity, the demo)."""
from __future__ import annotations

import re


def profile_for_release(release: str | None) -> str:
    """The ``ksm`` policy profile whose behaviour matches a kernel release.

    >= 6.12: ``6.12`` (a THP split maps its zero subpages to the zero page); 6.11: ``6.11``
    (checksum before the stable-tree search); 4.13 ... 6.10: ``6.10`` (stable search first;
    smart_scan exists from 6.7 and follows the trace's setting); older: ``3.18``.  Unknown
    releases get ``6.12`` (with a warning from :func:`load_ground_truth`).
    """
    v = release_tuple(release)
    if v is None:
        return "6.12"
    if v >= (6, 12):
        return "6.12"
    if v >= (6, 11):
        return "6.11"
    if v >= (4, 13):
        return "6.10"
    return "3.18"


#: the first release of each series whose ksmd jumps over holes in mergeable VMAs (commit
#: f5548c318d65 "ksm: use range-walk function to jump over holes in scan_get_next_rmap_item",
#: 6.18-rc6; Cc stable): read in the 6.12.59-rc1 review series and the 5.10.249 announcement.
#: Other stable series may have it too from some release on; pass ``range_walk`` explicitly there.
RANGE_WALK_SINCE = {(6, 12): 59, (5, 10): 249}


def range_walk_for_release(release: str | None) -> bool:
    """Whether a kernel release has the range walk (``ksm`` parameter ``range_walk``): 6.18 and
    later, and the stable releases of :data:`RANGE_WALK_SINCE`.  Unknown releases are taken as the
    newest kernel (like :func:`profile_for_release`)."""
    v = release_tuple(release)
    if v is None:
        return True
    if v >= (6, 18):
        return True
    since = RANGE_WALK_SINCE.get(v)
    m = re.match(r"\d+\.\d+\.(\d+)", str(release))
    return since is not None and m is not None and int(m.group(1)) >= since


def release_tuple(release: str | None) -> tuple[int, int] | None:
    if not release:
        return None
    m = re.match(r"(\d+)\.(\d+)", str(release))
    return (int(m.group(1)), int(m.group(2))) if m else None


def kernel_profile(trace) -> tuple[str | None, str]:
    """The ``ksm`` profile for ``trace``'s kernel, and why: :func:`profile_for_release` of the
    traced kernel release; None when the trace names no kernel release (a synthetic trace), and
    then commands keep the policy's default profile (a fidelity comparison, which must reproduce
    some kernel, assumes 6.12+ and warns)."""
    release = (getattr(trace, "host", None) or {}).get("kernel_release")
    if release_tuple(release) is None:
        return None, f"the trace names no kernel release ({release!r})"
    return profile_for_release(release), f"the traced kernel is {release}"
