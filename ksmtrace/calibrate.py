"""Calibrating the cost model: per-unit nanoseconds from microbenchmarks on this host, and a fit of
the units ksmd spends its time on to ksmd's measured CPU in ground-truth runs.

* :func:`microbenchmark` (``ksmtrace calibrate``): times user-space proxies of the kernel's work
  units — xxhash64 of 4 KiB (``checksums``), jhash2 (``jhash2_checksums``), PKSM's 64-word sampled
  hash, memcmp of equal pages, an all-zero check, a page copy, ``mprotect`` of one page (a PTE
  write-protect with its TLB flush), a copy-on-write fault — and keeps the built-in values for
  units without a faithful user-space proxy (rmap-item bookkeeping, tree node visits, wake-ups).
* :func:`fit_from_runs` (``ksmtrace calibrate --from-runs``): replays every ground-truth trace with
  the kernel's settings, and fits, with non-negative least squares, a few *groups* of units (each
  group scales its units' base costs together, so the model stays small and physically plausible)
  to ksmd's real CPU time per window of about a second.  Runs are split into fitting and held-out
  runs; the report gives each held-out run's error of total ksmd CPU.

CPU seconds are always computed at report time from a run's raw unit counts and a cost file, so a
new fit never needs a re-run.  See ``docs/cost-model.md``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ksmtrace.engine.cost import DAEMON_MASK, DEFAULT_NS, UNIT_NAMES, CostModel, resolve_cost_model
from ksmtrace.errors import KsmtraceError
from ksmtrace.progress import ProgressFn, make as make_progress

PAGE = 4096


# =============================================================================================
# microbenchmarks
# =============================================================================================
def _best_ns(fn: Callable[[int], None], n: int, repeat: int = 5) -> float:
    """Best per-iteration time of ``fn(n)`` over ``repeat`` tries, in ns."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t) / n)
    return best


def _numba_kernels():
    from numba import njit

    @njit(cache=True)
    def jhash2_pages(words, n):  # words: uint32[1024]; the kernel's jhash2 over a page, n times
        acc = np.uint32(0)
        for _ in range(n):
            a = np.uint32(0xDEADBEEF + (1024 << 2) + 17)
            b = a
            c = a
            i = 0
            while i + 3 < 1024:
                a += words[i]
                b += words[i + 1]
                c += words[i + 2]
                a -= c; a ^= (c << np.uint32(4)) | (c >> np.uint32(28)); c += b
                b -= a; b ^= (a << np.uint32(6)) | (a >> np.uint32(26)); a += c
                c -= b; c ^= (b << np.uint32(8)) | (b >> np.uint32(24)); b += a
                a -= c; a ^= (c << np.uint32(16)) | (c >> np.uint32(16)); c += b
                b -= a; b ^= (a << np.uint32(19)) | (a >> np.uint32(13)); a += c
                c -= b; c ^= (b << np.uint32(4)) | (b >> np.uint32(28)); b += a
                i += 3
            acc ^= a ^ b ^ c
        return acc

    @njit(cache=True)
    def sampled_pages(words, offs, n):  # PKSM's sampled hash: 64 words at scattered offsets
        acc = np.uint32(0)
        for _ in range(n):
            h = np.uint32(0xDEADBEEF)
            for j in range(64):
                h += words[offs[j]]
                h += h << np.uint32(8)
                h ^= h >> np.uint32(12)
            acc ^= h
        return acc

    @njit(cache=True)
    def zero_pages(buf, n):  # memchr_inv-style all-zero check of a page, n times
        z = 0
        for _ in range(n):
            for i in range(512):
                if buf[i] != 0:
                    z += 1
                    break
        return z

    return jhash2_pages, sampled_pages, zero_pages


