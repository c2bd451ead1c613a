"""Partitioners on generated labels; class exclusion exactly as in the paper (Appendix A.2)."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from simulations.partitioning import ClassExclusionPartitioner, make_partitioner


def labels_dataset(per_class: int = 12, num_classes: int = 10, seed: int = 0) -> Dataset:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))
    return Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})


def classes_of(partitioner, pid: int) -> set[int]:
    return set(partitioner.load_partition(pid)["label"])


@pytest.mark.parametrize("ood, k", [(0.1, 1), (0.5, 5), (0.6, 6), (0.7, 7), (0.8, 8), (0.9, 9)])
@pytest.mark.parametrize("disjoint", [True, False])
def test_partition_n_excludes_classes_n_to_n_plus_k_minus_1_mod_10(ood, k, disjoint):
    part = ClassExclusionPartitioner(num_partitions=10, ood_fraction=ood, disjoint=disjoint)
    part.dataset = labels_dataset()
    assert part.num_excluded == k
    for n in range(10):
        excluded = {(n + j) % 10 for j in range(k)}
        assert classes_of(part, n) == set(range(10)) - excluded


def test_paper_examples():
    # "In the case of 10% OOD, the class n dataloader excluded all training data from class n."
    p10 = ClassExclusionPartitioner(num_partitions=10, ood_fraction=0.1)
    p10.dataset = labels_dataset()
    assert classes_of(p10, 3) == set(range(10)) - {3}
    # "the class 1 dataloader for the 80%-OOD setting trained on only classes 0 and 9"
    p80 = ClassExclusionPartitioner(num_partitions=10, ood_fraction=0.8)
    p80.dataset = labels_dataset()
    assert classes_of(p80, 1) == {0, 9}
    assert p80.kept_classes(1) == [0, 9]


def test_overlapping_loaders_hold_every_sample_of_their_classes():
    ds = labels_dataset(per_class=7)
    part = ClassExclusionPartitioner(num_partitions=30, ood_fraction=0.5, disjoint=False)
    part.dataset = ds
    labels = np.asarray(ds["label"])
    for pid in (0, 13, 29):
        rows = np.asarray(part.load_partition(pid)["row"])
        kept = part.kept_classes(pid)
        assert sorted(rows) == sorted(np.flatnonzero(np.isin(labels, kept)))
    # three experts per loader: partitions p, p+10, p+20 are the same loader
    assert part.load_partition(4)["row"] == part.load_partition(14)["row"] == part.load_partition(24)["row"]


def test_disjoint_shards_partition_the_dataset():
    ds = labels_dataset(per_class=20)
    part = ClassExclusionPartitioner(num_partitions=20, ood_fraction=0.3, disjoint=True, seed=1)
    part.dataset = ds
    rows = np.concatenate([np.asarray(part.load_partition(p)["row"]) for p in range(20)])
    assert len(rows) == len(ds) and len(set(rows.tolist())) == len(ds)
    sizes = [len(part.load_partition(p)) for p in range(20)]
    assert max(sizes) - min(sizes) <= 10  # classes are dealt evenly


def test_disjoint_split_depends_on_seed_only():
    def rows(seed):
        part = ClassExclusionPartitioner(num_partitions=10, ood_fraction=0.5, seed=seed)
        part.dataset = labels_dataset()
        return part.load_partition(2)["row"]

    assert rows(0) == rows(0)
    assert rows(0) != rows(1)


@pytest.mark.parametrize("ood", [0.0, 1.0, -0.5, 0.01, 0.99])
def test_bad_ood_fraction_is_rejected(ood):
    with pytest.raises(ValueError, match="ood_fraction"):
        part = ClassExclusionPartitioner(num_partitions=10, ood_fraction=ood)
        part.dataset = labels_dataset()
        part.load_partition(0)


def test_out_of_range_partition_and_labels():
    part = ClassExclusionPartitioner(num_partitions=4, ood_fraction=0.5, num_classes=4)
    part.dataset = Dataset.from_dict({"label": [0, 1, 2, 7]})
    with pytest.raises(ValueError, match="partition_id 4"):
        part.load_partition(4)
    with pytest.raises(ValueError, match=r"labels in column 'label' must lie in \[0, 4\)"):
        part.load_partition(0)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological", "class-exclusion"])
@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
def test_make_partitioner_covers_the_data_without_overlap(name):
    ds = labels_dataset(per_class=30)
    part = make_partitioner(name, 5, seed=0, alpha=0.5, classes_per_partition=2, ood_fraction=0.4)
    part.dataset = ds
    rows = [np.asarray(part.load_partition(p)["row"]) for p in range(5)]
    flat = np.concatenate(rows)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    assert all(len(r) > 0 for r in rows)
    if name == "pathological":
        assert all(len(set(part.load_partition(p)["label"])) <= 2 for p in range(5))


def test_unknown_partitioning():
    with pytest.raises(ValueError, match="unknown partitioning 'shards'"):
        make_partitioner("shards", 3)
