"""ClientSoup: the per-round merge of the client models (paper Appendix D, Algorithm 3).

``w_t = fedsoup.merge([x_i], weights=ω, pivot=x_{t-1}, order_by=scores, **soup)``
over the usable replies, in their visiting order. ``soup=None`` is the plain weighted
soup ``Σ ω_i x_i`` (FedAvg's aggregate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import log

import fedsoup
from fedsoup.errors import MergeInputError, OptionError, closest_name
from fedsoup.options import MergeOptions
from fedsoup.report import MergeReport
from strategies._shared import format_kwargs, model_distance
from strategies.replies import UsableReply

__all__ = ["ClientSoup", "SoupResult", "MergeOutsideBall", "PIVOTS", "round_seed", "capped_shares", "non_floating_rule"]

PIVOTS = ("global", "soup")

# `merge` arguments that FedSoup sets itself from the replies and its own options.
_RESERVED = {
    "models": "the client replies are the models",
    "weights": "weights come from `weighted_by_key`",
    "pivot": "use FedSoup(soup_pivot=...)",
    "order_by": "use FedSoup(order_by='<client metric key>')",
    "seed": "use FedSoup(seed=...); each round derives its own seed from it",
    # FedSoup takes soup["lora"] (and "lora_tolerance") for its LoRA round (strategies.adapters)
    # before the rest reaches here; the rank sent back is the server's adapter_config's.
    "lora": "FedSoup reads it with adapter_config=...: FedSoup(adapter_config=..., soup={'lora': ...})",
    "lora_rank": "the global adapter's rank is the server's adapter_config's r (and rank_pattern)",
}


class MergeOutsideBall(Exception):
    """The ClientSoup's ``w_t`` ended farther from the soup ``s`` than every reply (Proposition 2's
    ball, radius ``R``): a diverged merge, which the round replaces by the plain soup.

    Offline, ``fedsoup.merge`` only warns (the caller chose ``lr``). A server must not: with
    the harmonic schedule the first step is ``η_0 / V_1``, and a client that claims a tiny
    weight and is visited first makes ``V_1`` tiny while an adaptive step does not shrink
    with the gradient; measured before this rule, 4.7e4 from the soup, 2.3e4x ``R``
    (tests/test_strategy_attacks2.py).
    """

    def __init__(self, distance: float | None, radius: float | None) -> None:
        self.distance, self.radius = distance, radius
        super().__init__(f"merge diverged: ‖w_t − s‖ = {distance:.4g} is outside the ball of radius {radius:.4g} "
                         "(farther from the soup than any reply)")


@dataclass
class SoupResult:
    model: dict[str, torch.Tensor]  # w_t, on the CPU
    ame_distance: float  # ‖w_t − plain soup‖ (0 for the plain soup)
    used: list[UsableReply]  # the replies merged, in visiting order
    report: MergeReport | None = None  # what the merge did (path, lr used, steps, the ball); None: the fallback soup


class ClientSoup:
    """Merges the usable replies of a round with :func:`fedsoup.merge`.

    ``soup``: keyword arguments of ``fedsoup.merge`` (validated once, now, as a
    :class:`fedsoup.MergeOptions`; a round validates nothing; ``device`` runs the merge
    there); ``None`` is the plain weighted soup. ``pivot``: ``"soup"`` (default, as FedSoup's) starts AME at
    the weighted soup of the replies, ``"global"`` at the model sent this round
    (``x_{t-1}``); without a known ``x_{t-1}`` (``aggregate_train`` without
    ``configure_train``) the soup is used. ``seed``: round ``t`` shuffles with a seed derived from ``(seed, t)``.
    ``max_weight_share``: the largest share ``ω_i / Σ ω`` one reply may have (``None``: no cap).
    """

    def __init__(
        self,
        soup: Mapping[str, Any] | None = None,
        pivot: str = "soup",
        seed: int = 0,
        max_weight_share: float | None = None,
    ) -> None:
        if pivot not in PIVOTS:
            raise OptionError("soup_pivot", pivot, f"soup_pivot must be 'global' or 'soup', got {pivot!r}",
                              suggestion=closest_name(str(pivot), PIVOTS))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise OptionError("seed", seed, f"seed must be an int, got {seed!r}")
        if max_weight_share is not None and (
            isinstance(max_weight_share, bool)
            or not isinstance(max_weight_share, (int, float))
            or not 0.0 < max_weight_share <= 1.0
        ):
            raise OptionError(
                "max_weight_share", max_weight_share, f"max_weight_share must be a number in (0, 1], got {max_weight_share!r}"
            )
        self.max_weight_share = None if max_weight_share is None else float(max_weight_share)
        # The strategy's own defaults for the merge's per-call inputs (weights, order_by,
        # pivot, seed) are set here, from the replies and FedSoup's arguments (_RESERVED).
        self.options = MergeOptions() if soup is None else MergeOptions.from_dict(soup, reserved=_RESERVED)
        self.settings = None if soup is None else dict(soup)
        self.pivot = pivot
        self.seed = int(seed)

    def describe(self) -> str:
        if self.settings is None:
            return "plain weighted soup (FedAvg)"
        return f"fedsoup.merge({format_kwargs(self.settings)})"

    @property
    def is_plain(self) -> bool:
        """True for the plain weighted soup ``Σ ω_i x_i`` (``soup=None``): linear in the replies."""
        return self.settings is None

    def merge(
        self, replies: list[UsableReply], server_round: int, current: Mapping[str, torch.Tensor] | None
    ) -> SoupResult | None:
        """``w_t`` of the replies; ``None`` if no reply is left to merge.

        An input error the merge raises naming an ingredient leaves that reply out (one
        WARNING) and the merge is redone without it; any other error is a merge failure,
        not a bad reply, and is raised for the caller's fallback (:meth:`soup`). So is a
        merge that ends outside Proposition 2's ball (:class:`MergeOutsideBall`).
        Non-floating arrays follow :func:`non_floating_rule`.
        """
        seed = round_seed(self.seed, server_round)
        pivot = current if self.pivot == "global" and current is not None else None  # None: the options' "soup"

        def merge(replies: list[UsableReply]) -> SoupResult:
            models = [r.arrays for r in replies]
            weights = self.weights(replies)
            scores = [r.score for r in replies] if replies[0].score is not None else None
            merged, report = fedsoup.merge(models, self.options, weights=weights, order_by=scores, pivot=pivot,
                                           seed=seed, report=True)
            if report.outside_ball:
                raise MergeOutsideBall(report.distance, report.radius)
            merged = {k: t.cpu() for k, t in merged.items()}
            distance = self._soup_distance(report, merged, models, weights)
            return SoupResult(non_floating_rule(merged, models, current), distance, replies, report)

        return _leaving_out_culprits(replies, merge)

    def soup(self, replies: list[UsableReply], current: Mapping[str, torch.Tensor] | None) -> SoupResult | None:
        """The plain weighted soup of the replies: the fallback when :meth:`merge` fails (culprits left out alike)."""

        def soup(replies: list[UsableReply]) -> SoupResult:
            models = [r.arrays for r in replies]
            merged = {k: t.cpu() for k, t in fedsoup.soup(models, self.weights(replies)).items()}
            return SoupResult(non_floating_rule(merged, models, current), 0.0, replies)

        return _leaving_out_culprits(replies, soup)

    def weights(self, replies: list[UsableReply]) -> list[float]:
        """The replies' weights ``ω_i``, scaled so that their sum cannot overflow, then capped.

        Every weight is divided by the same power of two (``2^e`` with ``max ω < 2^e``):
        exact in binary floating point, so the normalised weights, and ``FedSoup()``'s
        equality with FedAvg, are unchanged, and ``Σ ω_i ≤ n`` for any finite weights up
        to the float maximum. With ``max_weight_share`` no reply gets a larger share
        (:func:`capped_shares`).
        """
        raw = [r.weight for r in replies]
        exponent = math.frexp(max(raw))[1]
        scaled = [math.ldexp(w, -exponent) for w in raw]
        return scaled if self.max_weight_share is None else capped_shares(scaled, self.max_weight_share)

    def _soup_distance(self, report: MergeReport, merged, models, weights) -> float:
        """``‖w_t − Σ ω_i x_i‖``: measured by the merge's ball guard; 0 for the soup itself;
        computed only where the merge did not measure it (``project=True``)."""
        if report.path == "soup":
            return 0.0
        if report.distance is not None:
            return report.distance
        return model_distance(merged, fedsoup.soup(models, weights))


def _leaving_out_culprits(
    replies: list[UsableReply], merge: Callable[[list[UsableReply]], SoupResult]
) -> SoupResult | None:
    """``merge(replies)``; an input error naming an ingredient leaves that reply out (one WARNING)
    and merges again. Any other error is raised: a merge failure, not a bad reply. ``None``
    when no reply is left."""
    replies = list(replies)
    while replies:
        try:
            return merge(replies)
        except MergeInputError as error:
            if error.ingredient is None or not 0 <= error.ingredient < len(replies):
                raise
            log(WARNING, "aggregate_train: left out reply from %s: %s", replies[error.ingredient].label, _where(error))
            replies = replies[: error.ingredient] + replies[error.ingredient + 1 :]
    return None


def _where(error: MergeInputError) -> str:
    return f"array {error.key!r} {error.reason}" if error.key is not None else error.reason


def capped_shares(weights: list[float], max_share: float) -> list[float]:
    """Normalised weights with no share above ``max_share``; the excess goes to the others pro rata.

    Water-filling: shares above the cap are set to it and the rest renormalised among
    the uncapped, until none exceeds it. If ``n · max_share < 1`` no assignment fits and
    every reply gets ``1/n``.
    """
    n = len(weights)
    if n * max_share <= 1.0:
        return [1.0 / n] * n
    total = math.fsum(weights)
    shares = [w / total for w in weights]
    capped: set[int] = set()
    while True:
        over = {i for i, share in enumerate(shares) if i not in capped and share > max_share}
        if not over:
            return shares
        capped |= over
        free = math.fsum(weights[i] for i in range(n) if i not in capped)
        left = 1.0 - max_share * len(capped)
        shares = [max_share if i in capped else left * weights[i] / free for i in range(n)]


def non_floating_rule(
    merged: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], current: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Non-floating arrays (counters such as ``num_batches_tracked``, masks, ids): no single client decides.

    With a global model they keep its value ``x_{t-1}``; without one (no
    ``configure_train``), the element-wise median of the replies (the lower one for an
    even count), which a minority of replies cannot move outside the others' range.
    docs/design.md §2.3 argues the rule.
    """
    out = dict(merged)
    for key, value in merged.items():
        if value.is_floating_point():
            continue
        if current is not None:
            out[key] = current[key].to(value.dtype)
        else:
            stacked = torch.stack([m[key].to(torch.int64) if m[key].dtype == torch.bool else m[key] for m in models])
            out[key] = stacked.median(dim=0).values.to(value.dtype)
    return out


def round_seed(seed: int, server_round: int) -> int:
    """A seed per (seed, round): rounds shuffle independently and reproducibly."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])
