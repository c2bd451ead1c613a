"""fedsoup.io: readers for every format, the npy reader, the streaming sharded writer, input checks."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fedsoup
from fedsoup import io as fio
from fedsoup.errors import MergeInputError, OptionError, OutputExistsError
from fedsoup.io import TensorInfo


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(4, 3, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "emb": torch.randn(8, 2, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7 + seed),
        "scale": torch.tensor(0.5 + seed),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_files_round_trip(tmp_path, suffix):
    state = make_state()
    torch.save(state, tmp_path / f"m{suffix}")
    assert_same(fio.load_state_dict(tmp_path / f"m{suffix}"), state)


def test_legacy_torch_format_loads(tmp_path):
    state = make_state()
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(fio.load_state_dict(tmp_path / "old.pt"), state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_top_level_wrapper_is_unwrapped(tmp_path, wrapper):
    state = make_state()
    torch.save({wrapper: state, "epoch": 3, "lr": 0.1}, tmp_path / "ckpt.pt")
    assert_same(fio.load_state_dict(tmp_path / "ckpt.pt"), state)


def test_non_tensor_entry_is_refused_by_name(tmp_path):
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(MergeInputError, match=r"x\.pt.*'epoch'.*not a tensor"):
        fio.load_state_dict(tmp_path / "x.pt")


def test_safetensors_headers_give_infos_without_data(tmp_path):
    state = make_state()
    save_file(state, tmp_path / "m.safetensors", metadata={"k": "v"})
    with fio.open_checkpoint(tmp_path / "m.safetensors") as checkpoint:
        assert checkpoint.infos["emb"] == TensorInfo((8, 2), torch.bfloat16)
        assert checkpoint.infos["bn.num_batches_tracked"] == TensorInfo((), torch.int64)
        assert checkpoint.metadata == {"k": "v"}
        assert checkpoint.numel == 12 + 4 + 16 + 1 + 1
        assert torch.equal(checkpoint.get("fc.bias"), state["fc.bias"])
        with pytest.raises(MergeInputError, match="tensor 'nope': no such tensor"):
            checkpoint.get("nope")


def test_npz_round_trip_and_headers(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int64)}
    np.savez(tmp_path / "m.npz", **arrays)
    with fio.open_checkpoint(tmp_path / "m.npz") as checkpoint:
        assert checkpoint.infos == {"a": TensorInfo((2, 3), torch.float32), "b": TensorInfo((3,), torch.int64)}
        assert torch.equal(checkpoint.get("a"), torch.from_numpy(arrays["a"]))


def test_npz_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "o.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(MergeInputError, match=r"o\.npz.*'a'.*pickle"):
        fio.open_checkpoint(tmp_path / "o.npz")


def test_directory_with_single_safetensors(tmp_path):
    state = make_state()
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    assert_same(fio.load_state_dict(tmp_path / "ckpt"), state)


def _mappings_of(path) -> int:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sum(str(path) in line for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_safetensors_tensors_are_private_mappings_released_when_freed(tmp_path):
    state = make_state()
    state["empty"] = torch.zeros(0, 3)
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    on_disk = path.read_bytes()
    with fio.open_checkpoint(path) as checkpoint:
        tensors = {key: checkpoint.get(key) for key in checkpoint.keys()}
        assert _mappings_of(path) == len(state) - 1  # one per non-empty tensor, nothing else
        whole = checkpoint.load_all()
        assert _mappings_of(path) == len(state)  # the whole file: one more, for every tensor
    for read in (tensors, whole):
        assert_same(read, state)  # still readable after the file is closed
        read["fc.weight"].add_(1.0)  # copy-on-write: the file never changes
    assert path.read_bytes() == on_disk
    del tensors["fc.weight"]  # its own mapping goes; the whole file's stays for the others
    assert _mappings_of(path) == len(state) - 1
    del tensors, whole, read
    assert _mappings_of(path) == 0


def test_safetensors_tensors_are_read_where_no_mapping_can_be_made(tmp_path, monkeypatch):
    # (a file system without mmap, or no descriptor or map area left for one)
    import errno

    from fedsoup.io import readers

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    state = make_state()
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    monkeypatch.setattr(readers.mmap, "mmap", refuse)
    with fio.open_checkpoint(path) as checkpoint:
        assert_same(checkpoint.load_all(), state)
        assert_same({key: checkpoint.get(key) for key in state}, state)
        with open(path, "r+b") as file:  # a file truncated meanwhile is an error, not a short tensor
            file.truncate(path.stat().st_size - 2)
        with pytest.raises(MergeInputError, match="ends at byte") as info:
            checkpoint.get("emb")  # (bf16: last in the file)
    assert (info.value.path, info.value.key) == (str(path), "emb")


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**12]},
    {"dtype": "F32", "shape": [2], "data_offsets": ["a", 8]},
    {"dtype": "F32", "shape": [2]},
    [0, 8],
])
def test_header_offsets_are_checked_where_tensors_are_mapped(tmp_path, entry):
    from fedsoup.io.readers import _data_offsets

    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with open(path, "rb") as file, pytest.raises(MergeInputError, match="not a readable safetensors file"):
        _data_offsets(file, str(path))
    path.write_bytes((10**9).to_bytes(8, "little") + header)  # a header longer than the file
    with open(path, "rb") as file, pytest.raises(MergeInputError, match="header of"):
        _data_offsets(file, str(path))


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**63], [0, 2**62, 4]])
def test_an_empty_tensor_of_a_shape_torch_cannot_hold_is_refused_at_open(tmp_path, shape):
    # safetensors accepts any shape of 0 elements; torch cannot make these (an int64
    # overflow in the shape or its strides): a TypeError/RuntimeError crashed the merge.
    header = json.dumps({"z": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
                         "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "empty.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(MergeInputError, match="shape") as info:
        fio.open_checkpoint(path)
    assert (info.value.path, info.value.key) == (str(path), "z")


@pytest.mark.parametrize("replacement", [
    {"w": torch.arange(4, dtype=torch.int32), "b": torch.zeros(2)},  # another dtype, the same bytes
    {"w": torch.zeros(2, 2), "b": torch.zeros(2)},  # another shape
    {"b": torch.zeros(2), "w": torch.zeros(4)},  # the same tensors at other offsets
])
def test_a_file_replaced_between_validation_and_mapping_is_refused(tmp_path, monkeypatch, replacement):
    # safe_open validates the file by its path, the tensors are mapped from a second open:
    # a file renamed over it in between must not be read with the first file's dtypes and shapes.
    from fedsoup.io import readers

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4), "b": torch.ones(2)}, path)
    save_file(replacement, tmp_path / "other.safetensors")
    validate = readers._safe_open

    def validate_then_replace(*args):
        handle = validate(*args)
        os.replace(tmp_path / "other.safetensors", path)
        return handle

    monkeypatch.setattr(readers, "_safe_open", validate_then_replace)
    try:
        with fio.open_checkpoint(path) as checkpoint:
            tensors = checkpoint.load_all()
    except MergeInputError as error:
        assert "changed while it was being opened" in str(error)
        assert error.path == str(path)
    else:  # read as what it now is, never as what it was
        assert_same(tensors, load_file(path))


def test_sharded_directory_and_index_paths(tmp_path):
    state = make_state()
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
    fio.write_checkpoint(tmp_path / "out", infos, state.__getitem__, max_shard_bytes=40)
    assert any("-of-" in name for name in files_in(tmp_path / "out"))
    for path in (tmp_path / "out", tmp_path / "out" / "model.safetensors", tmp_path / "out" / "model.safetensors.index.json"):
        with fio.open_checkpoint(path) as checkpoint:
            assert type(checkpoint).__name__ == "ShardedCheckpoint"
            assert_same(checkpoint.load_all(), state)


def test_sharded_index_with_missing_shard_is_refused(tmp_path):
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MergeInputError, match="shard file 'model-00001-of-00002.safetensors' is missing"):
        fio.open_checkpoint(tmp_path)


@pytest.mark.parametrize("shard", ["model.safetensors.index.json", "other.safetensors.index.json"])
def test_an_index_whose_shard_is_an_index_is_refused(tmp_path, shard):
    # An index listing itself (or two listing each other) recursed until RecursionError.
    for name in ("model.safetensors.index.json", "other.safetensors.index.json"):
        (tmp_path / name).write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(MergeInputError, match="is an index, not a weights file") as info:
        fio.open_checkpoint(tmp_path / "model.safetensors.index.json")
    assert info.value.path == str(tmp_path / "model.safetensors.index.json")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipes_among_a_strangers_files_are_never_opened(tmp_path, no_hang):
    from fedsoup.io.readers import open_weights_file

    state = make_state()
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(state, folder / "weights.safetensors")
    os.mkfifo(folder / "x.safetensors.index.json")  # globbed as an index, then read: blocked
    assert_same(fio.load_state_dict(folder), state)
    save_file(state, folder / "model-00001-of-00002.safetensors")  # a shard's name: indexes beside it are read
    assert_same(fio.load_state_dict(folder / "model-00001-of-00002.safetensors"), state)
    with pytest.raises(MergeInputError, match="not a regular file") as info:
        open_weights_file(folder / "x.safetensors.index.json", "x")
    assert info.value.path == "x"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_given_as_an_input_is_not_a_regular_file(tmp_path, no_hang, capsys):
    """Before: "no such file or directory" for a pipe that is there (resolve_input took
    whatever is neither a file nor a directory for missing)."""
    from fedsoup import cli
    from fedsoup.io.resolve import resolve_input

    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    save_file(make_state(), tmp_path / "good.safetensors")
    for call in (lambda: resolve_input(pipe, name="p"), lambda: fio.open_checkpoint(pipe, name="p")):
        with pytest.raises(MergeInputError) as info:
            call()
        assert (info.value.path, info.value.reason) == ("p", "not a regular file (a pipe, socket or device)")
    with pytest.raises(MergeInputError, match="not a regular file"):
        fedsoup.merge_files([tmp_path / "good.safetensors", pipe], tmp_path / "out.safetensors")
    assert cli.main(["merge", str(tmp_path / "good.safetensors"), str(pipe), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert f"{pipe}: not a regular file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "pipe.safetensors"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("garbage.safetensors", b"not a safetensors file at all", "not a readable safetensors"),
        ("garbage.pt", b"\x80\x02garbage", "garbage.pt"),
        ("garbage.npz", b"PK\x03\x04 truncated zip", "not a readable .npz"),
        ("weird.onnx", b"whatever", "unknown checkpoint format"),
    ],
)
def test_corrupt_files_raise_input_error_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MergeInputError, match=message) as info:
        fio.open_checkpoint(tmp_path / name)
    assert name in str(info.value)


def test_truncated_safetensors_is_refused(tmp_path):
    save_file(make_state(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-5])
    with pytest.raises(MergeInputError, match=r"t\.safetensors: not a readable safetensors"):
        fio.open_checkpoint(tmp_path / "t.safetensors")


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(MergeInputError, match="nope.safetensors: no such file"):
        fio.open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeInputError, match="holds no checkpoint"):
        fio.open_checkpoint(tmp_path / "empty")


class _RunsCode:
    """Unpickling this object would create the marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.zeros(2), "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"payload": _RunsCode(marker)}, handle)
    for name in ("evil.pt", "evil.bin"):
        with pytest.raises(MergeInputError, match=rf"{name}: refused by torch.load\(weights_only=True\)"):
            fio.open_checkpoint(tmp_path / name)
    assert not marker.exists()


