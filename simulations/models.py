"""Small models that train in seconds on 2 CPU cores."""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """64 -> 64 -> 10 multilayer perceptron for scikit-learn's 8x8 digits."""

    def __init__(self, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CifarCNN(nn.Module):
    """Three conv blocks and a linear head for 32x32 RGB (~120k parameters).

    No BatchNorm on purpose: its running statistics are not weights, and averaging
    them across non-IID clients is a separate problem from the one studied here.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(dataset: str, seed: int | None = None) -> nn.Module:
    """A fresh model for ``dataset``; ``seed`` fixes its initialisation."""
    if seed is not None:
        torch.manual_seed(seed)
    if dataset == "digits":
        return DigitsMLP()
    if dataset == "cifar10":
        return CifarCNN()
    raise ValueError(f"no model for dataset '{dataset}'")
