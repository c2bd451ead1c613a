"""fedsoup.merge_files: = the CLI = fedsoup.merge; typed errors naming file and tensor; Hugging Face directories."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedsoup
from fedsoup import cli
from tests.hf_helpers import correctly_rounded_mean
from fedsoup import io as fio
from fedsoup.errors import MergeInputError, MergeWarning, OutputExistsError

OPTIONS = dict(optimizer="adam", lr=0.05, epochs=2, batch_size=2, shuffle=True, seed=3, weights=[3, 1, 2, 4])
FLAGS = ["--optimizer", "adam", "--lr", "0.05", "--epochs", "2", "--batch-size", "2", "--shuffle", "--seed", "3",
         "--weights", "3,1,2,4"]


def make_models(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "embed.weight": torch.randn(10, 4, generator=g).to(torch.bfloat16),
            "layer.0.weight": torch.randn(6, 4, generator=g),
            "layer.0.bias": torch.randn(6, generator=g),
            "layer.1.weight": torch.randn(3, 6, generator=g),
            "position_ids": torch.arange(8),
        }
        for _ in range(n)
    ]


def write_files(models, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, model in enumerate(models):
        save_file(model, folder / f"m{i}.safetensors")
        paths.append(str(folder / f"m{i}.safetensors"))
    return paths


def assert_same(a, b) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- merge_files = CLI = merge


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
@pytest.mark.parametrize("shard_size", [None, "300B"], ids=["single", "sharded"])
def test_merge_files_equals_cli_equals_merge(tmp_path, capsys, low_memory, shard_size):
    models = make_models()
    inputs = write_files(models, tmp_path / "in")
    expected = fedsoup.merge([load_file(p) for p in inputs], **OPTIONS)

    out = fedsoup.merge_files(inputs, tmp_path / "lib", low_memory=low_memory, shard_size=shard_size, **OPTIONS)
    assert out == tmp_path / "lib"
    flags = [*FLAGS, "--low-memory" if low_memory else "--in-memory"] + (["--shard-size", shard_size] if shard_size else [])
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "cli"), *flags]) == 0, capsys.readouterr().err

    names = sorted(p.name for p in (tmp_path / "lib").iterdir())
    # tensor by tensor, the merge's report goes beside the output (its header was written first)
    report = ["model.safetensors.fedsoup.json"] if low_memory else []
    if shard_size:
        shards = [name for name in names if name.startswith("model-")]
        assert len(shards) > 1 and names == sorted(["model.safetensors.index.json", *shards, *report])
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    else:
        assert names == sorted(["model.safetensors", *report])
    assert names == sorted(p.name for p in (tmp_path / "cli").iterdir())
    library, command = fio.load_state_dict(tmp_path / "lib"), fio.load_state_dict(tmp_path / "cli")
    assert_same(library, command)
    if low_memory:  # tensor by tensor: equal up to the last bit of a vectorised kernel
        for key in expected:
            assert library[key].dtype == expected[key].dtype
            torch.testing.assert_close(library[key], expected[key], rtol=1e-6, atol=1e-6)
    else:
        assert_same(library, expected)


def test_merge_files_glob_metrics_pivot_file_and_metadata(tmp_path):
    models = make_models(3)
    inputs = write_files(models, tmp_path / "in")
    (tmp_path / "metrics.csv").write_text("file,n,acc\nm2,30,0.7\nm0,10,0.9\nm1,20,0.8\n")
    pivot = make_models(1, seed=7)[0]
    save_file(pivot, tmp_path / "pivot.safetensors")
    out = fedsoup.merge_files(str(tmp_path / "in" / "*.safetensors"), tmp_path / "o.safetensors",
                              metrics=tmp_path / "metrics.csv", weights="n", order_by="acc",
                              pivot=tmp_path / "pivot.safetensors", optimizer="sgd", lr=0.5, momentum=0.9, epochs=2)
    expected = fedsoup.merge([load_file(p) for p in inputs], weights=[10, 20, 30], order_by=[0.9, 0.8, 0.7],
                             pivot=pivot, optimizer="sgd", lr=0.5, momentum=0.9, epochs=2)
    assert_same(load_file(out), expected)
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    settings = json.loads(metadata["fedsoup.merge"])
    assert settings["momentum"] == 0.9 and settings["weights"] == [10, 20, 30]
    assert settings["pivot"] == str(tmp_path / "pivot.safetensors")
    assert json.loads(metadata["fedsoup.inputs"]) == inputs


def test_existing_output_is_an_output_exists_error(tmp_path):
    inputs = write_files(make_models(2), tmp_path)
    (tmp_path / "o.safetensors").write_bytes(b"keep")
    with pytest.raises(OutputExistsError) as info:
        fedsoup.merge_files(inputs, tmp_path / "o.safetensors")
    assert info.value.path == str(tmp_path / "o.safetensors")
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep"
    fedsoup.merge_files(inputs, tmp_path / "o.safetensors", force=True)
    assert_same(load_file(tmp_path / "o.safetensors"), fedsoup.soup([load_file(p) for p in inputs]))


def test_device_passes_through(tmp_path):
    inputs = write_files(make_models(2), tmp_path)
    out = fedsoup.merge_files(inputs, tmp_path / "o.safetensors", device="cpu", optimizer="adam", lr=0.1)
    assert_same(load_file(out), fedsoup.merge([load_file(p) for p in inputs], optimizer="adam", lr=0.1))


@pytest.fixture
def few_open_files():
    """Lower this process's open-file limit to 100 above what it uses now (1024 is a common
    default), restoring it after the test."""
    resource = pytest.importorskip("resource")
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(len(os.listdir("/proc/self/fd")) + 100, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_in_memory_merge_of_many_tensors_needs_few_open_files(tmp_path, few_open_files):
    # Python's mmap keeps a duplicate descriptor per mapping: one mapping per tensor made an
    # in-memory merge of 4 models of 300 tensors fail under the usual 1024 open files.
    g = torch.Generator().manual_seed(0)
    models = [{f"layer.{i}.weight": torch.randn(3, generator=g) for i in range(150)} for _ in range(3)]
    inputs = write_files(models, tmp_path / "in")
    index = {"metadata": {}, "weight_map": {f"layer.{i}.weight": f"s-0000{i % 2 + 1}-of-00002.safetensors"
                                            for i in range(150)}}
    (tmp_path / "sharded").mkdir()
    for shard in (1, 2):
        save_file({k: v for k, v in models[0].items() if index["weight_map"][k].startswith(f"s-0000{shard}")},
                  tmp_path / "sharded" / f"s-0000{shard}-of-00002.safetensors")
    (tmp_path / "sharded" / "s.safetensors.index.json").write_text(json.dumps(index))
    out = fedsoup.merge_files([*inputs, str(tmp_path / "sharded")], tmp_path / "o.safetensors", low_memory=False,
                              pivot=inputs[1])
    assert_same(load_file(out), fedsoup.merge([*models, models[0]], pivot=models[1]))


def test_a_tensor_by_tensor_merge_of_many_inputs_needs_one_open_file_each(tmp_path, few_open_files):
    # Each mapped tensor holds a duplicate descriptor (Python's mmap): with one input file open
    # each, 60 inputs needed 120 descriptors; where a mapping cannot be made, the bytes are read.
    g = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(5, generator=g), "b": torch.randn(2, generator=g)} for _ in range(70)]
    inputs = write_files(models, tmp_path / "in")
    out = fedsoup.merge_files(inputs, tmp_path / "o.safetensors", low_memory=True)
    assert_same(load_file(out), fedsoup.merge(models))


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_an_input_modified_in_place_during_the_merge_is_an_error_and_nothing_is_written(tmp_path, monkeypatch,
                                                                                        low_memory):
    # Inputs are mapped, read as the merge goes: bytes another program writes into a file
    # mid-merge reach the merge, whose result is then a mix of no version of that file.
    import time

    models = make_models(2)
    inputs = write_files(models, tmp_path / "in")
    out = tmp_path / "out.safetensors"
    merge = fedsoup.merge

    def merge_then_rewrite(*args, **kwargs):
        if not any(path.name == "done" for path in tmp_path.iterdir()):
            (tmp_path / "done").touch()
            time.sleep(0.05)  # past the file system's clock tick
            with open(inputs[1], "r+b") as file:  # the last tensor's bytes, the same length
                file.seek(-4 * 6, os.SEEK_END)
                file.write(torch.full((6,), 7.0).numpy().tobytes())
        return merge(*args, **kwargs)

    monkeypatch.setattr(fedsoup, "merge", merge_then_rewrite)
    with pytest.raises(MergeInputError, match="changed while it was being merged") as info:
        fedsoup.merge_files(inputs, out, low_memory=low_memory, shard_size="300B")
    assert (info.value.path, info.value.key) == (inputs[1], None)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["done", "in"]


def test_a_torch_file_modified_in_place_during_the_merge_is_an_error(tmp_path, monkeypatch):
    # torch.load(mmap=True) maps .pt/.bin files as safetensors files are mapped.
    import time

    models = make_models(2)
    inputs = [str(tmp_path / f"m{i}.pt") for i in range(2)]
    for model, path in zip(models, inputs):
        torch.save(model, path)
    (tmp_path / "other").mkdir()  # (torch names the archive after the file)
    torch.save({key: tensor + 1 if tensor.is_floating_point() else tensor for key, tensor in models[1].items()},
               tmp_path / "other" / "m1.pt")
    other = (tmp_path / "other" / "m1.pt").read_bytes()
    assert len(other) == os.path.getsize(inputs[1])
    merge = fedsoup.merge

    def rewrite_then_merge(*args, **kwargs):
        time.sleep(0.05)  # past the file system's clock tick
        with open(inputs[1], "r+b") as file:
            file.write(other)
        return merge(*args, **kwargs)

    monkeypatch.setattr(fedsoup, "merge", rewrite_then_merge)
    with pytest.raises(MergeInputError, match="changed while it was being merged") as info:
        fedsoup.merge_files(inputs, tmp_path / "out.safetensors")
    assert info.value.path == inputs[1]
    assert not (tmp_path / "out.safetensors").exists()


def test_a_base_model_modified_in_place_during_an_adapter_merge_is_an_error(tmp_path, monkeypatch):
    # The base's tensors no adapter touches are written from its mapping, read as they are written.
    import time

    from fedsoup.lora import driver

    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "gpt2", "torch_dtype": "float32"}')
    base = {"h.q.weight": torch.randn(6, 4, generator=g), "wte.weight": torch.randn(10, 4, generator=g)}
    save_file(base, tmp_path / "base" / "model.safetensors")
    adapters = []
    for i in range(2):
        adapters.append(tmp_path / f"a{i}")
        adapters[-1].mkdir()
        (adapters[-1] / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "bias": "none"}')
        save_file({"base_model.model.h.q.lora_A.weight": torch.randn(2, 4, generator=g),
                   "base_model.model.h.q.lora_B.weight": torch.randn(6, 2, generator=g)},
                  adapters[-1] / "adapter_model.safetensors")
    base_producer = driver.base_producer  # (the merge, tensor by tensor)

    def merge_then_rewrite(*args, **kwargs):
        time.sleep(0.05)  # past the file system's clock tick
        with open(tmp_path / "base" / "model.safetensors", "r+b") as file:  # wte.weight's last bytes
            file.seek(-4 * 4, os.SEEK_END)
            file.write(torch.full((4,), 7.0).numpy().tobytes())
        return base_producer(*args, **kwargs)

    monkeypatch.setattr(driver, "base_producer", merge_then_rewrite)
    with pytest.raises(MergeInputError, match="changed while it was being merged") as info:
        fedsoup.merge_files(adapters, tmp_path / "out", base=tmp_path / "base")
    assert info.value.path == str(tmp_path / "base")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- typed errors


def _broken_input(tmp_path: Path, case: str) -> tuple[str, str | None]:
    """Write a bad third input; return its path and the tensor key the error must name."""
    model = make_models(1, seed=3)[0]
    path = tmp_path / f"{case}.safetensors"
    if case == "nan":
        model["layer.0.bias"][2] = float("nan")
        key = "layer.0.bias"
    elif case == "missing":
        del model["layer.1.weight"]
        key = "layer.1.weight"
    elif case == "shape":
        model["layer.0.weight"] = torch.zeros(4, 6)
        key = "layer.0.weight"
    elif case == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return str(path), None
    elif case == "pickle":
        path = tmp_path / "evil.pt"
        marker = tmp_path / "code-ran"
        path.write_bytes(
            b"\x80\x02cbuiltins\nopen\nq\x00X" + len(str(marker)).to_bytes(4, "little") + str(marker).encode()
            + b"X\x01\x00\x00\x00wq\x01\x86q\x02Rq\x03."
        )
        return str(path), None
    save_file(model, path)
    return str(path), key


@pytest.mark.parametrize("case", ["nan", "missing", "shape", "corrupt", "pickle"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_merge_input_error_attributes(tmp_path, case, low_memory):
    good = write_files(make_models(2), tmp_path / "good")
    bad, key = _broken_input(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MergeInputError) as info:
        fedsoup.merge_files([*good, bad], tmp_path / "out.safetensors", low_memory=low_memory, optimizer="adam", lr=0.1)
    error = info.value
    assert (error.path, error.key) == (bad, key)
    assert error.ingredient == (2 if case in ("nan", "missing", "shape") else None)
    assert str(error).startswith(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not (tmp_path / "code-ran").exists()


def test_merge_input_error_from_merge_in_memory():
    models = make_models(3)
    models[1]["layer.0.weight"][0, 0] = float("inf")
    with pytest.raises(MergeInputError) as info:
        fedsoup.merge(models, optimizer="adam", lr=0.1)
    assert (info.value.ingredient, info.value.key, info.value.path) == (1, "layer.0.weight", None)


def _empty_input(folder: Path, form: str) -> str:
    """A checkpoint of ``form`` that holds no tensors; its path as given to a merge."""
    folder.mkdir(parents=True, exist_ok=True)
    if form == "safetensors":
        save_file({}, folder / "empty.safetensors")
        return str(folder / "empty.safetensors")
    if form == "npz":
        np.savez(folder / "empty.npz")
        return str(folder / "empty.npz")
    if form == "pt":
        torch.save({}, folder / "empty.pt")
        return str(folder / "empty.pt")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return str(folder / "model.safetensors.index.json")


@pytest.mark.parametrize("form", ["safetensors", "npz", "sharded", "pt"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_an_input_with_no_tensors_is_refused_naming_it_and_nothing_is_written(tmp_path, capsys, form, low_memory):
    """Before: two safetensors (or .npz, or sharded) inputs of no tensors merged into an empty
    output, exit 0; an empty .pt was refused. Now every format is refused alike."""
    empty = [_empty_input(tmp_path / f"in{i}", form) for i in range(2)]
    good = write_files(make_models(1), tmp_path / "good")
    for inputs, culprit in ((empty, empty[0]), ([*good, empty[1]], empty[1])):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(MergeInputError) as info:
            fedsoup.merge_files(inputs, tmp_path / "out.safetensors", low_memory=low_memory)
        assert (info.value.path, info.value.key, info.value.reason) == (culprit, None, "holds no tensors")
        flags = ["--low-memory"] if low_memory else []
        assert cli.main(["merge", *inputs, "-o", str(tmp_path / "out.safetensors"), *flags]) == 2
        assert f"fedsoup: error: {culprit}: holds no tensors" in capsys.readouterr().err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_files_of_integer_tensors_only_merge_as_the_library_merges_them(tmp_path, low_memory):
    """Not "no tensors": integer tensors are tensors. The file merge writes what
    ``fedsoup.merge`` returns for them, the first visited input's (tests/test_merge.py)."""
    models = [{"position_ids": torch.arange(4), "bn.num_batches_tracked": torch.tensor(10 + i)} for i in range(3)]
    inputs = write_files(models, tmp_path / "in")
    out = fedsoup.merge_files(inputs, tmp_path / "out.safetensors", order_by=[0.1, 0.9, 0.5], low_memory=low_memory)
    assert_same(load_file(out), fedsoup.merge(models, order_by=[0.1, 0.9, 0.5]))