# --------------------------------------------------------------------------- checks


def _checkpoint(name, state):
    return fio.InMemoryCheckpoint(name, state)


def test_check_compatible_names_file_and_tensor():
    a = _checkpoint("a.pt", {"w": torch.zeros(2, 3), "n": torch.tensor(1)})
    cases = [
        ({"w": torch.zeros(2, 3)}, "n", r"b\.pt, tensor 'n': missing \(present in a\.pt\)"),
        ({"w": torch.zeros(2, 3), "n": torch.tensor(1), "x": torch.zeros(1)}, "x", r"b\.pt, tensor 'x': not in a\.pt"),
        ({"w": torch.zeros(3, 2), "n": torch.tensor(1)}, "w", r"b\.pt, tensor 'w': has shape \(3, 2\), but a\.pt has \(2, 3\)"),
        ({"w": torch.zeros(2, 3), "n": torch.tensor(1.0)}, "n", r"b\.pt, tensor 'n': is float32, but a\.pt has int64"),
    ]
    for state, key, message in cases:
        with pytest.raises(MergeInputError, match=message) as info:
            fio.check_compatible([a, _checkpoint("b.pt", state)])
        assert (info.value.path, info.value.key, info.value.ingredient) == ("b.pt", key, 1)
    fio.check_compatible([a, _checkpoint("c.pt", {"n": torch.tensor(2), "w": torch.ones(2, 3)})])