def microbenchmark(seconds: float = 2.0, progress: ProgressFn | None = None) -> CostModel:
    """Per-unit costs measured on this host (user-space proxies; see the module docstring)."""
    import xxhash

    prog = make_progress(progress)
    scale = max(0.05, float(seconds) / 2.0)
    n_hash = max(200, int(20000 * scale))
    rng = np.random.default_rng(1)
    page = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    page2 = bytes(bytearray(page))  # equal content, a different object (bytes(page) would be page itself)
    assert page2 is not page
    measured: dict[str, float] = {}
    notes: dict[str, str] = {}

    # loop/call overhead of a Python call on a tiny input, subtracted from the per-page numbers
    tiny = b"x" * 8
    h64 = xxhash.xxh64_intdigest
    over = _best_ns(lambda n: [h64(tiny) for _ in range(n)], n_hash)
    measured["checksums"] = max(1.0, _best_ns(lambda n: [h64(page) for _ in range(n)], n_hash) - over)
    notes["checksums"] = "xxh64 of 4 KiB (mm/ksm.c calc_checksum), Python call overhead subtracted"
    measured["full_hashes"] = measured["checksums"]
    notes["full_hashes"] = "as checksums"
    prog(1, 8, "xxhash")

    eq_over = _best_ns(lambda n: [tiny == b"x" * 8 for _ in range(n)], n_hash)
    measured["memcmp_pages"] = max(1.0, _best_ns(lambda n: [page == page2 for _ in range(n)], n_hash) - eq_over)
    notes["memcmp_pages"] = "memcmp of two equal 4 KiB pages (bytes ==)"
    # a tree node visit compares a page with a different one: it stops at the first differing
    # cache line (random pages: the first bytes), plus the lookup of the node's page
    other = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    diff_ns = max(1.0, _best_ns(lambda n: [page == other for _ in range(n)], n_hash) - eq_over)
    notes["stable_node_visits"] = "built-in (no user-space proxy for the page lookup; memcmp part measured: %.0f ns)" % diff_ns
    prog(2, 8, "memcmp")

    words = np.frombuffer(page, dtype=np.uint32).copy()
    zbuf = np.zeros(512, np.uint64)
    offs = rng.permutation(1024)[:64].astype(np.int64)
    jh, sh, zc = _numba_kernels()
    jh(words, 1), sh(words, offs, 1), zc(zbuf, 1)  # compile (cached on disk)
    n_nb = max(2000, int(200000 * scale))
    measured["jhash2_checksums"] = _best_ns(lambda n: jh(words, n), n_nb)
    notes["jhash2_checksums"] = "jhash2 over 1024 words (numba)"
    measured["sampled_hashes"] = _best_ns(lambda n: sh(words, offs, n), n_nb)
    notes["sampled_hashes"] = "PKSM random_sample_hash, 64 words (numba)"
    measured["zero_checks"] = _best_ns(lambda n: zc(zbuf, n), n_nb)
    notes["zero_checks"] = "scan of an all-zero 4 KiB page (numba)"
    prog(3, 8, "hashes")

    src = ctypes.create_string_buffer(page, PAGE)
    dst = ctypes.create_string_buffer(PAGE)
    mm = ctypes.memmove
    mv_over = _best_ns(lambda n: [mm(dst, src, 8) for _ in range(n)], n_hash)
    measured["page_copies"] = max(1.0, _best_ns(lambda n: [mm(dst, src, PAGE) for _ in range(n)], n_hash) - mv_over)
    notes["page_copies"] = "memmove of 4 KiB"
    prog(4, 8, "copy")

    wp = _mprotect_ns(max(200, int(5000 * scale)))
    if wp is not None:
        measured["write_protects"] = wp
        measured["remaps"] = wp
        notes["write_protects"] = notes["remaps"] = "mprotect() of one page (PTE change + TLB flush), syscall included"
    prog(5, 8, "mprotect")
    cow = _cow_fault_ns(max(256, int(4096 * scale)))
    if cow is not None:
        measured["cow_copies"] = cow
        notes["cow_copies"] = "write fault on a MAP_PRIVATE page of a memfd (fault + 4 KiB copy)"
    prog(6, 8, "cow")
    # hash-table operations: a Python dict is a poor proxy; a numba typed-dict op is closer
    measured["hashtable_ops"] = _dict_op_ns(max(10000, int(200000 * scale)))
    notes["hashtable_ops"] = "insert+lookup+delete in a numba typed dict, per op"
    measured["fault_table_ops"] = measured["hashtable_ops"]
    prog(8, 8, "done")

    ns = dict(DEFAULT_NS)
    ns.update({k: float(max(1, round(float(v)))) for k, v in measured.items()})
    src_text = (
        f"ksmtrace calibrate microbenchmarks on {platform.node()} ({_cpu_model()}, Linux {platform.release()}), "
        f"{time.strftime('%Y-%m-%d')}: measured {', '.join(sorted(measured))}; the other units keep the built-in values"
    )
    model = CostModel(ns=ns, name=f"microbench-{platform.node()}", source=src_text)
    object.__setattr__(model, "notes", notes)  # informational, not saved
    return model


