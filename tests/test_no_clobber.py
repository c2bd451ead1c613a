"""A merge never writes, replaces or deletes a file it reads, even with --force (docs/design.md §4).

Every file a merge would write or remove (the weights, shards, index, report sidecar and the
files carried beside them) is checked, by identity (device and inode, so through links), against
every file it reads (the inputs' weights, shards and indexes, the configuration and carried files
of their model or adapter directories, the base, the pivot, the metrics file): a match is an
:class:`~fedsoup.errors.OutputError` naming the output file, exit 2, one line, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fedsoup
from fedsoup import cli
from fedsoup import io as fio
from fedsoup.errors import MergeWarning, OutputError

INPUT_REASON = "is an input of this merge"


def tree_hashes(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` (links followed) -> its SHA-256: what must not change."""
    hashes = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def tiny(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}


def model_directory(folder: Path, seed: int, *, weights: str = "model.safetensors") -> Path:
    """A model directory as save_pretrained leaves it (config, tokenizer files, the weights)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 8}\n')
    if weights.endswith(".bin"):
        torch.save(tiny(seed), folder / weights)
    else:
        save_file(tiny(seed), folder / weights)
    return folder


def refused(capsys, *argv) -> str:
    """Run the CLI: exit 2, one error line saying an input would be overwritten; that line."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedsoup: error: "), err
    assert INPUT_REASON in lines[0] and "even with --force" in lines[0], err
    return lines[0]


# --------------------------------------------------------------------------- the reported cases


