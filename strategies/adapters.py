"""Federated LoRA in FedSoup: the server's adapter, the checks of adapter replies, the round's figures.

Clients fine-tune a PEFT LoRA adapter and reply with ``get_peft_model_state_dict(model)``
(keys ``base_model.model.<module>.lora_{A,B}.weight``, :mod:`fedsoup.lora.pairs`). Module
``m`` of reply ``i`` stands for the update ``ΔW_i = s_i B_i A_i``, with ``s_i`` computed by
the *server* from its own adapter configuration (``FedSoup(adapter_config=...)``; ``α/r_i``,
or ``α/√r_i`` with rsLoRA): a client never scales its own update. Two modes
(``FedSoup(soup={"lora": ...})``, docs/strategy.md "LoRA adapters"):

- ``"factors"`` (default): ``A`` and ``B`` are merged as the tensors they are, as Flower's
  FedAvg does; replies must have the global adapter's ranks.
- ``"products"``: the updates ``ΔW_i`` are merged (:mod:`strategies.products`), replies may
  have other ranks, and the round's adapter goes back at the configured rank.

This module holds what both modes share: :class:`LoraOptions` (the mode, the SVD
tolerance and the server's :class:`~fedsoup.lora.LoraSettings`), :class:`GlobalAdapter`
(the global model's LoRA pairs, checked against that configuration when a run starts),
:func:`adapter_structure_check` (a reply's arrays against the global adapter, before any
byte is read), :func:`reply_pairs` and :func:`factor_product_error` (the round's
factor/product error), and the byte counts of a round.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message

from fedsoup.errors import MergeInputError, OptionError
from fedsoup.lora import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LoraPair,
    LoraSettings,
    measure,
    parse_adapter_config,
    split_adapter,
)
from fedsoup.lora.config import ADAPTER_CONFIG_NAME
from fedsoup.lora.measure import Stack
from fedsoup.lora.pairs import module_name
from fedsoup.options import MergeOptions
from fedsoup.structure import check_structure

__all__ = [
    "DEFAULT_LORA_MODE",
    "DEFAULT_SVD_TOLERANCE",
    "LORA_SOUP_OPTIONS",
    "LoraOptions",
    "GlobalAdapter",
    "split_soup",
    "server_adapter_settings",
    "adapter_structure_check",
    "reply_pairs",
    "factor_product_error",
    "module_error",
    "ERROR_PROBES",
    "array_bytes",
    "module_seed",
]

DEFAULT_LORA_MODE = "factors"
#: Power iterations of the products mode's randomized SVD stop when the captured energy grew
#: by at most this much (relative) in the last one.
DEFAULT_SVD_TOLERANCE = 1e-3
#: Keys of FedSoup's ``soup=`` dict that configure the LoRA round rather than ``fedsoup.merge``.
LORA_SOUP_OPTIONS = ("lora", "lora_tolerance")


@dataclass(frozen=True)
class LoraOptions:
    """How FedSoup merges adapter replies: ``mode``, the SVD ``tolerance``, the server's ``settings``."""

    mode: str
    tolerance: float
    settings: LoraSettings

    def describe(self) -> str:
        targets = self.settings.target_modules
        scale = "α/√r (rsLoRA)" if self.settings.use_rslora else "α/r"
        text = f"LoRA {self.mode} (r={self.settings.r}, lora_alpha={self.settings.lora_alpha:g}, s={scale}, " \
               f"target_modules={targets!r})"
        return text + (f", SVD tolerance {self.tolerance:g}" if self.mode == "products" else "")


def split_soup(soup: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, dict[str, Any]]:
    """``soup`` without :data:`LORA_SOUP_OPTIONS`, and those options.

    A ``soup`` that held only LoRA options is the plain soup (``None``), so that
    ``soup={"lora": "factors"}`` is FedAvg on the factors.
    """
    if soup is None or not isinstance(soup, Mapping):
        return soup, {}
    lora = {key: soup[key] for key in LORA_SOUP_OPTIONS if key in soup}
    if not lora:
        return soup, {}
    rest = {key: value for key, value in soup.items() if key not in LORA_SOUP_OPTIONS}
    return (rest or None), lora


