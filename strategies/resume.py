"""Resuming a FedSoup run inside Flower's own round loop (docs/strategy.md, "State, checkpoints and resuming").

``FedSoup.start`` calls Flower's ``Strategy.start`` with the checkpointed model and the
rounds left; these helpers give Flower's log lines, ``evaluate_fn`` and ``Result`` the
run's round numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Result

__all__ = ["array_shapes", "RoundLogLines", "shift_rounds", "shift_result"]


def array_shapes(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(a.shape) for k, a in arrays.items()}


class RoundLogLines(logging.Filter):
    """Shows Flower's ``[ROUND r/n]`` lines of a resumed run with the run's numbers, ``[ROUND done+r/T]``.

    Only rewrites that one message (matched by its format string); anything else, or
    another format in a later Flower, passes unchanged.
    """

    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done, self.total = done, total

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "[ROUND %s/%s]" and isinstance(record.args, tuple) and len(record.args) == 2:
            record.args = (record.args[0] + self.done, self.total)
        return True


def shift_rounds(evaluate_fn: Callable[[int, ArrayRecord], Any], offset: int) -> Callable[[int, ArrayRecord], Any]:
    def evaluate(server_round: int, arrays: ArrayRecord) -> Any:
        return evaluate_fn(server_round + offset, arrays)

    return evaluate


def shift_result(result: Result, offset: int, restored: ArrayRecord) -> Result:
    """Flower's Result of the remaining rounds, keyed by the run's round numbers."""
    for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
        setattr(result, name, {r + offset: m for r, m in getattr(result, name).items()})
    if not result.arrays:  # no round produced a model: the restored one is the result
        result.arrays = restored
    return result
