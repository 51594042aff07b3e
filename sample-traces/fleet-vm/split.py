#!/usr/bin/env python3
"""Split the `vm` sample (3 QEMU guests on one host, captured with one hash key) into three
single-guest traces, one per "host": the shipped fleet sample `sample-traces/fleet-vm/`.

    python sample-traces/fleet-vm/split.py [--source sample-traces/vm] [--dest sample-traces/fleet-vm]

Each `guestN/` is a complete trace holding the rows of QEMU process N only (pages, vmas, processes,
ksm_stat), every snapshot, with the source's snapshot times and wall clock.  Its manifest keeps the
source's host facts (hostname renamed `vm-guestN`), capture options and hash key fingerprint, and
records where it came from (`capture.split_from`).  The host-wide `ksm/` table (the real KSM's
counters, sampled during the capture) is copied unchanged: it describes the one real host that ran
all three guests, so `fidelity`/`validate` on a guest trace are meaningless — but `prepare` needs it
to know that the real KSM ran (pages it mapped to the zero page stay zero-filled candidates), so
each guest is counted exactly as the guest's pages are in the 3-guest trace.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pyarrow.compute as pc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from ksmtrace.trace.reader import open_trace  # noqa: E402
from ksmtrace.trace.writer import TraceWriter  # noqa: E402

PER_PROCESS = ("pages", "vmas", "processes", "ksm_stat")
HOST_WIDE = ("ksm",)
LOG_FIELDS = ("wall",)


def split(source: Path, dest: Path) -> list[Path]:
    tr = open_trace(source)
    procs = sorted(set(tr.read_table("processes", columns=["proc"])["proc"].to_list()))
    out = []
    for i, proc in enumerate(procs):
        path = dest / f"guest{i}"
        if path.exists():
            shutil.rmtree(path)
        host = dict(tr.host, hostname=f"{tr.host.get('hostname', 'host')}-guest{i}")
        capture = dict(tr.capture, split_from={"trace": tr.name, "fingerprint": tr.fingerprint, "proc": proc,
                                               "how": "sample-traces/fleet-vm/split.py"})
        w = TraceWriter(path, host=host, capture=capture, tracer=tr.manifest.get("tracer", {}),
                        command_line=tr.manifest.get("command_line"),
                        pages_schema=_pages_schema(tr))
        for s, e in enumerate(tr.snapshots):
            tables = {}
            for name in e.get("files", {}):
                t = tr._read_file(tr._file(name, s), name)  # the source's own validated reader
                if name in PER_PROCESS:
                    t = t.filter(pc.equal(t["proc"], proc))
                elif name not in HOST_WIDE:
                    continue
                tables[name] = t
            stats = {k: e[k] for k in LOG_FIELDS if k in e}
            stats["pages"] = int(tables["pages"].num_rows) if s == 0 else None
            w.commit_snapshot(s, e["t_ns"], e.get("t_end_ns", e["t_ns"]), tables, keyframe=bool(e.get("keyframe")),
                              stats={k: v for k, v in stats.items() if v is not None})
        w.close(tr.manifest.get("end_reason") or "split", coverage=[c for c in tr.manifest.get("coverage", [])
                                                                      if c.get("proc") == proc])
        out.append(path)
    return out


def _pages_schema(tr):
    import pyarrow.parquet as pq

    return pq.ParquetFile(tr._file("pages", 0)).schema_arrow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=HERE.parent / "vm")
    ap.add_argument("--dest", type=Path, default=HERE)
    a = ap.parse_args()
    for p in split(a.source, a.dest):
        t = open_trace(p)
        print(json.dumps({"trace": str(p), "snapshots": t.n_snapshots,
                          "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
