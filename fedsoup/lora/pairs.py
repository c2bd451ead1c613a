"""A PEFT adapter state dict as LoRA pairs ``(A, B, s)`` per module, and back.

PEFT saves an adapter (``get_peft_model_state_dict``, ``adapter_model.safetensors``) with
the adapter name removed from the keys:

    base_model.model.<module>.lora_A.weight      A, shape (r, d_in)
    base_model.model.<module>.lora_B.weight      B, shape (d_out, r)
    base_model.model.<module to save>.<param>    a full tensor of a ``modules_to_save`` module

``<module>`` is the module's name in the base model (what ``target_modules``,
``rank_pattern`` and ``alpha_pattern`` match). Keys of variants this package does not merge
(embedding LoRA, DoRA's magnitude, ``lora_B.bias``) are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsoup.errors import MergeInputError
from fedsoup.inputs import compute_dtype
from fedsoup.lora.config import LoraSettings

__all__ = ["PEFT_PREFIX", "LORA_A_SUFFIX", "LORA_B_SUFFIX", "LoraPair", "Adapter", "split_adapter", "join_adapter",
           "module_name", "dense_deltas"]

PEFT_PREFIX = "base_model.model."
#: The key suffixes of a module's factors in PEFT's saved format: ``<path> + LORA_A_SUFFIX`` is ``A``.
LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
# Key fragments of LoRA variants, with the name users know them by.
_REFUSED_KEYS = {
    ".lora_embedding_A": "LoRA on an embedding layer",
    ".lora_embedding_B": "LoRA on an embedding layer",
    ".lora_magnitude_vector": "DoRA (a magnitude vector)",
    ".lora_B.bias": "a LoRA bias (lora_bias)",
    ".lora_E": "AdaLoRA",
}


@dataclass(frozen=True)
class LoraPair:
    """One module's factors: its update is ``ΔW = scale · B @ A`` (``A``: (r, d_in), ``B``: (d_out, r))."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def product(self) -> torch.Tensor:
        """``ΔW = scale · B @ A``, dense (d_out, d_in), in the compute dtype (float64 if a factor is)."""
        dtype = compute_dtype([self.B, self.A])
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(frozen=True)
class Adapter:
    """An adapter split by :func:`split_adapter`: pairs by module path, full tensors by key."""

    settings: LoraSettings
    pairs: dict[str, LoraPair]  # "base_model.model.<module>" -> pair
    full: dict[str, torch.Tensor]  # modules_to_save tensors, by their file key


def module_name(path: str) -> str:
    """A module's name relative to the base model (what PEFT's patterns match)."""
    return path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path


def _in_modules_to_save(key: str, modules_to_save: frozenset[str]) -> bool:
    """True when ``key``'s module is one of ``modules_to_save`` (PEFT matches the name's end)."""
    parts = module_name(key).split(".")[:-1]  # drop the parameter name
    return any(parts[-len(name.split(".")):] == name.split(".") for name in modules_to_save if name)


def split_adapter(state_dict: Mapping[str, torch.Tensor], settings: LoraSettings, *,
                  ingredient: int | None = None, path: str | None = None) -> Adapter:
    """Pair every ``lora_A`` with its ``lora_B`` and attach each module's scale.

    Raises :class:`~fedsoup.errors.MergeInputError` (naming the ingredient or file and the
    tensor) for a refused variant's key, an ``A`` without its ``B`` (or the reverse), factors
    that are not 2-D matrices of one rank, a rank that differs from the config's (PEFT
    could not load it), or a tensor that is neither a factor nor in ``modules_to_save``.
    """
    where = {"ingredient": ingredient, "path": path}
    pairs: dict[str, LoraPair] = {}
    full: dict[str, torch.Tensor] = {}
    prefixes = set()
    for key, tensor in state_dict.items():
        for fragment, name in _REFUSED_KEYS.items():
            if fragment in key:
                raise MergeInputError(f"{name} is not supported (only plain LoRA and rsLoRA on linear layers)",
                                      key=key, **where)
        if key.endswith(LORA_A_SUFFIX):
            prefixes.add(key[: -len(LORA_A_SUFFIX)])
        elif key.endswith(LORA_B_SUFFIX):
            prefixes.add(key[: -len(LORA_B_SUFFIX)])
        elif ".lora_A." in key or ".lora_B." in key:
            raise MergeInputError("not a key of PEFT's saved format (an adapter name inside the key? save with "
                                  "save_pretrained or get_peft_model_state_dict)", key=key, **where)
        elif _in_modules_to_save(key, settings.modules_to_save):
            full[key] = tensor
        else:
            raise MergeInputError("neither a LoRA factor nor a tensor of modules_to_save", key=key, **where)
    for prefix in sorted(prefixes):
        a_key, b_key = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
        if a_key not in state_dict or b_key not in state_dict:
            missing = b_key if a_key in state_dict else a_key
            raise MergeInputError("LoRA factor without its pair", key=missing, **where)
        A, B = state_dict[a_key], state_dict[b_key]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise MergeInputError(f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not the factors of one "
                                  "rank (A: (r, d_in), B: (d_out, r))", key=a_key, **where)
        if not (A.is_floating_point() and B.is_floating_point()):
            raise MergeInputError("LoRA factors must be floating point", key=a_key, **where)
        module = module_name(prefix)
        expected = settings.rank(module)
        if A.shape[0] != expected:
            raise MergeInputError(f"rank {A.shape[0]} in the tensors, {expected} in adapter_config.json "
                                  "(field 'r' or 'rank_pattern')", key=a_key, **where)
        pairs[prefix] = LoraPair(A, B, settings.scale(module))
    if not pairs:
        raise MergeInputError("holds no LoRA factors (no '*.lora_A.weight' / '*.lora_B.weight' tensors)", **where)
    return Adapter(settings, pairs, full)


def join_adapter(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under PEFT's saved key names from ``{path: (A, B)}`` and full tensors."""
    state_dict: dict[str, torch.Tensor] = {}
    for prefix in sorted(pairs):
        A, B = pairs[prefix]
        state_dict[prefix + LORA_A_SUFFIX] = A.contiguous()
        state_dict[prefix + LORA_B_SUFFIX] = B.contiguous()
    for key in sorted(full):
        state_dict[key] = full[key].contiguous()
    return state_dict


def dense_deltas(pairs: Mapping[str, LoraPair], full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{path: s·B·A}`` (:meth:`LoraPair.product`) for every module, then the full tensors as they are:
    an adapter in product space, what AME over products merges (docs/design.md §2.6)."""
    dense = {path: pair.product() for path, pair in pairs.items()}
    dense.update(full)
    return dense
