"""Client partitions: flwr-datasets partitioners plus the paper's class-exclusion shards.

``make_partitioner`` maps the run-config key ``partitioning`` to a
:class:`flwr_datasets.partitioner.Partitioner`:

- ``iid``: :class:`~flwr_datasets.partitioner.IidPartitioner`
- ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` (``alpha``)
- ``pathological``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner`
  (``classes-per-partition`` classes per client)
- ``class-exclusion``: :class:`ClassExclusionPartitioner` (the paper, Appendix A.2)
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

PARTITIONINGS = ("iid", "dirichlet", "pathological", "class-exclusion")


class ClassExclusionPartitioner(Partitioner):
    """Class-exclusion shards of *On Defining Neural Averaging*, Appendix A.2.

    With ``C`` classes and ``k = round(ood_fraction · C)`` excluded classes, loader
    ``n`` (``n = 0..C-1``) holds every class except ``n, n+1, ..., n+k-1 (mod C)``:
    at 10% OOD loader ``n`` drops class ``n``; at 80% OOD loader 1 keeps only
    classes 0 and 9. Partition ``p`` uses loader ``p mod C``, so 30 partitions give
    the paper's "3 experts per loader".

    Two ways to fill a loader with samples:

    - ``disjoint=False`` (the paper): a loader holds *every* training sample of its
      classes, so partitions overlap. Partitions that share a loader are identical;
      the experts differ by seed only.
    - ``disjoint=True`` (federated shards, the default): every sample belongs to
      exactly one partition. The samples of each class are shuffled with ``seed``
      and dealt evenly over the partitions that keep that class.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients).
    ood_fraction : float
        Fraction of classes each partition never sees, in ``(0, 1)``; rounded to a
        whole number of classes ``k`` with ``1 <= k <= C-1``.
    partition_by : str
        Label column.
    num_classes : int | None
        ``C``; by default the number of distinct labels in the dataset (labels must
        then be ``0..C-1``).
    disjoint : bool
        See above.
    seed : int
        Shuffle seed for ``disjoint=True``.
    """

    def __init__(
        self,
        num_partitions: int,
        ood_fraction: float,
        partition_by: str = "label",
        num_classes: int | None = None,
        disjoint: bool = True,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if not 0.0 < ood_fraction < 1.0:
            raise ValueError(f"ood_fraction must be in (0, 1), got {ood_fraction}")
        self._num_partitions = num_partitions
        self._ood_fraction = ood_fraction
        self._partition_by = partition_by
        self._num_classes = num_classes
        self._disjoint = disjoint
        self._seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            labels = np.asarray(self.dataset[self._partition_by])
            self._num_classes = int(labels.max()) + 1 if labels.size else 0
        return self._num_classes

    @property
    def num_excluded(self) -> int:
        """``k``: how many classes each partition never sees."""
        k = int(round(self._ood_fraction * self.num_classes))
        if not 1 <= k <= self.num_classes - 1:
            raise ValueError(
                f"ood_fraction={self._ood_fraction} excludes {k} of {self.num_classes} "
                "classes; it must exclude at least 1 and keep at least 1"
            )
        return k

    def excluded_classes(self, partition_id: int) -> list[int]:
        """Classes partition ``partition_id`` never sees: ``n..n+k-1 (mod C)``."""
        self._check_id(partition_id)
        c = self.num_classes
        n = partition_id % c
        return sorted((n + j) % c for j in range(self.num_excluded))

    def kept_classes(self, partition_id: int) -> list[int]:
        excluded = set(self.excluded_classes(partition_id))
        return [c for c in range(self.num_classes) if c not in excluded]

    def load_partition(self, partition_id: int) -> Dataset:
        self._check_id(partition_id)
        if self._indices is None:
            self._indices = self._build_indices()
        return self.dataset.select(self._indices[partition_id])

    def _check_id(self, partition_id: int) -> None:
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(
                f"partition_id {partition_id} out of range [0, {self._num_partitions})"
            )

    def _build_indices(self) -> list[np.ndarray]:
        labels = np.asarray(self.dataset[self._partition_by])
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels in column '{self._partition_by}' must lie in "
                f"[0, {self.num_classes}); got [{labels.min()}, {labels.max()}]"
            )
        keepers = {
            c: [p for p in range(self._num_partitions) if c in self.kept_classes(p)]
            for c in range(self.num_classes)
        }
        rng = np.random.default_rng(self._seed)
        chunks: list[list[np.ndarray]] = [[] for _ in range(self._num_partitions)]
        for c in range(self.num_classes):
            members = np.flatnonzero(labels == c)
            if not keepers[c]:
                continue  # fewer partitions than classes: nobody keeps class c
            if self._disjoint:
                members = rng.permutation(members)
                for part, piece in zip(keepers[c], np.array_split(members, len(keepers[c]))):
                    chunks[part].append(piece)
            else:
                for part in keepers[c]:
                    chunks[part].append(members)
        return [
            np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
            for parts in chunks
        ]


def make_partitioner(
    name: str,
    num_partitions: int,
    *,
    seed: int = 42,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    ood_fraction: float = 0.5,
    disjoint: bool = True,
    partition_by: str = "label",
) -> Partitioner:
    """Build the partitioner called ``name`` (one of :data:`PARTITIONINGS`)."""
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            alpha=alpha,
            min_partition_size=5,
            self_balancing=True,
            seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    if name == "class-exclusion":
        return ClassExclusionPartitioner(
            num_partitions=num_partitions,
            ood_fraction=ood_fraction,
            partition_by=partition_by,
            disjoint=disjoint,
            seed=seed,
        )
    raise ValueError(f"unknown partitioning '{name}'; choose one of {', '.join(PARTITIONINGS)}")