class _Reading(fio.InMemoryCheckpoint):
    """An input that records which tensors are read."""

    def __init__(self, name, state, read):
        super().__init__(name, state)
        self._log = read

    def _read(self, key):
        self._log.append((self.name, key))
        return super()._read(key)


def _tie_inputs(read, **held):
    """Inputs a.bin, b.st, ...: each name maps to its extra tensors beside the shared ones."""
    generator = torch.Generator().manual_seed(0)
    shared = {name: torch.randn(4, 3, generator=generator) for name in ("wte", "square")}
    shared["ln"] = torch.randn(3, generator=generator)
    inputs = []
    for name, extra in held.items():
        state = {key: value.clone() for key, value in shared.items()}
        state.update({key: make(state) for key, make in extra.items()})
        inputs.append(_Reading(name, state, read))
    return inputs


def _copy_of(key, change=None):
    def make(state):
        copy = state[key].clone()
        if change is not None:
            change(state, copy)
        return copy
    return make


def _flip_zero(state, copy):
    state["wte"][1, 2], copy[1, 2] = 0.0, -0.0  # equal for torch.equal, not bitwise


VOCAB = frozenset({4})  # the config's vocab_size: "wte" and "square" are (4, 3)


@pytest.mark.parametrize(("held", "rows", "expected"), [
    # the tied copy of a tensor all inputs hold: left out of the inputs holding it
    ({"a": {"head": _copy_of("wte")}, "b": {}}, VOCAB, {0: {"head": "wte"}}),
    ({"a": {}, "b": {"head": _copy_of("wte")}, "c": {"head": _copy_of("wte")}}, VOCAB,
     {1: {"head": "wte"}, 2: {"head": "wte"}}),
    ({"a": {"head": _copy_of("wte")}, "b": {}}, frozenset({4, 9}), {0: {"head": "wte"}}),  # vocab_size of a sub-config
    # a config saying tie_word_embeddings: false, or no vocab_size: nothing left out (check_compatible refuses)
    ({"a": {"head": _copy_of("wte")}, "b": {}}, frozenset(), {}),
    # no tensor of its dtype and shape that all inputs hold: no tie by the headers, left to check_compatible
    ({"a": {"head": lambda state: state["wte"].double()}, "b": {}}, VOCAB, {}),
    ({"a": {"head": _copy_of("wte"), "extra": _copy_of("wte")}, "b": {}}, VOCAB, {0: {"head": "wte", "extra": "wte"}}),
    ({"a": {"bias": _copy_of("ln")}, "b": {"bias": lambda state: torch.zeros(4)}, "c": {}}, VOCAB, {}),
])
def test_tied_copies_are_the_bitwise_copies_of_a_tensor_every_input_holds(held, rows, expected):
    read = []
    inputs = _tie_inputs(read, **{f"{name}.pt": extra for name, extra in held.items()})
    assert fio.tied_copies(inputs, rows) == expected
    # only the tensors whose headers could make a tie are read: a copy, and the tensors of its
    # input with its dtype and shape (never "ln" for a (4, 3) copy); nothing when ties are off
    for name, key in read:
        infos = next(checkpoint.infos for checkpoint in inputs if checkpoint.name == name)
        copies = [k for k in infos if not all(k in checkpoint.infos for checkpoint in inputs)]
        assert key in copies or any(infos[key] == infos[copy] for copy in copies), (name, key)
    assert all((inputs[index].name, key) in read for index, copies in expected.items() for key in copies)
    if not rows:
        assert read == []


