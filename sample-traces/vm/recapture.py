#!/usr/bin/env python3
"""Recapture the ``vm`` sample trace from scratch (root, Linux with KSM, Debian/apt for QEMU).

    .venv/bin/python sample-traces/vm/recapture.py            # prepare, boot, capture, install

1. ``prepare.sh`` installs qemu-system-x86 + cpio (apt) and builds the kernel + busybox initramfs
   cache (nothing goes into the project's environment);
2. ``boot_guests.py -n 3 --mem 256`` starts three QEMU/TCG guests (``mem-merge=on``: QEMU
   madvises guest RAM MADV_MERGEABLE, and MADV_HUGEPAGE: THP);
3. as soon as every QEMU process has its mergeable guest-RAM VMA (before the guests boot),
   ``ksmtrace capture --pid ... --scope mergeable --fingerprints --interval 2 --duration 60
   --ksm-sample-interval 0.5`` starts;
4. right after snapshot 0 is committed, the real KSM is started with
   ``ksm_settings(run=1, pages_to_scan=1000, sleep_millisecs=20)`` (other settings as found);
   at the end every KSM setting is restored (and merged pages unmerged) by that context manager;
5. the guests are stopped, the trace replaces the files in ``sample-traces/vm/`` and
   ``capture.json`` records what was done (versions, times, KSM settings, when KSM started).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256, help="MiB per guest")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--pages-to-scan", type=int, default=1000)
    ap.add_argument("--sleep-millisecs", type=int, default=20)
    ap.add_argument("--no-ksm", action="store_true", help="do not run the real KSM during the capture")
    ap.add_argument("--no-prepare", action="store_true", help="skip prepare.sh (cache already filled)")
    ap.add_argument("--cache", default=None, help="VM cache directory (prepare.sh's)")
    ap.add_argument("--dest", type=Path, default=HERE, help="where the trace goes (default: this directory)")
    args = ap.parse_args(argv)

    from ksmtrace.lab import kernelksm

    cache = args.cache
    if not args.no_prepare:
        cmd = [str(HERE / "prepare.sh")] + ([cache] if cache else [])
        C.log("prepare: " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    sys.path.insert(0, str(HERE))
    import boot_guests

    cache_dir = Path(cache) if cache else boot_guests.default_cache_dir()
    vm_manifest = boot_guests.read_manifest(cache_dir)
    ksm_before = C.ksm_snapshot()
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-vm-recapture-"))
    out = tmp / "vm"
    boot_cmd = [sys.executable, str(HERE / "boot_guests.py"), "-n", str(args.guests), "--mem", str(args.mem),
                "--timeout", "180", "--cache", str(cache_dir)]
    C.log("boot: " + " ".join(boot_cmd[1:]))
    t_boot = time.monotonic_ns()
    boot = subprocess.Popen(boot_cmd, stdout=subprocess.PIPE, text=True)
    info: dict = {}
    try:
        # the QEMU processes are the boot script's children; wait for their guest-RAM VMA
        deadline = time.monotonic() + 30
        pids: list[int] = []
        while time.monotonic() < deadline:
            pids = C.children_of(boot.pid)
            if len(pids) == args.guests and all(C.has_mergeable_vma(p) for p in pids):
                break
            if boot.poll() is not None:
                raise SystemExit("recapture: boot_guests.py exited early")
            time.sleep(0.01)
        else:
            raise SystemExit("recapture: the guests never got a mergeable VMA")
        t_mergeable = time.monotonic_ns()
        targets = [x for p in pids for x in ("--pid", str(p))]
        cmd = C.capture_command(out, targets, interval=args.interval, duration=args.duration, scope="mergeable")
        cap = C.start_capture(cmd)
        first = C.wait_first_snapshot(out, cap)
        t0 = int(first["t_ns"])
        ksm_params = {"run": 1, "pages_to_scan": args.pages_to_scan, "sleep_millisecs": args.sleep_millisecs}
        ready_line = None
        if args.no_ksm or not kernelksm.available():
            summary = C.finish_capture(cap, timeout=args.duration + 120)
            t_ksm = None
        else:
            with kernelksm.ksm_settings(**ksm_params):
                t_ksm = time.monotonic_ns()
                C.log(f"KSM started {(t_ksm - t0) / 1e9:.3f} s after snapshot 0: {ksm_params}")
                summary = C.finish_capture(cap, timeout=args.duration + 120)
                ksm_end = C.ksm_snapshot()
                C.kill_tree(boot)  # stop the guests before KSM unmerges (cheaper)
        ksm_after = C.ksm_snapshot()
        if boot.poll() is None:
            C.kill_tree(boot)
        lines = [json.loads(x) for x in (boot.stdout.read() or "").splitlines() if x.strip().startswith("{")]
        ready_line = next((x for x in lines if x.get("event") == "ready"), None)
        size = C.install_trace(out, args.dest)
        info = {
            "trace": "vm",
            "workload": f"{args.guests} QEMU/TCG guests x {args.mem} MiB booting the same Debian cloud kernel + busybox initramfs",
            "commands": {
                "prepare": str(HERE / "prepare.sh") + (f" {cache}" if cache else ""),
                "boot": " ".join(boot_cmd[1:]),
                "capture": " ".join(cmd[1:]),
                "ksm": None if t_ksm is None else f"kernelksm.ksm_settings({', '.join(f'{k}={v}' for k, v in ksm_params.items())})",
            },
            "qemu_pids": pids,
            "mergeable_vma_after_spawn_s": (t_mergeable - t_boot) / 1e9,
            "first_snapshot_after_spawn_s": (t0 - t_boot) / 1e9,
            "ksm_started_after_snapshot0_s": None if t_ksm is None else (t_ksm - t0) / 1e9,
            "ksm_params": None if t_ksm is None else ksm_params,
            "ksm_settings_before": ksm_before,
            "ksm_counters_at_end": locals().get("ksm_end"),
            "ksm_settings_after": ksm_after,
            "guests": ready_line,
            "vm_cache_manifest": {k: v for k, v in vm_manifest.items() if k not in ("vmlinuz", "initramfs", "qemu_binary")},
            "host": C.host_facts(),
            "capture_summary": summary,
            "trace_bytes": size,
        }
        C.write_capture_info(args.dest, info)
        C.log(f"trace installed in {args.dest} ({size / 2**20:.2f} MiB)")
    finally:
        if boot.poll() is None:
            C.kill_tree(boot)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: info.get(k) for k in ("trace_bytes", "ksm_started_after_snapshot0_s", "first_snapshot_after_spawn_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
