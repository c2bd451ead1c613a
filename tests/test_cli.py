"""`fedsoup merge` / `fedsoup inspect`: results equal fedsoup.merge, low-memory is exact, bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedsoup
from fedsoup import cli
from fedsoup import io as fio
from fedsoup.offline import producers

REPO = Path(__file__).resolve().parents[1]
ADAM = ["--optimizer", "adam", "--lr", "0.05", "--epochs", "2", "--batch-size", "2", "--shuffle", "--seed", "3"]
ADAM_KWARGS = dict(optimizer="adam", lr=0.05, epochs=2, batch_size=2, shuffle=True, seed=3)


def make_models(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
            "fc.weight": torch.randn(5, 4, generator=g),
            "fc.bias": torch.randn(5, generator=g),
            "emb": torch.randn(6, 2, generator=g).to(torch.bfloat16),
            "bn.num_batches_tracked": torch.tensor(10 + i),
        }
        for i in range(n)
    ]


def write(models, folder: Path, fmt: str = "safetensors") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, model in enumerate(models):
        if fmt == "safetensors":
            path = folder / f"client{i}.safetensors"
            save_file(model, path)
        elif fmt in ("pt", "bin"):
            path = folder / f"client{i}.{fmt}"
            torch.save({"state_dict": model, "epoch": 1}, path)
        elif fmt == "npz":
            path = folder / f"client{i}.npz"
            np.savez(path, **{k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in model.items()})
        elif fmt == "sharded":
            path = folder / f"client{i}"
            infos = {k: fio.TensorInfo(tuple(v.shape), v.dtype) for k, v in model.items()}
            fio.write_checkpoint(path, infos, model.__getitem__, max_shard_bytes=100)
        else:
            raise AssertionError(fmt)
        paths.append(str(path))
    return paths


def run(*argv, capsys=None) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def assert_same(a, b) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def library_merge(inputs, **options):
    """fedsoup.merge on the same tensors, in the same key order, as the command line sees them."""
    return fedsoup.merge([fio.load_state_dict(path) for path in inputs], **options)


def no_output_left(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


# --------------------------------------------------------------------------- merge = fedsoup.merge


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "bin", "npz", "sharded"])
def test_cli_merge_equals_library_merge_for_every_format(tmp_path, capsys, fmt):
    models = make_models()
    inputs = write(models, tmp_path / "in", fmt)
    code, out, err = run("merge", *inputs, "-o", tmp_path / "out.safetensors", *ADAM, "--weights", "3,1,2", capsys=capsys)
    assert code == 0, err
    expected = library_merge(inputs, weights=[3, 1, 2], **ADAM_KWARGS)
    assert_same(load_file(tmp_path / "out.safetensors"), expected)
    assert "merged 3 inputs" in out and "tensors" in out and "parameters" in out


def test_metadata_records_settings_and_inputs(tmp_path, capsys):
    inputs = write(make_models(), tmp_path)
    assert run("merge", *inputs, "-o", tmp_path / "out.safetensors", *ADAM, "--betas", "0.8,0.9", capsys=capsys)[0] == 0
    with safe_open(tmp_path / "out.safetensors", "pt") as handle:
        metadata = handle.metadata()
    settings = json.loads(metadata["fedsoup.merge"])
    assert settings["optimizer"] == "adam" and settings["epochs"] == 2 and settings["betas"] == [0.8, 0.9]
    assert json.loads(metadata["fedsoup.inputs"]) == inputs
    assert metadata["format"] == "pt"


def test_glob_inputs_and_pt_output(tmp_path, capsys):
    inputs = write(make_models(), tmp_path / "in")
    code, _, err = run("merge", str(tmp_path / "in" / "*.safetensors"), "-o", tmp_path / "soup.pt", capsys=capsys)
    assert code == 0, err
    assert_same(torch.load(tmp_path / "soup.pt", weights_only=True), fedsoup.soup([fio.load_state_dict(p) for p in sorted(inputs)]))


def test_sharded_output_round_trips(tmp_path, capsys):
    models = make_models()
    inputs = write(models, tmp_path / "in")
    code, _, err = run("merge", *inputs, "-o", tmp_path / "out", "--shard-size", "200B", *ADAM, capsys=capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in names and len(names) > 2
    expected = library_merge(inputs, **ADAM_KWARGS)
    assert_same(fio.load_state_dict(tmp_path / "out"), expected)
    # ... and the sharded output is itself a valid input.
    code, _, err = run("merge", tmp_path / "out", tmp_path / "out" / "model.safetensors.index.json",
                       "-o", tmp_path / "again.safetensors", capsys=capsys)
    assert code == 0, err
    assert_same(load_file(tmp_path / "again.safetensors"), expected)


# --------------------------------------------------------------------------- low memory


@pytest.mark.parametrize(
    "options",
    [
        ["--optimizer", "adam", "--lr", "0.05", "--epochs", "3", "--batch-size", "2", "--shuffle", "--seed", "7"],
        ["--optimizer", "sgd", "--lr", "0.7", "--epochs", "2", "--order-by", "0.2,0.9,0.5,0.1", "--pivot", "1"],
        ["--optimizer", "sgd", "--lr", "0.7", "--momentum", "0.9", "--schedule", "constant", "--epochs", "2",
         "--order-by", "0.2,0.9,0.5,0.1", "--pivot", "first", "--fixed-pivot"],
        ["--optimizer", "fedyogi", "--lr", "0.1", "--weights", "1,2,3,4", "--epochs", "2"],
    ],
    ids=["adam", "sgd", "sgd-momentum", "fedyogi"],
)
def test_low_memory_equals_in_memory(tmp_path, capsys, options):
    inputs = write(make_models(4, seed=5), tmp_path / "in")
    assert run("merge", *inputs, "-o", tmp_path / "mem.safetensors", "--in-memory", *options, capsys=capsys)[0] == 0
    code, out, err = run("merge", *inputs, "-o", tmp_path / "low.safetensors", "--low-memory", *options, capsys=capsys)
    assert code == 0, err
    assert "low-memory" in out
    low, mem = load_file(tmp_path / "low.safetensors"), load_file(tmp_path / "mem.safetensors")
    assert sorted(low) == sorted(mem)
    # Bit for bit up to float rounding: torch's vectorised kernels may round the last bit
    # differently for a tensor at another offset of the whole-model buffer (measured on
    # this CPU: Adam, SGD and FedYogi bit-identical, momentum SGD <= 2.4e-7 apart).
    for key in low:
        assert low[key].dtype == mem[key].dtype
        torch.testing.assert_close(low[key], mem[key], rtol=1e-6, atol=1e-6)
    float_keys = [k for k in low if low[k].is_floating_point()]
    assert not all(torch.equal(low[k], load_file(inputs[0])[k]) for k in float_keys)  # it did merge


def test_low_memory_with_pivot_checkpoint_and_sharded_output(tmp_path, capsys):
    models = make_models(3, seed=2)
    inputs = write(models, tmp_path / "in")
    pivot = make_models(1, seed=9)[0]
    save_file(pivot, tmp_path / "pivot.safetensors")
    options = ["--optimizer", "adam", "--lr", "0.1", "--pivot", tmp_path / "pivot.safetensors", "--epochs", "2"]
    code, _, err = run("merge", *inputs, "-o", tmp_path / "low", "--low-memory", "--shard-size", "150", *options, capsys=capsys)
    assert code == 0, err
    expected = library_merge(inputs, optimizer="adam", lr=0.1, pivot=fio.load_state_dict(tmp_path / "pivot.safetensors"), epochs=2)
    assert_same(fio.load_state_dict(tmp_path / "low"), expected)


@pytest.mark.parametrize(
    "options, reason",
    [
        (["--greedy", "--evaluate", "math:fsum"], "greedy selection scores the whole model"),
        (["--project"], "projection ball"),
        (["--optimizer", "torch.optim.LBFGS"], "LBFGS is not element-wise"),
    ],
)
def test_low_memory_refuses_whole_model_merges(tmp_path, capsys, options, reason):
    inputs = write(make_models(), tmp_path)
    code, _, err = run("merge", *inputs, "-o", tmp_path / "out.safetensors", "--low-memory", *options, capsys=capsys)
    assert code == 2
    assert reason in err and "--low-memory" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_low_memory_is_chosen_when_memory_is_short(tmp_path, capsys, monkeypatch):
    inputs = write(make_models(), tmp_path)
    monkeypatch.setattr(producers, "memory_available", lambda: 1000)
    code, out, err = run("merge", *inputs, "-o", tmp_path / "out.safetensors", *ADAM, capsys=capsys)
    assert code == 0, err
    assert "low-memory" in out and "merging tensor by tensor" in err
    # ... but never for a merge it would change: then it stays in memory.
    code, out, err = run("merge", *inputs, "-o", tmp_path / "p.safetensors", "--project", capsys=capsys)
    assert code == 0, err
    assert "in-memory" in out and "not possible" in err


# --------------------------------------------------------------------------- settings


def test_config_file_flags_override_and_metrics_columns(tmp_path, capsys):
    models = make_models(3)
    inputs = write(models, tmp_path / "ckpts")
    (tmp_path / "metrics.csv").write_text("file,num_examples,val_acc\nclient2,30,0.7\nclient0,10,0.9\nclient1,20,0.8\n")
    (tmp_path / "merge.toml").write_text(
        'inputs = ["ckpts/client0.safetensors", "ckpts/client1.safetensors", "ckpts/client2.safetensors"]\n'
        'output = "merged.safetensors"\nmetrics = "metrics.csv"\n'
        'optimizer = "adam"\nlr = 0.5\nepochs = 2\nbatch-size = 2\nweights = "num_examples"\norder_by = "val_acc"\n'
        "[optimizer_kwargs]\nbetas = [0.5, 0.9]\n"
    )
    code, _, err = run("merge", "--config", tmp_path / "merge.toml", "--lr", "0.05", capsys=capsys)
    assert code == 0, err
    expected = library_merge(inputs, optimizer="adam", lr=0.05, epochs=2, batch_size=2, weights=[10, 20, 30],
                             order_by=[0.9, 0.8, 0.7], betas=(0.5, 0.9))
    assert_same(load_file(tmp_path / "merged.safetensors"), expected)
    assert inputs  # the config's relative paths resolved against its folder


@pytest.mark.parametrize("suffix, text", [(".toml", "optimiser = 'adam'\n"), (".json", '{"optimiser": "adam"}')])
def test_unknown_config_key_exits_2_naming_it(tmp_path, capsys, suffix, text):
    inputs = write(make_models(), tmp_path)
    (tmp_path / f"c{suffix}").write_text(text)
    code, _, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", "--config", tmp_path / f"c{suffix}", capsys=capsys)
    assert code == 2 and "unknown option 'optimiser'; did you mean 'optimizer'?" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_greedy_with_evaluate_file(tmp_path, capsys):
    models = make_models()
    inputs = write(models, tmp_path)
    (tmp_path / "score.py").write_text("def score(state):\n    return -float(state['fc.weight'].abs().sum())\n")
    code, _, err = run("merge", *inputs, "-o", tmp_path / "g.safetensors", "--greedy", "--evaluate",
                       f"{tmp_path / 'score.py'}:score", "--optimizer", "adam", "--lr", "0.1", "--epochs", "2",
                       "--pivot", "first", capsys=capsys)
    assert code == 0, err
    expected = library_merge(inputs, optimizer="adam", lr=0.1, epochs=2, pivot="first", greedy=True,
                             evaluate=lambda s: -float(s["fc.weight"].abs().sum()))
    assert_same(load_file(tmp_path / "g.safetensors"), expected)


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (inputs, fragments the one-line error must contain)."""
    good = write(make_models(2), tmp_path)
    other_keys = make_models(1)[0]
    other_keys["extra"] = torch.zeros(2)
    save_file(other_keys, tmp_path / "keys.safetensors")
    other_shape = make_models(1)[0]
    other_shape["fc.weight"] = torch.zeros(4, 5)
    save_file(other_shape, tmp_path / "shape.safetensors")
    nan = make_models(1)[0]
    nan["fc.bias"][2] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    marker = tmp_path / "code-ran"
    (tmp_path / "evil.pt").write_bytes(
        b"\x80\x02cbuiltins\nopen\nq\x00X" + len(str(marker)).to_bytes(4, "little") + str(marker).encode()
        + b"X\x01\x00\x00\x00wq\x01\x86q\x02Rq\x03."
    )
    return {
        "missing": ([*good, str(tmp_path / "missing.safetensors")], ["missing.safetensors", "no such file"]),
        "corrupt": ([*good, str(tmp_path / "corrupt.safetensors")], ["corrupt.safetensors", "not a readable"]),
        "keys": ([*good, str(tmp_path / "keys.safetensors")], ["keys.safetensors", "'extra'"]),
        "shape": ([*good, str(tmp_path / "shape.safetensors")], ["shape.safetensors", "'fc.weight'", "(4, 5)"]),
        "nan": ([*good, str(tmp_path / "nan.safetensors")], ["nan.safetensors", "'fc.bias'", "NaN"]),
        "pickle": ([*good, str(tmp_path / "evil.pt")], ["evil.pt", "weights_only"]),
        "glob": ([*good, str(tmp_path / "nothing*.pt")], ["nothing*.pt", "no file matches"]),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "keys", "shape", "nan", "pickle", "glob"])
