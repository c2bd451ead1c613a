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

Every written tensor is rounded once, from its float32/float64 result (the exact weighted mean
for the soup of bf16/fp16 tensors), into the ``dtype`` asked for or its adapter's dtype
(docs/design.md §2.3): the factors and full tensors by :func:`fedsoup.merge` itself, the
factors of a soup of products or of an SVD from their float32 (float64) values. What a dense
``ΔW`` is formed from (the merged factors of a merge into the base, the merged dense updates)
is an intermediate, kept in float32/float64 and never rounded into the adapters' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedsoup.ame import merge
from fedsoup.errors import OptionError
from fedsoup.inputs import compute_dtype, normalised_weights, output_dtype
from fedsoup.lora.checks import check_adapters, check_equal_ranks, check_lora_options, rounded_into, tensors_of
from fedsoup.lora.config import LoraSettings, output_adapter_config, parse_adapter_config
from fedsoup.lora.linalg import balanced_factors, captured_energy, factored_svd, randomized_svd
from fedsoup.lora.measure import Stack, factor_product_error, factor_product_errors, stacked
from fedsoup.lora.pairs import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    Adapter,
    dense_deltas,
    join_adapter,
    module_name,
    split_adapter,
)
from fedsoup.lora.report import AdapterMerge, LoraReport
from fedsoup.options import LORA_MODES, MergeOptions
from fedsoup.plan import reduces_to_soup

__all__ = [
    "LORA_MODES",
    "AdapterMerge",
    "LoraReport",
    "merge_adapters",
    "merge_adapter_state_dicts",
    "merged_deltas",
]


def resolved_options(options: MergeOptions | None) -> MergeOptions:
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
            tensors[path + LORA_A_SUFFIX] = pair.A
            tensors[path + LORA_B_SUFFIX] = pair.B if ratio == 1.0 else (pair.B.to(compute_dtype([pair.B])) * ratio)
        tensors.update(adapter.full)
        dicts.append(tensors)
    return dicts


def _output_scale(settings: LoraSettings, path: str, rank: int) -> float:
    return settings.scale(module_name(path), rank)