def lora_options(soup_lora: Mapping[str, Any], adapter_config: Any) -> LoraOptions | None:
    """:class:`LoraOptions` from the ``soup`` LoRA keys and ``adapter_config``; ``None`` without either.

    Raises :class:`~fedsoup.errors.OptionError` for an unknown mode, a bad tolerance, or
    LoRA options without the server's adapter configuration.
    """
    if adapter_config is None:
        if soup_lora:
            name = next(iter(soup_lora))
            raise OptionError(name, soup_lora[name], f"soup option {name!r} needs the server's adapter configuration: "
                              "FedSoup(adapter_config=<adapter_config.json dict, its path, or a peft LoraConfig>)")
        return None
    mode = soup_lora.get("lora", DEFAULT_LORA_MODE)
    MergeOptions(lora=mode)  # the one check of the option (fedsoup.MergeOptions.lora)
    tolerance = soup_lora.get("lora_tolerance", DEFAULT_SVD_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0 \
            or not math.isfinite(tolerance):
        raise OptionError("lora_tolerance", tolerance, f"option 'lora_tolerance' must be a number in [0, 1), got {tolerance!r}")
    if mode == "factors" and "lora_tolerance" in soup_lora:
        raise OptionError("lora_tolerance", tolerance, "option 'lora_tolerance' applies to the 'products' mode only "
                          "(the 'factors' mode takes no SVD)")
    return LoraOptions(mode, float(tolerance), server_adapter_settings(adapter_config))


def server_adapter_settings(config: Any) -> LoraSettings:
    """The server's adapter configuration as :class:`~fedsoup.lora.LoraSettings`.

    ``config``: an ``adapter_config.json`` dict, the path of that file or of the adapter
    directory holding it, or an object with ``to_dict()`` (PEFT's ``LoraConfig``; its enums
    and sets are turned into their JSON values, as ``save_pretrained`` writes them).
    Raises :class:`~fedsoup.errors.OptionError` (option ``adapter_config``) if it cannot
    be read or is not a plain LoRA/rsLoRA configuration.
    """
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / ADAPTER_CONFIG_NAME if path.is_dir() else path
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise OptionError("adapter_config", str(path), f"cannot read the adapter configuration {str(path)!r} "
                              f"({error})") from None
    elif not isinstance(config, Mapping) and callable(getattr(config, "to_dict", None)):
        config = json.loads(json.dumps(config.to_dict(), default=_json_value))
    if not isinstance(config, Mapping):
        raise OptionError("adapter_config", config, "adapter_config must be an adapter_config.json dict, its path, or "
                          f"an object with to_dict() (peft.LoraConfig), got {type(config).__name__}")
    try:
        return parse_adapter_config(config)
    except MergeInputError as error:
        raise OptionError("adapter_config", dict(config), f"adapter_config: {error.reason}") from None


def _json_value(value: Any) -> Any:
    """What ``json`` cannot write in PEFT's ``to_dict()``: enums by value, sets as sorted lists."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)


@dataclass(frozen=True)
class GlobalAdapter:
    """The global model's LoRA pairs: ``(d_out, d_in, r)`` and scale per module path, and the other keys."""

    settings: LoraSettings
    modules: dict[str, tuple[int, int, int]]  # "base_model.model.<module>" -> (d_out, d_in, r)
    full: tuple[str, ...]  # modules_to_save tensors

    @classmethod
    def of(cls, model: Mapping[str, torch.Tensor], lora: LoraOptions) -> GlobalAdapter:
        """Check the global model against the server's configuration.

        Raises :class:`~fedsoup.errors.OptionError`: option ``lora`` when the mode cannot
        apply (no LoRA pairs in the global model), option ``adapter_config`` when the model
        does not match it (another rank, a tensor neither a factor nor in
        ``modules_to_save``, an ``A`` without its ``B``).
        """
        if not any(key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)) for key in model):
            raise OptionError("lora", lora.mode, f"the {lora.mode!r} LoRA mode cannot apply: the global model holds no "
                              "LoRA pairs (no '*.lora_A.weight' / '*.lora_B.weight' arrays; is initial_arrays the "
                              "adapter's state dict, get_peft_model_state_dict(model)?)")
        try:
            adapter = split_adapter(model, lora.settings)
        except MergeInputError as error:
            where = f" (array {error.key!r})" if error.key is not None else ""
            raise OptionError("adapter_config", dict(lora.settings.raw), "the global model does not match the "
                              f"server's adapter_config{where}: {error.reason}") from None
        modules = {path: (pair.B.shape[0], pair.A.shape[1], pair.rank) for path, pair in adapter.pairs.items()}
        return cls(lora.settings, modules, tuple(adapter.full))

    def scale(self, path: str, rank: int | None = None) -> float:
        """``s`` of ``path`` at ``rank`` (the global rank by default), from the server's configuration."""
        return self.settings.scale(module_name(path), self.modules[path][2] if rank is None else rank)


