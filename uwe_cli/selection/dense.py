"""The dense engine: uwe(x) = G[x] ⊗ F[x] rows, nearest-centre distances kept exactly in float64 (numba).

`CentreTracker` keeps, for each candidate, the squared distance D to its nearest centre and which
centre that is. Adding a centre updates D exactly while skipping, by the triangle inequality and a
norm bound, every candidate the new centre cannot improve. The result is the same D as a full pass;
only the work differs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from uwe_cli.selection import _kernels as kern
from uwe_cli.selection.greedy import KCGResult, k_center_greedy, kmeanspp_seeding
from uwe_cli.selection.tracker import Progress, Tracker, TrackerStats, tracker_class

KNN_NEIGHBOURS = 16
# Below this many multiply-adds an update runs on one thread: starting a thread team costs ~0.1 ms on
# an idle machine and many milliseconds on a loaded one.
PARALLEL_MIN_WORK = 4_000_000
SEARCH_CHUNK_ROWS = 65_536
OUTER_CHUNK_ENTRIES = 8_000_000  # (candidate, centre) pairs per block of the outer-product proposal


class DenseEmbedding(NamedTuple):
    """Embedding rows as the outer product G[r] ⊗ F[r]: float32 features (n, d), float64 weights (n, K)."""

    features: np.ndarray
    weights: np.ndarray


def as_weights(G: np.ndarray | None, n: int) -> np.ndarray:
    """Weights as the (n, K) float64 matrix the kernels expect; None means unweighted (CoreSet)."""
    if G is None:
        return np.ones((n, 1), dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    return np.ascontiguousarray(G.reshape(n, -1))


def _embed32(G: np.ndarray, F: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 embeddings of `rows`, for FAISS's approximate search only."""
    block = F[rows].astype(np.float32, copy=False)
    if G.shape[1] == 1:
        return np.ascontiguousarray(block * G[rows].astype(np.float32))
    out = G[rows][:, :, None].astype(np.float32) * block[:, None, :]
    return np.ascontiguousarray(out.reshape(len(rows), -1))


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a declared dependency
        return None
    return faiss


