"""Operator safety (issue 22): --force deletes only fedsoup's own files, a killed writer's temp
files are cleaned up by the next run, OS errors are one line naming the path and the cause.

CI runs as root, which ignores file modes: permission tests run the command line in a
subprocess that drops to ``nobody`` (after importing what it needs, since the interpreter
may live where ``nobody`` cannot read). Full disks are a real tmpfs of a few kB mounted in
a private mount namespace (``unshare -m``, skipped where that is not allowed) and an
injected ``ENOSPC``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedsoup
from fedsoup import cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def make_models(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


def write_inputs(folder: Path, n: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, model in enumerate(make_models(n)):
        save_file(model, folder / f"c{i}.safetensors")
        paths.append(str(folder / f"c{i}.safetensors"))
    return paths


def run(*argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsoup: error: "), err
    return lines[0]


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- 1. --force


def test_force_deletes_only_what_fedsoup_writes_for_that_output(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "train.py").write_text("print('train')")
    (tmp_path / "outside.safetensors").write_bytes(b"outside")
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"linked")
    save_file(make_models(1)[0], out / "model-00001-of-00002.safetensors")  # an old shard of this output
    (out / "model-00002-of-00002.safetensors").symlink_to(elsewhere)  # a link with a shard's name
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "notes.txt", "b": "train.py", "c": "..", "d": "../outside.safetensors",
        "e": "model-00001-of-00002.safetensors", "f": "model-00002-of-00002.safetensors",
    }}))
    code, _, err = run("merge", *inputs, "-o", str(out) + "/", "--force", capsys=capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "train.py").read_text() == "print('train')"
    assert (tmp_path / "outside.safetensors").read_bytes() == b"outside"
    assert (out / "model-00002-of-00002.safetensors").is_symlink() and elsewhere.read_bytes() == b"linked"
    assert not (out / "model-00001-of-00002.safetensors").exists()  # fedsoup's own name: replaced
    assert not (out / "model.safetensors.index.json").exists()
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["w"], fedsoup.soup([load_file(p) for p in inputs])["w"])
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00002-of-00002.safetensors", "model.safetensors", "notes.txt", "train.py"]


def test_force_removes_the_report_sidecar_of_the_output_it_replaces(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "o.safetensors"
    sidecar = tmp_path / "o.safetensors.fedsoup.json"  # the report of a tensor-by-tensor merge
    (tmp_path / "notes.fedsoup.json").write_text("mine")
    assert run("merge", *inputs, "-o", out, "--low-memory", capsys=capsys)[0] == 0 and sidecar.is_file()
    code, _, err = run("merge", *inputs, "-o", out, "--in-memory", "--force", capsys=capsys)
    assert code == 0, err
    assert not sidecar.exists()  # it described the output that was replaced
    assert (tmp_path / "notes.fedsoup.json").read_text() == "mine"


@pytest.mark.parametrize("obstacle", ["directory", "symlink"])
def test_force_refuses_a_destination_it_did_not_write_before_writing_anything(tmp_path, capsys, obstacle):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"not mine")
    if obstacle == "directory":
        (out / "model.safetensors").mkdir()
        (out / "model.safetensors" / "keep.txt").write_text("keep")
    else:
        (out / "model.safetensors").symlink_to(target)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, _, err = run("merge", *inputs, "-o", str(out) + "/", "--force", capsys=capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert str(out / "model.safetensors") in line and ".tmp" not in line
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert target.read_bytes() == b"not mine"


def test_without_force_an_old_shard_of_the_output_is_not_overwritten(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00003.safetensors").write_bytes(b"someone's shard")
    code, _, err = run("merge", *inputs, "-o", str(out) + "/", "--shard-size", "100", capsys=capsys)
    assert code == 2 and "output exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00003.safetensors"]
    assert (out / "model-00001-of-00003.safetensors").read_bytes() == b"someone's shard"


# --------------------------------------------------------------------------- 2. temp files


def test_temp_files_are_recognisable_and_a_dead_writers_are_removed(tmp_path, capsys):
    from fedsoup.atomic import is_fedsoup_temp

    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    dead = tmp_path / ".out.safetensors.fedsoup-dead0001.tmp"  # what a killed writer leaves
    dead.write_bytes(b"partial")
    alive = tmp_path / ".out.safetensors.fedsoup-live0001.tmp"  # a writer still at work
    alive.write_bytes(b"in progress")
    other = tmp_path / ".out.safetensors.12345.tmp"  # not recognisably fedsoup's
    other.write_bytes(b"someone else's")
    elsewhere = tmp_path / ".older-output.pt.fedsoup-dead0002.tmp"  # a killed write of another output here
    elsewhere.write_bytes(b"partial")
    assert is_fedsoup_temp(dead.name) and is_fedsoup_temp(alive.name) and not is_fedsoup_temp(other.name)
    with open(alive, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        code, _, err = run("merge", *inputs, "-o", out, capsys=capsys)
        assert code == 0, err
        assert not dead.exists() and not elsewhere.exists()
        assert alive.exists() and other.exists()
    code, _, err = run("merge", *inputs, "-o", out, "--force", capsys=capsys)
    assert code == 0, err
    assert not alive.exists() and other.read_bytes() == b"someone else's"


def _wait_for(predicate, process, seconds=120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()}")
        time.sleep(0.01)
    raise AssertionError("timed out")


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def slow_merge(tmp_path: Path) -> list[str]:
    """A merge that takes seconds: 3 inputs of 10 MB, Adam for 20 epochs, 1 MB shards."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(3):
        path = tmp_path / f"c{i}.safetensors"
        save_file({f"t{k}": torch.randn(256, 256, generator=g) for k in range(40)}, path)
        inputs.append(str(path))
    return [sys.executable, "-m", "fedsoup", "merge", *inputs, "--low-memory", "--shard-size", "1MB",
            "--optimizer", "adam", "--epochs", "20", "-q", "-o"]


