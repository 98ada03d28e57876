"""Numba kernels for exact distance-based selection.

An embedding row is the outer product ``G[r] ⊗ F[r]`` of a float64 weight vector (K values) and the
float32 feature row (d values), flattened to K·d. UWE and CoreSet use K = 1 (G = u^tau, or 1);
BADGE uses K classes (G = p − onehot(ŷ)). The embedding is computed on the fly in float64, so no
n × K·d matrix is ever stored and every distance equals the float64 reference bit for bit up to the
order of summation. Distances are squared Euclidean, summed as direct differences (no
‖x‖² + ‖y‖² − 2x·y cancellation).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# A new centre c cannot improve candidate i whose nearest centre is a when ‖c − a‖ ≥ 2·D(i)
# (triangle inequality). On squared float64 values with relative error ~1e-13, this margin keeps
# the test conservative: a candidate is skipped only when the bound holds with room to spare.
PRUNE_MARGIN = 1.0 + 1e-9


@njit(cache=True, inline="always")
def _sq_dist(G, F, r, E, limit):
    """‖G[r]⊗F[r] − E‖², stopping early once it reaches `limit` (the value is then only a lower bound)."""
    s = 0.0
    for k in range(G.shape[1]):
        g = G[r, k]
        for j in range(F.shape[1]):
            diff = g * F[r, j] - E[k, j]
            s += diff * diff
        if s >= limit:
            return s
    return s


@njit(parallel=True, cache=True)
def sq_norms(G, F, rows):
    """‖G[r]⊗F[r]‖² for each row."""
    out = np.empty(rows.size, dtype=np.float64)
    for t in prange(rows.size):
        r = rows[t]
        s = 0.0
        for k in range(G.shape[1]):
            g = G[r, k]
            for j in range(F.shape[1]):
                v = g * F[r, j]
                s += v * v
        out[t] = s
    return out


@njit(cache=True)
def centre_embedding(G, F, r):
    """The float64 embedding of row r as a K × d matrix."""
    E = np.empty((G.shape[1], F.shape[1]), dtype=np.float64)
    for k in range(G.shape[1]):
        for j in range(F.shape[1]):
            E[k, j] = G[r, k] * F[r, j]
    return E


@njit(parallel=True, cache=True)
def add_centre(G, F, cand, D, near, centre_rows, new_id, E, prune):
    """Lower D(i) to ‖x_i − E‖² where smaller, for every live candidate (D ≥ 0 marks picked rows with -1).

    With `prune`, the distance from E to each candidate's current nearest centre is computed lazily
    (once per centre, shared by all its candidates) and candidates that cannot improve are skipped.
    Returns the number of candidate distances evaluated.
    """
    cc2 = np.full(new_id, -1.0)
    evaluated = 0
    for t in prange(cand.size):
        d = D[t]
        if d <= 0.0:
            continue
        a = near[t]
        if prune and a >= 0:
            c = cc2[a]
            if c < 0.0:
                # Benign race: two threads may both compute the same centre distance and write it.
                c = _sq_dist(G, F, centre_rows[a], E, np.inf)
                cc2[a] = c
            if c >= 4.0 * d * PRUNE_MARGIN:
                continue
        s = _sq_dist(G, F, cand[t], E, d)
        evaluated += 1
        if s < d:
            D[t] = s
            near[t] = new_id
    return evaluated


@njit(parallel=True, cache=True)
def nearest_exact(G, F, cand, centres, D, near):
    """Exact nearest centre for each candidate by a full scan (fallback and reference path)."""
    for t in prange(cand.size):
        best = np.inf
        arg = -1
        r = cand[t]
        for a in range(centres.size):
            c = centres[a]
            s = 0.0
            for k in range(G.shape[1]):
                for j in range(F.shape[1]):
                    diff = G[r, k] * F[r, j] - G[c, k] * F[c, j]
                    s += diff * diff
                if s >= best:
                    break
            if s < best:
                best = s
                arg = a
        D[t] = best
        near[t] = arg


@njit(parallel=True, cache=True)
def refine_knn(G, F, cand, centres, knn_idx, knn_sq32, tol, D, near, unsure):
    """Exact float64 minimum over FAISS's k float32 neighbours; flag rows where a farther centre could win.

    Centres outside the k returned have float32 squared distance ≥ knn_sq32[t, -1]; their true value is at
    least that minus `tol[t]`. When that lower bound does not clear the exact minimum, the row is flagged
    for a full exact scan.
    """
    kk = knn_idx.shape[1]
    full = kk >= centres.size
    for t in prange(cand.size):
        r = cand[t]
        best = np.inf
        arg = -1
        for q in range(kk):
            a = knn_idx[t, q]
            if a < 0:
                continue
            c = centres[a]
            s = 0.0
            for k in range(G.shape[1]):
                for j in range(F.shape[1]):
                    diff = G[r, k] * F[r, j] - G[c, k] * F[c, j]
                    s += diff * diff
            if s < best or (s == best and a < arg):
                best = s
                arg = a
        D[t] = best
        near[t] = arg
        unsure[t] = (not full) and (knn_sq32[t, kk - 1] - tol[t] <= best)