def _mprotect_ns(n: int) -> float | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    buf = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[0] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        def run(k):
            for _ in range(k):
                libc.mprotect(addr, PAGE, 1)  # PROT_READ
                libc.mprotect(addr, PAGE, 3)  # PROT_READ|PROT_WRITE

        return _best_ns(run, n) / 2
    finally:
        try:
            buf.close()
        except BufferError:
            pass


def _cow_fault_ns(pages: int) -> float | None:
    try:
        fd = os.memfd_create("ksmtrace-calibrate")
    except (AttributeError, OSError):
        return None
    try:
        os.ftruncate(fd, pages * PAGE)
        os.pwrite(fd, b"\x01" * (pages * PAGE), 0)
        best = math.inf
        for _ in range(3):
            m = mmap.mmap(fd, pages * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            view = np.frombuffer(m, dtype=np.uint8)
            _ = int(view[::PAGE].sum())  # map the page-cache pages first (read faults)
            t = time.perf_counter_ns()
            view[::PAGE] = 2  # one write fault + copy per page
            best = min(best, (time.perf_counter_ns() - t) / pages)
            del view
            m.close()
        return best
    finally:
        os.close(fd)


def _dict_op_ns(n: int) -> float:
    from numba import njit

    @njit(cache=True)
    def ops(n):
        d = {}
        s = 0
        for i in range(n):
            k = (i * 2654435761) & 0xFFFFFF
            d[k] = i
            s += d.get(k ^ 1, 0)
            if i & 1:
                d.pop(k, 0)
        return s

    ops(10)
    return _best_ns(lambda k: ops(k), n, repeat=3) / 3


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# =============================================================================================
# fitting to ksmd's real CPU
# =============================================================================================
#: unit groups fitted together (each group's units keep their base ratios); units in no group
#: keep their base cost.  Few groups keep the fit identifiable and the costs plausible.  Wake-ups
#: and full-scan starts are separate groups: their ratio varies a lot between workloads (one scan
#: per ~1.3 wake-ups for a zero-heavy workload at use_zero_pages=1, one per ~10 for a static one).
GROUPS: dict[str, tuple[str, ...]] = {
    "page_visit": ("pages_visited", "addresses_walked", "rmap_allocs", "rmap_frees"),
    "checksum": ("checksums", "jhash2_checksums"),
    "wakeup": ("wakeups",),
    "scan_start": ("scan_starts",),
    "tree": ("stable_node_visits", "unstable_node_visits"),
    "merge": ("write_protects", "remaps", "memcmp_pages", "zero_checks", "stale_prunes", "page_copies"),
}


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None, tol: float = 1e-10) -> np.ndarray:
    """Non-negative least squares: argmin ||A x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    A = np.asarray(A, dtype=float)
    b = np.asarray(b, dtype=float)
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (b - A @ x)
    it = 0
    max_iter = max_iter or 3 * n + 30
    while (~passive).any() and w[~passive].max() > tol * max(1.0, np.abs(w).max()):
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            it += 1
            if it > max_iter * 10:
                return x
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = A.T @ (b - A @ x)
    return x


@dataclass
class RunData:
    """One ground-truth run prepared for fitting: unit counts and real CPU per window."""

    trace: str
    label: str
    workload: str
    settings: str
    units: np.ndarray  # [windows, N_UNITS] simulated unit counts
    real_cpu_s: np.ndarray  # [windows] ksmd CPU seconds (real)
    duration_s: float

    @property
    def total_units(self) -> np.ndarray:
        return self.units.sum(axis=0)

    @property
    def total_real_s(self) -> float:
        return float(self.real_cpu_s.sum())


@dataclass
class FitResult:
    model: CostModel
    scales: dict[str, float]
    train: list[dict[str, Any]] = field(default_factory=list)
    holdout: list[dict[str, Any]] = field(default_factory=list)
    base: str = ""

    def summary(self) -> dict[str, Any]:
        def stats(rows):
            e = [abs(r["rel_error"]) for r in rows if r.get("rel_error") is not None]
            return {"runs": len(rows), "mean_abs_error": float(np.mean(e)) if e else None,
                    "max_abs_error": float(np.max(e)) if e else None,
                    "within_25pct": sum(1 for x in e if x <= 0.25)}
        return {"train": stats(self.train), "holdout": stats(self.holdout), "scales": self.scales}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "scales": self.scales, "base": self.base,
                "train": self.train, "holdout": self.holdout, "summary": self.summary()}


def find_ground_truth_traces(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Trace directories (with ground truth) given directly or found under the given directories."""
    from ksmtrace.trace import schema

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / schema.MANIFEST).is_file():
            out.append(p)
            continue
        if not p.is_dir():
            raise KsmtraceError(f"{p}: no such trace or directory")
        found = sorted(m.parent for m in p.rglob(schema.MANIFEST))
        out.extend(found)
    seen: set[Path] = set()
    uniq = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def run_data(trace_path: str | os.PathLike, window_s: float = 1.0, timing_cost: CostModel | str | None = None) -> RunData:
    """Replay one ground-truth trace and return its unit counts and real CPU per window."""
    from ksmtrace.fidelity.groundtruth import ksm_params, load_ground_truth, wall_clock_model
    from ksmtrace.fidelity.metrics import step_hold
    from ksmtrace.replay import replay
    from ksmtrace.trace.reader import open_trace

    tr = open_trace(trace_path)
    gt = load_ground_truth(tr)
    params = ksm_params(gt)
    clock = wall_clock_model(gt, resolve_cost_model(timing_cost))
    res = replay(tr, "ksm", params, scope="recorded", timing_cost=clock, start_s=gt.start_s, hz=gt.hz)
    t = res.table["t_s"].to_numpy()
    units = np.column_stack([res.table[f"u_{u}"].to_numpy().astype(float) if f"u_{u}" in res.table.columns
                             else np.zeros(len(t)) for u in UNIT_NAMES])
    real = step_hold(gt.times, gt.column("ksmd_cpu_ns") / 1e9, t)
    real = np.nan_to_num(real)
    d_real = np.diff(real, prepend=real[0])
    # windows of >= window_s from KSM's start (the rows before it carry no work)
    start = gt.start_s
    keep = t > start
    t, units, d_real = t[keep], units[keep], d_real[keep]
    if len(t) == 0:
        raise KsmtraceError(f"{trace_path}: no snapshot after KSM started")
    win = np.floor((t - start) / window_s).astype(np.int64)
    nwin = int(win.max()) + 1
    U = np.zeros((nwin, units.shape[1]))
    R = np.zeros(nwin)
    np.add.at(U, win, units)
    np.add.at(R, win, d_real)
    used = U.sum(axis=1) > 0
    v = gt.validate or {}
    return RunData(trace=str(trace_path), label=str(v.get("label", Path(trace_path).parent.name)),
                   workload=str(v.get("workload", "?")), settings=str(v.get("settings_preset", "?")),
                   units=U[used], real_cpu_s=R[used], duration_s=float(gt.end_s - start))


