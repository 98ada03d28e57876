"""The small CNN whose 512-d penultimate layer gives the real-feature benchmark pool (`real_pool.py`).

Loaded by `uwe extract classification --model real_net:fashion_cnn` with benchmarks/ on PYTHONPATH.
"""

from __future__ import annotations

import torch
from torch import nn


class FashionCNN(nn.Module):
    """Three conv blocks and a two-layer head; the 512-d input of the last Linear is the pool feature."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fashion_cnn(num_classes: int = 10) -> FashionCNN:
    """Factory for `--model real_net:fashion_cnn`."""
    return FashionCNN(num_classes)
