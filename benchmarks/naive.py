"""The paper's algorithm implemented plainly: the benchmarks' baseline and an independent check."""

from __future__ import annotations

import numpy as np

from uwe_cli.selection.dense import as_weights
from uwe_cli.selection.greedy import KCGResult
from uwe_cli.selection.tracker import TrackerStats


def k_center_greedy_naive(
    features: np.ndarray,
    weights: np.ndarray | None,
    candidates: np.ndarray,
    centres: np.ndarray,
    budget: int,
    chunk_rows: int = 16_384,
    gemm_init: bool = False,
) -> KCGResult:
    """The paper's algorithm implemented plainly (numpy, float64, a full pass over the pool per pick).

    The baseline for benchmarks; same semantics as `k_center_greedy`. `gemm_init` computes the initial
    distances to the labeled set as one float64 matrix product per chunk (‖x‖² + ‖y‖² − 2x·y, as
    CoreSet's reference code does) instead of one pass per labeled unit: fast, but cancellation can
    perturb exact ties, so the tests use the default.
    """
    G = as_weights(weights, features.shape[0])
    candidates = np.asarray(candidates, dtype=np.int64)

    def emb(rows: np.ndarray) -> np.ndarray:
        block = features[rows].astype(np.float64)
        return (G[rows][:, :, None] * block[:, None, :]).reshape(len(rows), -1)

    def sq_dist_to(e: np.ndarray) -> np.ndarray:
        out = np.empty(candidates.size)
        for s in range(0, candidates.size, chunk_rows):
            diff = emb(candidates[s : s + chunk_rows]) - e
            out[s : s + chunk_rows] = np.einsum("ij,ij->i", diff, diff)
        return out

    D = np.full(candidates.size, np.inf)
    centres = np.asarray(centres, dtype=np.int64)
    if gemm_init and centres.size:
        lab = emb(centres)
        lab_sq = np.einsum("ij,ij->i", lab, lab)
        for s in range(0, candidates.size, chunk_rows):
            x = emb(candidates[s : s + chunk_rows])
            d2 = np.einsum("ij,ij->i", x, x)[:, None] + lab_sq[None, :] - 2.0 * (x @ lab.T)
            D[s : s + chunk_rows] = np.maximum(d2.min(axis=1), 0.0)
    else:
        for c in centres:
            np.minimum(D, sq_dist_to(emb(np.array([c]))[0]), out=D)
    positions = np.empty(budget, dtype=np.int64)
    distances = np.empty(budget)
    taken = np.zeros(candidates.size, dtype=bool)
    for b in range(budget):
        if b == 0 and not len(centres):
            norms = np.concatenate(
                [
                    np.einsum("ij,ij->i", e, e)
                    for e in (
                        emb(candidates[s : s + chunk_rows]) for s in range(0, candidates.size, chunk_rows)
                    )
                ]
            )
            t = int(np.argmax(norms))
            dist = float(np.sqrt(norms[t]))
        else:
            masked = np.where(taken, -1.0, D)
            t = int(np.argmax(masked))
            dist = float(np.sqrt(masked[t]))
        positions[b], distances[b] = t, dist
        taken[t] = True
        np.minimum(D, sq_dist_to(emb(candidates[t : t + 1])[0]), out=D)
    return KCGResult(positions, distances, TrackerStats())
