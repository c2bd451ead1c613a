"""Refusals around an adapter merge (docs/design.md §2.6): adapters that cannot be merged
together, a LoRA mode or rank that does not exist, unequal ranks for the ``factors`` mode, and
a merged value that the dtype written cannot hold.

Each refusal is typed and names its culprit: :class:`~fedsoup.errors.MergeInputError`
(ingredient, file, field or tensor) or :class:`~fedsoup.errors.OptionError` (option, value).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from fedsoup.errors import MergeInputError, MergeWarning, OptionError, closest_name
from fedsoup.inputs import find_non_finite
from fedsoup.io.formats import dtype_str
from fedsoup.lora.pairs import LORA_A_SUFFIX, Adapter, join_adapter, module_name
from fedsoup.options import LORA_MODES
from fedsoup.rounding import round_to

__all__ = ["check_adapters", "check_equal_ranks", "check_lora_options", "culprit", "rounded_into", "tensors_of"]


def culprit(names: Sequence[str] | None, index: int) -> dict[str, Any]:
    """The error attributes naming ingredient ``index`` (and its file, when ``names`` are given)."""
    return {"ingredient": index, "path": None if names is None else names[index]}


def check_adapters(adapters: Sequence[Adapter], names: Sequence[str] | None = None) -> None:
    """Refuse adapters that cannot be merged together; warn where they only look different.

    They must agree on ``target_modules``, ``modules_to_save``, the adapted modules and
    their shapes (up to rank) and the full tensors' keys and shapes, and hold only finite
    values. A different ``base_model_name_or_path`` (often just a local path) warns.
    Raises :class:`~fedsoup.errors.MergeInputError` naming the ingredient (or file), and
    the field or tensor.
    """
    if not adapters:
        raise MergeInputError("cannot merge an empty list of adapters")
    first = adapters[0]
    for index, adapter in enumerate(adapters):
        where = culprit(names, index)
        bad = find_non_finite(tensors_of(adapter))
        if bad is not None:
            raise MergeInputError("contains NaN or Inf values", key=bad, **where)
        if index == 0:
            continue
        if adapter.settings.target_set != first.settings.target_set:
            raise MergeInputError(
                f"{adapter.settings.target_modules!r} in adapter_config.json, ingredient 0 has "
                f"{first.settings.target_modules!r}", field="target_modules", **where)
        if adapter.settings.modules_to_save != first.settings.modules_to_save:
            raise MergeInputError(
                f"{sorted(adapter.settings.modules_to_save)} in adapter_config.json, ingredient 0 has "
                f"{sorted(first.settings.modules_to_save)}", field="modules_to_save", **where)
        for path in sorted(first.pairs.keys() ^ adapter.pairs.keys()):
            missing = path in first.pairs
            raise MergeInputError(
                f"{'has no LoRA pair for' if missing else 'adapts'} module {module_name(path)!r}"
                f"{'' if missing else ', which ingredient 0 does not'}", key=path + LORA_A_SUFFIX, **where)
        for path, pair in adapter.pairs.items():
            ref = first.pairs[path]
            if pair.A.shape[1] != ref.A.shape[1] or pair.B.shape[0] != ref.B.shape[0]:
                raise MergeInputError(
                    f"module of shape (d_out, d_in) = ({pair.B.shape[0]}, {pair.A.shape[1]}), ingredient 0's is "
                    f"({ref.B.shape[0]}, {ref.A.shape[1]})", key=path + LORA_A_SUFFIX, **where)
        for key in sorted(first.full.keys() ^ adapter.full.keys()):
            raise MergeInputError("modules_to_save tensor present in only one of this adapter and ingredient 0",
                                  key=key, **where)
        for key, tensor in adapter.full.items():
            if tensor.shape != first.full[key].shape:
                raise MergeInputError(f"shape {tuple(tensor.shape)}, ingredient 0's is "
                                      f"{tuple(first.full[key].shape)}", key=key, **where)
    bases = [a.settings.base_model for a in adapters]
    for index, base in enumerate(bases[1:], start=1):
        if base != bases[0]:
            where = names[index] if names is not None else f"ingredient {index}"
            warnings.warn(
                f"{where}: base_model_name_or_path is {base!r}, the first adapter's is {bases[0]!r} "
                "(often only a local path differs; merged as adapters of the same base)",
                MergeWarning, stacklevel=3,
            )
            break


def check_equal_ranks(adapters: Sequence[Adapter], names: Sequence[str] | None = None) -> None:
    for path, first in adapters[0].pairs.items():
        for index, adapter in enumerate(adapters[1:], start=1):
            if adapter.pairs[path].rank != first.rank:
                raise MergeInputError(
                    f"rank {adapter.pairs[path].rank}, ingredient 0's is {first.rank}: the 'factors' mode "
                    "needs equal ranks (merge as 'products' instead)", key=path + LORA_A_SUFFIX,
                    **culprit(names, index))


def check_lora_options(mode: str, rank: int | None) -> None:
    """Refuse an unknown ``mode`` (with the closest name) or a ``rank`` that is not a positive integer."""
    if mode not in LORA_MODES:
        raise OptionError("lora", mode, f"unknown LoRA mode {mode!r} (use {' or '.join(LORA_MODES)})",
                          suggestion=closest_name(str(mode), LORA_MODES))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError("lora_rank", rank, f"option 'lora_rank' must be a positive integer, got {rank!r}")


def tensors_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    return join_adapter({path: (pair.A, pair.B) for path, pair in adapter.pairs.items()}, adapter.full)


def rounded_into(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A merged floating ``tensor`` (its float32/float64 result, or already in ``dtype``) rounded
    once, to nearest even, into ``dtype`` (:func:`fedsoup.rounding.round_to`).

    A finite value that ``dtype`` cannot hold (Inf, or NaN in ``float8_e4m3fn``, once rounded)
    is refused: :class:`~fedsoup.errors.OptionError` ``option="dtype"`` with the dtype's name
    as its value, as :func:`fedsoup.merge` refuses it, so that nothing unusable is written.
    """
    rounded = round_to(tensor, dtype)
    if rounded is not tensor and find_non_finite({key: rounded}) is not None \
            and find_non_finite({key: tensor}) is None:
        name = dtype_str(dtype)
        raise OptionError("dtype", name, f"tensor {key!r} of the merge does not fit in {name} "
                                         f"(Inf or NaN once rounded into it); write a wider dtype")
    return rounded