@pytest.mark.parametrize("mode", ["--in-memory", "--low-memory"])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, case, mode):
    inputs, fragments = _bad_inputs(tmp_path)[case]
    before = {p.name for p in tmp_path.iterdir()}
    code, out, err = run("merge", *inputs, "-o", tmp_path / "out.safetensors", mode, *ADAM, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsoup: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    no_output_left(tmp_path, before)
    assert not (tmp_path / "code-ran").exists()


def test_bad_settings_exit_2(tmp_path, capsys):
    inputs = write(make_models(3), tmp_path)
    out = tmp_path / "o.safetensors"
    cases = [
        (["--weights", "1,2"], "2 values for 3 inputs"),
        (["--weights", "1,-2,1"], "client1.safetensors: weight must be finite and >= 0"),
        (["--optimizer", "adamm"], "unknown optimizer 'adamm'"),
        (["--optimizer", "sgd", "--betas", "0.9,0.9"], "betas"),
        (["--order-by", "val_acc"], "--metrics"),
        (["--greedy"], "needs an evaluate"),
        (["--opt", "nesterov=true", "--opt", "momentun=0.9"], "unknown option 'momentun'; did you mean 'momentum' (an argument of SGD)?"),
        (["--dtype", "int8"], "dtype 'int8'"),
        (["--shard-size", "lots"], "size 'lots'"),
        (["--pivot", "7"], "pivot"),
    ]
    for options, message in cases:
        code, _, err = run("merge", *inputs, "-o", out, *options, capsys=capsys)
        assert code == 2 and message in err, (options, err)
        assert not out.exists()
    assert run("merge", *inputs, capsys=capsys)[0] == 2  # no -o
    with pytest.raises(SystemExit) as info:
        cli.main(["merge", *inputs, "-o", str(out), "--epochs", "many"])
    assert info.value.code == 2


def test_existing_output_kept_unless_force(tmp_path, capsys):
    inputs = write(make_models(), tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run("merge", *inputs, "-o", out, capsys=capsys)
    assert code == 2 and "output exists" in err and out.read_bytes() == b"precious"
    assert run("merge", *inputs, "-o", out, "--force", capsys=capsys)[0] == 0
    assert_same(load_file(out), fedsoup.soup([load_file(p) for p in inputs]))


def test_unexpected_error_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    inputs = write(make_models(), tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fedsoup, "merge", broken)
    code, _, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", capsys=capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        "fedsoup: unexpected error: RuntimeError: kernel exploded (set FEDSOUP_DEBUG=1 for the traceback)"
    ]
    assert not (tmp_path / "o.safetensors").exists()


def test_quiet_prints_only_the_summary(tmp_path, capsys):
    inputs = write(make_models(), tmp_path)
    code, out, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", "--low-memory", "-q", capsys=capsys)
    assert code == 0 and err == "" and out.count("\n") == 1


# --------------------------------------------------------------------------- pipes and devices as files

# Runs each command line of argv[1] (JSON) in one process, printing [exit status, stdout, stderr]
# as it goes: a command that blocks times the process out, the first one not printed.
COMMANDS_SCRIPT = """
import contextlib, io, json, sys
from fedsoup import cli
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    print(json.dumps([code, out.getvalue(), err.getvalue()]), flush=True)
"""
PIPE_TIMEOUT = 120  # s, for every command together: a blocked open fails the test, never hangs the suite


def _special_file_commands(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (a command line naming a pipe or device where a file goes, that pipe or device)."""
    inputs = write(make_models(2), tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    merge = ["merge", *inputs, "-o", str(work / "out.safetensors"), "-q"]
    pipe = {name: str(work / name) for name in ("c.toml", "m.csv", "score.py", "pivot.safetensors", "o.safetensors",
                                                "o.pt.fedsoup.json")}
    for path in pipe.values():
        os.mkfifo(path)
    device = work / "dev.csv"  # a device under a metrics file's name
    device.symlink_to(os.devnull)
    return {
        "config pipe": (["merge", "--config", pipe["c.toml"]], pipe["c.toml"]),
        "config device": ([*merge, "--config", os.devnull], os.devnull),
        "metrics pipe": ([*merge, "--metrics", pipe["m.csv"], "--weights", "n"], pipe["m.csv"]),
        "metrics device": ([*merge, "--metrics", str(device), "--order-by", "acc"], str(device)),
        "evaluate pipe": ([*merge, "--greedy", "--evaluate", pipe["score.py"] + ":score"], pipe["score.py"]),
        "optimizer pipe": ([*merge, "--optimizer", pipe["score.py"] + ":Optimizer"], pipe["score.py"]),
        "pivot pipe": ([*merge, "--pivot", pipe["pivot.safetensors"]], pipe["pivot.safetensors"]),
        "inspect pipe": (["inspect", inputs[0], pipe["pivot.safetensors"]], pipe["pivot.safetensors"]),
        "output pipe": (["merge", *inputs, "-o", pipe["o.safetensors"], "-q"], pipe["o.safetensors"]),
        "output pipe, force": (["merge", *inputs, "-o", pipe["o.safetensors"], "-q", "-f"], pipe["o.safetensors"]),
        "report beside a .pt": (["merge", *inputs, "-o", str(work / "o.pt"), "-q"], pipe["o.pt.fedsoup.json"]),
    }


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_or_device_where_any_option_names_a_file_exits_2_at_once_writing_nothing(tmp_path):
    """Before: --config and --metrics naming a named pipe blocked forever opening it, and a
    device (/dev/null) was read as an empty config ("unknown config format") or metrics file
    ("no rows"); a file.py:NAME of --evaluate or --optimizer that is a pipe "does not exist".
    Now each is refused as inputs are: one line, `<path>: not a regular file`, exit 2, nothing
    written. Inputs, --pivot, ``inspect`` and the output (a pipe in the way) were refused already;
    the report written beside a .pt output was not (the pipe was replaced by it, exit 0)."""
    commands = _special_file_commands(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argvs = [[str(word) for word in argv] for argv, _ in commands.values()]
    try:
        result = subprocess.run([sys.executable, "-c", COMMANDS_SCRIPT, json.dumps(argvs)], capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=PIPE_TIMEOUT)
    except subprocess.TimeoutExpired as expired:
        done = expired.stdout or b""  # (bytes, whatever text=)
        count = len((done.decode() if isinstance(done, bytes) else done).splitlines())
        pytest.fail(f"{list(commands)[count]!r} blocked for {PIPE_TIMEOUT} s: {' '.join(argvs[count])}")
    assert result.returncode == 0, result.stderr
    said = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(said) == len(commands), result.stdout
    for (name, (_, culprit)), (code, out, err) in zip(commands.items(), said):
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, (name, code, out, err)
        assert lines[0].startswith("fedsoup: error: ") and f"{culprit}: " in lines[0], (name, err)
        assert "not a regular file" in lines[0], (name, err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_the_library_refuses_a_pipe_as_config_metrics_or_imported_file_naming_it(tmp_path, no_hang):
    """What the command line's refusals are made of: typed errors carrying the path (and the option)."""
    from fedsoup.offline import load_config, load_metrics
    from fedsoup.offline.tables import import_object

    inputs = write(make_models(2), tmp_path / "in")
    for name in ("c.toml", "m.csv", "score.py"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(fedsoup.MergeInputError) as info:
        load_config(tmp_path / "c.toml")
    assert (info.value.path, info.value.reason) == (str(tmp_path / "c.toml"), "not a regular file (a pipe, socket or device)")
    with pytest.raises(fedsoup.MergeInputError) as info:
        load_metrics(tmp_path / "m.csv", inputs)
    assert info.value.path == str(tmp_path / "m.csv") and info.value.reason.startswith("not a regular file")
    with pytest.raises(fedsoup.MergeInputError) as info:
        fedsoup.merge_files(inputs, tmp_path / "out.safetensors", metrics=tmp_path / "m.csv", weights="n")
    assert info.value.path == str(tmp_path / "m.csv") and info.value.reason.startswith("not a regular file")
    spec = f"{tmp_path / 'score.py'}:score"
    with pytest.raises(fedsoup.OptionError, match="not a regular file") as info:
        import_object(spec, "evaluate")
    assert (info.value.option, info.value.value) == ("evaluate", spec)
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_tensors_and_differences(tmp_path, capsys):
    inputs = write(make_models(1), tmp_path)
    other = make_models(1)[0]
    other["fc.weight"] = torch.zeros(4, 5)
    del other["fc.bias"]
    save_file(other, tmp_path / "other.safetensors")
    code, out, _ = run("inspect", *inputs, tmp_path / "other.safetensors", capsys=capsys)
    assert code == 1  # cannot be merged
    assert "client0.safetensors: 5 tensors, 110 parameters" in out
    assert "conv.weight" in out and "(4, 2, 3, 3)" in out and "bfloat16" in out
    assert "not mergeable: 2 differences" in out
    assert "tensor 'fc.bias': missing" in out and "tensor 'fc.weight': has shape (4, 5), but" in out
    code, out, _ = run("inspect", "--json", *inputs, capsys=capsys)
    report = json.loads(out)
    assert report["checkpoints"][0]["keys"]["fc.weight"] == {"dtype": "float32", "shape": [5, 4]}
    assert report["checkpoints"][0]["parameters"] == 110 and report["differences"] == []
    assert run("inspect", tmp_path / "nope.pt", capsys=capsys)[0] == 2


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_console_entry_points_exit_codes(tmp_path):
    inputs = write(make_models(), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "fedsoup", "merge", *inputs, "-o", str(tmp_path / "o.safetensors"),
                         "--low-memory", *ADAM], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "fedsoup", "merge", *inputs, str(tmp_path / "nope.pt"),
                          "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("nope.pt: no such file or directory")
    assert not (tmp_path / "x.safetensors").exists()


RAISED_LIMIT_SCRIPT = """
import resource, sys
import fedsoup
from fedsoup import cli
inputs, output = sys.argv[1:-1], sys.argv[-1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
try:  # the library leaves the process's limit alone
    fedsoup.merge_files(inputs, output + ".library.safetensors")
    print("library: merged")
except fedsoup.MergeInputError as error:
    print("library:", error.reason)
print("cli:", cli.main(["merge", *inputs, "-o", output, "-q"]))
print("after:", resource.getrlimit(resource.RLIMIT_NOFILE) == (64, hard))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_the_command_line_merges_more_inputs_than_the_soft_open_file_limit(tmp_path):
    """Before: each input holds a file open, and past the soft RLIMIT_NOFILE (1024 on most
    systems) the merge failed ('too many open files'). The command line raises the soft limit
    to the hard one while it runs (and puts it back); the library does not touch it."""
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip("the hard open-file limit is too low to raise the soft one past 100 inputs")
    inputs = []
    for i in range(100):
        save_file({"w": torch.full((3,), float(i))}, tmp_path / f"m{i:03d}.safetensors")
        inputs.append(str(tmp_path / f"m{i:03d}.safetensors"))
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "-c", RAISED_LIMIT_SCRIPT, *inputs, str(out)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith(("library:", "cli:", "after:"))]
    assert said == ["library: cannot be read: too many open files", "cli: 0", "after: True"]
    expected = fedsoup.merge([{"w": torch.full((3,), float(i))} for i in range(100)])["w"]
    assert torch.equal(load_file(out)["w"], expected)


def test_metrics_json_rows_matched_by_run_folder(tmp_path, capsys):
    models = make_models(3)
    inputs = []
    for name, model in zip(("a", "b", "c"), models):
        (tmp_path / "runs" / name).mkdir(parents=True)
        torch.save(model, tmp_path / "runs" / name / "model.pt")
        inputs.append(str(tmp_path / "runs" / name / "model.pt"))
    (tmp_path / "m.json").write_text(json.dumps({"c": {"n": 1, "acc": 0.5}, "a": {"n": 4, "acc": 0.1}, "b": {"n": 2, "acc": 0.9}}))
    code, _, err = run("merge", str(tmp_path / "runs" / "*" / "model.pt"), "-o", tmp_path / "o.safetensors",
                       "--metrics", tmp_path / "m.json", "--weights", "n", "--order-by", "acc", "--ascending",
                       "--optimizer", "adam", "--lr", "0.1", capsys=capsys)
    assert code == 0, err
    expected = library_merge(inputs, weights=[4, 2, 1], order_by=[0.1, 0.9, 0.5], descending=False, optimizer="adam", lr=0.1)
    assert_same(load_file(tmp_path / "o.safetensors"), expected)
    # Rows that only say "model.pt" cannot tell the runs apart: refused, not guessed.
    (tmp_path / "bad.csv").write_text("file,n\nmodel.pt,1\nmodel.pt,2\nmodel.pt,3\n")
    code, _, err = run("merge", *inputs, "-o", tmp_path / "x.safetensors", "--metrics", tmp_path / "bad.csv",
                       "--weights", "n", capsys=capsys)
    assert code == 2 and "no row (column 'file') identifies input" in err


def test_metrics_rows_by_position_without_a_name_column(tmp_path, capsys):
    models = make_models(2)
    inputs = write(models, tmp_path)
    (tmp_path / "m.csv").write_text("val_acc\n0.3\n0.6\n")
    code, _, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", "--metrics", tmp_path / "m.csv",
                       "--order-by", "val_acc", "--pivot", "first", "--optimizer", "adam", "--lr", "0.2", capsys=capsys)
    assert code == 0, err
    expected = library_merge(inputs, order_by=[0.3, 0.6], pivot="first", optimizer="adam", lr=0.2)
    assert_same(load_file(tmp_path / "o.safetensors"), expected)


@pytest.mark.parametrize("line, message", [
    ('lr = "fast"', "option 'lr' must be a finite number, got 'fast'"),
    ("shuffle = 1", "option 'shuffle' must be true or false, got 1"),
    ("epochs = true", "option 'epochs' must be an integer, got True"),
    ("low_memory = 'auto'", "option 'low_memory' must be true, false or None, got 'auto'"),
    ("optimizer_kwargs = 3", "'optimizer_kwargs' must be a table"),
    ("shard_sise = '1GB'", "unknown option 'shard_sise'; did you mean 'shard_size'?"),
    ("lr = ", "invalid config"),
])
def test_config_values_of_the_wrong_type_exit_2(tmp_path, capsys, line, message):
    inputs = write(make_models(), tmp_path)
    (tmp_path / "c.toml").write_text(line + "\n")
    code, _, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", "--config", tmp_path / "c.toml", capsys=capsys)
    assert code == 2 and message in err, err


def test_yaml_config(tmp_path, capsys):
    pytest.importorskip("yaml")
    inputs = write(make_models(), tmp_path)
    (tmp_path / "c.yaml").write_text("optimizer: adam\nlr: 0.05\nepochs: 2\nbatch-size: 2\nshuffle: true\nseed: 3\n")
    code, _, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", "--config", tmp_path / "c.yaml", capsys=capsys)
    assert code == 0, err
    assert_same(load_file(tmp_path / "o.safetensors"), library_merge(inputs, **ADAM_KWARGS))


def test_bad_options_fail_before_any_tensor_is_read(tmp_path, capsys, monkeypatch):
    inputs = write(make_models(), tmp_path)
    reads = []
    original = fio.Checkpoint.get
    monkeypatch.setattr(fio.Checkpoint, "get", lambda self, key: reads.append(key) or original(self, key))
    code, _, err = run("merge", *inputs, "-o", tmp_path / "o.safetensors", "--optimizer", "adam", "--momentum", "0.9",
                       capsys=capsys)
    assert code == 2 and "momentum" in err
    assert reads == []