def adapter_structure_check(adapter: GlobalAdapter, mode: str) -> Callable[..., None]:
    """A structure check of a reply's arrays (metadata only) against the global adapter.

    For :class:`strategies.replies.ReplyChecker`: called as ``check(reference, reply_arrays,
    reference_name=...)`` and raising :class:`~fedsoup.errors.MergeInputError` naming the
    array, as :func:`fedsoup.structure.check_structure` does. Every LoRA module of the global
    adapter needs its ``lora_A`` (r_i, d_in) and ``lora_B`` (d_out, r_i) and no other module
    may be adapted; ``factors`` needs ``r_i`` = the global rank, ``products`` any
    ``1 ≤ r_i ≤ min(d_out, d_in)``. Other arrays (``modules_to_save``) are checked as any.
    """

    def check(reference: Mapping[str, Any], other: Mapping[str, Any], *, reference_name: str = "the global model") -> None:
        for key in other:
            if key not in reference and key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
                raise MergeInputError(f"adapts module {module_name(key.rsplit('.', 2)[0])!r}, which the global adapter "
                                      "does not (other target_modules)", key=key)
        for path, (d_out, d_in, rank) in adapter.modules.items():
            a_key, b_key = path + LORA_A_SUFFIX, path + LORA_B_SUFFIX
            if a_key not in other and b_key not in other:
                raise MergeInputError(f"missing: no LoRA pair for module {module_name(path)!r} of the global adapter "
                                      "(other target_modules)", key=a_key)
            for key, pair in ((a_key, b_key), (b_key, a_key)):
                if key not in other:
                    raise MergeInputError(f"missing: {pair.rsplit('.', 2)[-2]} without its {key.rsplit('.', 2)[-2]}",
                                          key=key)
            a_shape, b_shape = tuple(other[a_key].shape), tuple(other[b_key].shape)
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise MergeInputError(f"has shape {a_shape} beside lora_B {b_shape}: not the factors of one rank "
                                      "(A: (r, d_in), B: (d_out, r))", key=a_key)
            if (b_shape[0], a_shape[1]) != (d_out, d_in):
                raise MergeInputError(f"adapts a module of shape (d_out, d_in) = ({b_shape[0]}, {a_shape[1]}), the "
                                      f"global adapter's is ({d_out}, {d_in})", key=a_key)
            client_rank = a_shape[0]
            if mode == "factors" and client_rank != rank:
                raise MergeInputError(f"has rank {client_rank}, the global adapter's is {rank} (the 'factors' mode "
                                      "needs the global rank; soup={'lora': 'products'} merges other ranks)", key=a_key)
            if not 1 <= client_rank <= min(d_out, d_in):
                raise MergeInputError(f"has rank {client_rank}, outside 1..min(d_out, d_in) = {min(d_out, d_in)}",
                                      key=a_key)
        factors = (LORA_A_SUFFIX, LORA_B_SUFFIX)
        full = {key: reference[key] for key in reference if not key.endswith(factors)}
        check_structure(full, {key: other[key] for key in other if not key.endswith(factors)},
                        reference_name=reference_name)

    return check


