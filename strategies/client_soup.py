"""ClientSoup: the per-round merge of the client models (paper Appendix D, Algorithm 3).

``w_t = fedsoup.merge([x_i], weights=ω, pivot=x_{t-1}, order_by=scores, **soup)``
over the usable replies, in their visiting order. ``soup=None`` is the plain weighted
soup ``Σ ω_i x_i`` (FedAvg's aggregate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import log

import fedsoup
from fedsoup.errors import MergeInputError, OptionError, closest_name
from fedsoup.options import MergeOptions
from strategies._shared import check_optimizer_builds, format_kwargs, model_distance
from strategies.replies import UsableReply

__all__ = ["ClientSoup", "SoupResult", "PIVOTS", "round_seed"]

PIVOTS = ("global", "soup")

# `merge` arguments that FedSoup sets itself from the replies and its own options.
_RESERVED = {
    "models": "the client replies are the models",
    "weights": "weights come from `weighted_by_key`",
    "pivot": "use FedSoup(soup_pivot=...)",
    "order_by": "use FedSoup(order_by='<client metric key>')",
    "seed": "use FedSoup(seed=...); each round derives its own seed from it",
}


@dataclass
class SoupResult:
    model: dict[str, torch.Tensor]  # w_t, on the CPU
    ame_distance: float  # ‖w_t − plain soup‖ (0 for the plain soup)
    used: list[UsableReply]  # the replies merged, in visiting order


class ClientSoup:
    """Merges the usable replies of a round with :func:`fedsoup.merge`.

    ``soup``: keyword arguments of ``fedsoup.merge`` (validated now as a
    :class:`fedsoup.MergeOptions`; ``device`` runs the merge there); ``None`` is the
    plain weighted soup. ``pivot``: ``"soup"`` (default, as FedSoup's) starts AME at
    the weighted soup of the replies, ``"global"`` at the model sent this round
    (``x_{t-1}``); without a known ``x_{t-1}`` (``aggregate_train`` without
    ``configure_train``) the soup is used. ``seed``: round ``t`` shuffles with a seed derived from ``(seed, t)``.
    """

    def __init__(self, soup: Mapping[str, Any] | None = None, pivot: str = "soup", seed: int = 0) -> None:
        if pivot not in PIVOTS:
            raise OptionError("soup_pivot", pivot, f"soup_pivot must be 'global' or 'soup', got {pivot!r}",
                              suggestion=closest_name(str(pivot), PIVOTS))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise OptionError("seed", seed, f"seed must be an int, got {seed!r}")
        self.options = None if soup is None else MergeOptions.from_dict(soup, reserved=_RESERVED)
        if self.options is not None:
            lr = self.options.lr if isinstance(self.options.lr, float) else 1.0
            check_optimizer_builds(self.options.optimizer, lr, self.options.optimizer_kwargs, "soup")
        self.settings = None if soup is None else dict(soup)
        self.pivot = pivot
        self.seed = int(seed)

    def describe(self) -> str:
        if self.settings is None:
            return "plain weighted soup (FedAvg)"
        return f"fedsoup.merge({format_kwargs(self.settings)})"

    def merge(
        self, replies: list[UsableReply], server_round: int, current: Mapping[str, torch.Tensor] | None
    ) -> SoupResult | None:
        """``w_t`` of the replies; ``None`` if no reply can be merged.

        A reply holding NaN/Inf is left out with one WARNING and the merge is redone
        without it (the merge's own check finds non-finite inputs cheaply, on its result).
        """
        kwargs = self._merge_kwargs(server_round, current)
        replies = list(replies)
        while replies:
            models = [r.arrays for r in replies]
            weights = [r.weight for r in replies]
            scores = [r.score for r in replies] if replies[0].score is not None else None
            try:
                merged = fedsoup.merge(models, weights=weights, order_by=scores, **kwargs)
            except MergeInputError as error:
                if error.ingredient is None or error.key is None:
                    log(WARNING, "aggregate_train: ClientSoup failed (%s); global model unchanged", error)
                    return None
                log(
                    WARNING,
                    "aggregate_train: left out reply from %s: array '%s' contains NaN or Inf",
                    replies[error.ingredient].label,
                    error.key,
                )
                del replies[error.ingredient]
                continue
            merged = {k: t.cpu() for k, t in merged.items()}
            distance = 0.0 if self.options is None else model_distance(merged, fedsoup.soup(models, weights))
            return SoupResult(merged, distance, replies)
        return None

    def _merge_kwargs(self, server_round: int, current: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
        if self.options is None:
            return {}
        kwargs = self.options.to_kwargs()
        del kwargs["weights"], kwargs["order_by"]  # per round, from the replies
        kwargs["seed"] = round_seed(self.seed, server_round)
        kwargs["pivot"] = current if self.pivot == "global" and current is not None else "soup"
        return kwargs


def round_seed(seed: int, server_round: int) -> int:
    """A seed per (seed, round): rounds shuffle independently and reproducibly."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])
