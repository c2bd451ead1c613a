"""One training round of FedSoup, from checked replies to ``x_t``, with its fallbacks.

    w_t = ClientSoup(usable replies)          fallback 0: the configured merge
        = plain soup of the same replies       fallback 1: if the merge fails or diverges
    x_t = ServerStew(x_{t-1}, w_t)             (must be finite in every array's dtype)
    x_t = x_{t-1}                              fallback 2: if the soup fails too

A merge "fails" when it raises anything but an input error naming one ingredient (that
reply is left out and the merge redone, in :meth:`ClientSoup.merge`), or when the stew's
``x_t`` is not finite; the stew's state is then restored, so a failed attempt leaves no
trace. Each fallback logs one WARNING, and the round's MetricRecord carries
:data:`METRIC_FALLBACK` (MetricRecord holds no strings). Nothing a client sends raises
out of :func:`train_round` (docs/design.md §3, "Robustness").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import MetricRecord
from flwr.common import log
from flwr.serverapp.exception import AggregationError

from fedsoup.inputs import find_non_finite
from fedsoup.report import MergeReport
from strategies.client_soup import ClientSoup, SoupResult
from strategies.replies import UsableReply
from strategies.server_stew import ServerStew

__all__ = [
    "RoundOutcome",
    "train_round",
    "aggregate_metrics",
    "round_metrics",
    "METRIC_CLIENTS_USED",
    "METRIC_CLIENTS_LEFT_OUT",
    "METRIC_STEW_GRAD_NORM",
    "METRIC_AME_SOUP_DISTANCE",
    "METRIC_FALLBACK",
    "METRIC_MERGE_PREFIX",
    "METRIC_BYTES_SENT",
    "METRIC_BYTES_RECEIVED",
    "METRIC_LORA_ERROR_MAX",
    "METRIC_LORA_ERROR_MEAN",
    "FALLBACK_MERGE",
    "FALLBACK_SOUP",
    "FALLBACK_PREVIOUS",
]

#: Keys FedSoup adds to the aggregated train MetricRecord of every round.
METRIC_CLIENTS_USED = "fedsoup-clients-used"
METRIC_CLIENTS_LEFT_OUT = "fedsoup-clients-left-out"
#: ‖g_t‖ = ‖x_{t-1} − w_t‖ over the floating arrays: how far the round moved the model.
METRIC_STEW_GRAD_NORM = "fedsoup-stew-grad-norm"
#: ‖AME merge − plain soup‖ of the same replies: what AME changed (0 for the plain soup).
METRIC_AME_SOUP_DISTANCE = "fedsoup-ame-soup-distance"
#: Which model the round produced: 0 the configured merge, 1 the plain soup, 2 the previous model.
METRIC_FALLBACK = "fedsoup-fallback"
#: Prefix of the ClientSoup's MergeReport figures (``fedsoup.MergeReport.figures``): ``-steps``,
#: ``-lr-min``/``-lr-max`` (η_0 used), ``-soup-distance``/``-ball-radius`` (Prop. 2's ball).
METRIC_MERGE_PREFIX = "fedsoup-merge-"
FALLBACK_MERGE, FALLBACK_SOUP, FALLBACK_PREVIOUS = 0, 1, 2
#: The bytes of the ArrayRecords sent by this round's ``configure_train`` and received in its
#: train replies (Flower's ``ArrayRecord.count_bytes``), as FlowerTune's communication tracker.
METRIC_BYTES_SENT = "fedsoup-bytes-sent"
METRIC_BYTES_RECEIVED = "fedsoup-bytes-received"
#: LoRA rounds: the factor/product error ‖s·soup(B)·soup(A) − soup(s·B·A)‖/‖soup(s·B·A)‖ of
#: the replies merged, max and mean over the modules (absent when their ranks differ).
METRIC_LORA_ERROR_MAX = "fedsoup-lora-factor-product-error-max"
METRIC_LORA_ERROR_MEAN = "fedsoup-lora-factor-product-error-mean"


@dataclass
class RoundOutcome:
    model: dict[str, torch.Tensor] | None  # x_t; None: the global model stays as it was
    used: list[UsableReply]  # the replies merged, in visiting order
    fallback: int
    grad_norm: float | None = None
    ame_distance: float | None = None
    report: MergeReport | None = None  # what the ClientSoup's merge did (None: the plain soup fallback)


class _Diverged(Exception):
    """The stew's ``x_t`` holds NaN or Inf in some array."""


