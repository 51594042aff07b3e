"""Where numba caches ksmtrace's compiled code.

numba checks a cached function against its own source file only, but a cached policy entry
point has the engine's primitives (engine/state.py, engine/clock.py) compiled into it: after an
edit to the engine, a stale cache would keep running the old engine code.  So the cache lives in
a directory named by a digest of every jitted source file of the package — any edit, anywhere,
starts a fresh cache — under the user's cache directory (site-packages may be read-only).

Import this module before any ``@njit(cache=True)`` decorator runs.  ``NUMBA_CACHE_DIR`` set by
the user wins.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

_JITTED = (
    "engine/state.py",
    "engine/clock.py",
    "engine/jitutil.py",
    "trace/prepare.py",
    "engine/daemon.py",
    "policies/oracle/kernel.py",
    "policies/ksm/kernel.py",
    "policies/pksm/kernel.py",
    "policies/hashtable/kernel.py",
    "lab/microbench.py",
)


def _digest() -> str:
    root = Path(__file__).parent
    h = hashlib.sha256(numba.__version__.encode())
    for rel in _JITTED:
        try:
            h.update((root / rel).read_bytes())
        except OSError:
            h.update(rel.encode())
    return h.hexdigest()[:16]


def configure() -> None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    base = os.environ.get("KSMTRACE_JIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ksmtrace", "jit"
    )
    path = os.path.join(base, _digest())
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return  # numba falls back to __pycache__ or an in-memory compile
    numba.config.CACHE_DIR = path


configure()
