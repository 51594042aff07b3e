"""Where numba caches ksmtrace's compiled code — and never a crash when it cannot.

numba checks a cached function against its own source file only, but a cached policy entry
point has the engine's primitives (engine/state.py, engine/clock.py) compiled into it: after an
edit to the engine, a stale cache would keep running the old engine code.  So the cache lives in
a directory named by a digest of every module of the package that imports numba (found by
scanning the package, so a new or moved jitted module is covered without a list to maintain)
and of the numba version: any edit, anywhere, starts a fresh cache.

Where: ``$KSMTRACE_JIT_CACHE`` or ``$XDG_CACHE_HOME/ksmtrace/jit`` (``~/.cache/ksmtrace/jit``).
When that is not writable (a read-only home, an unprivileged user, a read-only install), a
private directory under the system's temporary directory (``ksmtrace-<uid>/jit``, 0700, ours)
is used; when none can be used, caching is turned off and functions compile in memory.  numba's
own fallbacks (``__pycache__`` beside a read-only source, ``~/.cache/numba``) would otherwise end
in "cannot cache function" at import time.  A cache directory must belong to the user and be
writable by nobody else: numba's cache files are pickles, and loading another user's is running
their code.

Import this module before any ``@njit(cache=True)`` decorator runs.  ``NUMBA_CACHE_DIR`` set by
the user wins (if it is usable).
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

import numba

_ROOT = Path(__file__).parent
_USES_NUMBA = re.compile(rb"^\s*(?:from\s+numba\b|import\s+numba\b)", re.M)

#: where compiled code is cached (None: not cached)
CACHE_DIR: str | None = None


#: modules without numba whose constants are compiled into every kernel
_COMPILED_IN = ("engine/cost.py", "engine/api.py")


def jitted_sources(root: Path = _ROOT) -> list[Path]:
    """Every module of the package that imports numba, and the modules whose constants the
    kernels compile in, in a stable order."""
    out = [root / q for q in _COMPILED_IN if (root / q).exists()]
    for p in sorted(root.rglob("*.py")):
        try:
            if p not in out and _USES_NUMBA.search(p.read_bytes()):
                out.append(p)
        except OSError:
            continue
    return out


def _digest() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    for p in jitted_sources():
        h.update(p.relative_to(_ROOT).as_posix().encode() + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:16]


#: digest of the jitted code (names the cache directory; the prepared-trace cache keys on it too)
CODE_DIGEST = _digest()


def _private_dir(path: str) -> bool:
    """Create ``path`` (0700) if needed; True if it is a directory of ours nobody else can write,
    and we can write it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return False
        if not os.access(path, os.W_OK | os.X_OK):
            return False
        tempfile.TemporaryFile(dir=path).close()  # what numba itself checks
        return True
    except OSError:
        return False


def _candidates() -> list[str]:
    user = os.environ.get("KSMTRACE_JIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ksmtrace", "jit"
    )
    out = [os.path.join(user, CODE_DIGEST)]
    try:
        tmp = tempfile.gettempdir()
    except (OSError, FileNotFoundError):
        return out
    top = os.path.join(tmp, f"ksmtrace-{os.geteuid()}")
    if _private_dir(top):  # ours: every level below is then ours too
        out.append(os.path.join(top, "jit", CODE_DIGEST))
    return out


def _disable_caching() -> None:
    """No usable cache directory: compile in memory (``cache=True`` becomes a no-op)."""
    from numba.core import dispatcher

    dispatcher.Dispatcher.enable_caching = lambda self: None


def configure() -> None:
    global CACHE_DIR
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given and _private_dir(given):
        CACHE_DIR = given
        return
    if os.environ.get("KSMTRACE_JIT_NO_CACHE"):
        _disable_caching()
        return
    for path in _candidates():
        if _private_dir(path):
            numba.config.CACHE_DIR = CACHE_DIR = path
            return
    _disable_caching()


configure()
