"""Merging LoRA adapters on purpose: as factors, or as the products they stand for.

Adapter ``i`` updates module ``m`` by ``ΔW_i = s_i B_i A_i`` (``s_i = α_i/r_i``, or
``α_i/√r_i`` with rsLoRA; :mod:`fedsoup.lora.config`). With weights ``ω_i`` (normalised):

- ``"factors"`` (FedAvg on adapters): ``A = Σ ω_i A_i`` and ``B = Σ ω_i (s_i/s) B_i`` (each
  adapter's scale folded into its ``B``, so adapters of different alphas are merged at
  their own scale; ``s`` is the output's, the first adapter's). Needs equal ranks. Its
  update ``s B A`` is *not* ``Σ ω_i s_i B_i A_i`` in general (a product of means is not
  a mean of products); any AME optimizer applies to the factors as to any tensors.
- ``"products"``: the updates themselves are merged. The soup ``Σ ω_i s_i B_i A_i``
  is exactly ``B_cat A_cat`` with ``B_cat = [ω_1 s_1 B_1 … ω_N s_N B_N]`` and
  ``A_cat = [A_1; …; A_N]`` (PEFT's ``cat``, FLoRA's stacking): written as is at rank
  ``Σ r_i``, or at a target rank by the truncated SVD of :mod:`fedsoup.lora.linalg`
  (from the factors, exact at full rank, optimal below it by Eckart–Young). AME with
  any other optimizer runs over the dense ``ΔW_i`` and yields a dense ``ΔW`` per module,
  written at the target rank by a seeded randomized SVD (or into the base model).

Every merge measures the factor/product error per module,

    e_m = ‖s·soup(B)·soup(A) − soup(s·B·A)‖_F / ‖soup(s·B·A)‖_F,

with the weighted soup as ``soup`` whatever the mode and optimizer (so it says what
averaging factors costs on these adapters, comparable across runs; undefined when ranks
differ), and the captured energy ``Σ_{j≤t} σ_j² / ‖ΔW‖_F²`` of every SVD taken.
``modules_to_save`` tensors are full tensors, merged with the same options as any.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsoup.ame import merge, options_reduce_to_soup
from fedsoup.errors import MergeInputError, MergeWarning, OptionError, closest_name
from fedsoup.inputs import compute_dtype, find_non_finite, normalised_weights
from fedsoup.lora.config import LoraSettings, output_adapter_config, parse_adapter_config
from fedsoup.lora.linalg import balanced_factors, captured_energy, factored_svd, randomized_svd
from fedsoup.lora.pairs import Adapter, join_adapter, module_name, split_adapter
from fedsoup.options import LORA_MODES, MergeOptions

__all__ = [
    "LORA_MODES",
    "AdapterMerge",
    "LoraReport",
    "check_adapters",
    "check_lora_options",
    "factor_product_errors",
    "merge_adapters",
    "merge_adapter_state_dicts",
    "merged_deltas",
    "merge_into_base",
]



@dataclass(frozen=True)
class LoraReport:
    """What an adapter merge did and what it cost, per module (keyed by module path).

    ``errors``: the factor/product error ``e_m`` (``None`` where ranks differ);
    ``energies``: the captured energy of the SVD taken per module (empty without one);
    ``how``: ``"factors"``, ``"cat"``, ``"svd"`` or ``"base"``; ``rank``: the target rank
    asked for (``None``: the mode's own); ``ranks``: the rank of each module written;
    ``config``: the written adapter's ``adapter_config.json`` as a dict.
    """

    mode: str
    how: str
    rank: int | None
    errors: Mapping[str, float | None]
    energies: Mapping[str, float] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None  # the merged adapter's adapter_config.json (None: into a base)

    @property
    def max_error(self) -> float | None:
        values = [e for e in self.errors.values() if e is not None]
        return max(values) if values else None

    @property
    def mean_error(self) -> float | None:
        values = [e for e in self.errors.values() if e is not None]
        return sum(values) / len(values) if values else None

    @property
    def min_energy(self) -> float | None:
        return min(self.energies.values()) if self.energies else None

    @property
    def mean_energy(self) -> float | None:
        return sum(self.energies.values()) / len(self.energies) if self.energies else None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (file metadata, the command line's report)."""
        ranks = sorted(set(self.ranks.values()))
        return {
            "lora_mode": self.mode, "lora_written_as": self.how, "lora_rank": ranks[0] if len(ranks) == 1 else ranks,
            "factor_product_error_max": self.max_error, "factor_product_error_mean": self.mean_error,
            "svd_energy_min": self.min_energy, "svd_energy_mean": self.mean_energy,
        }

    def summary(self) -> str:
        """One line: ``lora products (svd, rank 16): factor/product error max 0.83 mean 0.81; SVD energy min 0.41``."""
        ranks = sorted(set(self.ranks.values()))
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        text = f"lora {self.mode} ({self.how}, {rank}): factor/product error "
        text += ("undefined (ranks differ)" if self.max_error is None
                 else f"max {self.max_error:.3g} mean {self.mean_error:.3g}")
        if self.energies:
            text += f"; SVD energy min {self.min_energy:.4g} mean {self.mean_energy:.4g}"
        return text


@dataclass(frozen=True)
class AdapterMerge:
    """A merged adapter: ``state_dict`` under PEFT's key names, its ``config``, and the report."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    report: LoraReport


def _where(names: Sequence[str] | None, index: int) -> dict[str, Any]:
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
        where = _where(names, index)
        bad = find_non_finite(_tensors_of(adapter))
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
                f"{'' if missing else ', which ingredient 0 does not'}", key=path + ".lora_A.weight", **where)
        for path, pair in adapter.pairs.items():
            ref = first.pairs[path]
            if pair.A.shape[1] != ref.A.shape[1] or pair.B.shape[0] != ref.B.shape[0]:
                raise MergeInputError(
                    f"module of shape (d_out, d_in) = ({pair.B.shape[0]}, {pair.A.shape[1]}), ingredient 0's is "
                    f"({ref.B.shape[0]}, {ref.A.shape[1]})", key=path + ".lora_A.weight", **where)
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


def _options(options: MergeOptions | None) -> MergeOptions:
    return MergeOptions() if options is None else options


def _factor_dicts(adapters: Sequence[Adapter], template: Adapter) -> list[dict[str, torch.Tensor]]:
    """Each adapter's factors with its scale folded into ``B`` relative to the output's: ``(s_i/s) B_i``.

    ``s_i == s`` leaves ``B_i`` untouched (no multiplication by 1.0), so adapters of equal
    scale are merged as exactly the tensors FedAvg averages.
    """
    dicts = []
    for adapter in adapters:
        tensors: dict[str, torch.Tensor] = {}
        for path, pair in adapter.pairs.items():
            ratio = pair.scale / template.pairs[path].scale
            tensors[path + ".lora_A.weight"] = pair.A
            tensors[path + ".lora_B.weight"] = pair.B if ratio == 1.0 else (pair.B.to(compute_dtype([pair.B])) * ratio)
        tensors.update(adapter.full)
        dicts.append(tensors)
    return dicts


def _stacked(adapters: Sequence[Adapter], omega: Sequence[float], path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_cat, A_cat)`` with ``B_cat A_cat = Σ_i ω_i s_i B_i A_i`` (compute dtype)."""
    dtype = compute_dtype([t for a in adapters for t in (a.pairs[path].A, a.pairs[path].B)])
    b_cat = torch.cat([a.pairs[path].B.to(dtype) * (w * a.pairs[path].scale) for a, w in zip(adapters, omega)], dim=1)
    a_cat = torch.cat([a.pairs[path].A.to(dtype) for a in adapters], dim=0)
    return b_cat, a_cat


def factor_product_errors(adapters: Sequence[Adapter], omega: Sequence[float]) -> dict[str, float | None]:
    """``e_m = ‖s·soup(B)·soup(A) − soup(s·B·A)‖ / ‖soup(s·B·A)‖`` per module, from the factors.

    ``soup(B) = Σ ω_i (s_i/s) B_i`` (scales folded, as the ``factors`` mode writes them),
    ``soup(A) = Σ ω_i A_i``; both products are held as factors, so the difference is
    ``[s·soup(B), −B_cat] [soup(A); A_cat]``, and both norms come from one thin QR per side
    (float64). ``None`` where the adapters' ranks differ (no soup of factors exists);
    ``0.0`` where the soup of products is zero and so is the product of soups.
    """
    errors: dict[str, float | None] = {}
    template = adapters[0]
    for path, first in template.pairs.items():
        if any(a.pairs[path].rank != first.rank for a in adapters):
            errors[path] = None
            continue
        b_cat, a_cat = _stacked(adapters, omega, path)
        b_soup = sum(w * a.pairs[path].scale * a.pairs[path].B.double() for a, w in zip(adapters, omega))
        a_soup = sum(w * a.pairs[path].A.double() for a, w in zip(adapters, omega))
        # One thin QR per side: U = [s·soup(B), −B_cat] = Q_u R_u, V = [soup(A); A_cat]ᵀ = Q_v R_v.
        # The difference is U Vᵀ, so its norm is ‖R_u R_vᵀ‖; the target −B_cat A_cat is the
        # last k columns of each, so its norm is ‖R_u[:, r:] R_v[:, r:]ᵀ‖ (no second QR).
        r_u = torch.linalg.qr(torch.cat([b_soup, -b_cat.double()], dim=1), mode="r").R
        r_v = torch.linalg.qr(torch.cat([a_soup, a_cat.double()], dim=0).T, mode="r").R
        difference = float(torch.linalg.matrix_norm(r_u @ r_v.T))
        target = float(torch.linalg.matrix_norm(r_u[:, first.rank:] @ r_v[:, first.rank:].T))
        errors[path] = (0.0 if difference == 0.0 else math.inf) if target == 0.0 else difference / target
    return errors


def _output_scale(settings: LoraSettings, path: str, rank: int) -> float:
    return settings.scale(module_name(path), rank)


def _as_output(adapters: Sequence[Adapter], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               full: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
    """``{path: (B, A)}`` with ``B A`` the update (scale included) → PEFT tensors and config.

    Each ``B`` is divided by the output config's scale for its rank, in float64 then cast
    to the first adapter's dtype, so ``PeftModel`` computes ``s · B A`` = the update.
    """
    template = adapters[0]
    ranks = {module_name(path): a.shape[0] for path, (b, a) in factors.items()}
    config = output_adapter_config(template.settings, ranks)
    settings = parse_adapter_config(config)
    pairs = {}
    for path, (b, a) in factors.items():
        dtype_a, dtype_b = template.pairs[path].A.dtype, template.pairs[path].B.dtype
        scale = _output_scale(settings, path, a.shape[0])
        pairs[path] = (a.to(dtype_a), (b.double() / scale).to(dtype_b))
    return join_adapter(pairs, full), config, {path: a.shape[0] for path, (b, a) in factors.items()}


def check_lora_options(mode: str, rank: int | None) -> None:
    """Refuse an unknown ``mode`` (with the closest name) or a ``rank`` that is not a positive integer."""
    if mode not in LORA_MODES:
        raise OptionError("lora", mode, f"unknown LoRA mode {mode!r} (use {' or '.join(LORA_MODES)})",
                          suggestion=closest_name(str(mode), LORA_MODES))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError("lora_rank", rank, f"option 'lora_rank' must be a positive integer, got {rank!r}")


def _run_merge(models: Sequence[Mapping[str, torch.Tensor]], options: MergeOptions,
               weights: Sequence[float] | None) -> dict[str, torch.Tensor]:
    """``fedsoup.merge(models, options, weights=...)`` on tensors (factors, updates, full tensors).

    The options were validated when built; only their LoRA fields are cleared here (these
    tensors are no adapters), which validates a copy once per call, not per tensor.
    """
    inner = options if options.lora is None and options.lora_rank is None else \
        dataclasses.replace(options, lora=None, lora_rank=None)
    return merge(list(models), inner, weights=None if weights is None else list(weights))


def _merged_factors(adapters: Sequence[Adapter], options: MergeOptions, weights, names=None) -> dict[str, torch.Tensor]:
    """The ``factors`` merge: AME (by default the soup) over ``A_i`` and ``(s_i/s) B_i``, and the full tensors."""
    _check_equal_ranks(adapters, names)
    return _run_merge(_factor_dicts(adapters, adapters[0]), options, weights)


def _merged_full(adapters: Sequence[Adapter], options: MergeOptions, weights) -> dict[str, torch.Tensor]:
    return _run_merge([a.full for a in adapters], options, weights) if adapters[0].full else {}


def _ame_over_products(adapters: Sequence[Adapter], options: MergeOptions, weights):
    """AME over the dense updates ``ΔW_i = s_i B_i A_i`` (and the full tensors): a dense ``ΔW`` per module."""
    dense = []
    for adapter in adapters:
        model = {}
        for path, pair in adapter.pairs.items():
            dtype = compute_dtype([pair.B, pair.A])
            model[path] = pair.scale * (pair.B.to(dtype) @ pair.A.to(dtype))
        model.update(adapter.full)
        dense.append(model)
    merged = _run_merge(dense, options, weights)
    return {path: merged[path] for path in adapters[0].pairs}, {key: merged[key] for key in adapters[0].full}


def merged_deltas(adapters: Sequence[Adapter], *, mode: str = "products", options: MergeOptions | None = None,
                  weights: Sequence[float] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The merged update ``ΔW`` of every module as a dense (d_out, d_in) matrix, and the full tensors.

    ``factors``: ``s·B·A`` of the merged factors; ``products``: the soup
    ``B_cat A_cat`` (formed once per module), or AME over the dense ``ΔW_i``.
    What :func:`merge_into_base` adds to the base weights.
    """
    options = _options(options)
    check_lora_options(mode, None)
    if mode == "factors":
        merged = _merged_factors(adapters, options, weights)
        deltas = {}
        for path, pair in adapters[0].pairs.items():
            a = merged[path + ".lora_A.weight"].double()
            b = merged[path + ".lora_B.weight"].double()
            deltas[path] = pair.scale * (b @ a)
        return deltas, {key: merged[key] for key in adapters[0].full}
    if options_reduce_to_soup(options):
        omega = normalised_weights(weights, len(adapters))
        deltas = {}
        for path in adapters[0].pairs:
            b_cat, a_cat = _stacked(adapters, omega, path)
            deltas[path] = b_cat @ a_cat
        return deltas, _merged_full(adapters, options, weights)
    return _ame_over_products(adapters, options, weights)


def _check_equal_ranks(adapters: Sequence[Adapter], names: Sequence[str] | None = None) -> None:
    for path, first in adapters[0].pairs.items():
        for index, adapter in enumerate(adapters[1:], start=1):
            if adapter.pairs[path].rank != first.rank:
                raise MergeInputError(
                    f"rank {adapter.pairs[path].rank}, ingredient 0's is {first.rank}: the 'factors' mode "
                    "needs equal ranks (merge as 'products' instead)", key=path + ".lora_A.weight",
                    **_where(names, index))


def merge_adapters(adapters: Sequence[Adapter], *, mode: str = "products", rank: int | None = None,
                   options: MergeOptions | None = None, weights: Sequence[float] | None = None,
                   names: Sequence[str] | None = None) -> AdapterMerge:
    """Merge adapters split by :func:`fedsoup.lora.split_adapter` into one adapter (module docstring).

    Args:
        adapters: the ingredients, checked together by :func:`check_adapters`.
        mode: ``"factors"`` or ``"products"``.
        rank: ``products`` only: the rank written. ``None``: the soup is written exactly at
            rank ``Σ r_i`` (``cat``); AME over products (a non-soup ``options``) then
            truncates its dense ``ΔW`` to ``Σ r_i``. A number: the truncated SVD at that
            rank (capped by ``min(d_out, d_in, Σ r_i)`` per module).
        options: any :class:`~fedsoup.MergeOptions` (optimizer, schedule...); the default
            is the weighted soup. Its ``seed`` seeds the randomized SVD of a dense ``ΔW``.
        weights: ``ω_i`` (normalised; uniform when ``None``).
        names: the ingredients' file names, for errors.

    Returns:
        :class:`AdapterMerge` with PEFT's key names and an ``adapter_config.json`` dict
        whose ``r``/``rank_pattern`` match the tensors and whose ``lora_alpha``,
        ``alpha_pattern`` and ``use_rslora`` are the first adapter's.
    """
    options = _options(options)
    check_lora_options(mode, rank)
    if mode == "factors" and rank is not None:
        raise OptionError("lora_rank", rank, "option 'lora_rank' applies to the 'products' mode only "
                          "(the 'factors' mode keeps the adapters' rank)")
    check_adapters(adapters, names)
    omega = normalised_weights(weights, len(adapters))
    errors = factor_product_errors(adapters, omega)
    template = adapters[0]
    if mode == "factors":
        merged = _merged_factors(adapters, options, weights, names)
        ranks = {path: pair.rank for path, pair in template.pairs.items()}
        config = output_adapter_config(template.settings, {module_name(p): r for p, r in ranks.items()})
        state_dict = {key: merged[key] for key in _adapter_keys(template)}
        return AdapterMerge(state_dict, config, LoraReport("factors", "factors", None, errors, {}, ranks, config))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    energies: dict[str, float] = {}
    if options_reduce_to_soup(options):
        full = _merged_full(adapters, options, weights)
        for path in template.pairs:
            b_cat, a_cat = _stacked(adapters, omega, path)
            if rank is None:
                factors[path] = (b_cat, a_cat)
                continue
            u, s, vh = factored_svd(b_cat, a_cat)
            kept = min(rank, s.numel())
            factors[path] = balanced_factors(u, s, vh, kept)
            energies[path] = captured_energy(s, kept)
        how = "cat" if rank is None else "svd"
    else:
        deltas, full = _ame_over_products(adapters, options, weights)
        for path, delta in deltas.items():
            target = rank if rank is not None else sum(a.pairs[path].rank for a in adapters)
            kept = min(target, min(delta.shape))
            u, s, vh = randomized_svd(delta, kept, seed=options.seed)
            factors[path] = balanced_factors(u, s, vh, kept)
            energies[path] = captured_energy(s, kept, total=float(delta.double().square().sum()))
        how = "svd"
    state_dict, config, ranks = _as_output(adapters, factors, full)
    return AdapterMerge(state_dict, config, LoraReport("products", how, rank, errors, energies, ranks, config))


def _adapter_keys(adapter: Adapter) -> list[str]:
    return list(_tensors_of(adapter))


def _tensors_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    return join_adapter({path: (pair.A, pair.B) for path, pair in adapter.pairs.items()}, adapter.full)


# --- into the base model ---------------------------------------------------------------------

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
                                  "adapter's module", key=path + ".lora_A.weight", **_where(names, 0))
        d_out, d_in = pair.B.shape[0], pair.A.shape[1]
        shape = tuple(base[key].shape)
        if shape not in ((d_out, d_in), (d_in, d_out)):
            raise MergeInputError(f"the base weight {key!r} has shape {shape}, the adapter's update "
                                  f"({d_out}, {d_in})", key=path + ".lora_A.weight", **_where(names, 0))
        layouts[path] = None if d_out == d_in else shape == (d_in, d_out)
    conv1d = template.settings.fan_in_fan_out or any(v is True for v in layouts.values())
    return {path: conv1d if layout is None else layout for path, layout in layouts.items()}


def merge_into_base(adapters: Sequence[Adapter], base: Mapping[str, torch.Tensor], *, mode: str = "products",
                    options: MergeOptions | None = None, weights: Sequence[float] | None = None,
                    names: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], LoraReport]:
    """The base model's state dict with the merged update added: ``W + ΔW`` (``W + ΔWᵀ`` for Conv1D).

    ``ΔW`` is :func:`merged_deltas`' (exact soup of products, AME over products, or the
    product of merged factors); ``modules_to_save`` tensors replace the base's. Computed in
    float32 (float64 for float64 weights), written in each base tensor's dtype. Keys of
    ``base`` the adapter does not touch are returned as they are.
    """
    options = _options(options)
    check_lora_options(mode, None)
    check_adapters(adapters, names)
    errors = factor_product_errors(adapters, normalised_weights(weights, len(adapters)))
    transposed = _transposed(adapters, base, names)
    deltas, full = merged_deltas(adapters, mode=mode, options=options, weights=weights)
    result = dict(base)
    for path, delta in deltas.items():
        key = _base_key(path, base)
        weight = base[key]
        dtype = compute_dtype([weight])
        update = delta.T if transposed[path] else delta
        result[key] = (weight.to(dtype) + update.to(dtype)).to(weight.dtype)
    for key, tensor in full.items():
        base_key = _base_key(key[: -len(key.rpartition(".")[2]) - 1], base, "." + key.rpartition(".")[2])
        if base_key is None or tuple(base[base_key].shape) != tuple(tensor.shape):
            raise MergeInputError("modules_to_save tensor has no tensor of its shape in the base model",
                                  key=key, **_where(names, 0))
        result[base_key] = tensor.to(base[base_key].dtype)
    ranks = {path: pair.rank for path, pair in adapters[0].pairs.items()}
    return result, LoraReport(mode, "base", None, errors, {}, ranks)


# --- fedsoup.merge on adapter state dicts ------------------------------------------------------

def merge_adapter_state_dicts(models: Sequence[Mapping[str, torch.Tensor]], options: MergeOptions,
                              adapter_config: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, *,
                              weights: Sequence[float] | None = None) -> AdapterMerge:
    """What ``fedsoup.merge(models, lora=..., adapter_config=...)`` does: ``models`` are adapter
    state dicts under PEFT's saved key names, ``adapter_config`` their ``adapter_config.json``
    (one for all, as a server that fixed the adapter has it, or one per model)."""
    if adapter_config is None:
        raise OptionError("adapter_config", None, "merging LoRA adapters needs their adapter_config.json: "
                          "fedsoup.merge(models, lora=..., adapter_config=config)")
    configs = [adapter_config] * len(models) if isinstance(adapter_config, Mapping) else list(adapter_config)
    if len(configs) != len(models):
        raise OptionError("adapter_config", f"{len(configs)} configs",
                          f"one adapter_config for all models or one per model; got {len(configs)} for {len(models)}")
    adapters = [split_adapter({str(k): v for k, v in model.items()}, parse_adapter_config(config, ingredient=index),
                              ingredient=index)
                for index, (model, config) in enumerate(zip(models, configs))]
    return merge_adapters(adapters, mode=options.lora, rank=options.lora_rank, options=options, weights=weights)
