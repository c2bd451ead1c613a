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


def test_the_temporary_file_is_fedsoups_and_locked_while_it_is_written(tmp_path):
    import fcntl

    from fedsoup.atomic import is_fedsoup_temp, remove_stale_temps

    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        assert tmp.parent == tmp_path and is_fedsoup_temp(tmp.name) and tmp.name.startswith(".out.bin.")
        with open(tmp, "rb") as other:  # another open file description: as another process sees it
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert remove_stale_temps(tmp_path) == [] and tmp.exists()  # a live writer's file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_stale_temporary_files_go_but_links_and_other_names_stay(tmp_path):
    from fedsoup.atomic import remove_stale_temps

    dead = tmp_path / ".a.bin.fedsoup-abcd1234.tmp"
    dead.write_bytes(b"x")
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    link = tmp_path / ".b.bin.fedsoup-abcd1235.tmp"
    link.symlink_to(target)
    folder = tmp_path / ".c.bin.fedsoup-abcd1236.tmp"
    folder.mkdir()
    for name in (".a.bin.12345678.tmp", "a.bin.fedsoup-abcd1234.tmp", ".a.bin.fedsoup-abcd123.tmp"):
        (tmp_path / name).write_bytes(b"not ours")
    assert remove_stale_temps(tmp_path) == [dead]
    assert link.is_symlink() and target.read_bytes() == b"keep" and folder.is_dir()
    assert len(list(tmp_path.iterdir())) == 6


def test_an_os_error_of_the_write_names_the_destination_not_the_temporary_file(tmp_path):
    from fedsoup.errors import OutputError

    with pytest.raises(OutputError) as info:
        with atomic_path(tmp_path / "out.bin") as tmp:
            raise PermissionError(13, "Permission denied", str(tmp))
    assert info.value.path == str(tmp_path / "out.bin") and info.value.cause.errno == 13
    assert str(info.value) == f"{tmp_path / 'out.bin'}: cannot write: permission denied"
    assert list(tmp_path.iterdir()) == []
