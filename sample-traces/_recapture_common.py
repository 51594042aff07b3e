"""Shared steps of the sample traces' recapture scripts (sample-traces/*/recapture.py).

Not part of the ksmtrace package: these scripts drive a real capture on the host they run on
(root, Linux, /proc).  Each recapture script

1. starts its workload (installing what it needs into a temporary directory, never into the
   project's environment),
2. runs ``python -m ksmtrace capture ...`` on it into a temporary directory,
3. optionally starts the real KSM right after the first snapshot committed (so a replay starts
   from the unmerged state) through :func:`ksmtrace.lab.kernelksm.ksm_settings`, which restores
   every KSM setting on every path,
4. moves the finished trace into ``sample-traces/<name>/`` (replacing the old trace files; the
   README, scripts and other files stay) and writes ``capture.json`` beside it: the exact
   commands, package versions, kernel, KSM settings and when KSM was started.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: what a trace directory holds (everything else in sample-traces/<name>/ is ours)
TRACE_ENTRIES = ("manifest.json", "snapshots.jsonl", "pages", "vmas", "processes", "ksm", "ksm_stat", "contents",
                 "faults", "ksm_events", "vma_files", "files", "filepages")
#: hard size limit of one sample trace (the tests check it too)
MAX_TRACE_BYTES = 10 * 1024 * 1024


def log(msg: str) -> None:
    print(f"[recapture {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ksmtrace_python() -> str:
    """The interpreter that has ksmtrace installed (this one, normally the project's .venv)."""
    try:
        import ksmtrace  # noqa: F401
    except ImportError:  # pragma: no cover
        sys.exit("recapture: run this script with the Python that has ksmtrace installed "
                 "(e.g. .venv/bin/python sample-traces/NAME/recapture.py)")
    return sys.executable


def capture_command(out: Path, targets: Sequence[str], *, interval: float, duration: float, scope: str,
                    fingerprints: bool = True, ksm_sample_interval: float | None = 0.5,
                    extra: Sequence[str] = ()) -> list[str]:
    cmd = [ksmtrace_python(), "-m", "ksmtrace", "capture", *targets, "--interval", f"{interval:g}",
           "--duration", f"{duration:g}", "--scope", scope]
    if fingerprints:
        cmd.append("--fingerprints")
    if ksm_sample_interval:
        cmd += ["--ksm-sample-interval", f"{ksm_sample_interval:g}"]
    cmd += [*extra, "--quiet", "--json", "-o", str(out)]
    return cmd


def start_capture(cmd: list[str]) -> subprocess.Popen:
    log("capture: " + " ".join(shlex.quote(c) for c in cmd[1:]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def wait_first_snapshot(out: Path, cap: subprocess.Popen, timeout: float = 60.0) -> dict[str, Any]:
    """Block until snapshot 0 is committed (its line in snapshots.jsonl); return that line."""
    log_path = out / "snapshots.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cap.poll() is not None:
            raise SystemExit(f"recapture: the capture exited early (status {cap.returncode})")
        try:
            text = log_path.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n") and text.strip():
            return json.loads(text.splitlines()[0])
        time.sleep(0.02)
    raise SystemExit("recapture: no first snapshot after %.0f s" % timeout)


def finish_capture(cap: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        out, _ = cap.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        cap.send_signal(signal.SIGINT)
        out, _ = cap.communicate(timeout=60)
    if cap.returncode not in (0,):
        raise SystemExit(f"recapture: capture failed with status {cap.returncode}")
    try:
        return json.loads(out)
    except ValueError:
        return {"stdout": out}


def ksm_snapshot() -> dict[str, Any]:
    from ksmtrace.lab import kernelksm

    if not kernelksm.available():
        return {}
    return kernelksm.read_all()


def install_trace(tmp_trace: Path, dest: Path) -> int:
    """Replace the trace files of ``dest`` by those of ``tmp_trace``; returns the trace's bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TRACE_ENTRIES:
        p = dest / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    total = 0
    for name in TRACE_ENTRIES:
        src = tmp_trace / name
        if not src.exists():
            continue
        shutil.move(str(src), str(dest / name))
    for root, dirs, files in os.walk(dest):
        rp = Path(root)
        if rp != dest and rp.relative_to(dest).parts[0] not in TRACE_ENTRIES:
            continue
        for f in files:
            fp = rp / f
            if rp == dest and f not in TRACE_ENTRIES:
                continue
            # shipped sample traces are public: readable by everyone (the writer makes them 0600)
            fp.chmod(0o644)
            total += fp.stat().st_size
        for d in dirs:
            (rp / d).chmod(0o755)
    dest.chmod(0o755)
    if total > MAX_TRACE_BYTES:
        log(f"WARNING: trace is {total / 2**20:.1f} MiB, over the {MAX_TRACE_BYTES / 2**20:.0f} MiB limit")
    return total


def pip_versions(python: str, names: Sequence[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([python, "-c", code, *names], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def deb_version(pkg: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    return r.stdout.strip() or None


def host_facts() -> dict[str, Any]:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "thp_enabled": thp.read_text().strip() if thp.exists() else None,
        "python": platform.python_version(),
        "ksmtrace_version": _ksmtrace_version(),
    }


def _ksmtrace_version() -> str:
    from ksmtrace import __version__

    return __version__


def write_capture_info(dest: Path, info: dict[str, Any]) -> None:
    p = dest / "capture.json"
    p.write_text(json.dumps(info, indent=1, sort_keys=False, default=str) + "\n")
    p.chmod(0o644)


def children_of(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == ppid:
            out.append(int(d))
    return sorted(out)


def has_mergeable_vma(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return False
    return any(line.startswith("VmFlags:") and " mg" in line for line in text.splitlines())


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal a process we started (by pid), wait, then SIGKILL it if needed."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
