"""Reply checking for FedSoup, and the zero-copy reading of Flower ``Array`` bytes.

Every reply a round receives is either *usable* (a :class:`UsableReply`: its weight,
its ``order_by`` score, its tie-break value and, for training, its arrays as tensors)
or *left out* with one WARNING naming the node and the reason (docs/design.md §3,
"Robustness"). Nothing here raises on a client's bad reply.

The visiting order of usable replies is: by the tie-break value the client reports
(``tie_break_key``, e.g. ``partition-id``), then by node id. ``fedsoup.merge`` then
sorts by the ``order_by`` scores with a stable sort, so ties in ``order_by`` keep this
order. Replies without a node id (Flower's ``Mock(spec=Message)`` replies in unit
tests) keep their given position among equals.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SType

from fedsoup.errors import MergeInputError
from fedsoup.inputs import find_non_finite
from fedsoup.io.npy import npy_view, read_npy_header
from fedsoup.structure import check_structure

# Enough bytes for any header numpy writes for a plain array (it pads to 64 bytes).
_HEADER_PEEK = 4096

__all__ = [
    "UsableReply",
    "ReplyChecker",
    "log_received",
    "read_arrays",
    "to_tensor_dict",
    "to_array_record",
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
                    arrays = read_arrays(_only_array_record(msg.content), reference, reference_name)
            except _LeftOut as reason:
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
        if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            if isinstance(value, str) or math.isfinite(value):
                return value
    return None


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
    value = float(value)
    if not math.isfinite(value):
        raise _LeftOut(f"{what} '{key}' is {value}")
    return value


def _key_diff(keys: Iterable[str], expected: Iterable[str], what: str) -> str:
    keys, expected = set(keys), set(expected)
    parts = []
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing:
        parts.append(f"missing {what} {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        parts.append(f"unexpected {what} {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    return ", ".join(parts)


# ----------------------------------------------------------------------
# Zero-copy Array reading: what a reply's arrays *are*, not what their metadata says
# ----------------------------------------------------------------------


def read_arrays(
    record: ArrayRecord, reference: Mapping[str, Any] | None, reference_name: str = "the global model"
) -> dict[str, torch.Tensor]:
    """A reply's arrays as tensors viewing the message bytes, each checked against ``reference``.

    1. Structure, on the metadata, before any data is read: the keys and shapes of
       ``reference`` (``fedsoup.structure``, the check ``fedsoup.merge`` uses) and the
       same dtype *kind* (float, int, unsigned, bool, complex) per array.
    2. Each array's bytes: its ``.npy`` header must equal its metadata (dtype, shape,
       C or Fortran order aside) and the byte length must be exactly header + data.
    3. Values: floating arrays must be finite *in the reference's dtype* (a float64
       1e300 sent for a float32 array is not).

    ``reference`` is the global model (or, without one, the structure most replies have);
    no reply is ever judged against another reply.
    """
    if reference is not None:
        try:
            check_structure(reference, dict(record.items()), reference_name=reference_name)
        except MergeInputError as error:
            raise _LeftOut(f"array {error.key!r} {error.reason}") from None
        for key, array in record.items():
            got, expected = _kind(array.dtype), _kind(reference[key].dtype)
            if got != expected:
                raise _LeftOut(
                    f"array {key!r} is {_KIND_NAMES.get(got, got)} ({array.dtype}), "
                    f"but {reference_name} has {_KIND_NAMES.get(expected, expected)} ({_dtype_name(reference[key].dtype)})"
                )
    tensors = {}
    for key, array in record.items():
        tensors[key] = _to_tensor(_checked_view(key, array))
        if reference is not None and tensors[key].is_floating_point():
            target = _torch_dtype(reference[key].dtype)
            value = tensors[key] if tensors[key].dtype == target else tensors[key].to(target)
            if find_non_finite({key: value}) is not None:
                where = "" if value is tensors[key] else f" in {_dtype_name(target)}"
                raise _LeftOut(f"array {key!r} contains NaN or Inf{where}")
    return tensors


def _checked_view(key: str, array: Array) -> np.ndarray:
    """A read-only view of ``array``'s bytes after checking that its header agrees with its metadata."""
    if array.stype != SType.NUMPY:
        raise _LeftOut(f"array {key!r} has serialisation type {array.stype!r}, not {SType.NUMPY!r}")
    data = memoryview(array.data)
    head = io.BytesIO(bytes(data[:_HEADER_PEEK]))
    try:
        shape, fortran_order, dtype = read_npy_header(head)
        declared = np.dtype(array.dtype)
    except Exception as error:  # noqa: BLE001 - any decoding failure means a bad reply
        raise _LeftOut(f"array {key!r} cannot be read ({error})") from None
    if dtype != declared:
        raise _LeftOut(f"array {key!r} holds {dtype.name} data, but its metadata says {declared.name}")
    if shape != tuple(int(n) for n in array.shape):
        raise _LeftOut(f"array {key!r} holds shape {shape}, but its metadata says {tuple(array.shape)}")
    expected_bytes = head.tell() + dtype.itemsize * math.prod(shape)
    if data.nbytes != expected_bytes:
        raise _LeftOut(f"array {key!r} cannot be read (it has {data.nbytes} bytes, its header needs {expected_bytes})")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=head.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


_KIND_NAMES = {"f": "floating", "i": "signed integer", "u": "unsigned integer", "b": "bool", "c": "complex"}


def _kind(dtype: Any) -> str:
    """NumPy's dtype kind letter for a torch or NumPy dtype (or dtype string); ``"?"`` if unknown."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return "f"
        if dtype.is_complex:
            return "c"
        if dtype == torch.bool:
            return "b"
        return "i" if dtype.is_signed else "u"
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "?"


def _torch_dtype(dtype: Any) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else np.dtype(dtype).name


def to_tensor_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord the strategy sends (no checks) as tensors viewing its bytes."""
    return {key: _to_tensor(_array_view(array)) for key, array in record.items()}


def to_array_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as a Flower ArrayRecord (on the CPU, dtypes kept)."""
    return ArrayRecord({key: Array(t.detach().cpu().numpy()) for key, t in tensors.items()})


def _array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a Flower ``Array``'s bytes (``Array.numpy()`` copies them).

    Flower serialises arrays with ``np.save`` (no pickle); anything ``fedsoup.io.npy``
    does not read (another serialisation type, an unknown header) goes through
    Flower's own ``Array.numpy()``.
    """
    if array.stype == SType.NUMPY:
        try:
            return npy_view(array.data)
        except ValueError:
            pass
    return array.numpy()


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # Read-only views of a message's bytes: torch warns that it cannot mark the
        # tensor read-only. Nothing here writes to its inputs (fedsoup.merge is pure).
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(array)
