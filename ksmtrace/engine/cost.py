"""The cost model: named units of work, and per-unit costs that turn counts into CPU seconds.

Policies count work in these units (raw counts, stored per snapshot in every result).  CPU
seconds are computed at report time from the counts and a cost model, so changing the model never
needs a re-run.  The replay's daemon also uses a cost model to decide how long each batch of work
takes in virtual time (so aggressive settings scan slower than budget / sleep, as on a real host);
that *timing* model is part of the run's spec.

Cost files are JSON: ``{"name": ..., "source": ..., "ns": {unit: nanoseconds, ...}}``.
``ksmtrace calibrate`` measures one on this host; ``ksmtrace calibrate --from-runs`` fits one to
ksmd's real CPU time (see ``docs/cost-model.md``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ksmtrace.errors import KsmtraceError

# unit name -> (help, daemon?)  Daemon units are CPU of the scanner thread; the others are paid
# by the application (a COW copy happens in the faulting task, not in ksmd).
UNITS: dict[str, tuple[str, bool]] = {
    "wakeups": ("daemon wake-ups (timer, lock, batch setup)", True),
    "scan_starts": ("starts of a full scan (lru_add_drain_all, unstable tree reset)", True),
    "addresses_walked": ("page-table lookups of addresses holding no candidate page", True),
    "pages_visited": ("pages the scanner looked at (rmap item lookup, smart_scan bookkeeping)", True),
    "rmap_allocs": ("rmap item allocations", True),
    "rmap_frees": ("rmap item frees", True),
    "checksums": ("full 4 KiB page hashes (xxhash)", True),
    "jhash2_checksums": ("full 4 KiB page hashes with jhash2 (KSM 3.18)", True),
    "sampled_hashes": ("sampled page hashes (64 random 32-bit words)", True),
    "sampled_words": ("words absorbed by a sampled hash at another strength than 64 (UKSM, pksm hash_strength)", True),
    "full_hashes": ("full-page hashes used as hash-table keys", True),
    "stable_node_visits": ("stable tree node visits: keyhole check + memcmp while descending", True),
    "unstable_node_visits": ("unstable tree node visits: page lookup in another mm + memcmp", True),
    "hash_compares": ("hash-keyed tree node compares (no memcmp)", True),
    "memcmp_pages": ("full 4 KiB compares of equal pages before a merge", True),
    "zero_checks": ("4 KiB scans for an all-zero page", True),
    "write_protects": ("PTE write-protects with TLB flush", True),
    "remaps": ("PTE replacements with TLB flush", True),
    "page_copies": ("pages copied by the daemon (undoing a failed merge)", True),
    "stale_prunes": ("stale stable nodes removed", True),
    "list_moves": ("work-list operations", True),
    "hashtable_ops": ("hash-table lookups, inserts and removals", True),
    "cow_copies": ("copy-on-write copies after a write to a merged page (paid by the writer)", False),
    "fault_table_ops": ("hash-table updates made by the write-fault handler (a COW drops a shared entry's reference; paid by the writer)", False),
}
UNIT_NAMES = tuple(UNITS)
UNIT_INDEX = {name: i for i, name in enumerate(UNIT_NAMES)}
N_UNITS = len(UNIT_NAMES)
DAEMON_MASK = np.array([UNITS[u][1] for u in UNIT_NAMES], dtype=bool)

# Defaults: measured on the project host (2 vCPU AMD EPYC Zen 5, Linux 6.18) by
# `ksmtrace calibrate` (user-space proxies, see docs/cost-model.md) and refined against ksmd's
# real CPU time by `ksmtrace calibrate --from-runs`.  Overridden by DEFAULT_COST_FILE if present.
DEFAULT_NS: dict[str, float] = {
    "wakeups": 2000.0,
    "scan_starts": 20000.0,
    "addresses_walked": 5.0,
    "pages_visited": 60.0,
    "rmap_allocs": 60.0,
    "rmap_frees": 50.0,
    "checksums": 190.0,
    "jhash2_checksums": 900.0,
    "sampled_hashes": 60.0,
    "sampled_words": 60.0 / 64,
    "full_hashes": 190.0,
    "stable_node_visits": 40.0,
    "unstable_node_visits": 80.0,
    "hash_compares": 5.0,
    "memcmp_pages": 120.0,
    "zero_checks": 120.0,
    "write_protects": 600.0,
    "remaps": 600.0,
    "page_copies": 500.0,
    "stale_prunes": 200.0,
    "list_moves": 10.0,
    "hashtable_ops": 40.0,
    "cow_copies": 1500.0,
    "fault_table_ops": 40.0,
}
DEFAULT_COST_FILE = Path(__file__).with_name("default_costs.json")


@dataclass(frozen=True)
class CostModel:
    """Per-unit costs in nanoseconds."""

    ns: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_NS))
    name: str = "builtin"
    source: str = "built-in defaults"
    #: as a timing model (the daemon's clock): the mean time a woken daemon waits for a CPU before
    #: its batch starts, ns (a busy host; ``ksmtrace.engine.clock.wake_wait``); 0: it runs at once
    wake_wait_ns: float = 0.0

    def __post_init__(self):
        unknown = [u for u in self.ns if u not in UNITS]
        if unknown:
            raise KsmtraceError(f"cost model {self.name!r}: unknown unit {unknown[0]!r}")

    def vector(self) -> np.ndarray:
        """Nanoseconds per unit, in UNIT_NAMES order (missing units cost 0)."""
        return np.array([float(self.ns.get(u, 0.0)) for u in UNIT_NAMES], dtype=np.float64)

    def timing_ps(self) -> np.ndarray:
        """Integer picoseconds per unit, daemon units only: the replay's deterministic clock."""
        v = np.rint(self.vector() * 1000.0).astype(np.int64)
        v[~DAEMON_MASK] = 0
        return v

    def cpu_seconds(self, counts: Mapping[str, float] | np.ndarray, daemon_only: bool = True) -> float:
        if isinstance(counts, np.ndarray):
            vec = counts.astype(np.float64)
        else:
            vec = np.array([float(counts.get(u, 0.0)) for u in UNIT_NAMES])
        w = self.vector()
        if daemon_only:
            w = np.where(DAEMON_MASK, w, 0.0)
        return float(vec @ w) / 1e9

    def to_json(self) -> dict:
        out = {"name": self.name, "source": self.source, "ns": dict(self.ns)}
        if self.wake_wait_ns:
            out["wake_wait_ns"] = float(self.wake_wait_ns)
        return out

    def digest(self) -> str:
        import hashlib

        key = self.to_json()["ns"]
        if self.wake_wait_ns:
            key = dict(key, wake_wait_ns=float(self.wake_wait_ns))
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        p = Path(path)
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            raise KsmtraceError(f"{p}: no such cost file") from None
        except (OSError, ValueError) as exc:
            raise KsmtraceError(f"{p}: not a readable cost file ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("ns"), dict):
            raise KsmtraceError(f"{p}: not a ksmtrace cost file (no 'ns' mapping)")
        ns = dict(DEFAULT_NS)
        for k, v in obj["ns"].items():
            if k not in UNITS:
                raise KsmtraceError(f"{p}: unknown unit {k!r}")
            try:
                ns[k] = float(v)
            except (TypeError, ValueError):
                raise KsmtraceError(f"{p}: unit {k!r} has a non-numeric cost {v!r}") from None
            if ns[k] < 0:
                raise KsmtraceError(f"{p}: unit {k!r} has a negative cost")
        if "sampled_words" not in obj["ns"]:
            # a file from before the unit existed: the same hash, per word (64 words per sampled hash)
            ns["sampled_words"] = ns["sampled_hashes"] / 64
        return cls(ns=ns, name=obj.get("name", p.stem), source=obj.get("source", str(p)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")


def default_cost_model() -> CostModel:
    """The shipped defaults (fitted file if present, else the built-in table)."""
    if DEFAULT_COST_FILE.exists():
        try:
            return CostModel.load(DEFAULT_COST_FILE)
        except KsmtraceError:
            pass
    return CostModel()


def resolve_cost_model(spec: str | Path | CostModel | None) -> CostModel:
    if spec is None:
        return default_cost_model()
    if isinstance(spec, CostModel):
        return spec
    return CostModel.load(spec)