def test_a_transformers_model_directory_is_never_the_output_of_its_own_merge(tmp_path, capsys):
    hf = pytest.importorskip("tests.hf_helpers")
    for i in range(2):
        hf.tiny_model("gpt2", seed=i).save_pretrained(tmp_path / f"c{i}copy")
    capsys.readouterr()  # (transformers' progress bar)
    before = tree_hashes(tmp_path)
    c0, c1 = tmp_path / "c0copy", tmp_path / "c1copy"
    line = refused(capsys, "merge", f"{c0}/", f"{c1}/", "-o", f"{c0}/", "--force")
    assert f"{c0}/model.safetensors: cannot write: {INPUT_REASON} ({c0}/model.safetensors)" in line
    refused(capsys, "merge", f"{c0}/", f"{c1}/", "-o", f"{c1}/", "--force")  # the second input's too
    with pytest.raises(OutputError) as caught:
        fedsoup.merge_files([c0, c1], f"{c0}/", force=True)
    assert caught.value.path == f"{c0}/model.safetensors" and INPUT_REASON in caught.value.reason
    assert tree_hashes(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["c0copy", "c1copy"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_weights_file_is_never_the_output_of_its_own_merge(tmp_path, capsys, suffix):
    for name, seed in (("a", 0), ("b", 1)):
        (save_file if suffix == ".safetensors" else lambda t, p: torch.save(t, p))(tiny(seed), tmp_path / f"{name}{suffix}")
    before = tree_hashes(tmp_path)
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    line = refused(capsys, "merge", a, b, "-o", a, "--force")
    assert line.startswith(f"fedsoup: error: {a}: cannot write: {INPUT_REASON} ({a})")
    refused(capsys, "merge", a, b, "-o", b, "--force", "--low-memory")
    refused(capsys, "merge", a, b, "-o", a)  # without --force too: told it is an input, not to use --force
    assert tree_hashes(tmp_path) == before


def test_the_refusal_comes_before_any_input_is_opened(tmp_path, monkeypatch):
    model_directory(tmp_path / "c0", 0)
    model_directory(tmp_path / "c1", 1)

    def no_reading(*args, **kwargs):
        raise AssertionError("an input was opened before the output was checked")

    monkeypatch.setattr("fedsoup.offline.driver.open_weights_file", no_reading)
    with pytest.raises(OutputError, match=INPUT_REASON):
        fedsoup.merge_files([tmp_path / "c0", tmp_path / "c1"], f"{tmp_path / 'c0'}/", force=True)


# --------------------------------------------------------------------------- worse cases


def test_force_never_deletes_an_input_sharded_in_the_output_folder(tmp_path, capsys):
    c0 = model_directory(tmp_path / "c0", 0)
    (c0 / "model.safetensors").unlink()
    big = {f"t{i}": torch.randn(8, 8) for i in range(4)}
    fio.write_checkpoint(c0, {k: fio.TensorInfo((8, 8), torch.float32) for k in big}, big.__getitem__,
                         max_shard_bytes=300)  # model-0000i-of-00004.safetensors + the index
    c1 = model_directory(tmp_path / "c1", 1)
    (c1 / "model.safetensors").unlink()
    save_file({k: v + 1 for k, v in big.items()}, c1 / "model.safetensors")
    before = tree_hashes(tmp_path)
    # A single file where the shards were: the input's shards and index would be "stale".
    line = refused(capsys, "merge", f"{c0}/", f"{c1}/", "-o", f"{c0}/", "--force", "--no-copy-config")
    assert "model-0000" in line or "model.safetensors.index.json" in line
    refused(capsys, "merge", f"{c0}/", f"{c1}/", "-o", c0 / "model.safetensors", "--force")
    refused(capsys, "merge", c0 / "model.safetensors.index.json", c1, "-o", f"{c0}/", "--force",
            "--shard-size", "300B")
    assert tree_hashes(tmp_path) == before


def test_carried_files_never_replace_an_inputs_own(tmp_path, capsys):
    first = model_directory(tmp_path / "first", 0)
    other = model_directory(tmp_path / "other", 1, weights="pytorch_model.bin")  # no model.safetensors to collide
    before = tree_hashes(tmp_path)
    line = refused(capsys, "merge", f"{first}/", f"{other}/", "-o", f"{other}/", "--force")
    assert f"{other}/config.json: cannot write: {INPUT_REASON} ({other}/config.json)" in line
    # Without the carried files, a directory output in an input's model directory would still
    # become that model (from_pretrained prefers model.safetensors to its pytorch_model.bin).
    line = refused(capsys, "merge", f"{first}/", f"{other}/", "-o", f"{other}/", "--force", "--no-copy-config")
    assert f"{INPUT_REASON} (the model directory {other}" in line
    assert tree_hashes(tmp_path) == before


def test_a_merge_into_an_inputs_folder_under_another_name_is_allowed(tmp_path, capsys):
    c0 = model_directory(tmp_path / "c0", 0)
    c1 = model_directory(tmp_path / "c1", 1)
    before = tree_hashes(tmp_path)
    assert cli.main(["merge", f"{c0}/", f"{c1}/", "-o", str(c0 / "merged.safetensors")]) == 0
    assert "not carried" in capsys.readouterr().err  # a single file carries nothing
    after = tree_hashes(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {str(c0 / "merged.safetensors")}


def test_inputs_reached_through_links_are_recognised(tmp_path, capsys):
    c0 = model_directory(tmp_path / "c0", 0)
    c1 = model_directory(tmp_path / "c1", 1)
    (tmp_path / "via").symlink_to(c0, target_is_directory=True)
    os.link(c1 / "model.safetensors", tmp_path / "hard.safetensors")
    before = tree_hashes(tmp_path / "c0", tmp_path / "c1")
    refused(capsys, "merge", f"{tmp_path / 'via'}/", f"{c1}/", "-o", f"{c0}/", "--force")  # input by a link
    refused(capsys, "merge", f"{c0}/", f"{c1}/", "-o", f"{tmp_path / 'via'}/", "--force")  # output by a link
    refused(capsys, "merge", c0 / "model.safetensors", tmp_path / "hard.safetensors", "-o", f"{c1}/", "--force",
            "--no-copy-config")  # a hard link: the same file under another name
    refused(capsys, "merge", c0 / "model.safetensors", c1 / "model.safetensors", "-o",
            tmp_path / "hard.safetensors", "--force")
    assert tree_hashes(tmp_path / "c0", tmp_path / "c1") == before


def test_the_pivot_and_the_metrics_file_are_inputs_too(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 1), ("p", 2)):
        save_file(tiny(seed), tmp_path / f"{name}.safetensors")
    a, b, p = (tmp_path / f"{n}.safetensors" for n in "abp")
    metrics = tmp_path / "out.safetensors.fedsoup.json"  # named as the output's report sidecar
    metrics.write_text(json.dumps({str(a): {"n": 1}, str(b): {"n": 3}}))
    before = tree_hashes(tmp_path)
    refused(capsys, "merge", a, b, "-o", p, "--pivot", p, "--force")
    line = refused(capsys, "merge", a, b, "-o", tmp_path / "out.safetensors", "--metrics", metrics,
                   "--weights", "n", "--force")
    assert f"{metrics}: cannot write: {INPUT_REASON}" in line
    assert tree_hashes(tmp_path) == before


def test_an_adapter_merge_never_writes_into_an_input_adapter_or_the_base(tmp_path, capsys):
    lora = pytest.importorskip("tests.lora_helpers")
    a0 = lora.make_adapter(tmp_path / "a0", seed=1)
    a1 = lora.make_adapter(tmp_path / "a1", seed=2)
    lora.gpt2_base().save_pretrained(tmp_path / "base")
    capsys.readouterr()  # (transformers' progress bar)
    before = tree_hashes(tmp_path)
    line = refused(capsys, "merge", f"{a0}/", f"{a1}/", "-o", f"{a0}/", "--force")
    assert f"{a0}/adapter_model.safetensors: cannot write: {INPUT_REASON}" in line
    refused(capsys, "merge", f"{a0}/", f"{a1}/", "-o", f"{a1}/")
    line = refused(capsys, "merge", f"{a0}/", f"{a1}/", "--base", f"{tmp_path / 'base'}/", "-o",
                   f"{tmp_path / 'base'}/", "--force")
    assert f"{tmp_path / 'base'}/model.safetensors: cannot write: {INPUT_REASON}" in line
    assert tree_hashes(tmp_path) == before


def test_write_checkpoint_keeps_the_files_it_is_told_to(tmp_path):
    kept = tmp_path / "out" / "model-00001-of-00002.safetensors"  # an old shard's name: "stale" to a new write
    kept.parent.mkdir()
    save_file(tiny(0), kept)
    data = tiny(1)
    infos = {k: fio.TensorInfo(tuple(v.shape), v.dtype) for k, v in data.items()}
    with pytest.raises(OutputError) as caught:
        fio.write_checkpoint(tmp_path / "out", infos, data.__getitem__, force=True, inputs_to_keep=[kept])
    assert caught.value.path == str(kept) and INPUT_REASON in caught.value.reason
    assert sorted(os.listdir(tmp_path / "out")) == [kept.name]
    fio.write_checkpoint(tmp_path / "out", infos, data.__getitem__, force=True)  # not kept: fedsoup's to replace
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]


# --------------------------------------------------------------------------- --no-copy-config


def test_no_copy_config_into_a_directory_warns_that_from_pretrained_needs_the_files(tmp_path, capsys):
    c0 = model_directory(tmp_path / "client0", 0)
    c1 = model_directory(tmp_path / "client1", 1)
    assert cli.main(["merge", f"{c0}/", f"{c1}/", "-o", f"{tmp_path / 'q3'}/", "--no-copy-config"]) == 0
    err = capsys.readouterr().err
    assert "fedsoup: warning:" in err and "config.json, tokenizer_config.json" in err and "not carried" in err
    assert sorted(os.listdir(tmp_path / "q3")) == ["model.safetensors"]
    with pytest.warns(MergeWarning, match=r"config\.json.*not carried.*from_pretrained"):
        fedsoup.merge_files([c0, c1], f"{tmp_path / 'q4'}/", copy_config=False)
