"""Replay results: the run's spec, one metrics row per snapshot, a summary, and the files they live in.

A result is two files named by the run id: ``<run_id>.json`` (spec, summary, latency histogram,
policy extras) and ``<run_id>.parquet`` (one row per snapshot).  Plots, reports and sweeps read
only these files.  The run id is derived from the trace fingerprint, the policy, its parameters,
the engine, the scope, the timing cost model and the ksmtrace version, so a result names exactly
what produced it and a sweep can skip runs it already has.

Definitions printed with every report (``FRAMES_SAVED_DEFINITION``):
``frames_saved`` is the number of physical 4 KiB frames the candidate pages use without any
deduplication minus the number they use under the policy, counted at the snapshot's instant, each
frame once (frames already shared by fork count once; pages mapping the kernel's zero page use
none).  ``oracle_saved`` is the same count for a perfect, instantaneous dedup.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ksmtrace.engine.cost import DAEMON_MASK, UNIT_NAMES, CostModel, resolve_cost_model
from ksmtrace.engine.state import lat_bin_edges_ms
from ksmtrace.errors import ResultError
from ksmtrace.outputs import open_output_dir
from ksmtrace.textfmt import dumps

FRAMES_SAVED_DEFINITION = (
    "frames_saved = physical 4 KiB frames the candidate pages use with no dedup minus frames they "
    "use under the policy, at each snapshot, each frame counted once (fork-shared frames once, "
    "zero-page mappings none); oracle_saved = the same for perfect instantaneous dedup"
)
RESULT_FORMAT = "ksmtrace-result"
RESULT_VERSION = 1


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def make_run_id(spec: dict[str, Any]) -> str:
    keyed = {k: spec[k] for k in ("trace_fingerprint", "policy", "params", "engine", "scope", "timing_cost", "start_ns", "seed", "options", "ksmtrace_version")}
    digest = hashlib.sha256(canonical(keyed).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(spec.get("trace_name", "trace")))[:40]
    return f"{name}.{spec['policy']}.{digest}"


@dataclass
class RunResult:
    spec: dict[str, Any]
    table: pl.DataFrame
    latency_hist: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    procs: pl.DataFrame | None = None  # per snapshot and process: candidate_pages, merged_pages
    first_merge_ns: np.ndarray | None = None  # per page: virtual time of its first merge, -1 never (not written)

    @property
    def run_id(self) -> str:
        return self.spec["run_id"]

    @property
    def policy(self) -> str:
        return self.spec["policy"]

    # --- derived ----------------------------------------------------------------------------
    def units_total(self) -> dict[str, int]:
        return {u: int(self.table[f"u_{u}"].sum()) for u in UNIT_NAMES if f"u_{u}" in self.table.columns}

    def cpu_seconds(self, cost: CostModel | str | None = None) -> float:
        """ksmd (daemon) CPU seconds under a cost model (default: the shipped defaults)."""
        model = resolve_cost_model(cost)
        vec = np.array([float(self.table[f"u_{u}"].sum()) if f"u_{u}" in self.table.columns else 0.0 for u in UNIT_NAMES])
        return model.cpu_seconds(vec, daemon_only=True)

    def cpu_per_snapshot(self, cost: CostModel | str | None = None) -> np.ndarray:
        model = resolve_cost_model(cost)
        w = np.where(DAEMON_MASK, model.vector(), 0.0)
        mat = np.column_stack([
            self.table[f"u_{u}"].to_numpy().astype(float) if f"u_{u}" in self.table.columns else np.zeros(self.table.height)
            for u in UNIT_NAMES
        ])
        return mat @ w / 1e9

    def latency_quantile(self, q: float) -> float:
        """Merge latency quantile in seconds, from the histogram (bin upper edge)."""
        h = self.latency_hist
        tot = int(h.sum())
        if tot == 0:
            return float("nan")
        edges = lat_bin_edges_ms()
        upper = np.append(edges[1:], edges[-1] * 2)
        k = int(np.searchsorted(np.cumsum(h), q * tot, side="left"))
        if k == 0:  # under 1 ms: reported as 0
            return 0.0
        return float(upper[min(k, len(upper) - 1)]) / 1000.0

    def compute_summary(self, cost: CostModel | str | None = None) -> dict[str, Any]:
        t = self.table
        last = t.row(t.height - 1, named=True) if t.height else {}
        merges = int(t["merges"].sum()) if t.height else 0
        lat_sum = float(self.extras.get("merge_latency_sum_ns", 0))
        oracle_mean = float(t["oracle_saved"].mean()) if t.height else 0.0
        saved_mean = float(t["frames_saved"].mean()) if t.height else 0.0
        s = {
            "snapshots": t.height,
            "duration_s": float(t["t_s"][-1]) if t.height else 0.0,
            "frames_saved_final": int(last.get("frames_saved", 0) or 0),
            "frames_saved_mean": saved_mean,
            "oracle_saved_final": int(last.get("oracle_saved", 0) or 0),
            "oracle_saved_mean": oracle_mean,
            "fraction_of_oracle_final": _ratio(last.get("frames_saved", 0), last.get("oracle_saved", 0)),
            "fraction_of_oracle_mean": _ratio(saved_mean, oracle_mean),
            "hash_only_saved_final": int(last.get("hash_only_saved", 0) or 0),
            "cow_breaks": int(t["cow_breaks"].sum()) if t.height else 0,
            "cow_breaks_max_interval": int(t["cow_breaks"].max() or 0) if t.height else 0,
            "cow_zero": int(last.get("cow_zero", 0) or 0),
            "merges": merges,
            "exposed_merges": int(t["exposed_merges"].sum()) if t.height else 0,
            "merge_latency_mean_s": (lat_sum / merges / 1e9) if merges else float("nan"),
            "merge_latency_p50_s": self.latency_quantile(0.5),
            "merge_latency_p90_s": self.latency_quantile(0.9),
            "cpu_seconds": self.cpu_seconds(cost),
            "cpu_model": resolve_cost_model(cost).name,
            "contract_violations": int(self.extras.get("contract_violations", 0)),
        }
        for k in self.spec.get("kernel_counters", []):
            if k in last and last[k] is not None:
                s[k] = int(last[k])
        if "unrestricted_oracle_saved" in t.columns:  # a run under a safe preset (ksmtrace.trace.restrict)
            u = float(t["unrestricted_oracle_saved"].mean()) if t.height else 0.0
            s["unrestricted_oracle_saved_mean"] = u
            s["fraction_of_unrestricted_oracle_mean"] = _ratio(saved_mean, u)
        return s

    # --- files ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "format_version": RESULT_VERSION,
            "spec": self.spec,
            "summary": _jsonable(self.summary),
            "latency_hist": self.latency_hist.tolist(),
            "latency_bin_edges_ms": lat_bin_edges_ms().tolist(),
            "extras": _jsonable(self.extras),
            "definition": FRAMES_SAVED_DEFINITION,
        }

    def write(self, directory: str | os.PathLike) -> Path:
        """Write the result files into ``directory`` (created if missing; it must be the user's
        own and not writable by others: :func:`ksmtrace.outputs.open_output_dir`).  Each file is
        written atomically; the JSON last, so its presence marks a complete result."""
        with open_output_dir(directory) as d:
            d.write_atomic(f"{self.run_id}.parquet", self.table.write_parquet)
            if self.procs is not None:
                d.write_atomic(f"{self.run_id}.procs.parquet", self.procs.write_parquet)
            return d.write_bytes(f"{self.run_id}.json", (dumps(self.to_json()) + "\n").encode())

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunResult":
        p = Path(path)
        if p.is_dir():
            raise ResultError(f"{p}: is a directory; give a result .json file (or use read_results)")
        if p.suffix == ".parquet":
            p = p.with_suffix(".json")
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            raise ResultError(f"{p}: no such result file") from None
        except (OSError, ValueError) as exc:
            raise ResultError(f"{p}: not a readable result file ({exc})") from None
        if not isinstance(obj, dict) or obj.get("format") != RESULT_FORMAT:
            raise ResultError(f"{p}: not a ksmtrace result file")
        if obj.get("format_version") != RESULT_VERSION:
            raise ResultError(f"{p}: result format version {obj.get('format_version')!r} is not supported")
        pq_path = p.with_suffix(".parquet")
        try:
            table = pl.read_parquet(pq_path)
        except FileNotFoundError:
            raise ResultError(f"{pq_path}: missing (the per-snapshot table of {p.name})") from None
        except Exception as exc:  # polars raises several types for bad files
            raise ResultError(f"{pq_path}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
        procs_path = p.parent / (p.stem + ".procs.parquet")
        procs = None
        if procs_path.exists():
            try:
                procs = pl.read_parquet(procs_path)
            except Exception as exc:
                raise ResultError(f"{procs_path}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
        return cls(
            spec=obj["spec"],
            table=table,
            procs=procs,
            latency_hist=np.array(obj.get("latency_hist", []), dtype=np.int64),
            extras=obj.get("extras", {}),
            summary=obj.get("summary", {}),
        )


def read_results(paths: list[str | os.PathLike]) -> list[RunResult]:
    """Result files, or directories of them, in a stable order."""
    out: list[RunResult] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.json"))
            files = [f for f in files if _is_result(f)]
            if not files:
                raise ResultError(f"{p}: no result files in this directory")
            out.extend(RunResult.read(f) for f in files)
        else:
            out.append(RunResult.read(p))
    return out


def _is_result(path: Path) -> bool:
    try:
        with open(path) as fh:
            head = fh.read(200)
        return RESULT_FORMAT in head
    except OSError:
        return False


def _ratio(a, b) -> float:
    try:
        a = float(a or 0)
        b = float(b or 0)
    except (TypeError, ValueError):
        return float("nan")
    return a / b if b > 0 else float("nan")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    return obj
