"""Uncertainty measures on probability tensors (paper Eq. 5-8), shared by every task head.

All functions take probabilities (already softmaxed) with the classes along `dim`, so one
implementation serves image-level (N×K) and pixel-level (N×K×H×W) outputs, and they run on whatever
device the tensor lives on (no copy to the host before the pool writer needs the numbers).
"""

from __future__ import annotations

import torch

MEASURES = ("entropy", "bvsb", "least_confidence")


def entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy, natural log (Eq. 5); p·log p is taken as 0 at p = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def bvsb(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Best-versus-second-best margin ratio p2/p1 (Eq. 8): 1 = undecided, 0 = certain."""
    if probs.shape[dim] < 2:
        return torch.zeros_like(probs.select(dim, 0))
    top = probs.topk(2, dim=dim).values
    first = top.select(dim, 0)
    second = top.select(dim, 1)
    return second / first.clamp_min(torch.finfo(probs.dtype).tiny)


def least_confidence(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """1 − p(best): the simplest uncertainty, 0 for a certain prediction."""
    return 1.0 - probs.amax(dim=dim)


def bald(samples: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mutual information between prediction and model (BALD) from S stochastic samples.

    `samples` stacks S probability tensors along a new leading axis (ensemble members or MC-dropout
    passes); `dim` is the class axis of one sample. Returns H(mean p) − mean H(p), clamped at 0
    against rounding.
    """
    mean = samples.mean(dim=0)
    expected = entropy(samples, dim=dim + 1).mean(dim=0)
    return (entropy(mean, dim=dim) - expected).clamp_min(0.0)


def all_measures(probs: torch.Tensor, dim: int = 1) -> dict[str, torch.Tensor]:
    """The three pool columns for one probability tensor."""
    return {
        "entropy": entropy(probs, dim),
        "bvsb": bvsb(probs, dim),
        "least_confidence": least_confidence(probs, dim),
    }