@pytest.mark.slow
def test_sigterm_mid_merge_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([*slow_merge(tmp_path), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    _wait_for(lambda: out.is_dir() and any(out.iterdir()), process)
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "terminated" in err
    assert not out.exists()  # not even the folder it created


@pytest.mark.slow
def test_sigkill_mid_merge_next_run_removes_the_temp_file_and_writes_the_same_output(tmp_path):
    command = slow_merge(tmp_path)
    reference = tmp_path / "reference"
    done = subprocess.run([*command, str(reference)], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    process = subprocess.Popen([*command, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    _wait_for(lambda: out.is_dir() and any(p.stat().st_size > 0 for p in out.iterdir() if p.name.endswith(".tmp")),
              process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert temps(out)  # SIGKILL runs no cleanup: the temp files are there
    again = subprocess.run([*command, str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr
    assert temps(out) == []
    assert _file_bytes(out) == _file_bytes(reference)


_CHECKPOINT_WRITER = r"""
import os, sys, time, torch
import fedsoup.io.writer as writer
from strategies.state import write_checkpoint
directory, stall = sys.argv[1], sys.argv[2] == "stall"
g = torch.Generator().manual_seed(0)
state = {"format": "fedsoup.strategies.FedSoup", "round": 2, "rng": {"seed": 0}, "settings": {},
         "global": {f"w{k}": torch.randn(64, 64, generator=g) for k in range(8)}, "stew": None}
if stall:  # the writer stops for good half-way through the tensor data, as a killed process would
    original = writer._tensor_bytes
    count = [0]
    def slow(tensor):
        count[0] += 1
        if count[0] == 4:
            print("stalled", flush=True)
            time.sleep(600)
        return original(tensor)
    writer._tensor_bytes = slow
write_checkpoint(directory, state, 2)
"""


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_next_run_removes_the_temp_file_and_writes_the_same_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_CHECKPOINT_WRITER)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run([sys.executable, str(script), str(reference), "run"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen([sys.executable, str(script), str(killed), "stall"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout.readline().strip() == "stalled", process.communicate()
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert temps(killed)
    again = subprocess.run([sys.executable, str(script), str(killed), "run"], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert temps(killed) == []
    assert _file_bytes(killed) == _file_bytes(reference)


# --------------------------------------------------------------------------- 3. OS errors


_AS_NOBODY = r"""
import os, pwd, sys
import encodings.ascii, encodings.latin_1, encodings.utf_8, encodings.idna  # noqa: F401 - imported before the drop
import fedsoup.cli, fedsoup.io, fedsoup.offline, safetensors.torch, torch, json, logging, tqdm  # noqa: F401
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
sys.exit(fedsoup.cli.main(sys.argv[1:]))
"""


@pytest.fixture
def shared_dir():
    """A folder every user can enter (pytest's tmp_path is 0700 under root)."""
    folder = Path(tempfile.mkdtemp(prefix="fedsoup-safety-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_unprivileged(*argv) -> subprocess.CompletedProcess:
    """The command line as a user that file modes apply to (``nobody`` when we are root)."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("no user 'nobody' to drop privileges to")
        command = [sys.executable, "-c", _AS_NOBODY, *map(str, argv)]
    else:
        command = [sys.executable, "-m", "fedsoup", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300, cwd="/")


@pytest.mark.parametrize("output", ["out.safetensors", "out.pt", "model/"])
def test_output_folder_without_write_permission_is_one_line_naming_it(shared_dir, output):
    inputs = write_inputs(shared_dir / "in")
    for path in inputs:
        os.chmod(path, 0o644)
    os.chmod(shared_dir / "in", 0o755)
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)
    (locked / "model").mkdir(mode=0o755)
    result = run_unprivileged("merge", *inputs, "-o", locked / output, "-q")
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert str(locked / output.rstrip("/")) in line and "permission denied" in line.lower()
    assert ".tmp" not in line and "unexpected" not in line
    assert sorted(p.name for p in locked.rglob("*")) == ["model"]


def test_unreadable_input_is_not_reported_missing(shared_dir):
    inputs = write_inputs(shared_dir / "in")
    for path in inputs:
        os.chmod(path, 0o644)
    os.chmod(inputs[1], 0o600)  # root's file: nobody cannot read it
    os.chmod(shared_dir / "in", 0o755)
    out = shared_dir / "out"
    out.mkdir(mode=0o777)
    result = run_unprivileged("merge", *inputs, "-o", out / "m.safetensors", "-q")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert inputs[1] in line and "permission denied" in line.lower() and "no such file" not in line.lower()
    assert list(out.iterdir()) == []
    result = run_unprivileged("merge", inputs[0], str(shared_dir / "in" / "missing.safetensors"), "-o",
                              out / "m.safetensors", "-q")
    assert result.returncode == 2
    assert one_error_line(result.stderr).endswith("missing.safetensors: no such file or directory")


def _tmpfs_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("output", ["full/out.safetensors", "full/out.pt", "full/model/"])
def test_full_disk_is_one_line_naming_the_output_and_leaves_nothing(shared_dir, output):
    if not _tmpfs_available():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    inputs = write_inputs(shared_dir / "in")
    big = {f"t{k}": torch.randn(64, 64) for k in range(8)}  # 128 kB: more than the 32 kB tmpfs holds
    for i, path in enumerate(inputs):
        save_file({key: value + i for key, value in big.items()}, path)
    full = shared_dir / "full"
    full.mkdir()
    script = (f"mount -t tmpfs -o size=32k tmpfs {full} && "
              f"{sys.executable} -m fedsoup merge {' '.join(inputs)} -q -o {shared_dir / output}; code=$?; "
              f"ls -A {full}; exit $code")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert str(shared_dir / output.rstrip("/")) in line and "no space left on device" in line.lower()
    assert ".tmp" not in line and "unexpected" not in line
    assert result.stdout.strip() == ""  # `ls -A` of the tmpfs: nothing left behind


@pytest.mark.parametrize("output", ["out.safetensors", "out.pt", "model/"])
def test_injected_enospc_is_a_typed_error_naming_the_output(tmp_path, capsys, monkeypatch, output):
    from fedsoup.errors import OutputError

    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "o"
    out.mkdir()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as info:
        fedsoup.merge_files(inputs, out / output)
    assert info.value.path.startswith(str(out / output.rstrip("/"))) and info.value.cause.errno == errno.ENOSPC
    assert list(out.iterdir()) == []
    code, _, err = run("merge", *inputs, "-o", out / output, capsys=capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"fedsoup: error: {out / output.rstrip('/')}")
    assert line.endswith(": cannot write: no space left on device")
    assert list(out.iterdir()) == []


def test_files_written_beside_the_weights_are_names_or_one_folder_deep(tmp_path):
    from fedsoup import io as fio
    from fedsoup.errors import OptionError

    infos = {"w": fio.TensorInfo((2,), torch.float32)}
    refused = ("../escape.json", "..", ".", "", "/abs.json", "a/b/c.json", "sub/../x.json", "sub//x.json",
               "./x.json", "sub/", "sub/.", "sub/..", "/sub/x.json")
    for name in refused:
        with pytest.raises(OptionError) as info:
            fio.write_checkpoint(tmp_path / "out" / "", infos, lambda key: torch.ones(2), extra_files={name: b"{}"})
        assert info.value.option == "extra_files" and info.value.value == name
    with pytest.raises(OptionError) as info:  # the report written after the output: a name
        fio.write_checkpoint(tmp_path / "out" / "", infos, lambda key: torch.ones(2), sidecars=["sub/r.json"])
    assert info.value.option == "sidecars"
    assert list(tmp_path.iterdir()) == []


def _write_with_template(out: Path, **options) -> list[Path]:
    from fedsoup import io as fio

    return fio.write_checkpoint(out / "", {"w": fio.TensorInfo((2,), torch.float32)}, lambda key: torch.ones(2),
                                extra_files={"config.json": b"{}", "templates/tool_use.jinja": b"new"}, **options)


def test_a_file_one_folder_deep_is_written_with_the_output_and_checked_like_the_others(tmp_path):
    from fedsoup.errors import OutputExistsError

    out = tmp_path / "out"
    written = _write_with_template(out)
    assert out / "templates" / "tool_use.jinja" in written and written[-1] == out / "model.safetensors"
    assert (out / "templates" / "tool_use.jinja").read_bytes() == b"new"

    fresh = tmp_path / "fresh"  # only the file in the subfolder is there: the output exists
    (fresh / "templates").mkdir(parents=True)
    (fresh / "templates" / "tool_use.jinja").write_bytes(b"old")
    (fresh / "templates" / "mine.jinja").write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        _write_with_template(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["templates"]
    assert (fresh / "templates" / "tool_use.jinja").read_bytes() == b"old"
    _write_with_template(fresh, force=True)
    assert (fresh / "templates" / "tool_use.jinja").read_bytes() == b"new"
    assert (fresh / "templates" / "mine.jinja").read_bytes() == b"mine"  # not fedsoup's


def test_an_error_leaves_no_file_and_no_subfolder_the_write_created(tmp_path, monkeypatch):
    def refuse():
        raise RuntimeError("an input changed")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        _write_with_template(out, before_rename=refuse)
    assert list(tmp_path.iterdir()) == []

    out.mkdir()  # the output folder is there, its subfolder is not: the subfolder goes
    with pytest.raises(RuntimeError):
        _write_with_template(out, before_rename=refuse)
    assert list(out.iterdir()) == []

    (out / "templates").mkdir()  # a subfolder that was there stays, with what it holds
    (out / "templates" / "mine.jinja").write_bytes(b"mine")
    with pytest.raises(RuntimeError):
        _write_with_template(out, before_rename=refuse)
    assert [p.name for p in out.iterdir()] == ["templates"] and os.listdir(out / "templates") == ["mine.jinja"]
    shutil.rmtree(out / "templates")

    # Interrupted between the renames (the template renamed, the weights not): it goes, and its folder.
    real_replace = os.replace

    def replace(source, destination):
        if Path(destination).name == "model.safetensors":
            raise KeyboardInterrupt
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write_with_template(out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("obstacle", ["symlink", "file", "symlink-to-file"])
def test_a_link_or_a_file_where_the_subfolder_goes_is_refused_even_with_force(tmp_path, obstacle):
    from fedsoup.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tool_use.jinja").write_bytes(b"not mine")
    if obstacle == "symlink":  # writing through it would write outside the output folder
        (out / "templates").symlink_to(elsewhere, target_is_directory=True)
    elif obstacle == "file":
        (out / "templates").write_bytes(b"someone's file")
    else:
        (out / "templates").symlink_to(elsewhere / "tool_use.jinja")
    before = sorted((str(p.relative_to(tmp_path)), p.is_symlink()) for p in tmp_path.rglob("*"))
    for force in (False, True):
        with pytest.raises(OutputError) as info:
            _write_with_template(out, force=force)
        assert info.value.path == str(out / "templates") and "in the way" in info.value.reason
        assert sorted((str(p.relative_to(tmp_path)), p.is_symlink()) for p in tmp_path.rglob("*")) == before
    assert (elsewhere / "tool_use.jinja").read_bytes() == b"not mine"


def test_a_pt_output_is_the_same_bytes_every_run(tmp_path):
    # torch.save on a path names its zip archive after the file: the random temporary name
    # made every .pt output different. Written through a file object, it is "archive".
    inputs = write_inputs(tmp_path / "in")
    first = fedsoup.merge_files(inputs, tmp_path / "a.pt")
    second = fedsoup.merge_files(inputs, tmp_path / "b.pt")
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(torch.load(first, weights_only=True)["w"], fedsoup.soup([load_file(p) for p in inputs])["w"])


def test_an_old_index_never_sits_beside_new_shards(tmp_path, monkeypatch):
    """With --force over a sharded output, the old index is gone before the first new shard
    is renamed over an old one: a kill between the renames leaves no index describing
    shards it does not match."""
    from fedsoup import atomic

    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    fedsoup.merge_files(inputs, out, shard_size=100)
    index = out / "model.safetensors.index.json"
    seen = []
    replace = os.replace

    def watching(source, destination):
        if Path(destination).name.startswith("model-"):
            seen.append(index.exists())
        return replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", watching)
    fedsoup.merge_files(inputs, out, shard_size=100, force=True, optimizer="adam", lr=0.1)
    assert seen and not any(seen)
    assert index.is_file()
