"""The language-model task's corpus: Python's own standard library, read offline, one client per package group.

Every machine with Python has this text, so the task needs no download. The file list is
fixed (every file is present in CPython 3.10-3.13); its bytes still differ between Python
versions, so :func:`corpus_identity` (the Python version and a SHA-256 of the bytes read)
is recorded with every result. The ``public`` group trains the base model centrally; each
other group is one client's domain, so clients' text genuinely differs (mail parsing,
event loops, JSON, XML, test runners, HTTP).

Each file is split once: its first ``1 - heldout`` bytes are training text, its last
``heldout`` bytes the client's held-out text (perplexity is measured there).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PUBLIC_GROUP", "CLIENT_GROUPS", "CORPUS_FILES", "ClientText", "stdlib_dir", "read_group",
           "client_texts", "public_text", "corpus_identity", "MissingCorpusFile"]

PUBLIC_GROUP = "public"
#: Group -> files relative to the standard library's directory (present in 3.10-3.13).
CORPUS_FILES: dict[str, tuple[str, ...]] = {
    PUBLIC_GROUP: ("collections/__init__.py", "functools.py", "textwrap.py", "string.py",
                   "argparse.py", "shutil.py"),
    "email": ("email/message.py", "email/feedparser.py", "email/header.py", "email/utils.py",
              "email/generator.py", "email/_parseaddr.py"),
    "asyncio": ("asyncio/base_events.py", "asyncio/events.py", "asyncio/tasks.py", "asyncio/streams.py",
                "asyncio/futures.py", "asyncio/locks.py"),
    "json": ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py"),
    "xml": ("xml/dom/minidom.py", "xml/etree/ElementTree.py", "xml/sax/saxutils.py", "xml/dom/pulldom.py",
            "xml/sax/expatreader.py"),
    "unittest": ("unittest/case.py", "unittest/loader.py", "unittest/runner.py", "unittest/result.py",
                 "unittest/suite.py"),
    "http": ("http/client.py", "http/server.py", "http/cookies.py"),
}
#: The clients, in partition-id order (partition ``i`` is ``CLIENT_GROUPS[i]``).
CLIENT_GROUPS: tuple[str, ...] = tuple(g for g in CORPUS_FILES if g != PUBLIC_GROUP)


class MissingCorpusFile(FileNotFoundError):
    """A corpus file is not in this Python's standard library (``path``: the file looked for)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"corpus file {path} is missing: the language-model task reads Python's "
                         "standard library source (a Python without its .py files, e.g. a stripped image?)")
        self.path = path


@dataclass(frozen=True)
class ClientText:
    """One client's text: its group name, training bytes and held-out bytes."""

    group: str
    train: bytes
    heldout: bytes


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _file_bytes(root: Path, name: str) -> bytes:
    path = root / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingCorpusFile(path) from None


def read_group(group: str, heldout: float, root: Path | None = None) -> ClientText:
    """The group's files split per file: the first ``1 - heldout`` of each is training text."""
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {heldout}")
    root = stdlib_dir() if root is None else root
    train, held = [], []
    for name in CORPUS_FILES[group]:
        data = _file_bytes(root, name)
        cut = len(data) - int(len(data) * heldout)
        train.append(data[:cut])
        held.append(data[cut:])
    return ClientText(group, b"".join(train), b"".join(held))


def client_texts(num_clients: int, heldout: float, root: Path | None = None) -> list[ClientText]:
    """The first ``num_clients`` client groups' texts (partition id = index)."""
    if not 1 <= num_clients <= len(CLIENT_GROUPS):
        raise ValueError(f"the language-model task has {len(CLIENT_GROUPS)} clients "
                         f"({', '.join(CLIENT_GROUPS)}); got num-partitions={num_clients}")
    return [read_group(g, heldout, root) for g in CLIENT_GROUPS[:num_clients]]


def public_text(root: Path | None = None) -> bytes:
    """The public group's whole text: the base model's centralized training data."""
    return read_group(PUBLIC_GROUP, 0.0, root).train


def corpus_identity(root: Path | None = None) -> dict[str, str]:
    """``{"python": "3.11.2", "corpus-sha256": ...}``: which text a result was measured on.

    The hash covers every group's file names and bytes in the fixed order above.
    """
    root = stdlib_dir() if root is None else root
    digest = hashlib.sha256()
    for group, names in CORPUS_FILES.items():
        for name in names:
            data = _file_bytes(root, name)
            digest.update(f"{group}/{name}:{len(data)}\n".encode())
            digest.update(data)
    return {"python": platform.python_version(), "corpus-sha256": digest.hexdigest()}