@pytest.mark.parametrize(("held", "rows"), [
    ({"a": {"layer.2": _copy_of("square")}, "b": {}}, frozenset({3})),  # 4 rows: no embedding of vocab_size 3
    ({"a": {"layer.2": _copy_of("square")}, "b": {}}, frozenset({12})),
    ({"a": {"norm.2": _copy_of("ln")}, "b": {}}, frozenset({3})),  # 1-D: no embedding
    ({"a": {"norm.2": _copy_of("ln")}, "b": {}}, None),
])
def test_only_an_embedding_is_a_tie_a_copied_layer_is_left_to_be_refused(held, rows):
    """A depth up-scaled model's extra layers are byte copies of shared ones, but from_pretrained
    ties only word embeddings (2-D, vocab_size rows): another copy is kept, and check_compatible
    refuses it as any tensor some inputs lack, naming it. Not a tensor is read to tell."""
    read = []
    inputs = _tie_inputs(read, **{f"{name}.pt": extra for name, extra in held.items()})
    assert fio.tied_copies(inputs, rows) == {} and read == []
    with pytest.raises(MergeInputError, match="missing") as caught:
        fio.check_compatible(inputs)
    assert caught.value.key == next(iter(held["a"]))


def test_with_no_config_a_copy_is_refused_saying_a_config_would_let_it_merge():
    """No config.json beside any input: nothing says the copy is a tied embedding (nor what
    vocab_size is), so nothing is left out; the refusal says how to merge it."""
    inputs = _tie_inputs([], **{"a.pt": {}, "b.pt": {"head": _copy_of("wte")}})
    with pytest.raises(MergeInputError, match=r"^b\.pt, tensor 'head': not in a\.pt; it is a bitwise copy of 'wte', but "
                                              r"with no config\.json beside the inputs .* put the model's config\.json "
                                              r"beside the weights files$") as caught:
        fio.tied_copies(inputs, None)
    assert (caught.value.key, caught.value.path, caught.value.ingredient) == ("head", "b.pt", 1)


