"""Atomic file output: write to a temporary file in the target folder, then rename.

A crash, a full disk or an exception in the writer never leaves a partial file at
the destination: either the old file (or nothing) is there, or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates files readable by their owner only; a finished output should get the
# mode any other new file would (0o666 minus the umask). Read once: os.umask sets too.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; on success rename it into place.

    The temporary file lives in the same folder so that the final ``os.replace`` is
    atomic on POSIX. On any exception the temporary file is removed and the
    destination is left untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            mode = destination.stat().st_mode & 0o7777  # replacing a file keeps its mode
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(destination: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``destination`` atomically."""
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(destination: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``destination`` atomically."""
    atomic_write_bytes(destination, text.encode("utf-8"))
