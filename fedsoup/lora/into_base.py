"""LoRA adapters merged into their base model: ``W + ΔW`` per adapted module (``W + ΔWᵀ`` for
GPT-2's Conv1D), with ``ΔW`` the merged update of :func:`fedsoup.lora.modes.merged_deltas`
(docs/design.md §2.6).

Tensor by tensor (:func:`base_producer`): a base of several GB is read one tensor at a time and
each result handed to the writer as it is formed, as mergekit does, so a merge holds about the
adapters plus one base tensor and one ``ΔW``; :func:`merge_into_base` is the same on a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedsoup.errors import MergeInputError
from fedsoup.inputs import compute_dtype, output_dtype
from fedsoup.io.formats import TensorInfo
from fedsoup.lora.checks import check_adapters, check_lora_options, culprit, rounded_into
from fedsoup.lora.modes import delta_makers, resolved_options
from fedsoup.lora.pairs import LORA_A_SUFFIX, Adapter, module_name
from fedsoup.lora.report import LoraReport
from fedsoup.options import MergeOptions

__all__ = ["merge_into_base", "base_producer"]


def _base_key(path: str, base: Mapping[str, Any], suffix: str = ".weight") -> str | None:
    """The base checkpoint's key for a module's parameter: its name, or without its first component
    (a checkpoint saved from the bare model, e.g. GPT-2's ``h.0...`` for ``transformer.h.0...``)."""
    name = module_name(path) + suffix
    if name in base:
        return name
    head, _, rest = name.partition(".")
    return rest if rest and rest in base else None


def _transposed(adapters: Sequence[Adapter], base: Mapping[str, torch.Tensor], names) -> dict[str, bool]:
    """Per module: is the base weight stored (d_in, d_out) (GPT-2's Conv1D, ``fan_in_fan_out``)?

    A non-square weight says so by its shape; a square one by ``fan_in_fan_out`` or, when a
    non-square module of the same adapter is stored transposed, by that (PEFT itself sets
    ``fan_in_fan_out`` for Conv1D layers).
    """
    template = adapters[0]
    layouts: dict[str, bool | None] = {}
    for path, pair in template.pairs.items():
        key = _base_key(path, base)
        if key is None:
            raise MergeInputError(f"the base model has no weight {module_name(path) + '.weight'!r} for this "
                                  "adapter's module", key=path + LORA_A_SUFFIX, **culprit(names, 0))
        d_out, d_in = pair.B.shape[0], pair.A.shape[1]
        shape = tuple(base[key].shape)
        if shape not in ((d_out, d_in), (d_in, d_out)):
            raise MergeInputError(f"the base weight {key!r} has shape {shape}, the adapter's update "
                                  f"({d_out}, {d_in})", key=path + LORA_A_SUFFIX, **culprit(names, 0))
        layouts[path] = None if d_out == d_in else shape == (d_in, d_out)
    conv1d = template.settings.fan_in_fan_out or any(v is True for v in layouts.values())
    return {path: conv1d if layout is None else layout for path, layout in layouts.items()}


def _full_keys(adapters: Sequence[Adapter], base: Mapping[str, torch.Tensor], names) -> dict[str, str]:
    """The base key each ``modules_to_save`` tensor replaces (a tensor of the same shape), else refused."""
    keys = {}
    for key, tensor in adapters[0].full.items():
        module, _, leaf = key.rpartition(".")
        base_key = _base_key(module, base, "." + leaf)
        if base_key is None or tuple(base[base_key].shape) != tuple(tensor.shape):
            raise MergeInputError("modules_to_save tensor has no tensor of its shape in the base model",
                                  key=key, **culprit(names, 0))
        keys[key] = base_key
    return keys


def merge_into_base(adapters: Sequence[Adapter], base: Mapping[str, torch.Tensor], *, mode: str = "products",
                    options: MergeOptions | None = None, weights: Sequence[float] | None = None,
                    names: Sequence[str] | None = None, dtype: torch.dtype | str | None = None,
                    ) -> tuple[dict[str, torch.Tensor], LoraReport]:
    """The base model's state dict with the merged update added: ``W + ΔW`` (``W + ΔWᵀ`` for Conv1D).

    ``ΔW`` is :func:`merged_deltas`' (exact soup of products, AME over products, or the
    product of merged factors, all in float32/float64: the merged factors are not rounded into
    the adapters' dtype first); ``modules_to_save`` tensors replace the base's. ``W + ΔW`` is
    computed in float32 (float64 for float64 weights or ``dtype``) and rounded once into
    ``dtype`` (a ``torch.dtype`` or a name such as ``"bf16"``), default each base tensor's
    dtype; the ``modules_to_save`` tensors are merged straight into it (the exact mean of bf16
    tensors rounded once into an fp16 base, each into the dtype of the base tensor it
    replaces). A value
    it cannot hold is refused (:class:`~fedsoup.errors.OptionError`, ``option="dtype"``). Keys
    of ``base`` the adapter does not touch are returned as they are.
    :func:`base_producer` gives the same tensors one at a time (a base read lazily).
    """
    infos = {key: TensorInfo(tuple(tensor.shape), tensor.dtype) for key, tensor in base.items()}
    produce, report = base_producer(adapters, infos, base.__getitem__, mode=mode, options=options, weights=weights,
                                    names=names, dtype=dtype)
    return {key: produce(key) for key in base}, report


def base_producer(adapters: Sequence[Adapter], base: Mapping[str, TensorInfo], read: Callable[[str], torch.Tensor],
                  *, mode: str = "products", options: MergeOptions | None = None,
                  weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
                  dtype: torch.dtype | str | None = None) -> tuple[Callable[[str], torch.Tensor], LoraReport]:
    """:func:`merge_into_base` tensor by tensor, for a writer (:func:`fedsoup.io.writer.write_checkpoint`).

    ``base``: the base's tensor infos (shapes and dtypes, from its header); ``read(key)`` reads one
    base tensor (:meth:`fedsoup.io.readers.Checkpoint.get`). Everything is checked, and the
    factor/product errors measured, here, before anything is read from the base; the merged
    factors (or stacks) and ``modules_to_save`` tensors are held (about the adapters' size).
    ``produce(key)`` then reads that one base tensor (none for a tensor ``modules_to_save``
    replaces), forms that module's ``ΔW`` and returns ``W + ΔW`` rounded once, so that a writer
    calling it key by key holds one base tensor and one ``ΔW`` at a time: the bytes of
    :func:`merge_into_base` (the same operations per tensor). AME over products merges every
    dense ``ΔW_i`` up front (:func:`fedsoup.lora.modes.dense_update_refusal`).
    """
    options, dtype = resolved_options(options), output_dtype(dtype)
    check_lora_options(mode, None)
    check_adapters(adapters, names)
    transposed = _transposed(adapters, base, names)
    full_keys = _full_keys(adapters, base, names)
    full_dtypes = {key: dtype or base[base_key].dtype for key, base_key in full_keys.items()}  # as written
    makers, full, errors = delta_makers(adapters, mode=mode, options=options, weights=weights, full_dtype=full_dtypes)
    updated = {_base_key(path, base): path for path in makers}
    replaced = {base_key: key for key, base_key in full_keys.items()}

    def produce(key: str) -> torch.Tensor:
        if key in replaced:
            return rounded_into(key, full[replaced[key]], dtype or base[key].dtype)
        weight = read(key)
        path = updated.get(key)
        if path is None:
            return weight
        work = compute_dtype([weight], dtype)
        delta = makers[path]()
        update = delta.T if transposed[path] else delta
        return rounded_into(key, weight.to(work) + update.to(work), dtype or weight.dtype)

    ranks = {path: pair.rank for path, pair in adapters[0].pairs.items()}
    return produce, LoraReport(mode, "base", None, errors, {}, ranks)
