"""Datasets for the simulations: scikit-learn digits (default, offline) and CIFAR-10.

Where the data comes from:

- ``digits``: :func:`sklearn.datasets.load_digits` (1,797 8x8 images, shipped with
  scikit-learn); a fixed stratified 75/25 train/test split.
- ``cifar10`` with ``data_dir`` set: either the CIFAR-10 *binary* version
  (``data_batch_{1..5}.bin`` and ``test_batch.bin``, 1 label byte + 3,072 CHW pixel
  bytes per record; no unpickling) or a Hugging Face dataset saved with
  ``save_to_disk`` (splits ``train``/``test``, an ``img``/``image`` column, ``label``).
- ``cifar10`` without ``data_dir``: ``flwr_datasets.FederatedDataset("uoft-cs/cifar10")``
  from the Hugging Face hub (needs network access).

Clients get their shard through a flwr-datasets partitioner (``partitioning.py``).
For local data the partitioner is run on a tiny ``Dataset`` of labels and row
indices, so the pixel arrays never go through Arrow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from simulations.config import SimConfig
from simulations.partitioning import make_partitioner

CIFAR10_HUB_ID = "uoft-cs/cifar10"
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class ArrayDataset:
    """Features ``x`` (digits: float32 ``(N, 64)``; CIFAR-10: uint8 ``(N, 32, 32, 3)``), labels ``y``."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} samples but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices])


# ---------------------------------------------------------------- loading


def load_digits_split(seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn digits, pixels scaled to [0, 1], stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return ArrayDataset(x_tr, y_tr), ArrayDataset(x_te, y_te)


def read_cifar10_binary(path: str | Path) -> ArrayDataset:
    """Read one CIFAR-10 binary batch file into uint8 HWC images and int64 labels."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
            f"({CIFAR10_RECORD_BYTES} bytes each)"
        )
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{path}: record {bad} has label {labels[bad]}, expected 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayDataset(np.ascontiguousarray(images), labels)


def load_cifar10_dir(data_dir: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 from a local directory: binary batches, or a saved Hugging Face dataset."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {root} does not exist")
    train_files = sorted(root.rglob("data_batch_*.bin"))
    test_files = sorted(root.rglob("test_batch.bin"))
    if train_files or test_files:
        if not (train_files and test_files):
            raise FileNotFoundError(
                f"{root}: CIFAR-10 binary needs data_batch_*.bin and test_batch.bin; "
                f"found {[p.name for p in train_files + test_files]}"
            )
        train = [read_cifar10_binary(p) for p in train_files]
        test = read_cifar10_binary(test_files[0])
        return (
            ArrayDataset(np.concatenate([d.x for d in train]), np.concatenate([d.y for d in train])),
            test,
        )
    if (root / "dataset_dict.json").exists():
        from datasets import load_from_disk

        splits = load_from_disk(str(root))
        missing = {"train", "test"} - set(splits)
        if missing:
            raise ValueError(f"{root}: saved dataset lacks split(s) {sorted(missing)}")
        return hf_to_arrays(splits["train"], str(root)), hf_to_arrays(splits["test"], str(root))
    raise FileNotFoundError(
        f"{root} holds neither CIFAR-10 binary batches (data_batch_*.bin, test_batch.bin) "
        "nor a saved Hugging Face dataset (dataset_dict.json)"
    )


def hf_to_arrays(ds: Dataset, origin: str = "dataset") -> ArrayDataset:
    """A Hugging Face image dataset (``img`` or ``image`` column, ``label``) as uint8 HWC arrays."""
    image_col = next((c for c in ("img", "image") if c in ds.column_names), None)
    if image_col is None or "label" not in ds.column_names:
        raise ValueError(
            f"{origin}: expected an 'img' or 'image' column and a 'label' column, "
            f"got {ds.column_names}"
        )
    images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8)
                       for im in ds[image_col]])
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{origin}: images have shape {images.shape[1:]}, expected (32, 32, 3)")
    return ArrayDataset(images, np.asarray(ds["label"], dtype=np.int64))


@functools.lru_cache(maxsize=4)
def load_arrays(dataset: str, data_dir: str = "", seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Centralised (train, test) arrays; cached per process."""
    if dataset == "digits":
        return load_digits_split(seed)
    if dataset == "cifar10":
        if data_dir:
            return load_cifar10_dir(data_dir)
        from flwr_datasets import FederatedDataset
        from flwr_datasets.partitioner import IidPartitioner

        # Whole splits from the hub (needs network access), e.g. for the paper scripts.
        fds = FederatedDataset(dataset=CIFAR10_HUB_ID, partitioners={"train": IidPartitioner(1)})
        return (hf_to_arrays(fds.load_split("train"), CIFAR10_HUB_ID),
                hf_to_arrays(fds.load_split("test"), CIFAR10_HUB_ID))
    raise ValueError(f"unknown dataset '{dataset}'")


# ------------------------------------------------------------- partitions


def _uses_hub(cfg: SimConfig) -> bool:
    return cfg.dataset == "cifar10" and not cfg.data_dir


def _partitioner(cfg: SimConfig, num_partitions: int):
    return make_partitioner(
        cfg.partitioning,
        num_partitions,
        seed=cfg.seed,
        alpha=cfg.dirichlet_alpha,
        classes_per_partition=cfg.classes_per_partition,
        ood_fraction=cfg.ood_fraction,
    )


@functools.lru_cache(maxsize=4)
def _hub_dataset(cfg: SimConfig, num_partitions: int):
    from flwr_datasets import FederatedDataset

    return FederatedDataset(
        dataset=CIFAR10_HUB_ID, partitioners={"train": _partitioner(cfg, num_partitions)}
    )


@functools.lru_cache(maxsize=8)
def partition_indices(cfg: SimConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Row indices into the local training arrays of every partition."""
    train, _ = load_arrays(cfg.dataset, cfg.data_dir)
    partitioner = _partitioner(cfg, num_partitions)
    partitioner.dataset = Dataset.from_dict({"label": train.y, "row": np.arange(len(train))})
    return tuple(
        np.asarray(partitioner.load_partition(p)["row"], dtype=np.int64)
        for p in range(num_partitions)
    )


def load_partition(cfg: SimConfig, partition_id: int, num_partitions: int) -> ArrayDataset:
    """Training shard of client ``partition_id`` of ``num_partitions``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} out of range [0, {num_partitions})")
    if _uses_hub(cfg):
        return hf_to_arrays(_hub_dataset(cfg, num_partitions).load_partition(partition_id), CIFAR10_HUB_ID)
    train, _ = load_arrays(cfg.dataset, cfg.data_dir)
    return train.subset(partition_indices(cfg, num_partitions)[partition_id])


def load_testset(cfg: SimConfig) -> ArrayDataset:
    """Held-out test set for the server's centralised evaluation."""
    if _uses_hub(cfg):
        return hf_to_arrays(_hub_dataset(cfg, cfg.num_partitions).load_split("test"), CIFAR10_HUB_ID)
    return load_arrays(cfg.dataset, cfg.data_dir)[1]


def train_val_split(data: ArrayDataset, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Seeded split of a client's shard into (train, validation)."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = int(round(val_fraction * len(data))) if len(data) > 1 else 0
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))
