"""Dataset loaders on generated files (CIFAR-10 binary and a saved Hugging Face dataset), transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulations.config import SimConfig
from simulations.data import (
    CIFAR10_RECORD_BYTES,
    load_arrays,
    load_cifar10_dir,
    load_partition,
    load_testset,
    read_cifar10_binary,
)
from simulations.transforms import random_crop_flip, to_tensor


def fake_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def write_binary(path, images: np.ndarray, labels: np.ndarray) -> None:
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1).tofile(path)


@pytest.fixture
def cifar_binary_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    batches = [fake_cifar(20, seed) for seed in range(2)]
    for i, (x, y) in enumerate(batches, start=1):
        write_binary(root / f"data_batch_{i}.bin", x, y)
    test = fake_cifar(10, 99)
    write_binary(root / "test_batch.bin", *test)
    return tmp_path, batches, test


def test_binary_reader_roundtrip(cifar_binary_dir):
    root, batches, (x_test, y_test) = cifar_binary_dir
    train, test = load_cifar10_dir(root)
    assert train.x.shape == (40, 32, 32, 3) and train.x.dtype == np.uint8
    np.testing.assert_array_equal(train.x[:20], batches[0][0])  # HWC pixels survive CHW storage
    np.testing.assert_array_equal(train.y[20:], batches[1][1])
    np.testing.assert_array_equal(test.x, x_test)
    np.testing.assert_array_equal(test.y, y_test)


def test_binary_reader_rejects_truncated_file(tmp_path):
    bad = tmp_path / "data_batch_1.bin"
    bad.write_bytes(b"\x00" * (CIFAR10_RECORD_BYTES + 5))
    with pytest.raises(ValueError, match="data_batch_1.bin.*not a whole number"):
        read_cifar10_binary(bad)


def test_binary_reader_rejects_bad_label(tmp_path):
    x, y = fake_cifar(3, 0)
    y = np.array([1, 12, 3])
    write_binary(tmp_path / "test_batch.bin", x, y)
    with pytest.raises(ValueError, match="record 1 has label 12"):
        read_cifar10_binary(tmp_path / "test_batch.bin")


def test_missing_or_unknown_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither CIFAR-10 binary"):
        load_cifar10_dir(tmp_path)
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        load_cifar10_dir(tmp_path)


def test_saved_hugging_face_dataset(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    features = Features({"img": Image(), "label": ClassLabel(num_classes=10)})
    splits = {}
    for name, (n, seed) in {"train": (30, 1), "test": (10, 2)}.items():
        x, y = fake_cifar(n, seed)
        splits[name] = Dataset.from_dict(
            {"img": [PILImage.fromarray(im) for im in x], "label": y.tolist()}, features=features)
    DatasetDict(splits).save_to_disk(str(tmp_path / "cifar10"))
    train, test = load_cifar10_dir(tmp_path / "cifar10")
    np.testing.assert_array_equal(train.x, fake_cifar(30, 1)[0])  # PNG storage is lossless
    np.testing.assert_array_equal(test.y, np.arange(10) % 10)


def test_cifar_partitions_from_local_dir(cifar_binary_dir):
    root, _, _ = cifar_binary_dir
    cfg = SimConfig(dataset="cifar10", data_dir=str(root), partitioning="iid", num_partitions=4)
    parts = [load_partition(cfg, p, 4) for p in range(4)]
    assert sum(len(p) for p in parts) == 40
    assert len(load_testset(cfg)) == 10
    with pytest.raises(ValueError, match="partition-id 4 out of range"):
        load_partition(cfg, 4, 4)


def test_digits_split_is_offline_stratified_and_fixed():
    train, test = load_arrays("digits")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.x.dtype == np.float32 and 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert set(np.unique(test.y)) == set(range(10))
    again, _ = load_arrays.__wrapped__("digits")
    np.testing.assert_array_equal(again.y, train.y)


def test_to_tensor_normalises_images_to_nchw():
    x, _ = fake_cifar(4, 0)
    t = to_tensor(x)
    assert t.shape == (4, 3, 32, 32) and t.dtype == torch.float32
    assert abs(float(t.mean())) < 1.0  # roughly centred by the CIFAR statistics
    feats = np.ones((2, 64), dtype=np.float32)
    assert torch.equal(to_tensor(feats), torch.ones(2, 64))


def test_random_crop_flip_is_seeded_and_shape_preserving():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    c = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
