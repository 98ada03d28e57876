"""Uncertainty weighting: min–max normalisation and the u^tau weights of uwe(x) = u(x)^tau · f(x).

Shared by unit pools (one weight per unit) and detection pools (one weight per box, before the
class-wise aggregation). The weighted embedding is never stored: selection kernels read the float32
features and multiply by the float64 weight on the fly, so distances equal a float64 reference
computed on w·f exactly.
"""

from __future__ import annotations

import math

import numpy as np

from uwe_cli.errors import SelectionError

NORMALIZE_CHOICES = ("minmax", "none")
AGGREGATES = ("max", "mean")


def check_selection_options(tau: float, normalize: str, aggregate: str = "max") -> None:
    """The options every pool kind shares, refused before any work."""
    if not math.isfinite(tau) or tau < 0:
        raise SelectionError(f"--tau must be a finite number >= 0, got {tau}")
    if normalize not in NORMALIZE_CHOICES:
        raise SelectionError(
            f"unknown --normalize '{normalize}' (choose from {', '.join(NORMALIZE_CHOICES)})"
        )
    if aggregate not in AGGREGATES:
        raise SelectionError(f"unknown --aggregate '{aggregate}' (choose from {', '.join(AGGREGATES)})")


def minmax_bounds(values: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the values in play, None when there are none: what normalisation needs, and what
    shards of a distributed pool reduce to the same global bounds."""
    return (float(values.min()), float(values.max())) if values.size else None


def apply_minmax(u: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """(u − min) / (max − min), clipped at 0; all 1 when the bounds are equal or absent."""
    u = np.asarray(u, dtype=np.float64)
    if bounds is None or bounds[0] == bounds[1]:
        return np.ones_like(u)
    lo, hi = bounds
    return np.clip((u - lo) / (hi - lo), 0.0, None)


def normalize_uncertainty(
    u: np.ndarray, in_play: np.ndarray | None, method: str, bounds: tuple[float, float] | None = None
) -> np.ndarray:
    """Min–max normalise u over the rows in play (labeled + candidates), or with given global `bounds`.

    All-equal uncertainty normalises to 1 everywhere, so UWE degrades to CoreSet instead of to zeros.
    Rows not in play are normalised with the same bounds (their values are not used).
    """
    u = np.asarray(u, dtype=np.float64)
    check_selection_options(0.0, method)
    if method == "none":
        return u.copy()
    if bounds is None:
        bounds = minmax_bounds(u if in_play is None else u[in_play])
    return apply_minmax(u, bounds)


def uwe_weights(u_norm: np.ndarray, tau: float) -> np.ndarray:
    """u^tau as float64; tau = 0 gives weight 1 for every row (CoreSet on features), even where u = 0."""
    check_selection_options(tau, "minmax")
    if tau == 0:
        return np.ones_like(u_norm, dtype=np.float64)
    return np.power(u_norm, tau, dtype=np.float64)


def underflow_warning(u_norm: np.ndarray, weights: np.ndarray, tau: float, what: str = "units") -> str | None:
    """A warning when u^tau rounds to 0 although u > 0: those embeddings collapse onto the origin.

    With a very large tau every weight but the largest underflows, and KCG degrades to pool order.
    """
    return underflow_message(int(np.count_nonzero((u_norm > 0) & (weights == 0))), u_norm.size, tau, what)


def underflow_message(lost: int, total: int, tau: float, what: str = "units") -> str | None:
    if not lost:
        return None
    return (
        f"--tau {tau:g}: u^tau underflows to 0 for {lost:,} of {total:,} {what} with u > 0, "
        "so they tie at the origin and are picked in pool order; use a smaller --tau"
    )
