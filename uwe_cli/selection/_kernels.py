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
# Reassociation lets LLVM vectorise the float64 sums (about 4x faster here). It changes only the order
# of summation, like numpy's own pairwise sums; no NaN/Inf or contraction shortcuts are allowed.
FASTMATH = {"reassoc", "nsz"}
ABANDON_BLOCK = 128
# BADGE rows (K > 1) are outer products, so ‖a − b‖² = ‖a‖² + ‖b‖² − 2(g_a·g_b)(f_a·f_b) costs K + d
# instead of K·d. That form cancels, so it only serves as a lower bound, lowered by this fraction of
# ‖a‖² + ‖b‖² (rounding is ~1e-13 of it): a candidate it clears is skipped, any other is computed exactly.
OUTER_SLACK = 1e-9


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _sq_dist(G, F, r, E, limit):
    """‖G[r]⊗F[r] − E‖², stopping early once it reaches `limit` (the value is then only a lower bound)."""
    s = 0.0
    d = F.shape[1]
    for k in range(G.shape[1]):
        g = G[r, k]
        for j0 in range(0, d, ABANDON_BLOCK):
            part = 0.0
            for j in range(j0, min(j0 + ABANDON_BLOCK, d)):
                diff = g * F[r, j] - E[k, j]
                part += diff * diff
            s += part
            if s >= limit:
                return s
    return s


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _outer_lower_bound(G, F, r, c, nr, nc):
    """A lower bound of ‖G[r]⊗F[r] − G[c]⊗F[c]‖² in O(K + d), given both squared norms (see OUTER_SLACK)."""
    gg = 0.0
    for k in range(G.shape[1]):
        gg += G[r, k] * G[c, k]
    ff = 0.0
    for j in range(F.shape[1]):
        ff += np.float64(F[r, j]) * np.float64(F[c, j])
    return nr + nc - 2.0 * gg * ff - OUTER_SLACK * (nr + nc)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _row_sq_norm(G, F, r):
    """‖G[r]⊗F[r]‖² = ‖G[r]‖²·‖F[r]‖² (only used inside bounds, where its rounding is covered)."""
    gg = 0.0
    for k in range(G.shape[1]):
        gg += G[r, k] * G[r, k]
    ff = 0.0
    for j in range(F.shape[1]):
        ff += np.float64(F[r, j]) * np.float64(F[r, j])
    return gg * ff


@njit(parallel=True, cache=True, fastmath=FASTMATH)
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


@njit(cache=True, fastmath=FASTMATH)
def prune_candidates(G, F, D, near, centre_rows, new_id, E, prune, norms, centre_norm, scan, out, centre_row):
    """Positions of the live candidates (D > 0; picked ones hold -1) that the new centre E might improve.

    Two bounds skip the rest: ‖x − c‖ ≥ |‖x‖ − ‖c‖| (in UWE space magnitude follows uncertainty), and
    the triangle inequality through the candidate's nearest centre a: no improvement when
    ‖c − a‖ ≥ 2·D(i). ‖c − a‖ is computed lazily, once per centre. Sequential on purpose: this O(n)
    pass is memory-bound, and waking a thread team for it costs more than it saves on busy machines.
    `scan` lists the positions to look at (a window of candidates ordered by norm, see CentreTracker).
    For outer-product rows (K > 1) ‖c − a‖² is replaced by its O(K + d) lower bound, which keeps the
    test safe. `centre_row` is the pool row of the new centre E.
    """
    cc2 = np.full(new_id, -1.0)
    outer = G.shape[1] > 1
    centre_sq = centre_norm * centre_norm
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
                    if outer:
                        ra = centre_rows[a]
                        c = max(
                            _outer_lower_bound(G, F, ra, centre_row, _row_sq_norm(G, F, ra), centre_sq), 0.0
                        )
                    else:
                        c = _sq_dist(G, F, centre_rows[a], E, np.inf)
                    cc2[a] = c
                if c >= 4.0 * d * PRUNE_MARGIN:
                    continue
        out[m] = t
        m += 1
    return m


@njit(cache=True, fastmath=FASTMATH)
def lower_distances(G, F, cand, D, near, todo, m, new_id, E, sq, centre_row, centre_sq):
    """D(i) = min(D(i), ‖x_i − E‖²) for the listed positions (one thread).

    `sq` holds the candidates' squared norms by position; for outer-product rows (K > 1) a candidate
    whose O(K + d) lower bound already reaches D(i) is skipped without the K·d exact distance.
    """
    outer = G.shape[1] > 1
    for q in range(m):
        t = todo[q]
        r = cand[t]
        if outer and _outer_lower_bound(G, F, r, centre_row, sq[t], centre_sq) >= D[t]:
            continue
        s = _sq_dist(G, F, r, E, D[t])
        if s < D[t]:
            D[t] = s
            near[t] = new_id


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def lower_distances_parallel(G, F, cand, D, near, todo, m, new_id, E, sq, centre_row, centre_sq):
    """As `lower_distances`, across all threads (positions are distinct, so writes never collide)."""
    outer = G.shape[1] > 1
    for q in prange(m):
        t = todo[q]
        r = cand[t]
        if outer and _outer_lower_bound(G, F, r, centre_row, sq[t], centre_sq) >= D[t]:
            continue
        s = _sq_dist(G, F, r, E, D[t])
        if s < D[t]:
            D[t] = s
            near[t] = new_id


@njit(parallel=True, cache=True, fastmath=FASTMATH)
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


@njit(parallel=True, cache=True, fastmath=FASTMATH)
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
