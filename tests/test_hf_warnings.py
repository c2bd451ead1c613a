"""What merge warns about language models (another tokenizer, config fields no tensor shows, float
dtypes), the same warnings in ``fedsoup inspect``, and refusals naming the config field behind them.

Tokenizers are real byte-level BPEs trained offline on Python's own standard library.
"""

from __future__ import annotations

import argparse
import json
import typing
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import fedsoup
from fedsoup import cli
from fedsoup.errors import MergeInputError, MergeWarning

VOCAB = 300  # 256 bytes, one special token and 43 merges learnt from the text


def trained_tokenizer(source: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens trained on ``source`` (its merges, hence ids, depend on the text)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(source.read_text(encoding="utf-8").splitlines(), trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def gpt2(seed: int, dtype=torch.float32, **fields) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(**{"vocab_size": VOCAB, "n_positions": 16, "n_embd": 16, "n_layer": 2,
                                        "n_head": 2, "bos_token_id": 0, "eos_token_id": 0, **fields})
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def save(model, folder: Path, tokenizer=None) -> str:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
    """Two tokenizers of the same size and different vocabularies (argparse.py's, typing.py's)."""
    return trained_tokenizer(Path(argparse.__file__)), trained_tokenizer(Path(typing.__file__))


def _merge_warnings(inputs, out: Path, low_memory: bool = False) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fedsoup.merge_files(inputs, out, low_memory=low_memory)
    return [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]


def test_models_with_different_tokenizers_merge_with_a_warning_naming_the_input_and_file(tmp_path, tokenizers_,
                                                                                          capsys):
    """Before: no warning, exit 0; embedding rows of different tokens were averaged and the
    output carried client0's tokenizer."""
    first, other = tokenizers_
    assert first.get_vocab() != other.get_vocab() and len(first) == len(other)
    inputs = [save(gpt2(0), tmp_path / "client0", first), save(gpt2(1), tmp_path / "client1", first),
              save(gpt2(2), tmp_path / "client2_othertok", other)]
    found = [message for message in _merge_warnings(inputs, tmp_path / "mix") if "tokenizer" in message]
    assert len(found) == 1, found
    assert f"{inputs[2]}/tokenizer.json" in found[0] and inputs[0] in found[0] and "client1" not in found[0]
    assert [m for m in _merge_warnings(inputs, tmp_path / "mix-low", low_memory=True) if "tokenizer" in m] == found
    assert found[0] in _merge_warnings(inputs, tmp_path / "mix.safetensors")  # for any output
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "mix2"), "--quiet"]) == 0
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "mix3")]) == 0
    err = capsys.readouterr().err
    assert f"fedsoup: warning: the tokenizer of {inputs[2]} differs" in err, err
    report = fedsoup.inspect_files(inputs)
    assert report["mergeable"] is True and any("client2_othertok/tokenizer.json" in w for w in report["warnings"])


