"""Small models for the trainer and the benchmarks, built by name for any input shape."""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch
from torch import nn


def logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on flattened features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: Sequence[int], num_classes: int, hidden: int = 128) -> nn.Module:
    """One hidden layer of ReLU units."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def mlp_wide(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The :func:`mlp` with 6400 hidden units: 5.1e6 parameters on 28x28 inputs, a model whose
    dense all-reduce at 1 Gbit/s (about 0.3 s for 20 MB) dwarfs its step compute on one CPU rank
    (communication-bound: the regime of compression and gossip)."""
    return mlp(input_shape, num_classes, hidden=6400)


def cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Two 3x3 conv layers (16, 32 channels) with max-pooling, then a linear classifier.

    Works for images (C, H, W) of any size >= 4x4 (Fashion-MNIST 28x28, digits 8x8). No BatchNorm
    or Dropout, so per-example gradients (D-GraB) apply.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes))


def cnn_bn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The :func:`cnn` with BatchNorm after each conv (per-example gradients do not apply)."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn-bn needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes))


MODELS: Dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "logreg": logreg, "mlp": mlp, "cnn": cnn, "cnn-bn": cnn_bn, "mlp-wide": mlp_wide,
}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """Build model ``name`` with weights initialised from ``seed`` (identical on every rank)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"model {name} needs integer class labels (>= 2 classes), got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)
