"""fedsoup.state: exact, pickle-free, atomic round trips of nested training state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch

import fedsoup
import fedsoup.io.writer
from fedsoup.state import STATE_JSON, flatten_state, has_checkpoint, load_checkpoint, save_checkpoint, unflatten_state


def assert_same(a, b, path="state"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def tricky_state():
    shared = torch.arange(6.0)
    return {
        "round": 3,
        "flag": True,
        "none": None,
        "lr": 0.1,
        "nan": float("nan"),
        "inf": float("-inf"),
        "betas": (0.9, (0.99, 0.999)),
        "list": [1, "two", [3.0]],
        "int keys": {0: torch.ones(2), 1: {"step": torch.tensor(5.0, dtype=torch.float64)}},
        "mixed keys": {0: "int zero", "0": "str zero"},
        "markers": {"__tensor__": "not a tensor", "__tuple__": [1]},
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "scalar": torch.tensor(2, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "non-contiguous": torch.randn(4, 3).t(),
        "shared a": shared,
        "shared b": shared[2:],
        "numpy": np.arange(5, dtype=np.int32),
        "np scalar": np.float32(1.5),
    }


def test_flatten_unflatten_round_trip_is_exact():
    state = tricky_state()
    tensors, skeleton = flatten_state(state)
    json.dumps(skeleton, allow_nan=False)  # the skeleton is strict JSON
    restored = unflatten_state(tensors, skeleton)
    expected = dict(state)
    expected["np scalar"] = 1.5  # numpy scalars become Python numbers
    assert_same(restored, expected)


def test_checkpoint_round_trip_through_files(tmp_path):
    state = tricky_state()
    save_checkpoint(tmp_path, state, tag="round-00003", metadata={"round": "3"})
    assert has_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-round-00003.safetensors", STATE_JSON]
    restored = load_checkpoint(tmp_path)
    expected = dict(state)
    expected["np scalar"] = 1.5
    assert_same(restored, expected)
    # The tensor file is a plain safetensors file, readable without fedsoup.
    raw = safetensors.torch.load_file(str(tmp_path / "state-round-00003.safetensors"))
    assert torch.equal(raw["int keys/0"], torch.ones(2))


@pytest.mark.parametrize("optimizer, kwargs", [
    ("adam", {"betas": (0.8, 0.9)}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("fedadam", {"betas": (0.9, 0.99), "eps": 1e-3}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
    ("rmsprop", {"momentum": 0.5}),
])
def test_optimizer_state_round_trip_continues_identically(tmp_path, optimizer, kwargs):
    cls = fedsoup.resolve_optimizer(optimizer)
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(4, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]

    def run(opt, ps, steps):
        for step in steps:
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()

    ref = [p.clone() for p in params]
    ref_opt = cls(ref, lr=0.05, **kwargs)
    run(ref_opt, ref, range(5))

    first = [p.clone() for p in params]
    opt = cls(first, lr=0.05, **kwargs)
    run(opt, first, range(2))
    save_checkpoint(tmp_path, {"params": first, "opt": opt.state_dict()}, tag="t")

    state = load_checkpoint(tmp_path)
    resumed = [p.clone() for p in state["params"]]
    opt2 = cls(resumed, lr=0.05, **kwargs)
    opt2.load_state_dict(state["opt"])
    run(opt2, resumed, range(2, 5))
    for a, b in zip(resumed, ref):
        assert torch.equal(a, b)


def test_unsupported_value_names_its_path():
    from fedsoup.errors import StateError

    with pytest.raises(StateError, match="'opt/hook'") as info:
        flatten_state({"opt": {"hook": object()}})
    assert info.value.key == "opt/hook"
    with pytest.raises(StateError, match="object arrays") as info:
        flatten_state({"a": np.array([object()])})
    assert info.value.key == "a"


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"round": 1, "w": torch.ones(3)}, tag="round-00001")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fedsoup.io.writer, "_tensor_bytes", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, {"round": 2, "w": torch.zeros(3)}, tag="round-00002")
    monkeypatch.undo()
    state = load_checkpoint(tmp_path)
    assert state["round"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-round-00001.safetensors", STATE_JSON]


def test_new_checkpoint_replaces_old_files(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, {"round": r, "w": torch.full((2,), float(r))}, tag=f"round-{r:05d}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-round-00003.safetensors", STATE_JSON]
    assert load_checkpoint(tmp_path)["round"] == 3


def test_crash_between_tensor_file_and_json_keeps_previous(tmp_path, monkeypatch):
    """The JSON rename is the commit point: a new tensor file alone changes nothing."""
    import fedsoup.state as state_module

    save_checkpoint(tmp_path, {"round": 1, "w": torch.ones(2)}, tag="round-00001")
    monkeypatch.setattr(state_module, "atomic_write_text", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"round": 2, "w": torch.zeros(2)}, tag="round-00002")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["round"] == 1


def test_bad_checkpoints_are_reported_with_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)
    (tmp_path / STATE_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="state.json: not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / STATE_JSON).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a fedsoup-state checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, {"w": torch.ones(2)}, tag="ok")
    document = json.loads((tmp_path / STATE_JSON).read_text())
    document["tensors"] = "../../etc/passwd"
    (tmp_path / STATE_JSON).write_text(json.dumps(document))
    with pytest.raises(ValueError, match="invalid tensor file name"):
        load_checkpoint(tmp_path)
    document["tensors"] = "state-ok.safetensors"
    document["state"] = {"w": {"__tensor__": "nope"}}
    (tmp_path / STATE_JSON).write_text(json.dumps(document))
    with pytest.raises(ValueError, match="tensor 'nope': is missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="checkpoint tag"):
        save_checkpoint(tmp_path, {}, tag="../evil")


# --------------------------------------------------------------------------- checksums (issue 22)


def _tensor_file(directory) -> "Path":
    return directory / json.loads((directory / STATE_JSON).read_text())["tensors"]


def test_state_json_records_a_checksum_per_tensor_file(tmp_path):
    import hashlib

    save_checkpoint(tmp_path, {"w": torch.arange(4.0)}, tag="round-00001")
    document = json.loads((tmp_path / STATE_JSON).read_text())
    tensor_file = _tensor_file(tmp_path)
    assert document["checksums"] == {tensor_file.name: "sha256:" + hashlib.sha256(tensor_file.read_bytes()).hexdigest()}


def test_a_flipped_byte_is_a_checkpoint_error_naming_the_file(tmp_path):
    from fedsoup.errors import CheckpointError

    save_checkpoint(tmp_path, {"w": torch.zeros(64)}, tag="round-00001")
    tensor_file = _tensor_file(tmp_path)
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: safetensors alone loads it without complaint
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert info.value.path == str(tensor_file) and "checksum" in str(info.value)
    assert str(tensor_file) in str(info.value)


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, {"round": 2, "w": torch.ones(3)}, tag="round-00002")
    document = json.loads((tmp_path / STATE_JSON).read_text())
    del document["checksums"]  # as written before checksums existed
    (tmp_path / STATE_JSON).write_text(json.dumps(document))
    with caplog.at_level("WARNING", logger="fedsoup"):
        state = load_checkpoint(tmp_path)
    assert state["round"] == 2 and torch.equal(state["w"], torch.ones(3))
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "checksum" in warnings[0].getMessage()
    assert str(tmp_path / STATE_JSON) in warnings[0].getMessage()


def test_tensor_files_without_state_json_are_refused_saying_how_to_start_fresh(tmp_path):
    from fedsoup.errors import CheckpointError
    from strategies.state import read_checkpoint

    assert read_checkpoint(tmp_path) is None  # an empty folder: a fresh run
    save_checkpoint(tmp_path, {"round": 3, "w": torch.ones(3)}, tag="round-00003")
    (tmp_path / STATE_JSON).unlink()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path)
    message = str(info.value)
    assert info.value.path == str(tmp_path / STATE_JSON)
    assert "state-round-00003.safetensors" in message and "state.json" in message
    assert "killed" in message and "start fresh" in message
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
    from strategies import FedSoup

    with pytest.raises(CheckpointError):  # the strategy does not restart at round 1 over it
        FedSoup(checkpoint_dir=tmp_path)


def test_a_checkpoint_write_on_a_full_disk_is_an_output_error_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno
    import os

    from fedsoup.errors import OutputError

    save_checkpoint(tmp_path, {"round": 1, "w": torch.ones(3)}, tag="round-00001")
    before = sorted(p.name for p in tmp_path.iterdir())

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as info:
        save_checkpoint(tmp_path, {"round": 2, "w": torch.zeros(3)}, tag="round-00002")
    monkeypatch.undo()
    assert info.value.path == str(tmp_path / "state-round-00002.safetensors")
    assert info.value.cause.errno == errno.ENOSPC and "no space left on device" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load_checkpoint(tmp_path)["round"] == 1
