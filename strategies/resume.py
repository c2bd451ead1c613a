"""Resuming a FedSoup run inside Flower's own round loop (docs/strategy.md, "State, checkpoints and resuming").

``FedSoup.start`` calls Flower's ``Strategy.start`` with the checkpointed model and the
rounds left; these helpers give Flower's log lines, ``evaluate_fn`` and ``Result`` the
run's round numbers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import Result

__all__ = ["resumed_start", "array_shapes", "RoundLogLines", "shift_rounds", "shift_result"]


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


def resumed_start(
    flower_start: Callable[..., Result],
    args: tuple,
    kwargs: dict[str, Any],
    *,
    done: int,
    restored: ArrayRecord,
    checkpoint_dir: Any,
    set_round_offset: Callable[[int], None],
) -> Result:
    """Flower's ``Strategy.start`` (``flower_start``, bound) for the rounds after ``done``.

    ``num_rounds`` counts all rounds: Flower's loop runs ``num_rounds − done`` from the
    ``restored`` model, with ``set_round_offset(done)`` in force (the strategy adds it to
    the round numbers Flower passes), its ``[ROUND r/n]`` lines, ``evaluate_fn`` and
    ``Result`` renumbered. A run already complete runs nothing and returns the saved model.
    """
    call = inspect.signature(flower_start).bind(*args, **kwargs)
    call.apply_defaults()
    given = call.arguments
    if done >= given["num_rounds"]:
        log(INFO, "FedSoup: run already complete at round %d/%d; pass a larger num_rounds to continue, "
            "or a new checkpoint_dir (checkpoint: '%s')", done, given["num_rounds"], checkpoint_dir)
        return Result(arrays=restored)
    if array_shapes(given["initial_arrays"]) != array_shapes(restored):
        log(WARNING, "FedSoup: the checkpointed model has other arrays than initial_arrays; using the checkpoint")
    remaining = given["num_rounds"] - done
    log(INFO, "Resuming at round %d/%d from the FedSoup checkpoint in '%s'", done + 1, given["num_rounds"], checkpoint_dir)
    renumber = RoundLogLines(done, given["num_rounds"])
    given["initial_arrays"], given["num_rounds"] = restored, remaining
    if given["evaluate_fn"] is not None:
        given["evaluate_fn"] = shift_rounds(given["evaluate_fn"], done)
    set_round_offset(done)
    FLOWER_LOGGER.addFilter(renumber)
    try:
        result = flower_start(*call.args, **call.kwargs)
    finally:
        FLOWER_LOGGER.removeFilter(renumber)
        set_round_offset(0)
    return shift_result(result, done, restored)
