"""LoRA adapters merged into their base model: ``W + ΔW`` per adapted module (``W + ΔWᵀ`` for
GPT-2's Conv1D), with ``ΔW`` the merged update of :func:`fedsoup.lora.modes.merged_deltas`
(docs/design.md §2.6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsoup.errors import MergeInputError
from fedsoup.inputs import compute_dtype, output_dtype
from fedsoup.lora.checks import check_adapters, check_lora_options, culprit, rounded_into
from fedsoup.lora.modes import measured_deltas, resolved_options
from fedsoup.lora.pairs import LORA_A_SUFFIX, Adapter, module_name
from fedsoup.lora.report import LoraReport
from fedsoup.options import MergeOptions

__all__ = ["merge_into_base"]


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
    """
    options, dtype = resolved_options(options), output_dtype(dtype)
    check_lora_options(mode, None)
    check_adapters(adapters, names)
    transposed = _transposed(adapters, base, names)
    full_keys = _full_keys(adapters, base, names)
    full_dtypes = {key: dtype or base[base_key].dtype for key, base_key in full_keys.items()}  # as written
    deltas, full, errors = measured_deltas(adapters, mode=mode, options=options, weights=weights,
                                           full_dtype=full_dtypes)
    result = dict(base)
    for path, delta in deltas.items():
        key = _base_key(path, base)
        weight = base[key]
        work = compute_dtype([weight], dtype)
        update = delta.T if transposed[path] else delta
        result[key] = rounded_into(key, weight.to(work) + update.to(work), dtype or weight.dtype)
    for key, tensor in full.items():
        base_key = full_keys[key]
        result[base_key] = rounded_into(base_key, tensor, dtype or base[base_key].dtype)
    ranks = {path: pair.rank for path, pair in adapters[0].pairs.items()}
    return result, LoraReport(mode, "base", None, errors, {}, ranks)