def test_the_same_tokenizer_saved_twice_gives_no_tokenizer_warning(tmp_path, tokenizers_):
    """The same vocabulary written differently (another transformers version: whitespace, key
    order, fields that do not map tokens to ids) is the same tokenizer."""
    first, _ = tokenizers_
    inputs = [save(gpt2(0), tmp_path / "a", first), save(gpt2(1), tmp_path / "b", first)]
    transformers.AutoTokenizer.from_pretrained(inputs[0]).save_pretrained(tmp_path / "b")
    rewritten = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    rewritten["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(dict(reversed(rewritten.items())), sort_keys=True))
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() != (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert _merge_warnings(inputs, tmp_path / "out") == []
    assert fedsoup.inspect_files(inputs)["warnings"] == []


@pytest.mark.parametrize("name", ["vocab.txt", "merges.txt", "vocab.json", "spiece.model"])
def test_vocabulary_files_compared_byte_for_byte(tmp_path, name):
    inputs = [save(gpt2(0), tmp_path / "a"), save(gpt2(1), tmp_path / "b")]
    (tmp_path / "a" / name).write_bytes(b"hello\nworld\n")
    (tmp_path / "b" / name).write_bytes(b"world\nhello\n")
    found = _merge_warnings(inputs, tmp_path / "out")
    assert len(found) == 1 and f"{inputs[1]}/{name}" in found[0], found
    (tmp_path / "b" / name).write_bytes(b"hello\nworld\n")
    assert _merge_warnings(inputs, tmp_path / "out2") == []


def test_inspect_reports_the_config_and_dtype_warnings_merge_gives(tmp_path, capsys):
    """Before: `fedsoup inspect` printed `mergeable`, with no mention of what merge warns about."""
    client0 = save(gpt2(0, torch.bfloat16), tmp_path / "client0")
    heads4 = save(gpt2(1, torch.bfloat16, n_head=4), tmp_path / "gpt2heads4")
    fp32 = save(gpt2(2, torch.float32), tmp_path / "gpt2fp32")
    for other, expected in ((heads4, "n_head"), (fp32, "float dtypes differ")):
        merged = _merge_warnings([client0, other], tmp_path / f"out-{Path(other).name}")
        assert any(expected in message for message in merged), merged
        report = fedsoup.inspect_files([client0, other])
        assert report["mergeable"] is True and report["warnings"] == merged
        assert cli.main(["inspect", "--summary", client0, other]) == 0
        out = capsys.readouterr().out
        assert all(f"warning: {message}" in out for message in merged), out
        assert "mergeable: 2 checkpoints" in out
        assert cli.main(["inspect", "--json", client0, other]) == 0
        assert json.loads(capsys.readouterr().out)["warnings"] == merged


def test_a_refusal_between_models_of_other_configs_names_the_differing_fields(tmp_path, capsys):
    """A 3-layer model (its own third layer) beside a 2-layer one: refused for a tensor 'not in
    client0', and now also naming n_layer, the cause."""
    inputs = [save(gpt2(0), tmp_path / "client0"), save(gpt2(1, n_layer=3), tmp_path / "deeper")]
    for low_memory in (False, True):
        with pytest.raises(MergeInputError) as caught:
            fedsoup.merge_files(inputs, tmp_path / "out", low_memory=low_memory)
        error = caught.value
        assert error.key.startswith("transformer.h.2.") and error.path == inputs[1] and error.ingredient == 1
        assert "not in" in str(error) and "(their config.json differ in n_layer)" in str(error), str(error)
    assert not (tmp_path / "out").exists()
    capsys.readouterr()  # (save_pretrained's progress)
    assert cli.main(["merge", *inputs, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in n_layer" in err[0], err
    same = save(gpt2(2), tmp_path / "same")
    (tmp_path / "same" / "model.safetensors").unlink()
    save(gpt2(2, n_embd=32), tmp_path / "wide_weights")  # weights of another width under an identical config
    (tmp_path / "wide_weights" / "model.safetensors").rename(tmp_path / "same" / "model.safetensors")
    with pytest.raises(MergeInputError) as caught:
        fedsoup.merge_files([inputs[0], same], tmp_path / "out")
    assert "config.json differ" not in str(caught.value)


def test_a_vocabulary_file_linking_out_of_its_model_is_not_read(tmp_path):
    """Vocabulary files are read as carried files are: a link leading out of an input's model
    (not carried from it) is neither followed nor a refusal, and compares as absent."""
    inputs = [save(gpt2(0), tmp_path / "a"), save(gpt2(1), tmp_path / "b")]
    (tmp_path / "a" / "vocab.txt").write_bytes(b"hello\nworld\n")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not a vocabulary\n")
    (tmp_path / "b" / "vocab.txt").symlink_to(secret)
    assert _merge_warnings(inputs, tmp_path / "out") == []
    assert fedsoup.inspect_files(inputs)["warnings"] == []


def test_inspect_names_the_config_field_behind_tensor_differences(tmp_path):
    inputs = [save(gpt2(0), tmp_path / "client0"), save(gpt2(1, n_layer=3), tmp_path / "deeper")]
    report = fedsoup.inspect_files(inputs)
    assert report["mergeable"] is False and any("transformer.h.2." in line for line in report["differences"])
    assert len(report["warnings"]) == 1 and "(n_layer)" in report["warnings"][0], report["warnings"]