def _as_output(adapters: Sequence[Adapter], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               full: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
    """``{path: (B, A)}`` with ``B A`` the update (scale included) → PEFT tensors and config.

    Each ``B`` is divided by the output config's scale for its rank, so ``PeftModel``
    computes ``s · B A`` = the update: in float64, held in the factors' own compute dtype (the
    soup of products' stacked factors: float32 as any merge result, float64 for float64
    adapters or ``dtype``; an SVD's: float64). ``A`` and that quotient are then rounded once
    into ``dtype`` (default: the first adapter's dtype of each factor).
    """
    template = adapters[0]
    ranks = {module_name(path): a.shape[0] for path, (b, a) in factors.items()}
    config = output_adapter_config(template.settings, ranks)
    settings = parse_adapter_config(config)
    pairs = {}
    for path, (b, a) in factors.items():
        dtype_a, dtype_b = dtype or template.pairs[path].A.dtype, dtype or template.pairs[path].B.dtype
        work = compute_dtype([a, b], dtype)
        scale = _output_scale(settings, path, a.shape[0])
        pairs[path] = (rounded_into(path + LORA_A_SUFFIX, a.to(work), dtype_a),
                       rounded_into(path + LORA_B_SUFFIX, (b.double() / scale).to(work), dtype_b))
    return join_adapter(pairs, full), config, {path: a.shape[0] for path, (b, a) in factors.items()}


# The dtype merged tensors are rounded into: one for all, or one per key (a key not in it: its own dtype).
Target = torch.dtype | Mapping[str, torch.dtype] | None


def _run_merge(models: Sequence[Mapping[str, torch.Tensor]], options: MergeOptions,
               weights: Sequence[float] | None, dtype: Target = None, *,
               intermediates: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``fedsoup.merge(models, options, weights=..., dtype=dtype)`` on tensors (factors, updates, full tensors).

    Every floating tensor is rounded once into ``dtype`` (one per key, or ``None``: its own
    dtype), but the ``intermediates`` (what a dense ``ΔW`` is formed from), which are the
    merge's float32/float64 result, never rounded into a narrower dtype
    (:func:`_merge_per_key_dtype`).

    The options were validated when built; only their LoRA fields are cleared here (these
    tensors are no adapters), which validates a copy once per call, not per tensor.
    """
    inner = options if options.lora is None and options.lora_rank is None else \
        dataclasses.replace(options, lora=None, lora_rank=None)
    models, weights = list(models), None if weights is None else list(weights)
    if not intermediates and not isinstance(dtype, Mapping):
        return merge(models, inner, weights=weights, dtype=dtype)
    targets = {key: dtype.get(key) if isinstance(dtype, Mapping) else dtype for key in models[0]}
    return _merge_per_key_dtype(models, inner, weights, targets, intermediates)


def _merge_per_key_dtype(models: list[Mapping[str, torch.Tensor]], options: MergeOptions, weights,
                         targets: Mapping[str, torch.dtype | None], intermediates: frozenset[str],
                         ) -> dict[str, torch.Tensor]:
    """:func:`_run_merge` with a dtype per key (``targets``) or intermediates. Each floating
    tensor has a compute dtype (float32, float64 for float64 inputs or target). The soup is per
    tensor, so each group of keys of one target is merged by a call of its own, the
    intermediates into their compute dtype (bf16 factors: their exact mean rounded once into
    float32). Any other merge runs once over every tensor (its ball guard and projection are
    the whole model's), on the tensors to round widened to their compute dtype (exact), whose
    float32/float64 results are then rounded once into their target."""
    wide = {key: compute_dtype([m[key] for m in models], None if key in intermediates else targets[key])
            for key, tensor in models[0].items() if tensor.is_floating_point()}
    if reduces_to_soup(options):
        groups: dict[torch.dtype | None, list[str]] = {}
        for key in models[0]:
            groups.setdefault(wide[key] if key in intermediates else targets[key], []).append(key)
        merged: dict[str, torch.Tensor] = {}
        for target, keys in groups.items():
            merged.update(merge([{key: m[key] for key in keys} for m in models], options, weights=weights,
                                dtype=target))
        return {key: merged[key] for key in models[0]}
    rounded = [key for key in wide if key not in intermediates and targets[key] is not None]
    widened = intermediates.union(rounded)
    merged = merge([{key: t.to(wide[key]) if key in widened else t for key, t in m.items()} for m in models],
                   options, weights=weights)
    for key in rounded:
        merged[key] = rounded_into(key, merged[key], targets[key])
    return merged


def _merged_factors(adapters: Sequence[Adapter], options: MergeOptions, weights, names=None, *,
                    dtype: Target = None, intermediate: bool = False) -> dict[str, torch.Tensor]:
    """The ``factors`` merge: AME (by default the soup) over ``A_i`` and ``(s_i/s) B_i``, and the full tensors,
    rounded once into ``dtype``; with ``intermediate``, the factors are left in float32/float64 (a ``ΔW`` is
    formed from them)."""
    check_equal_ranks(adapters, names)
    factor_keys = frozenset(path + suffix for path in adapters[0].pairs for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX))
    return _run_merge(_factor_dicts(adapters, adapters[0]), options, weights, dtype,
                      intermediates=factor_keys if intermediate else frozenset())


def _merged_full(adapters: Sequence[Adapter], options: MergeOptions, weights, dtype: Target = None) -> dict[str, torch.Tensor]:
    return _run_merge([a.full for a in adapters], options, weights, dtype) if adapters[0].full else {}


def _ame_over_products(adapters: Sequence[Adapter], options: MergeOptions, weights, dtype: Target = None):
    """AME over the dense updates ``ΔW_i = s_i B_i A_i`` (float32/float64 intermediates) and the full
    tensors (rounded once into ``dtype``): a dense ``ΔW`` per module, and the full tensors."""
    merged = _run_merge([dense_deltas(a.pairs, a.full) for a in adapters], options, weights, dtype,
                        intermediates=frozenset(adapters[0].pairs))
    return {path: merged[path] for path in adapters[0].pairs}, {key: merged[key] for key in adapters[0].full}


def merged_deltas(adapters: Sequence[Adapter], *, mode: str = "products", options: MergeOptions | None = None,
                  weights: Sequence[float] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The merged update ``ΔW`` of every module as a dense (d_out, d_in) matrix, and the full tensors.

    ``factors``: ``s·B·A`` of the merged factors; ``products``: the soup
    ``B_cat A_cat`` (formed once per module), or AME over the dense ``ΔW_i``.
    What :func:`merge_into_base` adds to the base weights.
    """
    deltas, full, _ = measured_deltas(adapters, mode=mode, options=options, weights=weights, measure=False)
    return deltas, full


def measured_deltas(adapters: Sequence[Adapter], *, mode: str, options: MergeOptions | None,
                    weights: Sequence[float] | None, measure: bool = True, full_dtype: Target = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float | None]]:
    """:func:`merged_deltas` and, with ``measure``, the factor/product error per module (else ``{}``):
    the soup of products measures each module on the stack it forms ``ΔW`` from (one stack a module).
    Each ``ΔW`` is formed in float32/float64 from unrounded merged factors or updates; the full
    tensors are rounded once into ``full_dtype`` (one for all or one per key; default: their own)."""
    makers, full, errors = delta_makers(adapters, mode=mode, options=options, weights=weights, measure=measure,
                                        full_dtype=full_dtype)
    return {path: make() for path, make in makers.items()}, full, errors


def dense_update_refusal(mode: str, options: MergeOptions | None) -> str | None:
    """Why this merge holds more than about the adapters (``low_memory`` refused), or ``None``:
    AME over products merges every adapter's dense ``ΔW_i`` of every module at once."""
    if mode == "products" and not reduces_to_soup(resolved_options(options)):
        return ("AME over products (an optimizer other than the soup) merges the dense update s·B·A of "
                "every adapter and module at once")
    return None


def delta_makers(adapters: Sequence[Adapter], *, mode: str, options: MergeOptions | None,
                 weights: Sequence[float] | None, measure: bool = True, full_dtype: Target = None,
                 ) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, torch.Tensor], dict[str, float | None]]:
    """:func:`measured_deltas` with each module's ``ΔW`` formed only when its maker is called
    (``{path: make}``), so that a merge into the base holds one dense ``ΔW`` at a time: the soup
    of products forms ``B_cat A_cat`` from the module's stack (the one its error is measured on,
    built up front), ``factors`` forms ``s·B·A`` from the
    merged factors (merged up front, float32/float64). AME over products (:func:`dense_update_refusal`)
    merges every dense ``ΔW_i`` at once; its makers hand out the merged ``ΔW``."""
    options = resolved_options(options)
    check_lora_options(mode, None)
    if mode == "products" and reduces_to_soup(options):
        omega = normalised_weights(weights, len(adapters))
        makers, errors = {}, {}
        for path in adapters[0].pairs:
            pairs = [a.pairs[path] for a in adapters]
            stack = stacked(pairs, omega)  # (the stacks together: about the adapters' size)
            makers[path] = functools.partial(_soup_of_products, stack)
            if measure:
                errors[path] = factor_product_error(pairs, omega, stack=stack)
        return makers, _merged_full(adapters, options, weights, full_dtype), errors
    errors = factor_product_errors(adapters, normalised_weights(weights, len(adapters))) if measure else {}
    if mode == "factors":
        merged = _merged_factors(adapters, options, weights, dtype=full_dtype, intermediate=True)
        makers = {path: functools.partial(_product, pair.scale, merged[path + LORA_B_SUFFIX],
                                          merged[path + LORA_A_SUFFIX])
                  for path, pair in adapters[0].pairs.items()}
        return makers, {key: merged[key] for key in adapters[0].full}, errors
    deltas, full = _ame_over_products(adapters, options, weights, full_dtype)
    return {path: functools.partial(deltas.__getitem__, path) for path in deltas}, full, errors


