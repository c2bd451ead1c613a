"""Flower strategies built on ``fedsoup``: ``FedSoup`` = ClientSoup + ServerStew.

Module map: ``fedsoup_strategy`` (the Flower Strategy API), ``client_soup`` (the
per-round ``fedsoup.merge``), ``server_stew`` (the server optimizer kept across
rounds), ``rounds`` (one round with its fallbacks), ``threads`` (the aggregation's
thread count), ``replies`` (reply checking, visiting order), ``arrays`` (a reply's arrays, checked
and read zero-copy),
``resume`` (continuing a run in Flower's loop), ``adapters``/``products``/``lora_round``
(LoRA adapter rounds),
``state`` (state dict and checkpoints), ``inprocess`` (a Grid that runs ClientApps
in this process, for tests, notebooks and quick comparisons).
"""

from strategies.client_soup import ClientSoup
from strategies.fedsoup_strategy import FedSoup
from strategies.rounds import (
    METRIC_AME_SOUP_DISTANCE,
    METRIC_CLIENTS_LEFT_OUT,
    METRIC_CLIENTS_USED,
    METRIC_FALLBACK,
    METRIC_STEW_GRAD_NORM,
)
from strategies.server_stew import ServerStew

__all__ = [
    "FedSoup",
    "ClientSoup",
    "ServerStew",
    "METRIC_CLIENTS_USED",
    "METRIC_CLIENTS_LEFT_OUT",
    "METRIC_STEW_GRAD_NORM",
    "METRIC_AME_SOUP_DISTANCE",
    "METRIC_FALLBACK",
]
