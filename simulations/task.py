"""Local training and evaluation, shared by the ClientApp, the ServerApp and the paper scripts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from simulations.data import ArrayDataset
from simulations.transforms import random_crop_flip, to_tensor


def train(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    augment: bool | None = None,
    seed: int = 0,
) -> float:
    """Train ``model`` in place on ``data``; return the mean loss of the last epoch.

    ``seed`` fixes batch order and augmentation, so a client's update is a pure
    function of (global model, shard, seed). ``augment`` defaults to crop+flip for
    images and nothing for feature vectors.
    """
    if len(data) == 0:
        return float("nan")
    x, y = to_tensor(data.x), torch.from_numpy(data.y)
    augment = x.ndim == 4 if augment is None else augment
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps,
                                weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown client optimizer '{optimizer}'")
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            xb = random_crop_flip(x[idx], gen) if augment else x[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        last = total / seen
    return last


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data``; (nan, nan) when empty."""
    if len(data) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        xb = to_tensor(data.x[start : start + batch_size])
        yb = torch.from_numpy(data.y[start : start + batch_size])
        logits = model(xb)
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(data), correct / len(data)


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from integers (run seed, round, partition...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)
