"""fedsoup.atomic: all or nothing, with ordinary file modes."""

from __future__ import annotations

import os
import stat

import pytest

from fedsoup.atomic import atomic_path, atomic_write_text


def test_success_replaces_and_failure_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("writer failed")
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_new_files_follow_the_umask_and_replacements_keep_their_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    os.chmod(kept, 0o600)
    atomic_write_text(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_text() == "new"
