"""Reply checking for FedSoup: envelope, one reply per node, weights, metrics, visiting order.

Every reply a round receives is either *usable* (a :class:`UsableReply`: its weight,
its ``order_by`` score, its tie-break value and, for training, its arrays as tensors)
or *left out* with one WARNING naming the node and the reason (docs/design.md §3,
"Robustness"); the arrays are read and checked by :mod:`strategies.arrays`. Nothing here
raises on a client's bad reply.

The visiting order of usable replies is: by the tie-break value the client reports
(``tie_break_key``, e.g. ``partition-id``), then by node id. ``fedsoup.merge`` then
sorts by the ``order_by`` scores with a stable sort, so ties in ``order_by`` keep this
order. Replies without a node id (Flower's ``Mock(spec=Message)`` replies in unit
tests) keep their given position among equals.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from strategies.arrays import ArrayProblem, read_arrays

__all__ = [
    "UsableReply",
    "ReplyChecker",
    "log_received",
]


@dataclass
class UsableReply:
    """A reply that takes part in the round."""

    label: str  # "node 6", or "reply 2" (its position) when it carries no node id
    content: RecordDict  # as received, but without the tie-break key in its MetricRecord
    weight: float
    score: float | None  # the ``order_by`` metric, if ordered
    arrays: dict[str, torch.Tensor] | None  # train replies only
    metrics_counted: bool = True  # False: its MetricRecord keys differ from most replies'


class _LeftOut(Exception):
    """A reply that cannot take part in the round; the message is the reason."""


def log_received(stage: str, replies: Iterable[Message]) -> list[Message]:
    """Log results and failures as Flower's strategies do; return the replies as a list.

    As Flower's ``FedAvg``, nothing is logged for a round without replies (e.g. every
    ``aggregate_evaluate`` of a run with ``fraction_evaluate=0``).
    """
    replies = list(replies)
    if not replies:
        return replies
    num_errors = sum(1 for msg in replies if msg.has_error())
    log(INFO, "%s: Received %s results and %s failures", stage, len(replies) - num_errors, num_errors)
    return replies


def _node_id(msg: Message) -> int | None:
    """The sender's node id; ``None`` for replies that have none (e.g. ``Mock(spec=Message)``)."""
    try:
        node_id = msg.metadata.src_node_id
    except AttributeError:
        return None
    return int(node_id) if isinstance(node_id, (int, np.integer)) and not isinstance(node_id, bool) else None


@dataclass(frozen=True)
class ReplyChecker:
    """Checks a round's replies against the strategy's settings (docs/design.md §3).

    ``weighted_by_key``: the weight metric (positive number); ``order_by``: an optional
    score metric (a number; replies without it are left out); ``tie_break_key``: an
    optional stable value (number or string) that clients report in their MetricRecord
    or a ConfigRecord; it orders replies before node ids and is never aggregated.
    """

    weighted_by_key: str
    order_by: str | None = None
    tie_break_key: str | None = None
    # The structure check of a train reply's arrays against the reference (metadata only),
    # called as ``structure(reference, arrays, reference_name=...)`` and raising
    # MergeInputError naming the array; ``None``: fedsoup.structure.check_structure (same
    # keys and shapes). FedSoup's LoRA rounds pass strategies.adapters.adapter_structure_check.
    structure: Callable[..., None] | None = None

    def check(
        self,
        stage: str,
        replies: list[Message],
        reference: Mapping[str, Any] | None = None,
        train: bool = True,
    ) -> list[UsableReply]:
        """The usable replies in visiting order; one WARNING per reply left out.

        Train replies need one ArrayRecord with the structure of ``reference`` (the
        global model: anything with ``.shape``/``.dtype`` per key; ``None``: the
        structure most replies have). All replies need one MetricRecord with a
        positive weight. Evaluate replies need the metric keys most replies have (where
        Flower's FedAvg raises on inconsistent replies, the offenders are left out); a
        train reply with other keys is merged (its model is judged against the global
        model alone) but its metrics are not aggregated (``metrics_counted``).
        """
        labelled = [(_sort_key(msg, position, self.tie_break_key), msg) for position, msg in enumerate(replies)]
        labelled.sort(key=lambda item: item[0])

        replies_per_node = Counter(node for node in map(_node_id, replies) if node is not None)
        candidates: list[tuple[str, Message]] = []
        for key, msg in labelled:
            label = key[-1]
            count = replies_per_node.get(_node_id(msg), 1)
            reason = _envelope_problem(msg, train) if count == 1 else _duplicate_problem(count)
            if reason is None:
                candidates.append((label, msg))
            else:
                log(WARNING, "%s: left out reply from %s: %s", stage, label, reason)

        metrics_of = {id(msg): self._metrics(msg) for _, msg in candidates}
        key_sets = Counter(frozenset(m.keys()) for m in metrics_of.values()).most_common(1)
        majority_keys = key_sets[0][0] if key_sets else frozenset()
        if train and reference is None:
            reference = _majority_structure([msg for _, msg in candidates])
            reference_name = "most replies"
        else:
            reference_name = "the global model"

        usable: list[UsableReply] = []
        for label, msg in candidates:
            metrics = metrics_of[id(msg)]
            keys_differ = frozenset(metrics.keys()) != majority_keys
            try:
                if keys_differ and not train:
                    raise _LeftOut(
                        "MetricRecord keys differ from the other replies: "
                        + _key_diff(metrics.keys(), majority_keys, "metric")
                    )
                weight = _number(metrics, self.weighted_by_key, "weight")
                if weight <= 0:
                    raise _LeftOut(f"weight '{self.weighted_by_key}' = {weight:g} is not positive")
                score = arrays = None
                if train:
                    score = _number(metrics, self.order_by, "order_by metric") if self.order_by else None
                    arrays = read_arrays(_only_array_record(msg.content), reference, reference_name, self.structure)
            except (_LeftOut, ArrayProblem) as reason:
                log(WARNING, "%s: left out reply from %s: %s", stage, label, reason)
                continue
            if keys_differ:  # train: the model is judged against the global model, never other replies
                log(
                    WARNING,
                    "%s: metrics of %s not aggregated (MetricRecord keys differ from most replies': %s); its model is used",
                    stage, label, _key_diff(metrics.keys(), majority_keys, "metric"),
                )
            content = self._without_tie_key(msg.content, metrics)
            usable.append(UsableReply(label, content, weight, score, arrays, metrics_counted=not keys_differ))
        return usable

    def _metrics(self, msg: Message) -> MetricRecord:
        """The reply's MetricRecord without the tie-break key (which is never a metric)."""
        metrics = next(iter(msg.content.metric_records.values()))
        if self.tie_break_key is not None and self.tie_break_key in metrics:
            metrics = MetricRecord({k: v for k, v in metrics.items() if k != self.tie_break_key})
        return metrics

    def _without_tie_key(self, content: RecordDict, metrics: MetricRecord) -> RecordDict:
        name = next(iter(content.metric_records))
        if content[name] is metrics:
            return content
        return RecordDict({**dict(content.items()), name: metrics})


