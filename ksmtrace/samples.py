"""The sample traces shipped with ksmtrace: real captures to try every command on.

>>> from ksmtrace import samples
>>> [s.name for s in samples.list_samples()]
['prefork', 'python-sci', 'vm']
>>> tr = samples.open_sample("vm")               # a Trace, as open_trace() gives
>>> samples.sample_path("vm")                    # its directory (pass it to any command)
>>> samples.resolve_trace("vm"), samples.resolve_trace("./my-trace")   # a sample name or a path

Each sample is a trace directory that also holds a ``README.md`` (how exactly it was captured),
``capture.json`` (the same facts, machine-readable) and a ``recapture.py`` that recaptures it from
scratch on a Linux host.  In a source checkout or an editable install they are the repository's
``sample-traces/``; an installed wheel carries them inside the package (``ksmtrace/_sample_traces``).
``KSMTRACE_SAMPLES_DIR`` overrides both.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ksmtrace.errors import KsmtraceError

#: the sample the demo and the docs use by default
DEFAULT_SAMPLE = "vm"
_PKG = Path(__file__).resolve().parent


class SampleError(KsmtraceError):
    """No such sample trace, or the samples are not installed."""


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    title: str  # first heading of its README
    snapshots: int
    trace_bytes: int

    @property
    def readme(self) -> Path:
        return self.path / "README.md"

    def open(self):
        from ksmtrace.trace.reader import open_trace

        return open_trace(self.path)


def samples_dirs() -> list[Path]:
    """Where sample traces are looked for, in order (only existing directories)."""
    cands: list[Path] = []
    env = os.environ.get("KSMTRACE_SAMPLES_DIR")
    if env:
        cands.append(Path(env))
    cands.append(_PKG / "_sample_traces")          # inside an installed wheel (force-included)
    cands.append(_PKG.parent / "sample-traces")    # a source checkout / editable install
    seen, out = set(), []
    for c in cands:
        try:
            r = c.resolve()
        except OSError:
            continue
        if r.is_dir() and r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _is_trace_dir(p: Path) -> bool:
    return (p / "manifest.json").is_file() and (p / "snapshots.jsonl").is_file()


def trace_bytes(path: str | os.PathLike) -> int:
    """Bytes of a trace's own files (manifest, log, table files), not README/scripts beside them."""
    p = Path(path)
    total = 0
    for name in ("manifest.json", "snapshots.jsonl"):
        f = p / name
        if f.is_file():
            total += f.stat().st_size
    for sub in ("pages", "vmas", "processes", "ksm", "ksm_stat", "contents"):
        d = p / sub
        if d.is_dir():
            total += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return total


def _title(p: Path) -> str:
    try:
        for line in (p / "README.md").read_text().splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    except OSError:
        pass
    return p.name


def _snapshots(p: Path) -> int:
    try:
        return sum(1 for line in (p / "snapshots.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def list_samples() -> list[Sample]:
    """Every sample trace found (the first directory that has a name wins), sorted by name."""
    found: dict[str, Sample] = {}
    for base in samples_dirs():
        for p in sorted(base.iterdir()):
            if p.is_dir() and p.name not in found and _is_trace_dir(p):
                found[p.name] = Sample(p.name, p, _title(p), _snapshots(p), trace_bytes(p))
    return [found[k] for k in sorted(found)]


def sample_names() -> list[str]:
    return [s.name for s in list_samples()]


def get_sample(name: str) -> Sample:
    for s in list_samples():
        if s.name == name:
            return s
    names = sample_names()
    if not names:
        raise SampleError("no sample traces are installed (looked in: "
                          + (", ".join(str(d) for d in samples_dirs()) or "nowhere: no samples directory") + ")")
    raise SampleError(f"no sample trace {name!r} (samples: {', '.join(names)})")


def sample_path(name: str = DEFAULT_SAMPLE) -> Path:
    """The directory of the sample trace ``name``."""
    return get_sample(name).path


def open_sample(name: str = DEFAULT_SAMPLE):
    """Open the sample trace ``name`` (a :class:`~ksmtrace.trace.reader.Trace`)."""
    return get_sample(name).open()


def capture_info(name: str) -> dict:
    """The sample's ``capture.json``: commands, versions, KSM settings, when KSM was started."""
    p = sample_path(name) / "capture.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def resolve_trace(name_or_path: str | os.PathLike) -> Path:
    """A trace directory from a path (if it exists) or a sample name."""
    p = Path(name_or_path)
    if p.exists():
        return p
    s = str(name_or_path)
    if os.sep not in s and "/" not in s:
        return sample_path(s)
    from ksmtrace.errors import TraceError

    raise TraceError(f"{p}: no such trace (and not a sample name; samples: {', '.join(sample_names()) or 'none'})")