@pytest.mark.parametrize(("held", "culprit", "reason"), [
    ({"a": {"head": _copy_of("wte")}, "b": {}, "c": {"head": _copy_of("wte", lambda s, c: c.__setitem__((0, 0), 7.0))}},
     "c.pt", r"not bitwise equal \(dtype, shape and bytes\) to 'wte' \(as in a\.pt\)"),
    ({"a": {"head": _copy_of("wte", _flip_zero)}, "b": {}}, "a.pt",
     r"not bitwise equal \(dtype, shape and bytes\) to 'wte' or 'square',"),
    ({"a": {"head": _copy_of("wte")}, "b": {}, "c": {"head": _copy_of("square")}}, "c.pt",
     r"not bitwise equal \(dtype, shape and bytes\) to 'wte' \(as in a\.pt\)"),
])
@pytest.mark.parametrize("rows", [VOCAB, None], ids=["config", "no-config"])
def test_a_claimed_tie_that_is_not_one_is_refused_naming_the_tensor_and_the_input(held, culprit, reason, rows):
    inputs = _tie_inputs([], **{f"{name}.pt": extra for name, extra in held.items()})
    with pytest.raises(MergeInputError, match=reason) as caught:
        fio.tied_copies(inputs, rows)
    names = [checkpoint.name for checkpoint in inputs]
    assert (caught.value.key, caught.value.path, caught.value.ingredient) == ("head", culprit, names.index(culprit))


def test_a_tied_copy_left_out_is_neither_listed_nor_read():
    read = []
    holding, leaving = _tie_inputs(read, **{"a.pt": {"head": _copy_of("wte")}, "b.pt": {}})
    view = fio.without_tensors(holding, {"head"})
    assert view.keys() == ["wte", "square", "ln"] and view.name == "a.pt" and view.nbytes == leaving.nbytes
    assert view.load_all().keys() == leaving.load_all().keys()
    with pytest.raises(MergeInputError, match="no such tensor"):
        view.get("head")
    fio.check_compatible([view, leaving])


def test_check_finite_names_file_and_tensor():
    with pytest.raises(MergeInputError, match=r"a\.pt, tensor 'w': contains NaN"):
        fio.check_finite(torch.tensor([1.0, float("nan")]), "a.pt", "w")
    with pytest.raises(MergeInputError, match=r"contains Inf"):
        fio.check_finite(torch.tensor([float("inf")]), "a.pt", "w")
    fio.check_finite(torch.tensor([1, 2]), "a.pt", "n")


