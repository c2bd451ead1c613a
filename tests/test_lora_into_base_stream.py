"""LoRA adapters merged into a base model tensor by tensor (fedsoup.lora.into_base, fedsoup.lora.driver):
the base read lazily, one tensor at a time, each written as it is produced, the bytes those of the
whole-dict merge; ``low_memory`` honoured, or refused where a mode cannot stream."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedsoup
import fedsoup.lora.driver
from fedsoup import MergeOptions, OptionError
from fedsoup.io.resolve import load_state_dict
from fedsoup.lora import load_adapter, merge_into_base
from fedsoup.lora.driver import merge_adapter_files

from tests.lora_helpers import gpt2_base, llama_base, make_adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_stream")
    llama_base().save_pretrained(str(root / "base"))
    adapters = [make_adapter(root / f"a{i}", "llama", seed=30 + i, modules_to_save=["lm_head"]) for i in range(2)]
    return root / "base", adapters


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("llama_sharded")
    llama_base().save_pretrained(str(root / "base"), max_shard_size="20KB")
    assert (root / "base" / "model.safetensors.index.json").is_file()
    return root / "base", llama[1]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_stream")
    gpt2_base().save_pretrained(str(root / "base"))
    return root / "base", [make_adapter(root / f"a{i}", "gpt2", seed=40 + i) for i in range(2)]


class _Counting:
    """A base checkpoint whose every tensor handed out is counted while it is alive."""

    def __init__(self, checkpoint):
        self._checkpoint, self.alive, self.most, self.read = checkpoint, 0, 0, []

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    def _dead(self):
        self.alive -= 1

    def get(self, key):
        tensor = self._checkpoint.get(key)
        self.read.append(key)
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(tensor, self._dead)
        return tensor

    def load_all(self):
        return {key: self.get(key) for key in self._checkpoint.infos}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._checkpoint.close()


@pytest.fixture
def counted(monkeypatch):
    opened = []

    def open_counting(path, name):
        opened.append(_Counting(fedsoup.io.readers.open_weights_file(path, name)))
        return opened[-1]

    monkeypatch.setattr(fedsoup.lora.driver, "open_weights_file", open_counting)
    return opened


@pytest.mark.parametrize("mode", ["products", "factors"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-sharded"])
def test_the_base_is_read_one_tensor_at_a_time(family, mode, llama, gpt2, llama_sharded, counted, tmp_path):
    base, adapters = {"llama": llama, "gpt2": gpt2, "llama-sharded": llama_sharded}[family]
    merge_adapter_files(adapters, tmp_path / "out", mode=mode, base=base, max_shard_bytes=100_000)
    [checkpoint] = counted
    replaced = {"lm_head.weight"} if family.startswith("llama") else set()  # (modules_to_save: the base's is not read)
    assert sorted(checkpoint.read) == sorted(set(checkpoint.infos) - replaced)  # each base tensor read once
    assert checkpoint.most == 1, f"{checkpoint.most} of {len(checkpoint.infos)} base tensors held at once"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode, options", [("products", {}), ("factors", {}), ("products", {"optimizer": "adam"}),
                                           ("factors", {"optimizer": "adam"})])
def test_the_streamed_output_is_the_whole_dict_merge_bit_for_bit(mode, options, dtype, llama, tmp_path):
    base, adapters = llama
    merge_adapter_files(adapters, tmp_path / "out", mode=mode, base=base, options=MergeOptions(**options),
                        weights=[1, 3], dtype=dtype, max_shard_bytes=100_000)
    loaded = [load_adapter(a, ingredient=i) for i, a in enumerate(adapters)]
    expected, _ = merge_into_base(loaded, load_state_dict(base), mode=mode, options=MergeOptions(**options),
                                  weights=[1, 3], dtype=dtype)
    written = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        written.update(load_file(str(shard)))
    assert list(written) != [] and written.keys() == expected.keys()
    for key, tensor in expected.items():
        want = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert written[key].dtype == want.dtype and torch.equal(written[key], want), key


def test_low_memory_streams_the_base_and_says_so(llama, counted, tmp_path):
    base, adapters = llama
    low = fedsoup.offline.driver.run_merge_files([str(a) for a in adapters], tmp_path / "low", base=str(base),
                                                 low_memory=True)
    whole = fedsoup.offline.driver.run_merge_files([str(a) for a in adapters], tmp_path / "whole", base=str(base))
    assert low.low_memory is True
    assert (tmp_path / "low" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert counted[0].most == 1


@pytest.mark.parametrize("with_base", [True, False])
def test_low_memory_is_refused_for_ame_over_products_and_nothing_is_written(with_base, llama, tmp_path):
    """AME over products merges every adapter's dense update at once: not about the adapters' size."""
    base, adapters = llama
    with pytest.raises(OptionError) as info:
        fedsoup.merge_files([str(a) for a in adapters], tmp_path / "out", lora="products", optimizer="adam",
                            low_memory=True, **({"base": str(base)} if with_base else {}))
    assert info.value.option == "low_memory" and "dense" in str(info.value)
    assert not Path(tmp_path / "out").exists()


def test_the_command_line_says_low_memory_and_refuses_it_for_ame_over_products(llama, tmp_path, capsys):
    from fedsoup import cli

    base, adapters = llama
    code = cli.main(["merge", *map(str, adapters), "--base", str(base), "-o", str(tmp_path / "soup"), "--low-memory"])
    assert code == 0 and "(low-memory," in capsys.readouterr().out
    code = cli.main(["merge", *map(str, adapters), "--base", str(base), "-o", str(tmp_path / "ame"), "--low-memory",
                     "--optimizer", "adam"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--low-memory" in err and "AME over products" in err
    assert not (tmp_path / "ame").exists()