def _sort_key(msg: Message, position: int, tie_break_key: str | None) -> tuple:
    """``(tie-break value, node id or position, label)``: the visiting order before ``order_by``."""
    node_id = _node_id(msg)
    label = f"node {node_id}" if node_id is not None else f"reply {position}"
    tie = _tie_value(msg, tie_break_key)
    # Numbers before strings before "not reported"; then node ids, or the given order.
    tie_key = (2, 0.0, "") if tie is None else (0, float(tie), "") if not isinstance(tie, str) else (1, 0.0, tie)
    return (tie_key, node_id is None, node_id if node_id is not None else position, label)


def _tie_value(msg: Message, key: str | None) -> float | str | None:
    if key is None or msg.has_error() or not msg.has_content():
        return None
    content = msg.content
    for record in (*content.config_records.values(), *content.metric_records.values()):
        value = record.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(_as_float(value)):
            return value
    return None


def _as_float(value: int | float) -> float:
    """``float(value)``, or NaN for an int too large for a float (MetricRecord holds any Python int)."""
    try:
        return float(value)
    except OverflowError:
        return math.nan


def _duplicate_problem(count: int) -> str:
    """One node, one reply: a node id seen more than once leaves all its replies out.

    The SuperLink sets ``src_node_id`` from the node's authenticated session, and each
    node gets one instruction per round, so a second reply is a replay or a bug; the
    server cannot tell which one is meant, and keeping any would let the node choose.
    """
    return f"its node sent {count} replies this round (one node, one reply: all are left out)"


def _envelope_problem(msg: Message, train: bool) -> str | None:
    """Why the reply cannot be used at all (error, no content, wrong record counts), or ``None``."""
    if msg.has_error():
        return f"error reply (code {msg.error.code}: {msg.error.reason})"
    if not msg.has_content():
        return "reply without content"
    if train and len(msg.content.array_records) != 1:
        return f"expected exactly one ArrayRecord, found {len(msg.content.array_records)}"
    if len(msg.content.metric_records) != 1:
        return f"expected exactly one MetricRecord, found {len(msg.content.metric_records)}"
    return None


def _only_array_record(content: RecordDict) -> ArrayRecord:
    return next(iter(content.array_records.values()))


def _majority_structure(replies: list[Message]) -> dict[str, Array] | None:
    """The arrays (keys, shapes, dtypes) most replies have: the reference when no model was sent."""
    records = {}
    signatures = []
    for msg in replies:
        record = _only_array_record(msg.content)
        signature = tuple((k, tuple(a.shape), a.dtype) for k, a in record.items())
        records.setdefault(signature, record)
        signatures.append(signature)
    if not signatures:
        return None
    signature, _ = Counter(signatures).most_common(1)[0]
    return dict(records[signature].items())


def _number(metrics: MetricRecord, key: str, what: str) -> float:
    if key not in metrics:
        raise _LeftOut(f"no {what} '{key}' in its MetricRecord")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _LeftOut(f"{what} '{key}' is not a single number: {value!r}")
    number = _as_float(value)
    if not math.isfinite(number):
        raise _LeftOut(f"{what} '{key}' is {value if isinstance(value, float) else 'too large for a float'}")
    return number


def _key_diff(keys: Iterable[str], expected: Iterable[str], what: str) -> str:
    keys, expected = set(keys), set(expected)
    parts = []
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing:
        parts.append(f"missing {what} {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        parts.append(f"unexpected {what} {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    return ", ".join(parts)
