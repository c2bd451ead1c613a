"""In-process stand-ins for Flower's network, to drive strategies in tests and notebooks.

``LocalGrid`` is enough for ``Strategy.configure_*``/``aggregate_*`` and ``start()``:
it lists node ids and answers each message by calling a Python function, with no
SuperLink, no Ray and no threads. ``train_reply``/``error_reply`` build replies the
way a ClientApp does (``Message(content, reply_to=instruction)``), so the reply's
``src_node_id`` is the instruction's destination.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid", "serverapp_identity", "train_reply", "error_reply", "train_content"]


@contextlib.contextmanager
def serverapp_identity(run_id: int = 1) -> Iterator[None]:
    """Act as a running ServerApp, so that strategies can create Messages.

    Flower stamps every new Message with the process's task identity, which the
    SuperLink sets before running a ServerApp; outside of it, set it here. The
    previous identity is restored on exit.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # pylint: disable=protected-access
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = saved


class LocalGrid:
    """A Grid whose nodes are Python functions ``client(message) -> reply``.

    Only what strategies call is implemented: ``get_node_ids`` and
    ``send_and_receive`` (replies come back in the order the messages were given).
    """

    def __init__(self, node_ids: Iterable[int], client: Callable[[Message], Message] | None = None) -> None:
        self.node_ids = list(node_ids)
        self.client = client
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        del timeout  # everything is local and synchronous
        messages = list(messages)
        self.sent.extend(messages)
        if self.client is None:
            raise RuntimeError("LocalGrid has no client function to answer messages")
        return [self.client(message) for message in messages]


def train_content(
    arrays: Mapping[str, np.ndarray] | ArrayRecord,
    num_examples: float | None = None,
    *,
    weighted_by_key: str = "num-examples",
    **metrics: float,
) -> RecordDict:
    """A ClientApp's train reply content: one ArrayRecord and one MetricRecord."""
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    metric_values = dict(metrics)
    if num_examples is not None:
        metric_values[weighted_by_key] = num_examples
    return RecordDict({"arrays": record, "metrics": MetricRecord(metric_values)})


def train_reply(instruction: Message, content: RecordDict) -> Message:
    """Reply to ``instruction`` with ``content``, as the node it was sent to."""
    return Message(content, reply_to=instruction)


def error_reply(instruction: Message, reason: str = "client failed", code: int = 0) -> Message:
    """An error reply from the node ``instruction`` was sent to."""
    return Message(Error(code=code, reason=reason), reply_to=instruction)
