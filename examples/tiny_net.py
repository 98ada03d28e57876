"""A tiny CNN for the demo and tests: a user architecture loaded with `--model tiny_net:tiny_cnn`."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv layers and a two-layer head; the 64-d input of the last Linear is the pool feature."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(32 * 16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    """Factory for `--model tiny_net:tiny_cnn` (the examples folder must be on PYTHONPATH)."""
    return TinyCNN(num_classes)
