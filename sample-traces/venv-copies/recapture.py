#!/usr/bin/env python3
"""Recapture the ``venv-copies`` sample trace from scratch (root, Linux; no network).

    .venv/bin/python sample-traces/venv-copies/recapture.py

1. copies the numpy package of the interpreter running this script (``numpy`` and ``numpy.libs``)
   into three directories ``env1``, ``env2``, ``env3`` of a temporary directory (three virtualenvs
   carrying the same library as different files), syncs them and drops their page cache
   (``POSIX_FADV_DONTNEED``), so what is resident is what the importers use;
2. starts three interpreters running ``worker.py ENV``: each marks itself mergeable
   (``prctl(PR_SET_MEMORY_MERGE)``), imports numpy from its own copy and does a little linear
   algebra and an FFT, then waits;
3. ``ksmtrace capture --pid ... --scope all --fingerprints --files TMP --interval 2 --duration 40
   --ksm-sample-interval 0.5``;
4. right after snapshot 0 is committed the real KSM is started
   (``ksm_settings(run=1, pages_to_scan=1000, sleep_millisecs=20)``, every setting restored at the
   end): it merges the processes' anonymous pages — never the page cache, which is the what-if;
5. about 10 s after snapshot 0, one file of ``env3`` that the importers read is rewritten in place
   with ``write()`` (one line appended: an in-place upgrade of one file of one copy) -- the write
   that breaks that file's sharing;
6. the workers are stopped, the trace installed in ``sample-traces/venv-copies/`` and
   ``capture.json`` written; the copies are removed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _recapture_common as C  # noqa: E402

ENVS = ("env1", "env2", "env3")
REWRITTEN = "numpy/_core/_methods.py"


def drop_cache(root: Path) -> int:
    n = 0
    for d, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--write-after", type=float, default=10.0, help="seconds after snapshot 0 to rewrite the env3 file")
    ap.add_argument("--pages-to-scan", type=int, default=1000)
    ap.add_argument("--sleep-millisecs", type=int, default=20)
    ap.add_argument("--no-ksm", action="store_true")
    ap.add_argument("--dest", type=Path, default=HERE)
    args = ap.parse_args(argv)

    import numpy

    from ksmtrace.lab import kernelksm

    site = Path(numpy.__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-pagecache-recapture-"))
    workers: list[subprocess.Popen] = []
    out: Path | None = None
    try:
        for env in ENVS:
            for pkg in ("numpy", "numpy.libs"):
                if (site / pkg).exists():
                    shutil.copytree(site / pkg, tmp / env / pkg, ignore=shutil.ignore_patterns("tests", "__pycache__"))
        os.sync()
        C.log(f"copied numpy {numpy.__version__} three times into {tmp}; dropped the cache of {drop_cache(tmp)} files")
        for env in ENVS:
            p = subprocess.Popen([sys.executable, "-S", "-B", str(HERE / "worker.py"), str(tmp / env)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            workers.append(p)
        for p in workers:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"recapture: worker {p.pid} said {line!r}")
        pids = [p.pid for p in workers]
        out = Path(tempfile.mkdtemp(prefix="ksmtrace-pagecache-trace-")) / "trace"  # not under --files
        targets = [x for pid in pids for x in ("--pid", str(pid))]
        cmd = C.capture_command(out, targets, interval=args.interval, duration=args.duration, scope="all",
                                fingerprints=True, extra=["--files", str(tmp)])
        ksm_before = C.ksm_snapshot()
        cap = C.start_capture(cmd)
        first = C.wait_first_snapshot(out, cap)
        t0 = first["t_ns"] / 1e9
        ksm_params = {"run": 1, "pages_to_scan": args.pages_to_scan, "sleep_millisecs": args.sleep_millisecs}
        use_ksm = not args.no_ksm and kernelksm.available()
        t_ksm = ksm_end = None
        with (kernelksm.ksm_settings(**ksm_params) if use_ksm else contextlib.nullcontext()):
            if use_ksm:
                t_ksm = time.monotonic() - t0
                C.log(f"KSM started {t_ksm:.3f} s after snapshot 0: {ksm_params}")
            time.sleep(max(0.0, t0 + args.write_after - time.monotonic()))
            with open(tmp / "env3" / REWRITTEN, "a") as f:
                f.write("# upgraded in place\n")
            wrote_at = time.monotonic() - t0
            C.log(f"rewrote env3/{REWRITTEN} at {wrote_at:.2f} s")
            summary = C.finish_capture(cap, timeout=args.duration + 120)
            ksm_end = C.ksm_snapshot()
            for p in workers:
                p.kill()
                p.wait()
        ksm_after = C.ksm_snapshot()
        nbytes = C.install_trace(out, args.dest)
        info = {
            "trace": "venv-copies",
            "workload": "three copies of the numpy package (numpy, numpy.libs) in three directories env1..env3 of one "
                        "temporary directory, each imported by its own CPython interpreter (-S, the copy first on "
                        "sys.path; prctl(PR_SET_MEMORY_MERGE)-mergeable) that does a little linear algebra and an FFT; one file of env3 rewritten in place "
                        "with write() during the capture",
            "commands": {
                "copies": f"cp -r SITE/numpy SITE/numpy.libs TMP/envN/ (N=1..3, without tests/ and __pycache__/); sync; "
                          "posix_fadvise(DONTNEED) on every copied file",
                "workers": [f"python -S -B sample-traces/venv-copies/worker.py TMP/{e}" for e in ENVS],
                "capture": " ".join(cmd[1:]).replace(str(tmp), "TMP").replace(str(out), "OUT"),
                "ksm": None if t_ksm is None else f"kernelksm.ksm_settings({', '.join(f'{k}={v}' for k, v in ksm_params.items())})",
                "write": f"append one line to TMP/env3/{REWRITTEN} at {wrote_at:.2f} s",
            },
            "packages": {"numpy": numpy.__version__},
            "worker_pids": pids,
            "rewritten_file": f"env3/{REWRITTEN}",
            "rewritten_after_snapshot0_s": wrote_at,
            "ksm_started_after_snapshot0_s": t_ksm,
            "ksm_params": ksm_params if t_ksm is not None else None,
            "ksm_settings_before": ksm_before,
            "ksm_counters_at_end": ksm_end,
            "ksm_settings_after": ksm_after,
            "host": C.host_facts(),
            "capture_summary": summary,
            "trace_bytes": nbytes,
        }
        C.write_capture_info(args.dest, info)
        C.log(f"installed {nbytes / 2**20:.2f} MiB in {args.dest}")
    finally:
        for p in workers:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        if out is not None:
            shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
