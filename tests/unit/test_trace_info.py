"""ksmtrace.trace.info on traces built in code (no root needed)."""
from __future__ import annotations

from ksmtrace.testing import make_trace
from ksmtrace.trace.info import trace_info


def test_info_counts_frames_and_hashes(tmp_path):
    snaps = [
        {
            (0, 1): "a",
            (0, 2): "a",
            (0, 3): 0,
            (0, 4): {"c": "b", "frame": "f"},  # fork-shared: one frame for two pages
            (1, 4): {"c": "b", "frame": "f"},
            (1, 5): {"c": 0, "zero_page": True},  # maps the shared zero page
        },
        {
            (0, 1): "a",
            (0, 2): "c",  # rewritten
            (0, 3): 0,
            (0, 4): {"c": "b", "frame": "f"},
            (1, 4): {"c": "b", "frame": "f"},
        },
    ]
    make_trace(tmp_path / "t", snaps, interval=2.0)
    d = trace_info(tmp_path / "t", cache=False)
    assert d["snapshots"] == 2 and d["time_span_s"] == 2.0 and d["complete"]
    s0, s1 = d["per_snapshot"]
    assert (s0["pages"], s0["new"], s0["rows"]) == (6, 6, 6)
    assert (s1["pages"], s1["changed"], s1["gone"], s1["rows"]) == (5, 1, 1, 2)
    # s0: 5 candidate pages in 4 frames; contents a, b, zero -> a perfect dedup keeps 2 frames
    assert (s0["candidates"], s0["frames"], s0["oracle_frames"], s0["saved_frames"]) == (5, 4, 2, 2)
    # hash-only: 6 present pages (the zero-page one reads as zeros), 3 distinct hashes
    assert s0["saved_hash_only"] == 3
    assert (s0["zero_filled"], s0["zero_page_mapped"]) == (1, 1)
    # s1: contents a, c, zero, b; 5 pages in 4 frames; a perfect dedup keeps 3 (zero -> zero page)
    assert (s1["frames"], s1["oracle_frames"], s1["saved_frames"], s1["saved_hash_only"]) == (4, 3, 1, 1)
    assert d["distinct_contents"] == 4  # a, b, c, zero over the whole trace
    assert d["page_snapshots"] == 11 and d["bytes_per_page_snapshot"] == d["bytes"] / 11
    assert d["has"]["pfns"] and not d["has"]["ground_truth"] and not d["has"]["contents"]
    assert [p["proc"] for p in d["process_list"]] == [0, 1]