@pytest.mark.parametrize("weights_file", ["adapter_model.safetensors", "adapter_model.bin"])
def test_an_adapter_with_no_tensors_is_refused_as_holding_no_lora_factors(tmp_path, weights_file):
    """Adapters are read by their own reader, which opens an empty file (the refusal of an
    empty .bin was in its reader, with the words of a model's); the adapter merge says what
    an adapter lacks, whatever its weights file."""
    pytest.importorskip("peft")
    from tests.lora_helpers import make_adapter

    adapter = make_adapter(tmp_path / "adapter", seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    if weights_file.endswith(".bin"):
        torch.save({}, empty / weights_file)
    else:
        save_file({}, empty / weights_file)
    with pytest.raises(MergeInputError) as info:
        fedsoup.merge_files([adapter, empty], tmp_path / "out")
    assert info.value.path == str(empty) and info.value.reason.startswith("holds no LoRA factors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("form", ["safetensors", "npz", "sharded", "pt"])
def test_inspect_describes_an_input_with_no_tensors_and_says_it_cannot_be_merged(tmp_path, capsys, form):
    """``inspect`` is there to tell what a file holds: an empty one is described (0 tensors),
    not refused, and listed among what keeps the inputs from being merged."""
    empty = _empty_input(tmp_path / "in", form)
    report = fedsoup.inspect_files([empty])
    assert [(c["file"], c["tensors"]) for c in report["checkpoints"]] == [(empty, 0)]
    assert report["refusals"] == [f"{empty}: holds no tensors"] and report["mergeable"] is False
    assert cli.main(["inspect", empty]) == 1
    assert f"not mergeable: {empty}: holds no tensors" in capsys.readouterr().out


# --------------------------------------------------------------------------- dtypes


def test_dtype_option_sets_the_output_dtype(tmp_path, capsys):
    inputs = write_files(make_models(2), tmp_path / "in")
    out = fedsoup.merge_files(inputs, tmp_path / "o.safetensors", dtype="fp16")
    merged = load_file(out)
    assert {merged[k].dtype for k in merged if merged[k].is_floating_point()} == {torch.float16}
    assert merged["position_ids"].dtype == torch.int64
    loaded = [load_file(p) for p in inputs]
    expected = fedsoup.soup(loaded, dtype=torch.float16)
    for key in expected:
        if expected[key].is_floating_point():
            # float32 inputs: their float32 soup rounded once; bf16 ones: the exact mean rounded once into fp16
            assert torch.equal(merged[key], expected[key])
    assert torch.equal(expected["layer.0.weight"], fedsoup.soup(loaded)["layer.0.weight"].to(torch.float16))
    assert torch.equal(expected["embed.weight"], correctly_rounded_mean([m["embed.weight"] for m in loaded],
                                                                        dtype=torch.float16))
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "c.safetensors"), "--dtype", "bfloat16"]) == 0
    assert load_file(tmp_path / "c.safetensors")["layer.0.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_a_dtype_torch_cannot_cast_into_is_an_option_error(tmp_path, low_memory):
    # float4_e2m1fn_x2 is a floating dtype, packed two to a byte: torch casts nothing into it
    # (the in-memory merge raised NotImplementedError from its kernel, an unexpected error).
    inputs = write_files(make_models(2), tmp_path / "in")
    with pytest.raises(fedsoup.OptionError) as info:
        fedsoup.merge_files(inputs, tmp_path / "o.safetensors", dtype=torch.float4_e2m1fn_x2, low_memory=low_memory)
    assert info.value.option == "dtype"
    with pytest.raises(fedsoup.OptionError):
        fedsoup.merge(make_models(2), dtype=torch.float4_e2m1fn_x2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in"]


def test_mixed_float_dtypes_warn_which_dtype_was_chosen(tmp_path, capsys):
    models = make_models(2)
    models[1] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in models[1].items()}
    inputs = write_files(models, tmp_path / "in")
    with pytest.warns(MergeWarning, match=r"tensor 'layer\.0\.\w+' is float32 in .*m0.safetensors, bfloat16 in "
                                          r".*m1.safetensors \(and 2 more tensors\); writing float32") as record:
        out = fedsoup.merge_files(inputs, tmp_path / "o.safetensors")
    assert len(record) == 1
    assert load_file(out)["layer.0.weight"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # an explicit dtype: nothing to warn about
        fedsoup.merge_files(inputs, tmp_path / "p.safetensors", dtype="bf16")
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "fedsoup: warning: the inputs' float dtypes differ" in capsys.readouterr().err
    # each dtype is named with the first input that has it (float32 was shown "in m2", the last)
    three = make_models(3)
    three[1] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in three[1].items()}
    with pytest.warns(MergeWarning, match=r"is float32 in \S*three/m0.safetensors, bfloat16 in \S*three/m1.safetensors "
                                          r"\(and 2 more tensors\); writing float32, the dtype of \S*three/m0"):
        fedsoup.merge_files(write_files(three, tmp_path / "three"), tmp_path / "t.safetensors")


# --------------------------------------------------------------------------- Hugging Face directories

TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "WordPiece"}}\n',
    "tokenizer_config.json": '{"do_lower_case": true, "model_max_length": 8}\n',
    "special_tokens_map.json": '{"cls_token": "[CLS]", "sep_token": "[SEP]"}\n',
    "vocab.txt": "[PAD]\n[CLS]\n[SEP]\nhello\nworld\n",
}


