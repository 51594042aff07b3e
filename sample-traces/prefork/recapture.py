#!/usr/bin/env python3
"""Recapture the ``prefork`` sample trace from scratch (root, Linux with KSM, network to PyPI).

    .venv/bin/python sample-traces/prefork/recapture.py
    .venv/bin/python sample-traces/prefork/recapture.py --gunicorn /some/venv/bin/gunicorn

1. creates a temporary venv and pip-installs gunicorn into it (never into the project's env);
2. starts ``gunicorn --preload -w 4 --max-requests 800 --max-requests-jitter 200`` serving
   ``app.py`` on a free loopback port, with KSMTRACE_PREFORK_MERGE=1 (the master calls
   prctl(PR_SET_MEMORY_MERGE) before it builds the catalog; the workers inherit it on fork);
3. once the four workers are up, ``ksmtrace capture --tree MASTER --scope anon --fingerprints
   --interval 1 --duration 30 --ksm-sample-interval 0.5`` starts (snapshot 0: idle, freshly
   forked workers);
4. right after snapshot 0 is committed, the real KSM is started
   (``ksm_settings(run=1, pages_to_scan=1000, sleep_millisecs=20)``) and ``load.py`` sends about
   250 requests/s from 6 threads to 127.0.0.1 for 25 s; workers are recycled by --max-requests
   during the capture (new forks, exits);
5. gunicorn is stopped (SIGTERM to the master we started), KSM restored, the trace installed in
   ``sample-traces/prefork/`` and ``capture.json`` written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _recapture_common as C  # noqa: E402

PINS = ["gunicorn==27.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"recapture: gunicorn exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("recapture: gunicorn is not listening")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gunicorn", default=None, help="gunicorn executable (default: a new temporary venv)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--load-seconds", type=float, default=25.0)
    ap.add_argument("--rate", type=float, default=250.0)
    ap.add_argument("--pages-to-scan", type=int, default=1000)
    ap.add_argument("--sleep-millisecs", type=int, default=20)
    ap.add_argument("--no-ksm", action="store_true")
    ap.add_argument("--dest", type=Path, default=HERE)
    args = ap.parse_args(argv)

    from ksmtrace.lab import kernelksm

    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-prefork-recapture-"))
    gun = None
    load = None
    try:
        if args.gunicorn:
            gbin = args.gunicorn
        else:
            venv = tmp / "venv"
            C.log(f"creating a temporary venv in {venv} and installing {' '.join(PINS)}")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", *PINS],
                           check=True, stdout=sys.stderr)
            gbin = str(venv / "bin/gunicorn")
        gpy = str(Path(gbin).parent / "python")
        versions = C.pip_versions(gpy, ["gunicorn"])
        pyver = subprocess.run([gpy, "-c", "import platform; print(platform.python_version())"], check=True,
                               capture_output=True, text=True).stdout.strip()
        port = free_port()
        gcmd = [gbin, "--preload", "-w", str(args.workers), "-b", f"127.0.0.1:{port}", "--max-requests", "800",
                "--max-requests-jitter", "200", "--log-level", "warning", "--chdir", str(HERE), "app:application"]
        env = dict(os.environ, KSMTRACE_PREFORK_MERGE="1")
        ksm_before = C.ksm_snapshot()
        C.log("gunicorn: " + " ".join(gcmd))
        gun = subprocess.Popen(gcmd, env=env, stdout=subprocess.DEVNULL)
        wait_listening(port, gun)
        deadline = time.monotonic() + 30
        while len(C.children_of(gun.pid)) < args.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        out = tmp / "prefork"
        cmd = C.capture_command(out, ["--tree", str(gun.pid)], interval=args.interval, duration=args.duration,
                                scope="anon")
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
            lcmd = [sys.executable, str(HERE / "load.py"), str(port), f"{args.load_seconds:g}", "--threads", "6",
                    "--rate", f"{args.rate:g}"]
            load = subprocess.Popen(lcmd, stdout=subprocess.PIPE, text=True)
            t_load = time.monotonic_ns()
            summary = C.finish_capture(cap, timeout=args.duration + 120)
            load_out, _ = load.communicate(timeout=args.load_seconds + 60)
            ksm_end = C.ksm_snapshot()
        finally:
            if load is not None and load.poll() is None:
                C.kill_tree(load)
            C.kill_tree(gun, grace=30)
            if ctx:
                ctx.__exit__(None, None, None)
        ksm_after = C.ksm_snapshot()
        size = C.install_trace(out, args.dest)
        info = {
            "trace": "prefork",
            "workload": f"gunicorn {versions['gunicorn']} pre-fork server (--preload, {args.workers} sync workers, "
                        "--max-requests 800 --max-requests-jitter 200) serving app.py under load.py",
            "commands": {
                "venv": f"python -m venv VENV && VENV/bin/pip install {' '.join(PINS)}" if not args.gunicorn else f"--gunicorn {args.gunicorn}",
                "gunicorn": "KSMTRACE_PREFORK_MERGE=1 " + " ".join(["VENV/bin/gunicorn", *gcmd[1:]]).replace(str(HERE), "sample-traces/prefork").replace(f":{port}", ":PORT"),
                "load": " ".join(["python", "sample-traces/prefork/load.py", "PORT", *lcmd[3:]]),
                "capture": " ".join(cmd[1:]).replace(str(gun.pid), "MASTER_PID"),
                "ksm": None if t_ksm is None else f"kernelksm.ksm_settings({', '.join(f'{k}={v}' for k, v in ksm_params.items())})",
            },
            "packages": versions,
            "server_python": pyver,
            "master_pid": gun.pid,
            "ksm_started_after_snapshot0_s": None if t_ksm is None else (t_ksm - t0) / 1e9,
            "load_started_after_snapshot0_s": (t_load - t0) / 1e9,
            "load_result": json.loads(load_out.strip().splitlines()[-1]) if load_out.strip() else None,
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
        print(json.dumps({k: info[k] for k in ("trace_bytes", "ksm_started_after_snapshot0_s", "load_result")}))
    finally:
        if load is not None and load.poll() is None:
            C.kill_tree(load)
        if gun is not None and gun.poll() is None:
            C.kill_tree(gun, grace=30)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
