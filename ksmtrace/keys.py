"""Secret keys kept in files (``capture --hash-key``, ``redact --key-file``): read, create, and say
when one is not private.

A key file shared with group or others makes every keyed hash of every trace made with it open to
a dictionary attack (``is this page all zeros but a password?``), so readers of key files warn::

    >>> msg = key_file_warning("shared.key")          # None, or one sentence to print
    >>> key, created = read_or_create_key("shared.key", nbytes=32)

:func:`key_file_warning` is what every reader of a key file calls (the capture's ``--hash-key``
included); it does not refuse, because a key already shared is shared — but it tells.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ksmtrace.errors import KsmtraceError


class KeyFileError(KsmtraceError):
    """A key file cannot be read or created, or does not hold a key."""


def key_file_warning(path: str | os.PathLike) -> str | None:
    """A warning when the key file ``path`` is readable (or writable) by group or others, or is
    not owned by the user reading it; None when it is private (or does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    problems = []
    readers = [who for who, bit in (("group", stat.S_IRGRP), ("others", stat.S_IROTH)) if st.st_mode & bit]
    if readers:
        problems.append("readable by " + " and ".join(readers))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append("writable by others")
    if st.st_uid != os.geteuid():
        problems.append(f"owned by uid {st.st_uid}")
    if not problems:
        return None
    return (f"{path}: key file is {' and '.join(problems)} (mode {stat.S_IMODE(st.st_mode):04o}); whoever can read it "
            f"can test guesses of page contents against every trace made with it (chmod 600 {path})")


def read_or_create_key(path: str | os.PathLike, nbytes: int = 32) -> tuple[bytes, bool]:
    """The key in ``path`` (hex digits, at least ``nbytes`` bytes' worth), or a new random one
    written there (mode 0600, never through a symbolic link) if the file does not exist.
    Returns (key, created)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = None
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot create the key file ({exc.strerror})") from None
    if fd is not None:
        key = secrets.token_bytes(nbytes)
        try:
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return key, True
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise KeyFileError(f"{p}: a key file must be a regular file")
            text = os.read(fd, 4096).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read the key file ({exc.strerror})") from None
    if text.lower().startswith("0x"):
        text = text[2:]
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < nbytes:
        raise KeyFileError(f"{p}: not a key (expected {2 * nbytes} or more hex digits)")
    return key, False
