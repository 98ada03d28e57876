"""What a dense engine receives: embedding rows G[r] ⊗ F[r] as float32 features and float64 weights.

Kept apart from the engines so that choosing one imports no compiler (numba loads in about half a
second; small pools are served without it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DenseEmbedding(NamedTuple):
    """Embedding rows as the outer product G[r] ⊗ F[r]: float32 features (n, d), float64 weights (n, K).

    `reorder`: the caller hands the feature matrix and the weights over; the engine may permute their
    rows in place instead of copying them (the caller must not read either afterwards).
    `spare_bytes`: memory the engine may spend on optional speed-ups beyond its bookkeeping (None: half
    of what the system reports available).
    """

    features: np.ndarray
    weights: np.ndarray
    reorder: bool = False
    spare_bytes: int | None = None


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def as_weights(G: np.ndarray | None, n: int) -> np.ndarray:
    """Weights as the (n, K) float64 matrix the kernels expect; None means unweighted (CoreSet)."""
    if G is None:
        return np.ones((n, 1), dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    return np.ascontiguousarray(G.reshape(n, -1))
