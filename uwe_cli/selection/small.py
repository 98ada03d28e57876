"""The engine for small problems: plain numpy, one exact float64 pass over the candidates per centre.

Loading the compiled engine (numba) costs about half a second before the first distance; when the whole
selection is a few hundred million multiply-adds, numpy finishes sooner. Distances are computed exactly
as the float64 reference does (direct differences, summed by numpy), so the batch is the same.
"""

from __future__ import annotations

import numpy as np

from uwe_cli.selection.embedded import DenseEmbedding, as_weights
from uwe_cli.selection.tracker import Tracker

# Work (multiply-adds: rows × K·d × (labeled + budget)) and embedding size (rows × K·d) up to which
# selection uses this engine instead of compiling one.
SMALL_WORK = 150_000_000
SMALL_ELEMENTS = 4_000_000
CHUNK_ELEMENTS = 1 << 20


def is_small(rows: int, dim: int, centres: int) -> bool:
    """Whether `centres` full passes over `rows` embeddings of `dim` values are cheaper in numpy."""
    return rows * dim <= SMALL_ELEMENTS and rows * dim * centres <= SMALL_WORK


class NumpyTracker(Tracker):
    """Nearest-centre distances by a full float64 pass per centre (no pruning, no compilation)."""

    def _setup(self, embedding: DenseEmbedding, device: str) -> None:
        F = embedding.features
        self._G = as_weights(embedding.weights, F.shape[0])
        self._F = F
        self.E = self._embed(self.candidates)
        self.width = self.E.shape[1]
        n = self.candidates.size
        self.D = np.full(n, np.inf)
        self.taken = np.zeros(n, dtype=np.bool_)
        self._step = max(1, CHUNK_ELEMENTS // max(1, self.E.shape[1]))

    def _embed(self, rows: np.ndarray) -> np.ndarray:
        G, F = self._G[rows], self._F[rows].astype(np.float64)
        return (G[:, :, None] * F[:, None, :]).reshape(len(rows), -1)

    def _lower(self, e: np.ndarray) -> None:
        for s in range(0, self.E.shape[0], self._step):
            block = self.D[s : s + self._step]
            np.minimum(block, ((self.E[s : s + self._step] - e) ** 2).sum(axis=1), out=block)
        n = self.E.shape[0]
        self.stats.evaluated += n
        self.stats.possible += n

    def init_centres(self, rows: np.ndarray) -> None:
        for row in np.asarray(rows, dtype=np.int64):
            self._lower(self._embed(np.array([row]))[0])

    def largest_norm(self) -> tuple[int, float]:
        sq = (self.E**2).sum(axis=1)
        t = int(np.argmax(sq))
        return t, float(sq[t])

    def add(self, row: int, max_d: float | None = None) -> None:
        self._lower(self._embed(np.array([row]))[0])

    def argmax(self) -> tuple[int, float]:
        masked = np.where(self.taken, -1.0, self.D)
        t = int(np.argmax(masked))
        return t, float(masked[t])

    def take(self, t: int) -> None:
        self.taken[t] = True

    def distances(self) -> np.ndarray:
        return np.where(self.taken, -1.0, self.D)

    def square_norms(self) -> np.ndarray:
        return (self.E**2).sum(axis=1)
