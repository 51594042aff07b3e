"""/proc/PID/smaps: VMAs with their VmFlags, and which of them a capture scope covers.

Scopes (``docs/capture.md``):

* ``mergeable``: private VMAs marked mergeable (VmFlags ``mg``: madvise(MADV_MERGEABLE) or
  prctl(PR_SET_MEMORY_MERGE)) — what the real KSM scans; only their anonymous pages.
* ``anon``: every private VMA; only its anonymous pages (and pages mapping the shared zero page).
* ``all``: every VMA, file pages included.

Never in scope: VM_IO (``io``), VM_PFNMAP (``pf``), hugetlb (``ht``) and the kernel's special
mappings ([vsyscall], [vvar], [vvar_vclock], [vdso], [uprobes]); their pages have no struct page
to hash or cannot be read without side effects.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ksmtrace.trace import schema as S

SCOPES = ("mergeable", "anon", "all")
SPECIAL = ("[vsyscall]", "[vvar]", "[vvar_vclock]", "[vdso]", "[uprobes]", "[sigpage]", "[vectors]")
SKIP_VMFLAGS = ("io", "pf", "ht")


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    vmflags: tuple[str, ...]
    dev: int = 0  # the file's device as stat(2) gives it (os.makedev of maps' major:minor)
    rss_kb: int = 0
    anon_kb: int = 0
    flags: int = 0  # V_* bits (schema)
    in_scope: bool = False

    @property
    def pages(self) -> int:
        return (self.end - self.start) >> 12

    @property
    def start_vpn(self) -> int:
        return self.start >> 12

    @property
    def private(self) -> bool:
        return len(self.perms) > 3 and self.perms[3] == "p"

    @property
    def mergeable(self) -> bool:
        return "mg" in self.vmflags

    @property
    def skipped(self) -> bool:
        """Never captured: VM_IO, VM_PFNMAP, hugetlb, or a kernel special mapping."""
        return any(f in self.vmflags for f in SKIP_VMFLAGS) or self.path in SPECIAL or self.start >= (1 << 63)


def vma_flags(v: Vma) -> int:
    f = 0
    if v.mergeable:
        f |= S.V_MERGEABLE
    named_special = v.path.startswith("[") and v.path not in ("[heap]", "[stack]") and not v.path.startswith("[anon:") and not v.path.startswith("[stack:")
    anon = (v.inode == 0 and not v.path.startswith("/") and not named_special) or v.path in ("[heap]", "[stack]")
    if anon:
        f |= S.V_ANON
    if v.private:
        f |= S.V_PRIVATE
    else:
        f |= S.V_SHARED
    if v.inode != 0 or v.path.startswith("/"):
        f |= S.V_FILE
    if v.path == "[stack]" or v.path.startswith("[stack:"):
        f |= S.V_STACK
    if v.path == "[heap]":
        f |= S.V_HEAP
    if "hg" in v.vmflags:
        f |= S.V_HUGEPAGE
    if "nh" in v.vmflags:
        f |= S.V_NOHUGEPAGE
    if "lo" in v.vmflags:
        f |= S.V_LOCKED
    return f


def classify(vmas: list[Vma], scope: str) -> None:
    """Set ``flags`` and ``in_scope`` of every VMA for ``scope``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (scopes: {', '.join(SCOPES)})")
    for v in vmas:
        v.flags = vma_flags(v)
        if v.skipped:
            v.in_scope = False
        elif scope == "mergeable":
            v.in_scope = v.private and v.mergeable
        elif scope == "anon":
            v.in_scope = v.private
        else:
            v.in_scope = True
        if v.in_scope:
            v.flags |= S.V_IN_SCOPE


_SMAPS_RE = re.compile(
    rb"^(?:([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)[ \t]*(.*)"
    rb"|Rss: +(\d+) kB|Anonymous: +(\d+) kB|VmFlags: (.*))$",
    re.M,
)


def parse_smaps(data: bytes) -> list[Vma]:
    """Parse the text of /proc/PID/smaps (or /proc/PID/maps: then no VmFlags/Rss)."""
    vmas: list[Vma] = []
    cur: Vma | None = None
    for m in _SMAPS_RE.finditer(data):
        lo = m.group(1)
        if lo is not None:
            cur = Vma(
                start=int(lo, 16),
                end=int(m.group(2), 16),
                perms=m.group(3).decode(),
                offset=int(m.group(4), 16),
                inode=int(m.group(7)),
                path=m.group(8).decode("utf-8", "replace").strip(),
                vmflags=(),
                dev=os.makedev(int(m.group(5), 16), int(m.group(6), 16)),
            )
            vmas.append(cur)
        elif cur is None:
            continue
        elif m.group(9) is not None:
            cur.rss_kb = int(m.group(9))
        elif m.group(10) is not None:
            cur.anon_kb = int(m.group(10))
        elif m.group(11) is not None:
            cur.vmflags = tuple(m.group(11).decode().split())
    return vmas


def read_smaps(pid: int) -> list[Vma]:
    """The VMAs of ``pid`` (raises OSError: FileNotFoundError/ProcessLookupError when gone,
    PermissionError when not allowed)."""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        data = f.read()
    return parse_smaps(data)
