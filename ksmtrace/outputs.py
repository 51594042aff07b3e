"""Output directories nobody else can redirect, and atomic files written into them.

Every command that writes (``replay -o``, ``compare -o``, ``plot -o``, ``sweep -o``, the capture's
trace directory, the prepared cache) goes through :func:`open_output_dir`:

* the directory must be owned by the invoking user (effective uid) and not writable by group or
  others; otherwise another user could swap a file or a sub-directory for a symbolic link while
  we write (a root capture into ``/tmp/x`` writing Parquet files wherever the owner of ``/tmp/x``
  points);
* the directory is opened once, its last component without following a symbolic link (one the
  user owns, in a directory only they can change, is accepted), and everything is then created
  relative to that descriptor with ``O_NOFOLLOW | O_EXCL``: a name swapped after the check
  changes nothing we write;
* files are written atomically: a temporary file in the directory, ``fsync``, then a rename
  within the directory (:meth:`OutputDir.write_atomic`).  Readers see the old file or the new
  one, never a torn one.

Every refusal or failure is one :class:`~ksmtrace.errors.OutputError` line naming the path.

>>> with open_output_dir("results") as out:
...     out.write_bytes("run.json", data)
...     out.write_atomic("run.parquet", lambda fh: table.write_parquet(fh))
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import weakref
from pathlib import Path
from typing import Any, Callable, IO

from ksmtrace.errors import OutputError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _trusted_link(link: os.stat_result, parent: os.stat_result) -> bool:
    """A symbolic link nobody else can change: owned by us (or root) in a directory that only we
    (or root) can write, or that is sticky (others cannot rename or remove our link there)."""
    me = os.geteuid()
    if link.st_uid not in (me, 0):
        return False
    if parent.st_uid not in (me, 0):
        return False
    if parent.st_mode & 0o022 and not (parent.st_mode & stat.S_ISVTX and link.st_uid == me):
        return False
    return True


def _check_owner(path: Path, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise OutputError(f"{path}: {what} is owned by uid {st.st_uid}, not by you (uid {me}); refusing to write into it")
    if st.st_mode & 0o022:
        raise OutputError(f"{path}: group or others can write to this {what} (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"refusing to write into it (chmod go-w {path}, or choose another)")


def _open_last(parent_fd: int, name: str, path: Path) -> int:
    """Open ``name`` in ``parent_fd`` as a directory without following a symbolic link (unless
    it is one nobody else can change)."""
    try:
        return os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    lst = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISLNK(lst.st_mode):
        raise OutputError(f"{path}: exists and is not a directory")
    if not _trusted_link(lst, os.fstat(parent_fd)):
        raise OutputError(f"{path}: is a symbolic link another user could change; give the real directory")
    try:
        return os.open(name, _DIR, dir_fd=parent_fd)
    except NotADirectoryError:
        raise OutputError(f"{path}: is a symbolic link to something that is not a directory") from None


def _walk(path: Path, create: bool, mode: int) -> int:
    """A descriptor of directory ``path``, creating missing components (mode ``mode``) relative
    to their parent's descriptor."""
    p = Path(os.path.abspath(path))
    missing: list[str] = []
    q = p
    while not os.path.lexists(q) and q != q.parent:
        missing.append(q.name)
        q = q.parent
    if missing and not create:
        raise OutputError(f"{path}: no such directory")
    if not missing:
        if p == p.parent:  # "/"
            return os.open(p, _DIR)
        pfd = os.open(p.parent, _DIR)
        try:
            return _open_last(pfd, p.name, p)
        finally:
            os.close(pfd)
    if q == q.parent:
        fd = os.open(q, _DIR)
    else:
        pfd = os.open(q.parent, _DIR)
        try:
            fd = _open_last(pfd, q.name, q)
        finally:
            os.close(pfd)
    cur = q
    for name in reversed(missing):
        cur = cur / name
        try:
            try:
                os.mkdir(name, mode, dir_fd=fd)
            except FileExistsError:
                pass  # created meanwhile: opened below without following a link, then checked
            nfd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise OutputError(f"{cur}: was replaced by a symbolic link or a file while it was being created") from None
            raise OutputError(f"{cur}: cannot create directory ({exc.strerror})") from None
        os.close(fd)
        fd = nfd
    return fd


