"""Flower strategies built on ``fedsoup``: ``FedSoup`` (ClientSoup + ServerStew)."""

from strategies.fedsoup_strategy import (
    METRIC_AME_SOUP_DISTANCE,
    METRIC_CLIENTS_LEFT_OUT,
    METRIC_CLIENTS_USED,
    METRIC_STEW_GRAD_NORM,
    FedSoup,
)

__all__ = [
    "FedSoup",
    "METRIC_CLIENTS_USED",
    "METRIC_CLIENTS_LEFT_OUT",
    "METRIC_STEW_GRAD_NORM",
    "METRIC_AME_SOUP_DISTANCE",
]
