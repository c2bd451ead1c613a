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
    assert "not mergeable: 1 difference with" in out and "tensor 'w'" in out
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


def test_misspelt_flag_prints_the_short_usage_and_the_suggestion(tmp_path, capsys):
    """As git does: one usage line and the suggestion, not the 15-line list of every flag before it."""
    err = usage_error(capsys, "merge", *checkpoints(tmp_path), "-o", tmp_path / "o.safetensors", "--dtpye", "fp16")
    lines = err.strip().splitlines()
    assert len(lines) <= 3, err
    assert lines[0] == "usage: fedsoup merge [options] INPUT... -o PATH"
    assert lines[-1] == "fedsoup merge: error: unknown flag '--dtpye'; did you mean '--dtype'?"
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    assert "--dtype DTYPE" in capsys.readouterr().out  # --help still lists every flag


def summary(capsys, *argv) -> str:
    assert cli.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out.strip()


def test_soup_summary_says_what_happened_not_epochs_and_steps(tmp_path, capsys):
    inputs = checkpoints(tmp_path)
    for mode in ("--in-memory", "--low-memory"):
        line = summary(capsys, "merge", *inputs, "-o", tmp_path / "o.safetensors", "-f", mode)
        assert line.endswith(f"({mode[2:]}; soup: the weighted mean)"), line
        assert "epoch" not in line and "steps" not in line
    line = summary(capsys, "merge", *inputs, "-o", tmp_path / "o.safetensors", "-f", "--optimizer", "adam",
                   "--epochs", "2")
    assert "(in-memory, 2 epochs; fused path, Adam, 4 steps, lr " in line, line


def test_counts_are_singular_for_one(tmp_path, capsys):
    save_file({"w": torch.randn(3, 2)}, tmp_path / "one.safetensors")
    line = summary(capsys, "merge", tmp_path / "one.safetensors", "-o", tmp_path / "o.safetensors")
    assert "merged 1 input into " in line and ": 1 tensor, 6 parameters, " in line, line


def test_adam_summary_names_the_tensors_identical_in_every_input(tmp_path, capsys):
    """Their scale-aware lr is 0 (their pseudogradient is 0): the range is over the tensors that differ."""
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": torch.randn(3, 2), "v": torch.randn(4) * 10, "same": torch.ones(5), "same2": torch.ones(2)},
                  paths[-1])
    line = summary(capsys, "merge", *paths, "-o", tmp_path / "o.safetensors", "--optimizer", "adam")
    assert "lr 0.." not in line, line
    assert "per tensor (scale-aware default; 0 on 2 tensors identical in every input)" in line, line


def test_report_lr_wording():
    from fedsoup.report import MergeReport

    def shown(lr, default=True):
        return MergeReport("fused", "Adam", 1, 2, lr=lr, lr_default=default).describe()

    assert shown({"a": 1e-3, "b": 1e-3}) == "fused path, Adam, 2 steps, lr 0.001 (scale-aware default)"
    assert shown({"a": 0.0, "b": 1e-3}) == ("fused path, Adam, 2 steps, lr 0.001 (scale-aware default; "
                                            "0 on 1 tensor identical in every input)")
    assert shown({"a": 0.0, "b": 0.0}) == "fused path, Adam, 2 steps, lr 0 (scale-aware default: every input identical)"
    assert shown({"a": 0.1, "b": 0.2}, default=False) == "fused path, Adam, 2 steps, lr 0.1..0.2 per tensor"
    assert MergeReport("soup", "SGD", 1, 0, lr={"a": 1.0}).describe() == "soup: the weighted mean"


def test_count_mismatch_messages_agree_with_their_nouns(tmp_path, capsys):
    """`--weights 3` for two inputs read "weights: 1 values for 2 inputs"."""
    import fedsoup
    from fedsoup.errors import OptionError

    inputs = checkpoints(tmp_path)
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "o.safetensors"), "--weights", "3"]) == 2
    assert "weights: 1 value for 2 inputs" in capsys.readouterr().err
    models = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(OptionError, match="weights has 1 entry for 2 ingredients"):
        fedsoup.merge(models, weights=[1.0])
    with pytest.raises(OptionError, match="order_by has 1 score for 2 ingredients"):
        fedsoup.merge(models, order_by=[1.0])
    with pytest.raises(OptionError, match="out of range for 1 ingredient$"):
        fedsoup.merge(models[:1], pivot=3)