def open_output_dir(path: str | os.PathLike, *, create: bool = True, mode: int = 0o755, empty: bool = False,
                    what: str = "output directory") -> "OutputDir":
    """Open (and create, with ``mode``) an output directory we may safely write into.

    ``empty``: it must hold nothing yet (a new trace).  Raises :class:`OutputError`.
    """
    p = Path(path)
    try:
        fd = _walk(p, create, mode & ~0o022)
    except OutputError:
        raise
    except FileNotFoundError:
        raise OutputError(f"{p}: no such directory") from None
    except NotADirectoryError:
        raise OutputError(f"{p}: a component of the path is not a directory") from None
    except OSError as exc:
        raise OutputError(f"{p}: cannot open {what} ({exc.strerror})") from None
    return _checked(p, fd, what, empty)


def _checked(path: Path, fd: int, what: str, empty: bool) -> "OutputDir":
    """The directory open as ``fd``, once it passes the ownership rule (and is empty if need be)."""
    try:
        _check_owner(path, os.fstat(fd), what)
        if empty and os.listdir(fd):
            raise OutputError(f"{path}: output exists and is not an empty directory")
    except BaseException:
        os.close(fd)
        raise
    return OutputDir(path, fd)


def check_output_dir(path: str | os.PathLike, *, empty: bool = False, what: str = "output directory") -> None:
    """Refuse early what :func:`open_output_dir` would refuse, without creating anything (for a
    command that has other work to do before it writes)."""
    p = Path(path)
    if os.path.lexists(p):
        open_output_dir(p, create=False, empty=empty, what=what).close()
        return
    q = p.parent if str(p.parent) else Path(".")
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    if not os.path.isdir(q):
        raise OutputError(f"{p}: cannot be created ({q} is not a directory)")
    if not os.access(q, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: cannot be created (permission denied in {q})")


class OutputDir:
    """An open output directory: create files and sub-directories relative to its descriptor."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._finalizer = weakref.finalize(self, _close_fd, fd)

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- files ------------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        if not name or "/" in name or name in (".", "..") or "\x00" in name:
            raise OutputError(f"{self.path}: {name!r} is not a plain file name")
        return name

    def _fail(self, name: str, exc: OSError, doing: str = "cannot write") -> OutputError:
        err = OutputError(f"{self.path / name}: {doing} ({exc.strerror or exc})")
        err.errno = exc.errno  # a writer may need it (ENOSPC: the disk is full)
        return err

    def write_atomic(self, name: str, fill: Callable[[IO[bytes]], Any], mode: int = 0o644, sync: bool = True) -> Path:
        """Write file ``name``: ``fill(fh)`` writes a private temporary file in this directory,
        which is flushed, ``fsync``-ed (``sync``) and renamed over ``name``."""
        self._name(name)
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            raise self._fail(name, exc) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise self._fail(name, exc) from None
            raise
        return self.path / name

    def write_bytes(self, name: str, data: bytes, mode: int = 0o644, sync: bool = True) -> Path:
        """Write ``data`` to ``name`` atomically."""
        return self.write_atomic(name, lambda fh: fh.write(data), mode=mode, sync=sync)

    def create(self, name: str, mode: int = 0o600, flags: int = 0) -> int:
        """A new file ``name`` (``O_EXCL``: it must not exist), opened for writing (plus ``flags``,
        e.g. ``os.O_APPEND``)."""
        try:
            return os.open(self._name(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | flags,
                           mode, dir_fd=self.fd)
        except OSError as exc:
            raise self._fail(name, exc, "cannot create") from None

    def open_existing(self, name: str, flags: int) -> int:
        """Open an existing file of this directory (never through a symbolic link)."""
        return os.open(self._name(name), flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        """Remove ``name`` if it exists."""
        try:
            os.unlink(self._name(name), dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def subdir(self, name: str, mode: int = 0o755, create: bool = True, empty: bool = False) -> "OutputDir":
        """A sub-directory (created with ``mode`` if missing), opened without following a link and
        held to the same ownership rule."""
        self._name(name)
        where = self.path / name
        try:
            if create:
                try:
                    os.mkdir(name, mode & ~0o022, dir_fd=self.fd)
                except FileExistsError:
                    pass
            fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise OutputError(f"{where}: is a symbolic link or not a directory; refusing to write into it") from None
            raise OutputError(f"{where}: cannot create directory ({exc.strerror})") from None
        return _checked(where, fd, "directory", empty)

    def fsync(self) -> None:
        """Make the renames and creations in this directory durable."""
        os.fsync(self.fd)

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
