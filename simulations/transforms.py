"""The few image transforms the simulations need (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch

# Per-channel statistics of the CIFAR-10 training set.
CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Model input from stored features: uint8 HWC images -> normalised float NCHW; floats pass through."""
    if x.dtype == np.uint8 and x.ndim == 4:
        images = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
        return (images - CIFAR10_MEAN) / CIFAR10_STD
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on an NCHW batch: reflect-pad, random crop back, random h-flip."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    cropped = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(3)
    return cropped
