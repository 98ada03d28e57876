"""The tracker interface: everything K-Center-Greedy and K-Means++ ask of a selection engine.

A tracker keeps, for each candidate, the squared distance D to its nearest centre, exactly (float64),
however it prunes. The greedy loops in `greedy.py` drive any tracker; engines differ in how they
store embeddings and compute distances: dense u^tau·f rows (numba `CentreTracker`, torch
`TorchCentreTracker`) or block-sparse class-wise image embeddings of detection pools
(`ClasswiseTracker`, `TorchClasswiseTracker`). Engines are found by (pool kind, backend) in
`TRACKERS`, by module path, so this module imports none of them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Progress = Callable[[int, int], None]

# (pool kind, backend) → "module:class". Every class takes (embedding, candidates, capacity, prune, device).
TRACKERS: dict[tuple[str, str], str] = {
    ("unit", "numba"): "uwe_cli.selection.dense:CentreTracker",
    ("unit", "numpy"): "uwe_cli.selection.small:NumpyTracker",
    ("unit", "torch"): "uwe_cli.selection.torch_backend:TorchCentreTracker",
    ("detection", "numba"): "uwe_cli.selection.classwise:ClasswiseTracker",
    ("detection", "torch"): "uwe_cli.selection.classwise_torch:TorchClasswiseTracker",
}


@dataclass
class TrackerStats:
    """How much distance work a run did (`evaluated`) against a full pass per centre (`possible`)."""

    evaluated: int = 0
    possible: int = 0
    unsure_rows: int = 0
    scanned: int = 0
    screened: int = 0  # candidates a low-precision screen proved out of reach (no exact distance needed)
    labeled_pairs: int = 0  # (candidate, labeled unit) float32 distances the labeled-set search formed

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.evaluated / self.possible if self.possible else 0.0


class Tracker(ABC):
    """Nearest-centre distances of the candidates, updated exactly as centres are added.

    Positions index `candidates` (ascending pool rows); rows index the pool. Picked candidates are
    out of play: `distances()` reports -1 for them and `argmax` never returns them.
    """

    def __init__(
        self, embedding: Any, candidates: np.ndarray, capacity: int, prune: bool = True, device: str = "cpu"
    ) -> None:
        """Every engine is built alike: room for `capacity` centres; `prune=False` computes every distance."""
        self.candidates = self._check_candidates(embedding, candidates)
        self.capacity = max(int(capacity), 1)
        self.prune = prune
        self.stats = TrackerStats()
        self.width = 0  # the embedding's length, set by `_setup`
        self._setup(embedding, device)
        if self.width < 1 and self.candidates.size:
            raise ValueError(f"{type(self).__name__}._setup must set `width`, the embedding's length")
        # Squared distances within this relative gap of the largest are ties: each engine's sum lies
        # within (width + 3)·2⁻⁵³ of the exact value, whatever its order; twice that, and room.
        self.tie_tolerance = 8.0 * (self.width + 3) * 2.0**-53

    def _check_candidates(self, embedding: Any, candidates: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(candidates, dtype=np.int64)

    @abstractmethod
    def _setup(self, embedding: Any, device: str) -> None:
        """Build the engine's state for `self.candidates`."""

    @abstractmethod
    def init_centres(self, rows: np.ndarray) -> None:
        """Start from these pool rows as centres (the labeled set)."""

    @abstractmethod
    def largest_norm(self) -> tuple[int, float]:
        """The candidate of largest squared embedding norm (ties: the earliest) and that squared norm."""

    @abstractmethod
    def add(self, row: int, max_d: float | None = None) -> None:
        """Make pool row `row` a centre. `max_d`, when the caller knows it, is the largest live D."""

    @abstractmethod
    def argmax(self) -> tuple[int, float]:
        """The live candidate of largest D (ties: the earliest) and its squared distance."""

    @abstractmethod
    def take(self, position: int) -> None:
        """Remove a candidate from play (it has been selected)."""

    @abstractmethod
    def distances(self) -> np.ndarray:
        """Squared distance to the nearest centre per candidate, -1 for picked ones."""

    # -- near-ties (see `greedy.next_pick`) ----------------------------------------------------------

    @abstractmethod
    def square_norms(self) -> np.ndarray:
        """Squared embedding norm per candidate, as this engine computed it."""

    def earliest_at_least(self, threshold: float) -> tuple[int, float]:
        """(position, D) of the earliest live candidate whose D is at least `threshold`, (-1, -1.0)
        when none; engines may find it faster than this pass over `distances()`."""
        return first_at_least(self.distances(), threshold)


def first_at_least(values: np.ndarray, threshold: float) -> tuple[int, float]:
    """(index, value) of the first value at least `threshold`, (-1, -1.0) when none."""
    near = np.flatnonzero(values >= threshold)
    return (int(near[0]), float(values[near[0]])) if near.size else (-1, -1.0)


def tracker_class(kind: str, backend: str) -> type[Tracker]:
    """The engine for a pool kind ("unit", "detection") and backend ("numba", "torch")."""
    try:
        module, _, name = TRACKERS[(kind, backend)].partition(":")
    except KeyError:
        known = ", ".join(f"{k}/{b}" for k, b in TRACKERS)
        raise ValueError(f"no selection engine for {kind} pools on {backend} (known: {known})") from None
    cls: Any = getattr(importlib.import_module(module), name)
    return cls