def _soup_of_products(stack: Stack) -> torch.Tensor:
    """One module's exact soup of products ``B_cat A_cat`` from its :class:`~fedsoup.lora.measure.Stack`."""
    return stack.scaled_B() @ stack.A


def _product(scale: float, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``s·B·A`` of merged factors, in float64."""
    return scale * (b.double() @ a.double())


def merge_adapters(adapters: Sequence[Adapter], *, mode: str = "products", rank: int | None = None,
                   options: MergeOptions | None = None, weights: Sequence[float] | None = None,
                   names: Sequence[str] | None = None, dtype: torch.dtype | str | None = None) -> AdapterMerge:
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
        dtype: the written tensors' dtype (a ``torch.dtype`` or a name such as ``"bf16"``;
            default: each tensor's in the first adapter),
            each rounded into it once from its float32/float64 result (or, for the soup of
            bf16/fp16 tensors, from their exact mean), never through the adapters' dtype.
            A value it cannot hold is refused (:class:`~fedsoup.errors.OptionError`,
            ``option="dtype"``).

    Returns:
        :class:`AdapterMerge` with PEFT's key names and an ``adapter_config.json`` dict
        whose ``r``/``rank_pattern`` match the tensors and whose ``lora_alpha``,
        ``alpha_pattern`` and ``use_rslora`` are the first adapter's.
    """
    options, dtype = resolved_options(options), output_dtype(dtype)
    check_lora_options(mode, rank)
    if mode == "factors" and rank is not None:
        raise OptionError("lora_rank", rank, "option 'lora_rank' applies to the 'products' mode only "
                          "(the 'factors' mode keeps the adapters' rank)")
    check_adapters(adapters, names)
    omega = normalised_weights(weights, len(adapters))
    template = adapters[0]
    soup_of_products = mode == "products" and reduces_to_soup(options)
    # The soup of products measures each module on the stack it merges (one stack a module).
    errors = {} if soup_of_products else factor_product_errors(adapters, omega)
    if mode == "factors":
        merged = _merged_factors(adapters, options, weights, names, dtype=dtype)
        ranks = {path: pair.rank for path, pair in template.pairs.items()}
        config = output_adapter_config(template.settings, {module_name(p): r for p, r in ranks.items()})
        state_dict = {key: merged[key] for key in _adapter_keys(template)}
        return AdapterMerge(state_dict, config, LoraReport("factors", "factors", None, errors, {}, ranks, config))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    energies: dict[str, float] = {}
    if soup_of_products:
        full = _merged_full(adapters, options, weights, dtype)
        for path in template.pairs:
            pairs = [a.pairs[path] for a in adapters]
            stack = stacked(pairs, omega)
            errors[path] = factor_product_error(pairs, omega, stack=stack)
            b_cat, a_cat = stack.scaled_B(), stack.A
            if rank is None:
                factors[path] = (b_cat, a_cat)
                continue
            u, s, vh = factored_svd(b_cat, a_cat)
            kept = min(rank, s.numel())
            factors[path] = balanced_factors(u, s, vh, kept)
            energies[path] = captured_energy(s, kept)
        how = "cat" if rank is None else "svd"
    else:
        deltas, full = _ame_over_products(adapters, options, weights, dtype)
        for path, delta in deltas.items():
            target = rank if rank is not None else sum(a.pairs[path].rank for a in adapters)
            kept = min(target, min(delta.shape))
            u, s, vh = randomized_svd(delta, kept, seed=options.seed)
            factors[path] = balanced_factors(u, s, vh, kept)
            energies[path] = captured_energy(s, kept, total=float(delta.double().square().sum()))
        how = "svd"
    state_dict, config, ranks = _as_output(adapters, factors, full, dtype)
    return AdapterMerge(state_dict, config, LoraReport("products", how, rank, errors, energies, ranks, config))


def _adapter_keys(adapter: Adapter) -> list[str]:
    return list(tensors_of(adapter))


def merge_adapter_state_dicts(models: Sequence[Mapping[str, torch.Tensor]], options: MergeOptions,
                              adapter_config: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, *,
                              weights: Sequence[float] | None = None,
                              dtype: torch.dtype | None = None) -> AdapterMerge:
    """What ``fedsoup.merge(models, lora=..., adapter_config=..., dtype=...)`` does: ``models`` are
    adapter state dicts under PEFT's saved key names, ``adapter_config`` their ``adapter_config.json``
    (one for all, as a server that fixed the adapter has it, or one per model), ``dtype``
    :func:`merge_adapters`'."""
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
    return merge_adapters(adapters, mode=options.lora, rank=options.lora_rank, options=options, weights=weights,
                          dtype=dtype)
