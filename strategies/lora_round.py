"""The round of a LoRA run (issue 27): ``train_round`` in factor or product space, and its figures.

With ``adapter_config`` the replies are PEFT adapters: the ``factors`` mode merges ``A`` and
``B`` as tensors (:func:`strategies.rounds.train_round` as is); the ``products`` mode merges
the updates ``s·B·A`` (:mod:`strategies.products`). Either way the round reports the
factor/product error of the replies merged (docs/strategy.md, "LoRA adapters").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.serverapp.exception import AggregationError

from strategies.adapters import GlobalAdapter, factor_product_error, reply_pairs
from strategies.client_soup import ClientSoup, round_seed
from strategies.products import GlobalProducts, ProductSoup, ProductStew
from strategies.replies import UsableReply
from strategies.rounds import (
    FALLBACK_SOUP,
    METRIC_LORA_ERROR_MAX,
    METRIC_LORA_ERROR_MEAN,
    RoundOutcome,
    train_round,
)
from strategies.server_stew import ServerStew

__all__ = ["global_adapter", "adapter_round"]


def global_adapter(lora, current: Mapping[str, torch.Tensor] | None) -> GlobalAdapter | None:
    """The global adapter's structure (LoRA runs with a known global model), else ``None``."""
    if lora is None or current is None:
        if lora is not None and lora.mode == "products":
            raise AggregationError("The 'products' LoRA mode needs the global adapter x_{t-1}: call "
                                   "configure_train before aggregate_train, or set current_arrays")
        return None
    return GlobalAdapter.of(current, lora)


def adapter_round(
    client_soup: ClientSoup,
    server_stew: ServerStew,
    lora,
    adapter: GlobalAdapter | None,
    usable: list[UsableReply],
    server_round: int,
    current: Mapping[str, torch.Tensor] | None,
) -> tuple[RoundOutcome, dict[str, float]]:
    """The round (:func:`strategies.rounds.train_round`), in product space for the ``products`` mode,
    and its LoRA figures: the factor/product error and, for products, the SVD's energy."""
    if adapter is None:
        return train_round(client_soup, server_stew, usable, server_round, current), {}
    seed = round_seed(client_soup.seed, server_round)
    figures: list = []
    soup, stew = client_soup, server_stew
    if lora.mode == "products":
        shared = GlobalProducts(adapter)  # ΔW_{t−1}, formed once for the soup and the stew
        soup = ProductSoup(adapter, seed, shared, client_soup=client_soup, lora=lora, truncate=server_stew.is_identity)
        stew = ProductStew(adapter, seed, shared, stew=server_stew)
        figures = [soup, stew]
    outcome = train_round(soup, stew, usable, server_round, current)
    metrics: dict[str, float] = {}
    if outcome.model is None:
        return outcome, metrics
    for part in figures:
        metrics.update(part.figures.metrics())
    weights = client_soup.weights(outcome.used)
    total = sum(weights)
    # The factors mode's plain soup through the identity stew is the soup of the factors itself.
    plain = client_soup.is_plain or outcome.fallback == FALLBACK_SOUP
    soup_of_factors = outcome.model if lora.mode == "factors" and plain and server_stew.is_identity else None
    if isinstance(soup, ProductSoup) and soup.errors is not None:  # measured on the soup's own stacks
        errors = None if None in soup.errors.values() else soup.errors
    else:
        errors = factor_product_error([reply_pairs(r.arrays, adapter) for r in outcome.used],
                                      [w / total for w in weights], seed, soup_of_factors)
    if errors:
        values = list(errors.values())
        metrics[METRIC_LORA_ERROR_MAX] = max(values)
        metrics[METRIC_LORA_ERROR_MEAN] = sum(values) / len(values)
    return outcome, metrics