def split_holdout(runs: Sequence[RunData], every: int = 3) -> tuple[list[RunData], list[RunData]]:
    """Deterministic split: within each workload x settings group (in trace order), every
    ``every``-th run is held out — and the second run of a group of two — so every group that has
    two or more runs is represented on both sides."""
    groups: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.settings), []).append(r)
    train: list[RunData] = []
    hold: list[RunData] = []
    i = 0
    for key in sorted(groups):
        g = sorted(groups[key], key=lambda r: r.trace)
        if len(g) == 1:
            # single runs alternate between the sides
            (hold if i % every == every - 1 else train).append(g[0])
            i += 1
            continue
        for j, r in enumerate(g):
            (hold if j % max(2, every) == 1 else train).append(r)
    return train, hold


def fit(runs: Sequence[RunData], base: CostModel, groups: Mapping[str, Sequence[str]] = GROUPS) -> tuple[CostModel, dict[str, float]]:
    """NNLS fit of group scales: real CPU per window ≈ Σ_g scale_g · Σ_{u in g} base_u · count_u.

    Each run's windows are weighted equally per run (a long run does not dominate).  Units in no
    group keep ``base``'s cost.  Returns the fitted model and the scales."""
    bvec = base.vector()
    gnames = list(groups)
    rows_A, rows_b = [], []
    for r in runs:
        if len(r.real_cpu_s) == 0:
            continue
        wgt = 1.0 / math.sqrt(len(r.real_cpu_s)) / max(r.total_real_s / max(len(r.real_cpu_s), 1), 1e-6)
        fixed = np.zeros(len(r.real_cpu_s))
        cols = []
        in_group = np.zeros(len(UNIT_NAMES), dtype=bool)
        for g in gnames:
            idx = [UNIT_NAMES.index(u) for u in groups[g]]
            in_group[idx] = True
            cols.append(r.units[:, idx] @ bvec[idx] / 1e9)
        rest = (~in_group) & DAEMON_MASK
        fixed = r.units[:, rest] @ bvec[rest] / 1e9
        rows_A.append(np.column_stack(cols) * wgt)
        rows_b.append((r.real_cpu_s - fixed) * wgt)
    if not rows_A:
        raise KsmtraceError("no ground-truth windows to fit")
    A = np.vstack(rows_A)
    b = np.concatenate(rows_b)
    # groups with no work in any run cannot be fitted: keep them at scale 1
    active = np.abs(A).sum(axis=0) > 0
    x = np.ones(len(gnames))
    if active.any():
        x[active] = nnls(A[:, active], b)
    scales = {g: float(s) for g, s in zip(gnames, x)}
    ns = dict(base.ns)
    for g, s in scales.items():
        for u in groups[g]:
            # whole nanoseconds: the replay's clock works in integer picoseconds and floors each
            # batch to a nanosecond, so whole-ns costs keep clock and report CPU exactly equal
            ns[u] = float(round(float(base.ns.get(u, DEFAULT_NS[u])) * s))
    return CostModel(ns=ns, name="fitted", source=""), scales


