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
ABANDON_BLOCK = 128

# Every sum below runs in an order written out in the code: eight running lanes, combined pairwise, then
# the tail. No `fastmath` reassociation: with it, LLVM chose the order, and a parallel kernel loaded from
# numba's cache summed differently from the same kernel freshly compiled (last-bit differences between
# two runs of one command). The lanes keep the sums vectorisable without giving the compiler that freedom.


@njit(cache=True, inline="always")
def _lanes_diff(g, F, r, E, k, j0, j1):  # pragma: no cover - compiled
    """Σ_{j0≤j<j1} (g·F[r, j] − E[k, j])², in a fixed order."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = j0
    while j + 8 <= j1:
        t0 = g * F[r, j] - E[k, j]
        t1 = g * F[r, j + 1] - E[k, j + 1]
        t2 = g * F[r, j + 2] - E[k, j + 2]
        t3 = g * F[r, j + 3] - E[k, j + 3]
        t4 = g * F[r, j + 4] - E[k, j + 4]
        t5 = g * F[r, j + 5] - E[k, j + 5]
        t6 = g * F[r, j + 6] - E[k, j + 6]
        t7 = g * F[r, j + 7] - E[k, j + 7]
        a0 += t0 * t0
        a1 += t1 * t1
        a2 += t2 * t2
        a3 += t3 * t3
        a4 += t4 * t4
        a5 += t5 * t5
        a6 += t6 * t6
        a7 += t7 * t7
        j += 8
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while j < j1:
        t = g * F[r, j] - E[k, j]
        s += t * t
        j += 1
    return s


@njit(cache=True, inline="always")
def _lanes_pair(G, F, r, c, k, j0, j1):  # pragma: no cover - compiled
    """Σ_{j0≤j<j1} (G[r, k]·F[r, j] − G[c, k]·F[c, j])², in a fixed order."""
    gr = G[r, k]
    gc = G[c, k]
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = j0
    while j + 8 <= j1:
        t0 = gr * F[r, j] - gc * F[c, j]
        t1 = gr * F[r, j + 1] - gc * F[c, j + 1]
        t2 = gr * F[r, j + 2] - gc * F[c, j + 2]
        t3 = gr * F[r, j + 3] - gc * F[c, j + 3]
        t4 = gr * F[r, j + 4] - gc * F[c, j + 4]
        t5 = gr * F[r, j + 5] - gc * F[c, j + 5]
        t6 = gr * F[r, j + 6] - gc * F[c, j + 6]
        t7 = gr * F[r, j + 7] - gc * F[c, j + 7]
        a0 += t0 * t0
        a1 += t1 * t1
        a2 += t2 * t2
        a3 += t3 * t3
        a4 += t4 * t4
        a5 += t5 * t5
        a6 += t6 * t6
        a7 += t7 * t7
        j += 8
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while j < j1:
        t = gr * F[r, j] - gc * F[c, j]
        s += t * t
        j += 1
    return s


@njit(cache=True, inline="always")
def _sq_dist(G, F, r, E, limit):  # pragma: no cover - compiled
    """‖G[r]⊗F[r] − E‖², stopping early once it reaches `limit` (the value is then only a lower bound)."""
    s = 0.0
    d = F.shape[1]
    for k in range(G.shape[1]):
        g = G[r, k]
        for j0 in range(0, d, ABANDON_BLOCK):
            s += _lanes_diff(g, F, r, E, k, j0, min(j0 + ABANDON_BLOCK, d))
            if s >= limit:
                return s
    return s


@njit(cache=True, inline="always")
def _pair_sq_dist(G, F, r, c, limit):  # pragma: no cover - compiled
    """‖G[r]⊗F[r] − G[c]⊗F[c]‖² with the same blocks and early stop as `_sq_dist`."""
    s = 0.0
    d = F.shape[1]
    for k in range(G.shape[1]):
        for j0 in range(0, d, ABANDON_BLOCK):
            s += _lanes_pair(G, F, r, c, k, j0, min(j0 + ABANDON_BLOCK, d))
            if s >= limit:
                return s
    return s


@njit(parallel=True, cache=True)
def sq_norms(G, F, rows):  # pragma: no cover - compiled
    """‖G[r]⊗F[r]‖² for each row (the distance to a zero centre, summed as every other distance)."""
    out = np.empty(rows.size, dtype=np.float64)
    zero = np.zeros((G.shape[1], F.shape[1]), dtype=np.float64)
    for t in prange(rows.size):
        out[t] = _sq_dist(G, F, rows[t], zero, np.inf)
    return out


@njit(cache=True)
def centre_embedding(G, F, r):
    """The float64 embedding of row r as a K × d matrix."""
    E = np.empty((G.shape[1], F.shape[1]), dtype=np.float64)
    for k in range(G.shape[1]):
        for j in range(F.shape[1]):
            E[k, j] = G[r, k] * F[r, j]
    return E


@njit(cache=True)
def prune_candidates(G, F, D, near, centre_rows, new_id, E, prune, norms, centre_norm, scan, out):
    """Positions of the live candidates (D > 0; picked ones hold -1) that the new centre E might improve.

    Two bounds skip the rest: ‖x − c‖ ≥ |‖x‖ − ‖c‖| (in UWE space magnitude follows uncertainty), and
    the triangle inequality through the candidate's nearest centre a: no improvement when
    ‖c − a‖ ≥ 2·D(i). ‖c − a‖ is computed lazily, once per centre. Sequential on purpose: this O(n)
    pass is memory-bound, and waking a thread team for it costs more than it saves on busy machines.
    `scan` lists the positions to look at (a window of candidates ordered by norm, see CentreTracker).
    """
    cc2 = np.full(new_id, -1.0)
    m = 0
    for q in range(scan.size):
        t = scan[q]
        d = D[t]
        if d <= 0.0:
            continue
        if prune:
            gap = norms[t] - centre_norm
            slack = 1e-12 * (norms[t] + centre_norm) * (norms[t] + centre_norm)
            if gap * gap >= d * PRUNE_MARGIN + slack:
                continue
            a = near[t]
            if a >= 0:
                c = cc2[a]
                if c < 0.0:
                    c = _sq_dist(G, F, centre_rows[a], E, np.inf)
                    cc2[a] = c
                if c >= 4.0 * d * PRUNE_MARGIN:
                    continue
        out[m] = t
        m += 1
    return m


@njit(cache=True)
def lower_distances(G, F, cand, D, near, todo, m, new_id, E):
    """D(i) = min(D(i), ‖x_i − E‖²) for the listed positions (one thread)."""
    for q in range(m):
        t = todo[q]
        s = _sq_dist(G, F, cand[t], E, D[t])
        if s < D[t]:
            D[t] = s
            near[t] = new_id


@njit(parallel=True, cache=True)
def lower_distances_parallel(G, F, cand, D, near, todo, m, new_id, E):
    """As `lower_distances`, across all threads (positions are distinct, so writes never collide)."""
    for q in prange(m):
        t = todo[q]
        s = _sq_dist(G, F, cand[t], E, D[t])
        if s < D[t]:
            D[t] = s
            near[t] = new_id


@njit(parallel=True, cache=True)
def nearest_exact(G, F, cand, centres, D, near):  # pragma: no cover - compiled
    """Exact nearest centre for each candidate by a full scan (fallback and reference path)."""
    for t in prange(cand.size):
        best = np.inf
        arg = -1
        r = cand[t]
        for a in range(centres.size):
            s = _pair_sq_dist(G, F, r, centres[a], best)
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
            s = _pair_sq_dist(G, F, r, centres[a], np.inf)
            if s < best or (s == best and a < arg):
                best = s
                arg = a
        D[t] = best
        near[t] = arg
        unsure[t] = (not full) and (knn_sq32[t, kk - 1] - tol[t] <= best)
