"""Uncertainty weighting: min–max normalisation and the u^tau weights of uwe(x) = u(x)^tau · f(x).

The weighted embedding is never stored: selection kernels read the float32 features and multiply by
the float64 weight on the fly, so distances equal a float64 reference computed on w·f exactly.
"""

from __future__ import annotations

import numpy as np

from uwe_cli.errors import SelectionError

NORMALIZE_CHOICES = ("minmax", "none")


def normalize_uncertainty(u: np.ndarray, in_play: np.ndarray | None, method: str) -> np.ndarray:
    """Min–max normalise u over the rows in play (labeled + candidates).

    All-equal uncertainty normalises to 1 everywhere, so UWE degrades to CoreSet instead of to zeros.
    Rows not in play are normalised with the same bounds (their values are not used).
    """
    u = np.asarray(u, dtype=np.float64)
    if method == "none":
        return u.copy()
    if method != "minmax":
        raise SelectionError(f"unknown --normalize '{method}' (choose from {', '.join(NORMALIZE_CHOICES)})")
    ref = u if in_play is None else u[in_play]
    if ref.size == 0:
        return np.ones_like(u)
    lo, hi = float(ref.min()), float(ref.max())
    if hi == lo:
        return np.ones_like(u)
    return np.clip((u - lo) / (hi - lo), 0.0, None)


def uwe_weights(u_norm: np.ndarray, tau: float) -> np.ndarray:
    """u^tau as float64; tau = 0 gives weight 1 for every row (CoreSet on features), even where u = 0."""
    if not np.isfinite(tau) or tau < 0:
        raise SelectionError(f"--tau must be a finite number >= 0, got {tau}")
    if tau == 0:
        return np.ones_like(u_norm, dtype=np.float64)
    return np.power(u_norm, tau, dtype=np.float64)
