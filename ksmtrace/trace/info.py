"""What a trace holds: the library behind ``ksmtrace info``.

>>> from ksmtrace.trace.info import trace_info
>>> info = trace_info("my-trace")            # a dict (JSON-ready)
>>> info["snapshots"], info["bytes_per_page_snapshot"], info["per_snapshot"][-1]["saved_frames"]

Per snapshot it reports the delta rows (new, changed, gone), the pages mapped, and what a perfect
deduplication would save at that instant, from :func:`ksmtrace.trace.prepare.prepare`:

* ``saved_frames`` (``oracle_saved``): physical frames a perfect dedup would free, counted on
  frames — pages that already share a frame (fork, the shared zero page) count once;
* ``saved_hash_only`` (``hash_dup_pages``): present pages minus distinct hashes, the naive count
  that ignores frames (what many studies quote).  It exceeds ``saved_frames`` by the pages that
  already share a frame; it can be one lower, because a perfect dedup maps zero-filled pages to
  the kernel's zero page and so frees every zero-filled frame, not all but one.

``distinct_contents`` counts the distinct hashes of readable present pages over the whole trace.
``complete`` is False for a trace still being captured (``capture_running``) or whose capture was
killed (``cut``: the snapshot being taken then is lost; the committed ones are all there);
``cleaned`` lists what a killed capture left behind and this open removed.

Every unreadable trace raises :class:`~ksmtrace.errors.TraceError` naming the file.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import polars as pl

from ksmtrace.trace import schema as S
from ksmtrace.trace.writer import dir_bytes
from ksmtrace.trace.reader import Trace, as_trace


def trace_info(trace: Trace | str | os.PathLike, scope: str = "anon", cache: bool = True) -> dict[str, Any]:
    """Summarise a trace (opens and checks every committed file)."""
    tr = as_trace(trace)
    tr.check()
    m = tr.manifest
    host = tr.host
    cap = tr.capture
    n = tr.n_snapshots
    times = tr.times_s

    # --- delta rows, snapshot by snapshot -----------------------------------------------------
    per: list[dict[str, Any]] = []
    mapped = 0
    any_pfn = any_kpf = any_sd = False
    hash_parts: list[np.ndarray] = []
    rows_total = 0
    for s in range(n):
        df = tr.read_table("pages", [s], ["op", "hash", "flags"])
        op = df["op"].to_numpy()
        flags = df["flags"].to_numpy()
        new = int((op == S.OP_NEW).sum())
        changed = int((op == S.OP_CHANGED).sum())
        gone = int((op == S.OP_GONE).sum())
        same = int((op == S.OP_SAME).sum())
        mapped += new - gone
        live = op != S.OP_GONE
        any_pfn |= bool((flags[live] & S.F_PFN).any())
        any_kpf |= bool((flags[live] & S.F_KPF).any())
        any_sd |= bool((flags[live] & S.F_SOFT_DIRTY).any())
        ok = live & ((flags & S.F_PRESENT) != 0) & ((flags & S.F_READ_FAILED) == 0)
        if ok.any():
            hash_parts.append(df["hash"].to_numpy()[ok])
        rows_total += len(op) - same
        per.append({
            "snap": s,
            "t_s": round(times[s], 6),
            "keyframe": bool(tr.snapshots[s].get("keyframe")),
            "pages": mapped,
            "rows": len(op) - same,
            "new": new,
            "changed": changed,
            "gone": gone,
        })
    if hash_parts:
        allh = np.sort(np.concatenate(hash_parts))
        distinct = int(1 + np.count_nonzero(allh[1:] != allh[:-1])) if len(allh) else 0
    else:
        distinct = 0

    # --- dedup baselines ----------------------------------------------------------------------
    prep = tr.prepare(scope=scope, cache=cache)
    for s, row in enumerate(per):
        row.update(
            candidates=int(prep.base_pages[s]),
            frames=int(prep.base_frames[s]),
            oracle_frames=int(prep.oracle_frames[s]),
            saved_frames=int(prep.oracle_saved[s]),
            saved_hash_only=int(prep.hash_dup_pages[s]),
            zero_filled=int(prep.zero_filled[s]),
            zero_page_mapped=int(prep.zero_page_mapped[s]),
        )

    # --- processes and coverage ----------------------------------------------------------------
    procs_out: list[dict[str, Any]] = []
    if tr.has_table("processes"):
        p = tr.read_table("processes")
        if p.height:
            alive = p.filter(pl.col("state") != "exited")
            last = alive.sort("snap").group_by("proc", maintain_order=True).last()
            firsts = p.group_by("proc").agg(pl.col("snap").min().alias("first_snap"), pl.col("snap").filter(pl.col("state") != "exited").max().alias("last_snap"))
            exited = p.filter(pl.col("state") == "exited").group_by("proc").agg(pl.col("snap").min().alias("exit_snap"))
            last = last.join(firsts, on="proc", how="left").join(exited, on="proc", how="left").sort("proc")
            for r in last.iter_rows(named=True):
                rss = int(r["rss_pages"])
                capd = int(r["captured_pages"])
                procs_out.append({
                    "proc": r["proc"], "pid": r["pid"], "ppid": r["ppid"], "comm": r["comm"],
                    "first_snap": r["first_snap"], "last_snap": r["last_snap"], "exit_snap": r["exit_snap"],
                    "state": r["state"], "rss_pages": rss, "anon_pages": int(r["anon_pages"]),
                    "captured_pages": capd, "coverage": (capd / rss) if rss else None,
                })

    total_bytes = dir_bytes(tr.path)
    page_snaps = sum(r["pages"] for r in per)
    gt_samples = 0
    if tr.has_ground_truth:
        gt_samples = sum(int(e["files"].get("ksm", {}).get("rows", 0)) for e in tr.snapshots)
    contents_rows = sum(int(e["files"].get("contents", {}).get("rows", 0)) for e in tr.snapshots)
    last = per[-1] if per else {}
    return {
        "path": str(tr.path),
        "format": m.get("format"),
        "format_version": m.get("format_version"),
        "tracer": m.get("tracer", {}),
        "created": m.get("created"),
        "complete": bool(m.get("complete")),
        "end_reason": m.get("end_reason"),
        "capture_running": tr.capture_running,
        "cut": not m.get("complete") and not tr.capture_running,
        "cleaned": list(tr.cleaned),
        "snapshots": n,
        "keyframes": sum(1 for e in tr.snapshots if e.get("keyframe")),
        "time_span_s": times[-1] - times[0] if n else 0.0,
        "processes": len(procs_out) if procs_out else prep.n_procs,
        "pages": last.get("pages", 0),
        "page_snapshots": page_snaps,
        "page_rows": rows_total,
        "distinct_contents": distinct,
        "zero_filled": last.get("zero_filled", 0),
        "zero_page_mapped": last.get("zero_page_mapped", 0),
        "saved_frames": last.get("saved_frames", 0),
        "saved_hash_only": last.get("saved_hash_only", 0),
        "scope": scope,
        "bytes": total_bytes,
        "bytes_per_page_snapshot": (total_bytes / page_snaps) if page_snaps else None,
        "host": {
            "kernel_release": host.get("kernel_release"),
            "root": host.get("root"),
            "pfn_readable": host.get("pfn_readable"),
            "kpageflags_readable": host.get("kpageflags_readable"),
            "soft_dirty": host.get("soft_dirty"),
            "thp_enabled": host.get("thp_enabled"),
            "ksm": host.get("ksm"),
        },
        "capture": {k: cap.get(k) for k in ("scope", "interval_s", "freeze", "soft_dirty", "fingerprints", "contents", "keyframe_every", "targets")},
        "has": {
            "pfns": any_pfn,
            "kpageflags": any_kpf,
            "soft_dirty": bool(cap.get("soft_dirty")),
            "ground_truth": tr.has_ground_truth,
            "ground_truth_samples": gt_samples,
            "sample_hash": tr.has_sample_hash,
            "prefix_hashes": tr.has_prefix_hashes,
            "sample_strengths": tr.has_sample_strengths,
            "contents": contents_rows > 0,
            "contents_rows": contents_rows,
        },
        "per_snapshot": per,
        "process_list": procs_out,
    }
