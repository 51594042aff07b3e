#!/usr/bin/env python3
"""Recapture the ``python-sci`` sample trace from scratch (root, Linux with KSM, network to PyPI).

    .venv/bin/python sample-traces/python-sci/recapture.py
    .venv/bin/python sample-traces/python-sci/recapture.py --python /some/venv/bin/python  # reuse a venv

1. creates a temporary venv and pip-installs the pinned scientific stack into it (never into the
   project's environment): numpy, pyarrow, polars, matplotlib;
2. starts four interpreters of that venv running ``worker.py`` (linalg, frames, plots, arrow);
   each marks itself mergeable with prctl(PR_SET_MEMORY_MERGE) and waits;
3. ``ksmtrace capture --pid ... --scope anon --fingerprints --interval 2 --duration 40
   --ksm-sample-interval 0.5`` starts; snapshot 0 holds the four bare interpreters;
4. right after snapshot 0 is committed the real KSM is started
   (``ksm_settings(run=1, pages_to_scan=1000, sleep_millisecs=20)``) and the workers are told to
   go: they import the stack (the same in each) and work for 30 s, then idle;
5. the workers are stopped, KSM restored, the trace installed in ``sample-traces/python-sci/``
   and ``capture.json`` written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _recapture_common as C  # noqa: E402

PINS = ["numpy==2.4.6", "pyarrow==26.0.1", "polars==2.1.0", "matplotlib==3.11.2"]
KINDS = ("linalg", "frames", "plots", "arrow")


def make_venv(base: Path) -> str:
    venv = base / "venv"
    C.log(f"creating a temporary venv in {venv} and installing {' '.join(PINS)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", *PINS], check=True,
                   stdout=sys.stderr)
    return str(venv / "bin/python")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=None, help="interpreter that has the stack (default: a new temporary venv)")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--work-seconds", type=float, default=30.0)
    ap.add_argument("--pages-to-scan", type=int, default=1000)
    ap.add_argument("--sleep-millisecs", type=int, default=20)
    ap.add_argument("--no-ksm", action="store_true")
    ap.add_argument("--dest", type=Path, default=HERE)
    args = ap.parse_args(argv)

    from ksmtrace.lab import kernelksm

    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-pysci-recapture-"))
    workers: list[subprocess.Popen] = []
    try:
        py = args.python or make_venv(tmp)
        versions = C.pip_versions(py, ["numpy", "pyarrow", "polars", "matplotlib"])
        pyver = subprocess.run([py, "-c", "import platform; print(platform.python_version())"], check=True,
                               capture_output=True, text=True).stdout.strip()
        ksm_before = C.ksm_snapshot()
        for kind in KINDS:
            p = subprocess.Popen([py, str(HERE / "worker.py"), kind, f"{args.work_seconds:g}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            workers.append(p)
        for p in workers:
            line = p.stdout.readline().strip()
            if line != "armed":
                raise SystemExit(f"recapture: worker {p.pid} said {line!r}")
        pids = [p.pid for p in workers]
        out = tmp / "python-sci"
        targets = [x for pid in pids for x in ("--pid", str(pid))]
        cmd = C.capture_command(out, targets, interval=args.interval, duration=args.duration, scope="anon")
        cap = C.start_capture(cmd)
        first = C.wait_first_snapshot(out, cap)
        t0 = int(first["t_ns"])
        ksm_params = {"run": 1, "pages_to_scan": args.pages_to_scan, "sleep_millisecs": args.sleep_millisecs}
        use_ksm = not args.no_ksm and kernelksm.available()
        ctx = kernelksm.ksm_settings(**ksm_params) if use_ksm else None
        t_ksm = None
        ksm_end = None
        if ctx:
            ctx.__enter__()
        try:
            if ctx:
                t_ksm = time.monotonic_ns()
                C.log(f"KSM started {(t_ksm - t0) / 1e9:.3f} s after snapshot 0: {ksm_params}")
            for p in workers:
                p.stdin.write("go\n")
                p.stdin.flush()
            t_go = time.monotonic_ns()
            summary = C.finish_capture(cap, timeout=args.duration + 120)
            ksm_end = C.ksm_snapshot()
        finally:
            for p in workers:
                C.kill_tree(p)
            if ctx:
                ctx.__exit__(None, None, None)
        ksm_after = C.ksm_snapshot()
        size = C.install_trace(out, args.dest)
        info = {
            "trace": "python-sci",
            "workload": "4 CPython interpreters, each prctl(PR_SET_MEMORY_MERGE)-mergeable, importing numpy, "
                        "pyarrow, polars and matplotlib and then doing different work: " + ", ".join(KINDS),
            "commands": {
                "venv": f"python -m venv VENV && VENV/bin/pip install {' '.join(PINS)}" if not args.python else f"--python {args.python}",
                "workers": [f"VENV/bin/python sample-traces/python-sci/worker.py {k} {args.work_seconds:g}" for k in KINDS],
                "capture": " ".join(cmd[1:]),
                "ksm": None if t_ksm is None else f"kernelksm.ksm_settings({', '.join(f'{k}={v}' for k, v in ksm_params.items())})",
            },
            "packages": versions,
            "worker_python": pyver,
            "worker_pids": pids,
            "ksm_started_after_snapshot0_s": None if t_ksm is None else (t_ksm - t0) / 1e9,
            "workers_started_work_after_snapshot0_s": (t_go - t0) / 1e9,
            "ksm_params": ksm_params if t_ksm is not None else None,
            "ksm_settings_before": ksm_before,
            "ksm_counters_at_end": ksm_end,
            "ksm_settings_after": ksm_after,
            "host": C.host_facts(),
            "capture_summary": summary,
            "trace_bytes": size,
        }
        C.write_capture_info(args.dest, info)
        C.log(f"trace installed in {args.dest} ({size / 2**20:.2f} MiB)")
        print(json.dumps({k: info[k] for k in ("trace_bytes", "ksm_started_after_snapshot0_s")}))
    finally:
        for p in workers:
            if p.poll() is None:
                C.kill_tree(p)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