class CentreTracker(Tracker):
    """Squared distance from every candidate to its nearest centre, updated exactly as centres are added."""

    def __init__(
        self,
        embedding: DenseEmbedding,
        candidates: np.ndarray,
        capacity: int,
        prune: bool = True,
        device: str = "cpu",
    ) -> None:
        self.F = np.ascontiguousarray(embedding.features)
        self.G = as_weights(embedding.weights, self.F.shape[0])
        candidates = np.ascontiguousarray(candidates, dtype=np.int64)
        self.candidates = candidates
        self.sq_norms = kern.sq_norms(self.G, self.F, candidates)
        # Internally candidates are kept in order of embedding norm: a centre c can only improve i when
        # |‖x_i‖ − ‖c‖| < √D(i) ≤ √max D, so each update scans one contiguous, cache-friendly slice.
        # Positions in the public API (argmax, take, distances) stay those of `candidates`.
        self._orig = np.argsort(self.sq_norms, kind="stable")
        self._pos = np.empty_like(self._orig)
        self._pos[self._orig] = np.arange(self._orig.size)
        self.cand = candidates[self._orig]
        self.sorted_sq_norms = self.sq_norms[self._orig]
        self.norms = np.sqrt(self.sorted_sq_norms)
        self._positions = np.arange(self.cand.size, dtype=np.int64)
        self.D = np.full(self.cand.size, np.inf, dtype=np.float64)
        self.near = np.full(self.cand.size, -1, dtype=np.int32)
        self.centre_rows = np.empty(max(capacity, 1), dtype=np.int64)
        self.k = 0
        self.prune = prune
        self.use_faiss = True  # False: exact full scan for the labeled set (tests)
        self._todo = np.empty(self.cand.size, dtype=np.int64)
        self.taken = 0
        self.stats = TrackerStats()

    def largest_norm(self) -> tuple[int, float]:
        t = int(np.argmax(self.sq_norms))
        return t, float(self.sq_norms[t])

    def init_centres(self, rows: np.ndarray) -> None:
        """Start from a set of centres (the labeled rows): exact nearest-centre distance for every candidate.

        FAISS's float32 k-NN proposes neighbours; distances are recomputed exactly in float64 and rows whose
        true nearest centre might lie beyond the k proposed are scanned in full.
        """
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        L = rows.size
        if L == 0:
            return
        self.centre_rows[:L] = rows
        self.k = L
        faiss = _faiss() if self.use_faiss else None
        if faiss is None or L <= KNN_NEIGHBOURS:
            kern.nearest_exact(self.G, self.F, self.cand, rows, self.D, self.near)
            self.stats.evaluated += self.cand.size * L
            self.stats.possible += self.cand.size * L
            return
        if self.G.shape[1] > 1:
            self._init_outer(rows)
            return
        emb_lab = _embed32(self.G, self.F, rows)
        index = faiss.IndexFlatL2(emb_lab.shape[1])
        index.add(emb_lab)
        lab_norm2 = float((emb_lab.astype(np.float64) ** 2).sum(axis=1).max())
        dim = emb_lab.shape[1]
        # Worst-case float32 error of ‖x‖²+‖y‖²−2x·y, relative to the norms involved.
        rel = max(1e-5, 4.0 * dim * float(np.finfo(np.float32).eps))
        kk = min(KNN_NEIGHBOURS, L)
        del emb_lab
        unsure_all: list[np.ndarray] = []
        for start in range(0, self.cand.size, SEARCH_CHUNK_ROWS):
            sl = slice(start, min(start + SEARCH_CHUNK_ROWS, self.cand.size))
            q = _embed32(self.G, self.F, self.cand[sl])
            sq32, idx = index.search(q, kk)
            q_norm2 = (q.astype(np.float64) ** 2).sum(axis=1)
            tol = rel * (q_norm2 + lab_norm2) + 1e-30
            D = np.empty(q.shape[0])
            near = np.empty(q.shape[0], dtype=np.int32)
            unsure = np.zeros(q.shape[0], dtype=np.bool_)
            kern.refine_knn(
                self.G,
                self.F,
                self.cand[sl],
                rows,
                idx.astype(np.int64),
                sq32.astype(np.float64),
                tol,
                D,
                near,
                unsure,
            )
            self.D[sl] = D
            self.near[sl] = near
            if unsure.any():
                unsure_all.append(np.flatnonzero(unsure) + start)
        self.stats.evaluated += self.cand.size * kk
        self.stats.possible += self.cand.size * L
        if unsure_all:
            which = np.concatenate(unsure_all)
            D = np.empty(which.size)
            near = np.empty(which.size, dtype=np.int32)
            kern.nearest_exact(self.G, self.F, self.cand[which], rows, D, near)
            self.D[which] = D
            self.near[which] = near
            self.stats.unsure_rows += int(which.size)
            self.stats.evaluated += int(which.size) * L

    def _init_outer(self, rows: np.ndarray) -> None:
        """`init_centres` for outer-product rows (BADGE, K > 1) without building K·d vectors for FAISS.

        ‖a − b‖² = ‖a‖² + ‖b‖² − 2(g_a·g_b)(f_a·f_b) for every (candidate, centre) pair from two float64
        matrix products (d and K wide instead of K·d); its k smallest propose neighbours, which
        `refine_knn` recomputes exactly. The proposal's rounding is far below OUTER_SLACK of the norms,
        so rows whose true nearest centre might lie beyond the k proposed are flagged and scanned in full.
        """
        L = rows.size
        kk = min(KNN_NEIGHBOURS, L)
        F_lab = self.F[rows].astype(np.float64)
        G_lab = self.G[rows]
        sq_lab = kern.sq_norms(self.G, self.F, rows)
        chunk = max(256, OUTER_CHUNK_ENTRIES // L)
        unsure_all: list[np.ndarray] = []
        for start in range(0, self.cand.size, chunk):
            sl = slice(start, min(start + chunk, self.cand.size))
            q_rows = self.cand[sl]
            q_sq = self.sorted_sq_norms[sl]
            approx = (self.G[q_rows] @ G_lab.T) * (self.F[q_rows].astype(np.float64) @ F_lab.T)
            approx *= -2.0
            approx += q_sq[:, None]
            approx += sq_lab[None, :]
            idx = np.argpartition(approx, kk - 1, axis=1)[:, :kk] if kk < L else np.argsort(approx, axis=1)
            vals = np.take_along_axis(approx, idx, axis=1)
            order = np.argsort(vals, axis=1, kind="stable")
            idx = np.ascontiguousarray(np.take_along_axis(idx, order, axis=1), dtype=np.int64)
            vals = np.ascontiguousarray(np.take_along_axis(vals, order, axis=1))
            tol = kern.OUTER_SLACK * (q_sq + float(sq_lab.max()))
            D = np.empty(q_rows.size)
            near = np.empty(q_rows.size, dtype=np.int32)
            unsure = np.zeros(q_rows.size, dtype=np.bool_)
            kern.refine_knn(self.G, self.F, q_rows, rows, idx, vals, tol, D, near, unsure)
            self.D[sl] = D
            self.near[sl] = near
            if unsure.any():
                unsure_all.append(np.flatnonzero(unsure) + start)
        self.stats.evaluated += self.cand.size * kk
        self.stats.possible += self.cand.size * L
        if unsure_all:
            which = np.concatenate(unsure_all)
            D = np.empty(which.size)
            near = np.empty(which.size, dtype=np.int32)
            kern.nearest_exact(self.G, self.F, self.cand[which], rows, D, near)
            self.D[which] = D
            self.near[which] = near
            self.stats.unsure_rows += int(which.size)
            self.stats.evaluated += int(which.size) * L

    def add(self, row: int, max_d: float | None = None) -> None:
        """Make pool row `row` a centre and lower every candidate's D accordingly.

        `max_d`, when known (KCG adds the candidate of largest D), is the largest live D; otherwise it is
        computed.
        """
        E = kern.centre_embedding(self.G, self.F, row)
        self.centre_rows[self.k] = row
        centre_norm = float(np.sqrt((E * E).sum()))
        scan = self._positions
        if self.prune:
            top = float(self.D.max()) if max_d is None else max_d
            if np.isfinite(top):
                root = np.sqrt(max(top, 0.0))
                reach = root * (1 + 1e-9) + 1e-9 * (centre_norm + root)
                lo, hi = np.searchsorted(self.norms, [centre_norm - reach, centre_norm + reach])
                scan = self._positions[lo : hi + 1]
        self.stats.scanned += scan.size
        m = kern.prune_candidates(
            self.G,
            self.F,
            self.D,
            self.near,
            self.centre_rows,
            self.k,
            E,
            self.prune,
            self.norms,
            centre_norm,
            scan,
            self._todo,
            row,
        )
        update = kern.lower_distances_parallel if m * E.size >= PARALLEL_MIN_WORK else kern.lower_distances
        update(
            self.G, self.F, self.cand, self.D, self.near, self._todo, m, self.k, E,
            self.sorted_sq_norms, row, float((E * E).sum()),
        )  # fmt: skip
        self.stats.evaluated += m
        self.stats.possible += self.cand.size - self.taken
        self.k += 1

    def distances(self) -> np.ndarray:
        """D for every candidate in the caller's order (-1 for picked ones)."""
        return self.D[self._pos]

    def argmax(self) -> tuple[int, float]:
        """The live candidate of largest D and its D; ties go to the earliest candidate in the caller's order."""
        best = int(np.argmax(self.D))
        top = self.D[best]
        tied = np.flatnonzero(top == self.D)
        t = int(self._orig[tied].min()) if tied.size > 1 else int(self._orig[best])
        return t, float(top)

    def take(self, t: int) -> None:
        """Remove candidate position t from play (it has been selected)."""
        self.D[self._pos[t]] = -1.0
        self.taken += 1


def dense_tracker(
    features: np.ndarray,
    weights: np.ndarray | None,
    candidates: np.ndarray,
    capacity: int,
    prune: bool = True,
    backend: str = "numba",
    device: str = "cpu",
) -> Tracker:
    """The dense engine for `backend` ("numba" or "torch" on `device`)."""
    embedding = DenseEmbedding(features, as_weights(weights, features.shape[0]))
    return tracker_class("unit", backend)(embedding, candidates, capacity, prune=prune, device=device)


def dense_kcg(
    features: np.ndarray,
    weights: np.ndarray | None,
    candidates: np.ndarray,
    centres: np.ndarray,
    budget: int,
    prune: bool = True,
    use_faiss: bool = True,
    progress: Progress | None = None,
    backend: str = "numba",
    device: str = "cpu",
) -> KCGResult:
    """K-Center-Greedy on dense embeddings G ⊗ F (`weights` None: unweighted, CoreSet)."""
    centres = np.asarray(centres, dtype=np.int64)
    tracker = dense_tracker(features, weights, candidates, centres.size + budget, prune, backend, device)
    if not use_faiss and isinstance(tracker, CentreTracker):
        tracker.use_faiss = False
    return k_center_greedy(tracker, centres, budget, progress)


def dense_kmeanspp(
    features: np.ndarray,
    G: np.ndarray,
    candidates: np.ndarray,
    centres: np.ndarray,
    budget: int,
    seed: int,
    prune: bool = True,
    progress: Progress | None = None,
    backend: str = "numba",
    device: str = "cpu",
) -> np.ndarray:
    """K-Means++ seeding on dense embeddings G ⊗ F (positions into `candidates`)."""
    centres = np.asarray(centres, dtype=np.int64)
    tracker = dense_tracker(features, G, candidates, centres.size + budget, prune, backend, device)
    return kmeanspp_seeding(tracker, centres, budget, seed, progress)
