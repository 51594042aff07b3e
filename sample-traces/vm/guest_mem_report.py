#!/usr/bin/env python3
"""Summarise the KSM-relevant memory of running processes (e.g. the QEMU guests).

    guest_mem_report.py PID [PID ...]
    guest_mem_report.py - < events.jsonl   # pids from boot_guests.py's first ("ready") JSON line

For every process it looks only at the VMAs that carry the ``mg`` flag in
/proc/PID/smaps (MADV_MERGEABLE, i.e. what KSM would scan; for QEMU with
mem-merge=on that is guest RAM plus ROMs), reads /proc/PID/pagemap to find the
present pages and /proc/PID/mem to read their contents, and prints one JSON
line per process plus a "total" line:

  mergeable_kb   size of the mg VMAs
  present_pages  4 KiB pages present in RAM (pagemap bit 63)
  zero_pages     present pages that are all zero bytes
  distinct_nonzero  distinct non-zero page contents (within the process)
  thp_kb         AnonHugePages of the mg VMAs (from smaps)
  rss_kb         the process' total Rss (smaps_rollup)

The total line adds ``distinct_nonzero_all`` (distinct non-zero contents over
all processes) and ``ksm_estimate_saved_pages``: pages KSM could free if it
merged every duplicate (non-zero duplicates plus all zero pages but one).
Read-only: it does not touch /sys/kernel/mm/ksm.  Needs root (pagemap/mem).
Python 3.11 standard library only.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections import Counter

PAGE = 4096
ZERO = bytes(PAGE)
CHUNK_PAGES = 4096  # pagemap entries read per syscall


def mergeable_vmas(pid: int) -> list[tuple[int, int, int]]:
    """(start, end, AnonHugePages kB) of VMAs with the mg flag."""
    vmas: list[tuple[int, int, int]] = []
    cur: list | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = head.split("-")
                cur = [int(lo, 16), int(hi, 16), 0]
            elif head == "AnonHugePages:" and cur is not None:
                cur[2] = int(line.split()[1])
            elif head == "VmFlags:" and cur is not None:
                if "mg" in line.split()[1:]:
                    vmas.append((cur[0], cur[1], cur[2]))
                cur = None
    return vmas


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1])
    return 0


def scan(pid: int, hashes: Counter) -> dict:
    vmas = mergeable_vmas(pid)
    present = zero = 0
    local: set[bytes] = set()
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm, \
            open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, _ in vmas:
            for base in range(start, end, CHUNK_PAGES * PAGE):
                npages = min(CHUNK_PAGES, (end - base) // PAGE)
                pm.seek(base // PAGE * 8)
                raw = pm.read(npages * 8)
                entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
                for i, e in enumerate(entries):
                    if not e >> 63:
                        continue
                    present += 1
                    mem.seek(base + i * PAGE)
                    data = mem.read(PAGE)
                    if data == ZERO:
                        zero += 1
                        continue
                    h = hashlib.blake2b(data, digest_size=16).digest()
                    local.add(h)
                    hashes[h] += 1
    return {
        "pid": pid,
        "rss_kb": rss_kb(pid),
        "mergeable_kb": sum(e - s for s, e, _ in vmas) // 1024,
        "thp_kb": sum(t for _, _, t in vmas),
        "present_pages": present,
        "zero_pages": zero,
        "distinct_nonzero": len(local),
    }


def main(argv: list[str]) -> int:
    if argv == ["-"]:
        pids = json.loads(sys.stdin.readline())["pids"]
    elif argv and all(a.isdigit() for a in argv):
        pids = [int(a) for a in argv]
    else:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: guest_mem_report.py PID [PID ...] | -", file=sys.stderr)
        return 2
    hashes: Counter = Counter()
    rows = [scan(p, hashes) for p in pids]
    for r in rows:
        print(json.dumps(r))
    present = sum(r["present_pages"] for r in rows)
    zero = sum(r["zero_pages"] for r in rows)
    nonzero = present - zero
    print(json.dumps({
        "total": True,
        "processes": len(rows),
        "rss_kb": sum(r["rss_kb"] for r in rows),
        "present_pages": present,
        "zero_pages": zero,
        "nonzero_pages": nonzero,
        "distinct_nonzero_all": len(hashes),
        "ksm_estimate_saved_pages": (nonzero - len(hashes)) + max(0, zero - 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
