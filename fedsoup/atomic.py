"""Atomic file output: write to a temporary file in the target folder, then rename.

A crash, a full disk or an exception in the writer never leaves a partial file at
the destination: either the old file (or nothing) is there, or the complete new one.

A process killed with SIGKILL (or by the OOM killer, or a power cut) runs no cleanup,
so its temporary file stays. Temporary files are therefore recognisable as fedsoup's
(``.<destination name>.fedsoup-<8 random characters>.tmp``) and their writer holds an
exclusive ``flock`` on them while writing. The kernel drops that lock when the writer
dies, however it dies, and it is seen across processes and container PID namespaces
sharing the file system. :func:`remove_stale_temps` deletes the fedsoup temporary files
of a folder whose lock it can take: their writer is gone. Every :func:`atomic_path`
first does so in its destination's folder, so the next write there cleans up.

OS errors of the write (a folder without write permission, a full disk, a read-only
file system) become :class:`~fedsoup.errors.OutputError`, naming the destination, not
the hidden temporary file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from fedsoup.errors import OutputError

try:  # POSIX; elsewhere temporary files are still removed on errors, but not after a kill
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "is_fedsoup_temp", "remove_stale_temps"]

# Temporary files are created readable by their owner only; a finished output should get the
# mode any other new file would (0o666 minus the umask). Read once: os.umask sets too.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_TEMP_MARK = ".fedsoup-"
_TEMP_SUFFIX = ".tmp"
_TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"  # 8 of them: as tempfile.mkstemp names
_TEMP_RE = re.compile(r"^\..+\.fedsoup-[a-z0-9_]{8}\.tmp$")


def is_fedsoup_temp(name: str) -> bool:
    """True for a file name :func:`atomic_path` gives its temporary files."""
    return _TEMP_RE.match(name) is not None


def _lock(fd: int, *, wait: bool) -> bool:
    """Take ``fd``'s exclusive ``flock``; False if another holds it or locks are not supported."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:  # held elsewhere (EWOULDBLOCK), or no locks on this file system (ENOLCK...)
        return False
    return True


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the fedsoup temporary files in ``folder`` whose writer is gone (their ``flock``
    is free); return them.

    Links, folders, files of live writers and every name that is not a fedsoup temporary
    file are left alone; so is everything where the file system cannot lock.
    """
    if fcntl is None:  # pragma: no cover - no way to tell a live writer from a dead one
        return []
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not is_fedsoup_temp(entry.name):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError:  # a link, gone meanwhile, or not ours to open
            continue
        try:
            if not os.path.samestat(os.fstat(fd), os.lstat(entry.path)) or not entry.is_file(follow_symlinks=False):
                continue
            if _lock(fd, wait=False):  # the writer is gone; holding the lock, nobody renames it now
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _temp_name(destination: str) -> str:
    return f".{destination}{_TEMP_MARK}{''.join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))}{_TEMP_SUFFIX}"


def _locked(fd: int, path: Path) -> bool:
    """Lock the new file ``fd``; False when a sweep deleted ``path`` before the lock was ours."""
    _lock(fd, wait=True)
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; on success rename it into place.

    The temporary file lives in the same folder so that the final ``os.replace`` is
    atomic on POSIX, and stays locked (``flock``) until then. On any exception it is
    removed and the destination is left untouched; its name is chosen before it is
    created, so that also a signal arriving right after the creation removes it. An
    ``OSError`` of creating, syncing or renaming the file, or one raised by the caller's
    writing with the temporary file as its ``filename``, is raised as
    :class:`~fedsoup.errors.OutputError` naming ``destination``.
    """
    destination = Path(destination)
    remove_stale_temps(destination.parent)
    tmp: Path | None = None
    fd: int | None = None
    try:
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            while fd is None:
                tmp = destination.parent / _temp_name(destination.name)  # removed on any exception from here
                try:
                    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # another writer's name: not ours to remove
                    tmp = None
                    continue
                if not _locked(fd, tmp):
                    os.close(fd)
                    fd = None
        except OSError as error:
            raise OutputError(destination, error) from None
        try:
            yield tmp
        except OSError as error:
            if error.filename is not None and os.fspath(error.filename) == str(tmp):
                raise OutputError(destination, error) from None
            raise
        try:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            try:
                mode = destination.stat().st_mode & 0o7777  # replacing a file keeps its mode
            except FileNotFoundError:
                mode = 0o666 & ~_UMASK
            os.chmod(tmp, mode)
            os.replace(tmp, destination)
        except OSError as error:
            raise OutputError(destination, error) from None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):  # gone already once renamed
                tmp.unlink()
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock, after the rename or the removal


def atomic_write_bytes(destination: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``destination`` atomically."""
    with atomic_path(destination) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as error:
            raise OutputError(destination, error) from None


def atomic_write_text(destination: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``destination`` atomically."""
    atomic_write_bytes(destination, text.encode("utf-8"))