def write_hf_directory(folder: Path, model: dict[str, torch.Tensor], config: dict) -> None:
    """What transformers' save_pretrained(max_shard_size=...) leaves: config, tokenizer, sharded weights + index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text('{"max_length": 8}\n')
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    (folder / "training_args.bin").write_bytes(b"not carried")
    infos = {k: fio.TensorInfo(tuple(v.shape), v.dtype) for k, v in model.items()}
    fio.write_checkpoint(folder, infos, model.__getitem__, max_shard_bytes=200)


def hf_config(**changes) -> dict:
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 4, "torch_dtype": "float32",
            "transformers_version": "4.57.0", **changes}


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_hugging_face_directories_merge_into_a_loadable_directory(tmp_path, low_memory):
    models = make_models(3)
    inputs = []
    for i, model in enumerate(models):
        write_hf_directory(tmp_path / f"client{i}", model, hf_config(_name_or_path=f"runs/client{i}"))
        inputs.append(str(tmp_path / f"client{i}"))
    assert "model.safetensors.index.json" in {p.name for p in Path(inputs[0]).iterdir()}

    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # bookkeeping fields may differ silently
        out = fedsoup.merge_files(inputs, tmp_path / "merged", shard_size="300B", low_memory=low_memory,
                                  optimizer="adam", lr=0.05, epochs=2)
    files = sorted(p.name for p in out.iterdir())
    shards = [name for name in files if name.startswith("model-")]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    report = {"model.safetensors.fedsoup.json"} if low_memory else set()  # tensor by tensor: the report beside it
    assert set(files) == {"config.json", "generation_config.json", *TOKENIZER_FILES, "model.safetensors.index.json",
                          *shards, *report}
    for name in ("generation_config.json", *TOKENIZER_FILES):
        assert (out / name).read_bytes() == (Path(inputs[0]) / name).read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((Path(inputs[0]) / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    expected = fedsoup.merge(models, optimizer="adam", lr=0.05, epochs=2)
    merged = fio.load_state_dict(out)
    for key in expected:
        assert merged[key].dtype == expected[key].dtype
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)
    try:
        import transformers  # noqa: F401 - optional: not a dependency
    except ImportError:
        return
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == "bert"


@pytest.mark.filterwarnings("ignore::fedsoup.errors.MergeWarning")
def test_hugging_face_config_rules(tmp_path, capsys):
    models = make_models(2)
    write_hf_directory(tmp_path / "a", models[0], hf_config())
    write_hf_directory(tmp_path / "b", models[1], hf_config(architectures=["BertForMaskedLM"], vocab_size=9))
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.warns(MergeWarning, match=r"b/config.json differs from .*a/config.json \(architectures, vocab_size\); "
                                          r"the output carries the configuration of .*a"):
        fedsoup.merge_files(inputs, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["BertModel"]
    # The output dtype goes into the config; copy_config=False carries nothing.
    fedsoup.merge_files(inputs, tmp_path / "half", dtype="bf16")
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fedsoup.merge_files(inputs, tmp_path / "bare", copy_config=False)
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["model.safetensors"]
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "cli"), "--no-copy-config", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["model.safetensors"]
    # A single-file output is just the weights.
    fedsoup.merge_files(inputs, tmp_path / "w.safetensors")
    assert not (tmp_path / "config.json").exists()


def test_existing_config_in_output_directory_needs_force(tmp_path):
    models = make_models(2)
    write_hf_directory(tmp_path / "a", models[0], hf_config())
    write_hf_directory(tmp_path / "b", models[1], hf_config())
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        fedsoup.merge_files([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["config.json"]
    fedsoup.merge_files([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", force=True)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "bert"


# --------------------------------------------------------------------------- inspect


def test_inspect_files_is_the_library_side_of_fedsoup_inspect(tmp_path, capsys):
    inputs = write_files(make_models(2), tmp_path)
    other = make_models(1)[0]
    other["layer.0.bias"] = torch.zeros(7)
    save_file(other, tmp_path / "other.safetensors")
    report = fedsoup.inspect_files([*inputs, tmp_path / "other.safetensors"])
    assert [c["file"] for c in report["checkpoints"]] == [*inputs, str(tmp_path / "other.safetensors")]
    assert report["checkpoints"][0]["keys"]["embed.weight"] == {"dtype": "bfloat16", "shape": [10, 4]}
    assert report["differences"] == [
        f"{tmp_path / 'other.safetensors'}, tensor 'layer.0.bias': has shape (7,), but {inputs[0]} has (6,)"
    ]
    assert report["mergeable"] is False and report["refusals"] == []
    assert cli.main(["inspect", "--json", *inputs, str(tmp_path / "other.safetensors")]) == 1  # not mergeable
    assert json.loads(capsys.readouterr().out) == report


# --------------------------------------------------------------------------- integer tensors


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_integer_tensors_that_differ_are_refused_unless_counters(tmp_path, capsys, low_memory):
    def model(i: int, ids_differ: bool) -> dict[str, torch.Tensor]:
        return {"w": torch.full((3,), float(i)), "bn.num_batches_tracked": torch.tensor(10 + i),
                "position_ids": torch.arange(4) + (i if ids_differ else 0)}

    counters = []
    for i in range(2):
        save_file(model(i, ids_differ=False), tmp_path / f"c{i}.safetensors")
        counters.append(str(tmp_path / f"c{i}.safetensors"))
    out = fedsoup.merge_files(counters, tmp_path / "ok.safetensors", low_memory=low_memory)
    merged = fio.load_state_dict(out)
    assert merged["bn.num_batches_tracked"].item() == 10  # a counter: the first input's
    assert torch.equal(merged["position_ids"], torch.arange(4))

    differing = []
    for i in range(2):
        save_file(model(i, ids_differ=True), tmp_path / f"d{i}.safetensors")
        differing.append(str(tmp_path / f"d{i}.safetensors"))
    with pytest.raises(MergeInputError, match="integer tensor differs") as caught:
        fedsoup.merge_files(differing, tmp_path / "bad.safetensors", low_memory=low_memory)
    assert (caught.value.key, caught.value.path, caught.value.ingredient) == ("position_ids", differing[1], 1)
    assert not (tmp_path / "bad.safetensors").exists()
    capsys.readouterr()
    assert cli.main(["merge", *differing, "-o", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "position_ids" in err[0] and "integer tensor differs" in err[0]
