"""`fedsoup` usage: misspelt flags and subcommands get the closest name (exit 2), grouped --help,
and `fedsoup inspect`'s exit status (0 mergeable, 1 not, 2 usage or read errors)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fedsoup import cli


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


def checkpoints(tmp_path, n: int = 2, **shapes) -> list[str]:
    paths = []
    for i in range(n):
        model = {"w": torch.randn(3, 2), "b": torch.randn(3)}
        model.update({key: torch.randn(*shape) for key, shape in shapes.items()} if i == n - 1 else {})
        path = tmp_path / f"m{i}.safetensors"
        save_file(model, path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("typo, closest", [
    ("--optimiser", "--optimizer"), ("--shufle", "--shuffle"), ("--batchsize", "--batch-size"),
    ("--lowmemory=1", "--low-memory"),
])
def test_misspelt_merge_flag_names_the_closest(tmp_path, capsys, typo, closest):
    inputs = checkpoints(tmp_path)
    err = usage_error(capsys, "merge", *inputs, "-o", tmp_path / "out.safetensors", typo, "adam")
    assert f"unknown flag '{typo.split('=')[0]}'; did you mean '{closest}'?" in err
    assert "usage: fedsoup merge" in err  # the subcommand's usage, not the top level's
    assert not (tmp_path / "out.safetensors").exists()


def test_misspelt_subcommand_and_inspect_flag(tmp_path, capsys):
    assert "unknown command 'merg'; did you mean 'merge'?" in usage_error(capsys, "merg", "a.pt")
    assert "unknown command 'inpsect'; did you mean 'inspect'?" in usage_error(capsys, "inpsect", "a.pt")
    err = usage_error(capsys, "inspect", *checkpoints(tmp_path), "--jsn")
    assert "unknown flag '--jsn'; did you mean '--json'?" in err and "usage: fedsoup inspect" in err


def test_help_groups_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["merge", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    groups = ["inputs and outputs:", "merge options (fedsoup.merge):", "optimizer arguments:", "LoRA adapters",
              "memory and device:"]
    positions = [text.index(group) for group in groups]
    assert positions == sorted(positions)
    low_memory_group = text[text.index("memory and device:"):text.index("examples:")]
    assert "--low-memory" in low_memory_group and "--in-memory" in low_memory_group
    assert "--optimizer" not in low_memory_group and "--output" not in text[positions[1]:]


def test_inspect_exit_status(tmp_path, capsys):
    (tmp_path / "same").mkdir()
    (tmp_path / "other").mkdir()
    same = checkpoints(tmp_path / "same")
    other = checkpoints(tmp_path / "other", w=(2, 2))
    assert cli.main(["inspect", *same]) == 0
    assert "mergeable: 2 checkpoints" in capsys.readouterr().out
    assert cli.main(["inspect", *other]) == 1
    out = capsys.readouterr().out
    assert "not mergeable: 1 differences" in out and "tensor 'w'" in out
    assert cli.main(["inspect", "--json", *other]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["mergeable"] is False and report["differences"]
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_is_not_a_crash(tmp_path):
    """`fedsoup inspect --json big.safetensors | head` used to print 'unexpected error: BrokenPipeError'
    and exit 1; like other command-line tools it now stops quietly with 141 (128 + SIGPIPE)."""
    import os
    import subprocess
    import sys
    path = tmp_path / "many.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(1) for i in range(3000)}, str(path))  # > 64 KiB of JSON
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-m", "fedsoup", "inspect", "--json", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout.read(1) == b"{"
    process.stdout.close()  # what `head` does once it has its lines
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert err == ""


def test_merge_with_nothing_given_asks_for_the_inputs_first(capsys):
    """`fedsoup merge` alone said 'no output: give -o OUTPUT'; the inputs are what is missing first."""
    assert cli.main(["merge"]) == 2
    err = capsys.readouterr().err
    assert "no inputs" in err and err.count("\n") == 1