def evaluate(model: CostModel, runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Per run: real ksmd CPU, the model's, and the relative error."""
    out = []
    vec = np.where(DAEMON_MASK, model.vector(), 0.0)
    for r in runs:
        sim = float(r.total_units @ vec) / 1e9
        real = r.total_real_s
        out.append({"trace": r.trace, "label": r.label, "workload": r.workload, "settings": r.settings,
                    "real_cpu_s": real, "model_cpu_s": sim,
                    "rel_error": (sim - real) / real if real > 0 else None, "duration_s": r.duration_s})
    return out


def fit_from_runs(
    paths: Sequence[str | os.PathLike],
    *,
    base: CostModel | str | None = None,
    holdout_every: int = 3,
    window_s: float = 1.0,
    iterations: int = 2,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit the cost model to ksmd's CPU in the ground-truth traces under ``paths``.

    ``base``: the per-unit costs the group scales multiply (default: the built-in table, or a
    microbenchmark cost file).  ``holdout_every``: see :func:`split_holdout` (0 = no held-out
    runs).  The replays' clock uses the model being fitted; ``iterations`` re-replays with the
    previous fit as the clock (the unit counts depend slightly on it).
    """
    prog = make_progress(progress)
    say = log or (lambda m: None)
    base_model = resolve_cost_model(base) if base is not None else CostModel()
    traces = find_ground_truth_traces(paths)
    if not traces:
        raise KsmtraceError("no traces found under " + ", ".join(map(str, paths)))
    timing: CostModel = base_model
    model = base_model
    scales: dict[str, float] = {}
    runs: list[RunData] = []
    skipped: list[str] = []
    for it in range(max(1, iterations)):
        runs = []
        for i, p in enumerate(traces):
            try:
                runs.append(run_data(p, window_s, timing_cost=timing))
            except KsmtraceError as exc:
                if it == 0:
                    skipped.append(f"{p}: {exc}")
            prog(it * len(traces) + i + 1, len(traces) * max(1, iterations), f"replay {Path(p).name}")
        if not runs:
            raise KsmtraceError("none of the traces has ground truth: " + "; ".join(skipped[:3]))
        train, hold = split_holdout(runs, holdout_every) if holdout_every else (list(runs), [])
        if not train:
            train, hold = list(runs), []
        model, scales = fit(train, base_model)
        timing = model
        say(f"iteration {it + 1}: scales " + ", ".join(f"{g}={s:.3g}" for g, s in scales.items()))
    for s in skipped:
        say(f"skipped {s}")
    train, hold = split_holdout(runs, holdout_every) if holdout_every else (list(runs), [])
    if not train:
        train, hold = list(runs), []
    tr_eval, ho_eval = evaluate(model, train), evaluate(model, hold)
    he = [abs(r["rel_error"]) for r in ho_eval if r["rel_error"] is not None]
    host = platform.node()
    source = (
        f"fitted by `ksmtrace calibrate --from-runs` on {host} ({_cpu_model()}, {os.cpu_count()} CPUs, Linux "
        f"{platform.release()}) {time.strftime('%Y-%m-%d')}: NNLS of ksmd CPU per {window_s:g} s window over "
        f"{len(train)} ground-truth runs ({', '.join(sorted({f'{r.workload}/{r.settings}' for r in train}))}); "
        f"group scales {', '.join(f'{g}={s:.3g}' for g, s in scales.items())} on base {base_model.name!r}; "
        + (f"held-out error of ksmd CPU over {len(he)} runs: mean {100 * np.mean(he):.1f}%, max {100 * np.max(he):.1f}%"
           if he else "no held-out runs")
    )
    model = CostModel(ns=dict(model.ns), name=f"fitted-{host}", source=source)
    return FitResult(model=model, scales=scales, train=tr_eval, holdout=ho_eval, base=base_model.name)


# =============================================================================================
# ksmd's real wake-up cycle (root, KSM): the timer behind sleep_millisecs, measured
# =============================================================================================
def ksmd_wakeup_cycle(sleep_ms: int = 20, seconds: float = 3.0, pages: int = 16) -> dict[str, Any]:
    """Mean time between two ksmd wake-ups at ``sleep_millisecs=sleep_ms`` on this host.

    A tiny mergeable region of unique pages makes every wake-up one complete full scan (the batch
    ends at the end of the scan), so ``full_scans / elapsed`` is the wake-up rate.  The replay's
    clock (``ksmtrace.engine.clock.next_wake``) predicts ``ceil(sleep·HZ/1000) + 1`` jiffies per
    cycle for a short batch; the difference is the real timer's lateness.  Every KSM setting is
    restored afterwards.
    """
    from ksmtrace import kernelksm as K
    from ksmtrace.trace.writer import kernel_hz

    hz = kernel_hz() or 250
    buf = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_MERGEABLE)
        rng = np.random.default_rng(7)
        buf[:] = rng.integers(0, 256, pages * PAGE, dtype=np.uint8).tobytes()
        with K.ksm_settings(run=0, pages_to_scan=1000, sleep_millisecs=int(sleep_ms), smart_scan=0, use_zero_pages=0):
            K.unmerge_all()
            K.write("run", 0)
            K.write("run", 1)
            time.sleep(0.3)  # settle: the first scans allocate rmap items
            f1, t1 = K.read("full_scans"), time.monotonic()
            time.sleep(seconds)
            f2, t2 = K.read("full_scans"), time.monotonic()
    finally:
        buf.close()
    n = int(f2) - int(f1)
    jiffy_ms = 1000.0 / hz
    model_jiffies = -(-int(sleep_ms) * hz // 1000) + 1
    mean = (t2 - t1) * 1000.0 / n if n > 0 else float("nan")
    return {"sleep_ms": int(sleep_ms), "hz": hz, "wakeups": n, "seconds": t2 - t1, "mean_cycle_ms": mean,
            "model_cycle_ms": model_jiffies * jiffy_ms, "late_ms": mean - model_jiffies * jiffy_ms,
            "late_fraction_of_jiffy": (mean - model_jiffies * jiffy_ms) / jiffy_ms}