def test_expand_inputs_sorts_globs_and_refuses_empty_ones(tmp_path):
    for name in ("b.pt", "a.pt", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert fio.expand_inputs([str(tmp_path / "*.pt"), "literal.pt"]) == [
        str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "literal.pt"
    ]
    with pytest.raises(MergeInputError, match="no file matches"):
        fio.expand_inputs([str(tmp_path / "*.safetensors")])


def test_parse_size():
    assert fio.parse_size("5GB") == 5 * 10**9
    assert fio.parse_size("1KiB") == 1024
    assert fio.parse_size("2.5 MB") == 2_500_000
    assert fio.parse_size(123) == 123
    for bad in ("lots", "-1", "0", "5 parsecs"):
        with pytest.raises(OptionError) as info:
            fio.parse_size(bad)
        assert info.value.option == "shard_size"


# --------------------------------------------------------------------------- writers


def _infos(state):
    return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}


def test_plan_shards_respects_limit_and_order():
    infos = {f"t{i}": TensorInfo((n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])}
    shards = fio.plan_shards(infos, max_shard_bytes=80)
    assert shards == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert [key for shard in shards for key in shard] == list(infos)
    assert fio.plan_shards(infos, max_shard_bytes=10**9) == [list(infos)]


def test_streaming_writer_matches_safetensors_and_keeps_metadata(tmp_path):
    state = {**make_state(), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    written = fio.write_checkpoint(tmp_path / "m.safetensors", _infos(state), state.__getitem__, metadata={"who": "me"})
    assert written == [tmp_path / "m.safetensors"]
    assert_same(load_file(tmp_path / "m.safetensors"), state)
    with fio.open_checkpoint(tmp_path / "m.safetensors") as checkpoint:
        assert checkpoint.metadata == {"format": "pt", "who": "me"}


def test_sharded_output_has_index_and_round_trips(tmp_path):
    state = make_state()
    written = fio.write_checkpoint(tmp_path / "m.safetensors", _infos(state), state.__getitem__, max_shard_bytes=48, metadata={"a": "b"})
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1 and all(f"-of-{len(shard_names):05d}" in name for name in shard_names)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["a"] == "b"
    assert [p.name for p in written][-1] == "m.safetensors.index.json"
    assert files_in(tmp_path) == sorted([*shard_names, "m.safetensors.index.json"])
    for name in shard_names:
        assert os.path.getsize(tmp_path / name) < 48 + 400  # data + header
    assert_same(fio.load_state_dict(tmp_path / "m.safetensors"), state)


def test_torch_output(tmp_path):
    state = make_state()
    fio.write_checkpoint(tmp_path / "m.pt", _infos(state), state.__getitem__)
    assert_same(torch.load(tmp_path / "m.pt", weights_only=True), state)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 40])
def test_failed_write_leaves_nothing_behind(tmp_path, max_shard_bytes):
    state = make_state()

    def produce(key):
        if key == "scale":
            raise RuntimeError("boom")
        return state[key]

    with pytest.raises(RuntimeError, match="boom"):
        fio.write_checkpoint(tmp_path / "m.safetensors", _infos(state), produce, max_shard_bytes=max_shard_bytes)
    assert files_in(tmp_path) == []


def _big_state(n: int = 6) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((1 << 16,), float(i)) for i in range(n)}


def test_a_write_error_mid_stream_stops_the_merge_and_leaves_nothing(tmp_path, monkeypatch):
    from fedsoup.errors import OutputError
    from fedsoup.io import writer as writer_module

    state = _big_state()
    calls = []
    original_write = writer_module._Sink.write

    def write(self, data):
        calls.append(memoryview(data).nbytes)
        if len(calls) == 3:  # the header, t0, then t1's bytes fail as a full disk does
            raise OutputError(self.destination, OSError(28, "No space left on device"))
        return original_write(self, data)

    produced = []
    monkeypatch.setattr(writer_module._Sink, "write", write)
    with pytest.raises(OutputError, match="no space left"):
        fio.write_checkpoint(tmp_path / "m.safetensors", _infos(state),
                             lambda key: produced.append(key) or state[key])
    assert files_in(tmp_path) == []
    assert len(produced) <= 3  # stops at the failed write, not at the end


def test_existing_output_is_kept_unless_forced_and_stale_shards_go(tmp_path):
    state = make_state()
    fio.write_checkpoint(tmp_path / "m.safetensors", _infos(state), state.__getitem__, max_shard_bytes=40)
    sharded = files_in(tmp_path)
    with pytest.raises(OutputExistsError, match="output exists"):
        fio.write_checkpoint(tmp_path / "m.safetensors", _infos(state), state.__getitem__)
    assert files_in(tmp_path) == sharded
    other = make_state(seed=1)
    fio.write_checkpoint(tmp_path / "m.safetensors", _infos(other), other.__getitem__, force=True)
    assert files_in(tmp_path) == ["m.safetensors"]
    assert_same(load_file(tmp_path / "m.safetensors"), other)


