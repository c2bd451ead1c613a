"""Run directories: every run writes into a fresh ``<root>/<timestamp>/``, never over another run.

    results/compare-demo/2026-12-06T21-04-59/   table.md, results.json, ...
    results/compare-demo/latest -> 2026-12-06T21-04-59

``latest`` is a relative symbolic link, replaced atomically once a run's outputs are
complete. A ``latest`` that is not a link (a file or folder someone made) is never
touched: the program only replaces what it wrote.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

__all__ = ["fresh_run_dir", "link_latest", "LATEST"]

LATEST = "latest"
log = logging.getLogger("simulations")


def fresh_run_dir(root: str | Path, now: float | None = None) -> Path:
    """Create and return a new directory ``root/<YYYY-mm-ddTHH-MM-SS>`` (``-2``, ``-3``... if taken).

    Created with ``mkdir(exist_ok=False)``, so two runs started in the same second get
    different directories, and an existing one is never reused.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(now))
    for attempt in range(1, 1000):
        candidate = root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run directory for {stamp} in {root}")


def link_latest(run_dir: str | Path) -> Path | None:
    """Point ``run_dir.parent / "latest"`` at ``run_dir``; return the link, or None if it was left alone.

    Replaces only a symbolic link (atomically: a new link renamed over it); where
    ``latest`` is a real file or directory, or the file system has no symbolic links,
    it logs why and leaves everything as it was.
    """
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        log.warning("left %s alone: it is not a link this program made", link)
        return None
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError as error:  # e.g. no symbolic links on this file system
        temporary.unlink(missing_ok=True)
        log.warning("could not link %s to %s: %s", link, run_dir.name, error)
        return None
    return link