def train_round(
    client_soup: ClientSoup,
    server_stew: ServerStew,
    usable: list[UsableReply],
    server_round: int,
    current: Mapping[str, torch.Tensor] | None,
) -> RoundOutcome:
    """``x_t`` from the usable replies (docs/design.md §3)."""
    if current is None and not server_stew.is_identity:
        raise AggregationError(
            "The ServerStew needs the global model x_{t-1}: call configure_train before "
            "aggregate_train, or set current_arrays"
        )
    if not usable:
        return RoundOutcome(None, [], FALLBACK_PREVIOUS)
    attempts: list[tuple[str, Callable[[], SoupResult | None]]] = [
        ("the plain soup" if client_soup.is_plain else "the ClientSoup merge",
         lambda: client_soup.merge(usable, server_round, current)),
        ("the plain soup", lambda: client_soup.soup(usable, current)),
    ]
    if client_soup.is_plain:
        attempts = attempts[:1]
    for level, (name, attempt) in enumerate(attempts):
        try:
            soup = attempt()
            if soup is None:  # every reply was left out by the merge's own checks
                return RoundOutcome(None, [], FALLBACK_PREVIOUS)
            model, grad_norm = _guarded_stew_step(server_stew, current, soup.model)
        except Exception as error:  # noqa: BLE001 - a failed merge must not end the run
            following = "the plain soup of the same replies" if level + 1 < len(attempts) else "the previous model"
            log(WARNING, "aggregate_train: %s failed in round %d (%r); using %s", name, server_round, error, following)
            continue
        return RoundOutcome(model, soup.used, level, grad_norm, soup.ame_distance, soup.report)
    return RoundOutcome(None, list(usable), FALLBACK_PREVIOUS)


def _guarded_stew_step(
    stew: ServerStew, current: Mapping[str, torch.Tensor] | None, merged: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], float | None]:
    """``(x_t, ‖g_t‖)``; raises :class:`_Diverged` (stew state restored) unless ``x_t`` is finite."""
    if current is None:  # identity stew (checked above): x_t = w_t
        model, grad_norm = merged, None
    elif stew.is_identity:
        model, grad_norm = stew.step(current, merged)
    else:
        saved = copy.deepcopy(stew.state_dict())
        try:
            model, grad_norm = stew.step(current, merged)
            _raise_if_not_finite(model)
        except BaseException:
            stew.load_state_dict(saved)
            raise
        return model, grad_norm
    _raise_if_not_finite(model)
    return model, grad_norm


def _raise_if_not_finite(model: Mapping[str, torch.Tensor]) -> None:
    key = find_non_finite(model)
    if key is not None:
        raise _Diverged(f"array {key!r} of x_t is NaN or Inf")


def aggregate_metrics(aggregate: Callable, replies: list[UsableReply], weighted_by_key: str, stage: str) -> MetricRecord:
    """The metrics aggregation function on the usable replies whose metric keys agree with most
    replies'; a failure costs the metrics, not the round."""
    replies = [r for r in replies if r.metrics_counted]
    if not replies:
        return MetricRecord()
    try:
        metrics = aggregate([r.content for r in replies], weighted_by_key)
    except Exception as error:  # noqa: BLE001 - e.g. list metrics of different lengths
        log(WARNING, "%s: could not aggregate the client metrics (%r); reporting FedSoup's only", stage, error)
        return MetricRecord()
    return MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()


def round_metrics(
    outcome: RoundOutcome, received: int, server_round: int, aggregate: Callable, weighted_by_key: str
) -> MetricRecord:
    """The round's train MetricRecord: the clients' metrics (aggregated), then FedSoup's keys; logs the round."""
    if outcome.model is None:
        metrics = MetricRecord()
        if received and not outcome.used:
            log(WARNING, "aggregate_train: no usable reply in round %d; global model unchanged", server_round)
    else:
        metrics = aggregate_metrics(aggregate, outcome.used, weighted_by_key, "aggregate_train")
        if outcome.grad_norm is not None:
            metrics[METRIC_STEW_GRAD_NORM] = outcome.grad_norm
        metrics[METRIC_AME_SOUP_DISTANCE] = outcome.ame_distance
        if outcome.report is not None:
            for name, value in outcome.report.figures().items():
                metrics[METRIC_MERGE_PREFIX + name] = value
            log(INFO, "aggregate_train: ClientSoup merge: %s", outcome.report.describe())
        log(
            INFO,
            "aggregate_train: FedSoup merged %d replies (%d left out), ‖g_t‖ = %s",
            len(outcome.used),
            received - len(outcome.used),
            "n/a" if outcome.grad_norm is None else f"{outcome.grad_norm:.6g}",
        )
    used = 0 if outcome.model is None else len(outcome.used)
    metrics[METRIC_CLIENTS_USED] = used
    metrics[METRIC_CLIENTS_LEFT_OUT] = received - used
    metrics[METRIC_FALLBACK] = outcome.fallback
    return metrics