def reply_pairs(arrays: Mapping[str, torch.Tensor], adapter: GlobalAdapter) -> dict[str, LoraPair]:
    """A checked reply's pairs, each with the server's scale at the reply's rank."""
    pairs = {}
    for path in adapter.modules:
        A, B = arrays[path + LORA_A_SUFFIX], arrays[path + LORA_B_SUFFIX]
        pairs[path] = LoraPair(A, B, adapter.scale(path, A.shape[0]))
    return pairs


def module_seed(seed: int, index: int) -> int:
    """A seed per (round seed, module index): each module's sketch is independent and reproducible."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


#: Above a stacked rank ``r + Σ r_i`` of twice this, a round's factor/product error is estimated
#: from this many seeded probes (docs/strategy.md); exact at or below it.
ERROR_PROBES = 16


def module_error(pairs: list[LoraPair], omega: list[float], seed: int, index: int, *,
                 soup: tuple[torch.Tensor, torch.Tensor] | None = None, stack: Stack | None = None) -> float | None:
    """Module ``index``'s factor/product error in a round (:func:`factor_product_error`); ``stack``:
    its :func:`fedsoup.lora.measure.stacked` factors when the round's merge built them."""
    return measure.factor_product_error(pairs, omega, stack=stack, soup=soup, probes=ERROR_PROBES,
                                        seed=module_seed(seed, index))


def factor_product_error(replies: list[dict[str, LoraPair]], omega: list[float], seed: int,
                         soup: Mapping[str, torch.Tensor] | None = None) -> dict[str, float] | None:
    """Per module ``‖s·soup(B)·soup(A) − soup(s·B·A)‖_F / ‖soup(s·B·A)‖_F`` of the round's replies.

    ``soup(B) = Σ ω_i (s_i/s) B_i``, ``soup(A) = Σ ω_i A_i``, ``soup(s·B·A) = Σ ω_i s_i B_i A_i``:
    what averaging the factors costs against merging the updates, by the kernel of
    ``fedsoup.lora``'s offline merges (:func:`fedsoup.lora.measure.factor_product_error`):
    exact for stacks of rank ``r + Σ r_i ≤ 2·``:data:`ERROR_PROBES`, else an estimate from
    :data:`ERROR_PROBES` probes seeded per module. ``None`` when the replies' ranks differ in
    some module (no soup of factors exists). ``soup``: the round's own soup of the factors
    (``Σ ω_i A_i``, ``Σ ω_i B_i`` under the adapter's keys), when it has one, instead of
    summing the replies again.
    """
    if not replies:
        return None
    errors = {}
    for index, path in enumerate(replies[0]):
        pairs = [reply[path] for reply in replies]
        factors = None
        if soup is not None and all(pair.rank == pairs[0].rank for pair in pairs):  # equal ranks: one scale
            factors = (pairs[0].scale * soup[path + LORA_B_SUFFIX], soup[path + LORA_A_SUFFIX])
        error = module_error(pairs, omega, seed, index, soup=factors)
        if error is None:
            return None
        errors[path] = error
    return errors


def array_bytes(messages: Iterable[Message]) -> int:
    """The bytes of the ArrayRecords the messages carry (Flower's ``ArrayRecord.count_bytes``:
    the serialised arrays and their keys), as FlowerTune's communication tracker counts them."""
    total = 0
    for message in messages:
        try:
            if message.has_error() or not message.has_content():
                continue
            records = message.content.array_records.values()
        except AttributeError:  # a Mock(spec=Message) reply without content
            continue
        total += sum(record.count_bytes() for record in records)
    return total
