"""A Flower ``Grid`` whose nodes are Python functions: strategies without a network.

``InProcessGrid(node_ids, client)`` implements Flower's ``Grid`` interface by calling
``client(message) -> reply`` for every message, in this process: no SuperLink, no
Ray, no threads. It is enough for ``Strategy.configure_*``/``aggregate_*`` and
``start()``; ``simulations.compare --backend inprocess`` runs the real ClientApp
through it, and the strategy tests and benchmarks use it.

Flower stamps every new ``Message`` with the identity of the running task (the
SuperLink sets it before it starts a ServerApp); :func:`serverapp_identity` sets it
for code that acts as a ServerApp outside of one. ``reply``/``error_reply``/
``train_content`` build replies the way a ClientApp does.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "serverapp_identity", "reply", "error_reply", "train_content"]

_IDENTITY = ("run_id", "node_id", "task_id")


def _identity_value(name: str) -> int | None:
    try:
        return getattr(TaskIdentity, name)
    except RuntimeError:  # not set in this process
        return None


@contextlib.contextmanager
def serverapp_identity(run_id: int = 1) -> Iterator[None]:
    """Act as a running ServerApp (so that strategies can create Messages); restored on exit."""
    saved = {name: _identity_value(name) for name in _IDENTITY}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """A Grid whose nodes are Python functions ``client(message) -> reply``.

    Replies come back in the order the messages were pushed. An exception in
    ``client`` propagates (a test sees it; a crashing "server" can be simulated).
    """

    def __init__(
        self, node_ids: Iterable[int], client: Callable[[Message], Message] | None = None, run_id: int = 1
    ) -> None:
        self.node_ids = [int(n) for n in node_ids]
        self.client = client
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        if self.client is None:
            raise RuntimeError("InProcessGrid has no client function to answer messages")
        ids = []
        for message in messages:
            message_id = str(next(self._ids))
            self._replies[message_id] = self.client(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        del timeout  # everything is local and synchronous
        return self.pull_messages(self.push_messages(messages))


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


def reply(instruction: Message, content: RecordDict) -> Message:
    """Reply to ``instruction`` with ``content``, as the node it was sent to."""
    return Message(content, reply_to=instruction)


def error_reply(instruction: Message, reason: str = "client failed", code: int = 0) -> Message:
    """An error reply from the node ``instruction`` was sent to."""
    return Message(Error(code=code, reason=reason), reply_to=instruction)
