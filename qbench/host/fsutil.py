"""Crash-safe file writes, an exclusive directory lock, and writes that never follow a link.

A result file is either the old version or the new one, never a truncated mix: write to a
temporary file in the same folder, fsync it, rename over the target, fsync the folder.

A results folder may be shared, uploaded, or prepared by someone else: a symbolic link planted
in it (``.lock`` -> ~/victim, ``cells/`` -> elsewhere) must not redirect a write. Folders are
checked with lstat (:func:`real_folder`), files are opened with O_NOFOLLOW (the lock) or
replaced rather than opened in place (:func:`open_fresh`, the atomic writes), and what is read
from another folder is read only when it is a regular file (:func:`read_regular`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qbench.errors import LockedError, StoreError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode a replaced regular file keeps, or what open() would give a new one under the
    umask (a link's target lends nothing: lstat, not stat)."""
    try:
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def real_folder(path: Path, *, below: Path) -> Path:
    """Make ``path`` a real folder, creating what is missing; no part of it from ``below``
    (excluded: the --out folder is the user's choice) down may be a symbolic link or a file.
    Raises StoreError naming the offending part."""
    path, below = Path(path), Path(below)
    try:
        parts = path.relative_to(below).parts
    except ValueError:
        raise StoreError(f"{path} is not inside {below}") from None
    here = below
    here.mkdir(parents=True, exist_ok=True)
    for part in parts:
        here = here / part
        try:
            st = here.lstat()
        except FileNotFoundError:
            try:
                here.mkdir()
            except FileExistsError:    # made meanwhile by another process: check it below
                pass
            st = here.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise StoreError(f"{here} is a symbolic link: qbench writes nothing through a link "
                             "in a results folder (remove the link, or give --out the real "
                             "folder)")
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{here} is not a folder")
    return path


def open_fresh(path: Path, mode: int = 0o644) -> int:
    """A file descriptor open for writing on a new, empty regular file at ``path``. Whatever
    was there (a file, a link, a FIFO) is removed first, never written through: O_TRUNC on a
    link or a second hard link would empty someone else's file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise StoreError(f"{path} is a folder, expected a file")
            os.unlink(path)
        try:
            return os.open(path, flags, mode)
        except FileExistsError:        # put back meanwhile: remove it again
            continue
    raise StoreError(f"{path} keeps being recreated by another process; not writing it")


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path`` if it is a regular file (a link, a FIFO or a device raises
    OSError: never copy a link's target, never block on a pipe). ``limit``: read at most so
    many bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read() if limit is None else fh.read(limit)
    finally:
        os.close(fd)


def is_regular(path: Path) -> bool:
    """A regular file itself, not a link to one (lstat)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; on failure leave no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _file_mode(path))  # mkstemp makes 0600; results are shared
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            why = ("file size limit reached (ulimit -f or the file system's maximum)"
                   if exc.errno == errno.EFBIG else "disk full")
            raise StoreError(f"{why} while writing {path}: nothing was written there; "
                             "earlier results are intact") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (before a rename makes it visible under its final name: a
    crash after the rename must not leave a name pointing at unwritten blocks)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; best effort."""
    _fsync_dir(path)


@contextlib.contextmanager
def exclusive_lock(folder: Path, *, wait: bool = False, what: str = "results folder"
                   ) -> Iterator[None]:
    """Hold an exclusive flock on ``folder/.lock``; refuse (or wait) if another process has it.

    flock is released by the kernel when the holder dies, so a kill -9 never leaves it stale.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{lock_path} is a symbolic link: qbench writes its pid into the "
                             "lock file and will not write through a link (remove it)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise StoreError(f"{lock_path} is not a regular file of its own (a FIFO, a device "
                             "or a hard link to another file): remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockedError(f"another qbench process (pid {holder}) is using this {what}; "
                              "wait for it to finish or use another --out", file=str(folder)
                              ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """A blocking flock on ``path`` (used so two cells never build the same artifact at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