# --------------------------------------------------------------------------- npy


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    np.array(3.5, dtype=np.float16),
    np.zeros((0, 2), dtype=np.int64),
])
def test_npy_view_is_a_zero_copy_view_of_np_save_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    view = fio.npy_view(data)
    assert view.dtype == array.dtype and view.shape == array.shape
    np.testing.assert_array_equal(view, array)
    if array.size:
        assert not view.flags.owndata  # points into ``data``


def test_npy_view_refuses_object_arrays():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        fio.npy_view(buffer.getvalue())


@pytest.mark.parametrize("array", [
    np.zeros((16, 1024), np.float32), np.zeros((5,), np.int64), np.array(3.0), np.zeros((0, 2), ">f4"),
    np.asfortranarray(np.zeros((3, 4))), np.zeros(2, bool), np.zeros(3, np.complex64), np.zeros((2, 3), np.uint8),
    np.zeros(2, "<U3"), np.zeros(2, dtype=[("a", "<f4")]), np.zeros(2, "<M8[s]"),
], ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_npy_header_fast_path_reads_what_numpy_reads(array):
    """The plain-header pattern (fedsoup.io.npy) and NumPy's parser agree; what the pattern does
    not match (structured, datetime dtypes) goes to NumPy's parser, leaving the stream as it was."""
    import io

    from fedsoup.io.npy import _plain_header, read_npy_header

    buffer = io.BytesIO()
    np.save(buffer, array)
    stream = io.BytesIO(buffer.getvalue())
    np.lib.format.read_magic(stream)
    expected = np.lib.format.read_array_header_1_0(stream)
    got_stream = io.BytesIO(buffer.getvalue())
    assert read_npy_header(got_stream) == (tuple(expected[0]), expected[1], expected[2])
    assert got_stream.tell() == stream.tell()  # left at the data, either way
    fast = _plain_header(io.BytesIO(buffer.getvalue()))
    assert (fast is None) == (array.dtype.names is not None or array.dtype.kind == "M")


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (16,1024), }",  # not numpy's repr: NumPy decides
    "{'descr': '<f4', 'fortran_order': False, 'shape': (16, 1024), 'x': 1, }",
    "{'descr': '<O', 'fortran_order': False, 'shape': (2,), }",
])
def test_npy_header_fast_path_leaves_anything_unusual_to_numpy(header):
    import io

    from fedsoup.io.npy import _plain_header

    text = header.encode("latin1")
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    stream = io.BytesIO(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text)
    assert _plain_header(stream) is None and stream.tell() == 0


@pytest.mark.parametrize(("configs", "rows"), [
    ([{"model_type": "gpt2", "vocab_size": 256}, {"model_type": "gpt2", "vocab_size": 999}], {256}),  # the first's
    ([None, {"model_type": "gpt2", "vocab_size": 256}], {256}),  # the first input *with* a config
    ([{"model_type": "llava", "text_config": {"vocab_size": 300}, "vision_config": {"hidden_size": 8}}], {300}),
    ([{"model_type": "x", "vocab_size": 5, "text_config": {"vocab_size": 300}}], {5, 300}),
    ([{"model_type": "gpt2", "vocab_size": 256, "tie_word_embeddings": False}], set()),  # untied
    ([{"model_type": "x", "vocab_size": 256, "text_config": {"tie_word_embeddings": False}}], set()),
    ([{"model_type": "x", "vocab_size": True}], set()),  # no usable vocab_size: nothing tied
    ([{"model_type": "x"}], set()),
    ([None, None], None),  # no config beside any input: nothing known
])
def test_tied_embedding_rows_are_the_first_model_configs_vocab_sizes_when_it_ties_them(tmp_path, configs, rows):
    from fedsoup.io.hf import tied_embedding_rows
    from fedsoup.io.resolve import resolve_input
    inputs = []
    for index, config in enumerate(configs):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        inputs.append(resolve_input(folder / "model.safetensors"))
    assert tied_embedding_rows(inputs) == (None if rows is None else frozenset(rows))
