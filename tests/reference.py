"""Brute-force float64 references for selection (plain numpy, no shared code with the engine)."""

from __future__ import annotations

import numpy as np


def dense_embeddings(features: np.ndarray, G: np.ndarray | None) -> np.ndarray:
    F = features.astype(np.float64)
    if G is None:
        return F
    G = np.asarray(G, dtype=np.float64).reshape(F.shape[0], -1)
    return (G[:, :, None] * F[:, None, :]).reshape(F.shape[0], -1)


def first_within_rounding(values: np.ndarray, width: int) -> int:
    """uwe's tie rule: the earliest index whose value is within 8·(width + 3)·2⁻⁵³ (relative) of the
    largest, the bound on how far float64 sums of `width` squares in any order lie apart."""
    top = values.max()
    if 0 < top < np.inf:
        return int(np.flatnonzero(values >= top * (1 - 8.0 * (width + 3) * 2.0**-53))[0])
    return int(np.argmax(values))


def kcg_reference(E: np.ndarray, candidates: np.ndarray, labeled: np.ndarray, budget: int):
    """Algorithm 1 on squared float64 distances; first pick = largest norm without labeled; ties (to
    within rounding) → first."""
    X = E[candidates]
    D = np.full(len(candidates), np.inf)
    for c in labeled:
        D = np.minimum(D, ((X - E[c]) ** 2).sum(axis=1))
    picks, dists = [], []
    taken = np.zeros(len(candidates), dtype=bool)
    for b in range(budget):
        if b == 0 and len(labeled) == 0:
            norms = (X**2).sum(axis=1)
            t = first_within_rounding(norms, E.shape[1])
            d = norms[t]
        else:
            masked = np.where(taken, -1.0, D)
            t = first_within_rounding(masked, E.shape[1])
            d = masked[t]
        picks.append(t)
        dists.append(np.sqrt(d))
        taken[t] = True
        D = np.minimum(D, ((X - X[t]) ** 2).sum(axis=1))
    return np.array(picks, dtype=np.int64), np.array(dists)


def kmeanspp_reference(E: np.ndarray, candidates: np.ndarray, labeled: np.ndarray, budget: int, seed: int):
    """K-Means++ seeding with the documented draw: cumsum of D², uniform × total, searchsorted right."""
    rng = np.random.default_rng(seed)
    X = E[candidates]
    D = np.full(len(candidates), np.inf)
    for c in labeled:
        D = np.minimum(D, ((X - E[c]) ** 2).sum(axis=1))
    picks = []
    for b in range(budget):
        if b == 0 and len(labeled) == 0:
            t = first_within_rounding((X**2).sum(axis=1), E.shape[1])
        else:
            mass = np.clip(D, 0, None)
            cum = np.cumsum(mass)
            if cum[-1] > 0:
                t = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)
            else:
                live = np.flatnonzero(D >= 0)
                t = int(live[rng.integers(live.size)])
        picks.append(t)
        D = np.minimum(D, ((X - X[t]) ** 2).sum(axis=1))
        D[t] = -1.0
        D[np.array(picks)] = -1.0
    return np.array(picks, dtype=np.int64)


def minmax(u: np.ndarray, in_play: np.ndarray) -> np.ndarray:
    lo, hi = u[in_play].min(), u[in_play].max()
    return np.ones_like(u) if hi == lo else np.clip((u - lo) / (hi - lo), 0, None)
