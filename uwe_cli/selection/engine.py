"""Exact nearest-centre tracking shared by K-Center-Greedy and K-Means++ seeding.

`CentreTracker` keeps, for each candidate, the squared distance D to its nearest centre and which
centre that is. Adding a centre updates D exactly (float64) while skipping, by the triangle
inequality, every candidate the new centre cannot improve. The result is the same D as a full pass;
only the work differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from uwe_cli.selection import _kernels as kern

Progress = Callable[[int, int], None]
KNN_NEIGHBOURS = 16
# Below this many multiply-adds an update runs on one thread: starting a thread team costs ~0.1 ms on
# an idle machine and many milliseconds on a loaded one.
PARALLEL_MIN_WORK = 4_000_000
SEARCH_CHUNK_ROWS = 65_536


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


@dataclass
class TrackerStats:
    evaluated: int = 0
    possible: int = 0
    unsure_rows: int = 0
    scanned: int = 0

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.evaluated / self.possible if self.possible else 0.0


class CentreTracker:
    """Squared distance from every candidate to its nearest centre, updated exactly as centres are added."""

    def __init__(
        self,
        features: np.ndarray,
        weights: np.ndarray,
        candidates: np.ndarray,
        capacity: int,
        prune: bool = True,
    ) -> None:
        self.F = features
        self.G = weights
        candidates = np.ascontiguousarray(candidates, dtype=np.int64)
        self.sq_norms = kern.sq_norms(self.G, self.F, candidates)
        # Internally candidates are kept in order of embedding norm: a centre c can only improve i when
        # |‖x_i‖ − ‖c‖| < √D(i) ≤ √max D, so each update scans one contiguous, cache-friendly slice.
        # Positions in the public API (argmax, take, distances) stay those of `candidates`.
        self._orig = np.argsort(self.sq_norms, kind="stable")
        self._pos = np.empty_like(self._orig)
        self._pos[self._orig] = np.arange(self._orig.size)
        self.cand = candidates[self._orig]
        self.norms = np.sqrt(self.sq_norms[self._orig])
        self._positions = np.arange(self.cand.size, dtype=np.int64)
        self.D = np.full(self.cand.size, np.inf, dtype=np.float64)
        self.near = np.full(self.cand.size, -1, dtype=np.int32)
        self.centre_rows = np.empty(max(capacity, 1), dtype=np.int64)
        self.k = 0
        self.prune = prune
        self._todo = np.empty(self.cand.size, dtype=np.int64)
        self.taken = 0
        self.stats = TrackerStats()

    def live_sq_norms(self) -> np.ndarray:
        return self.sq_norms

    def init_centres(self, rows: np.ndarray, use_faiss: bool = True) -> None:
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
        faiss = _faiss() if use_faiss else None
        if faiss is None or L <= KNN_NEIGHBOURS:
            kern.nearest_exact(self.G, self.F, self.cand, rows, self.D, self.near)
            self.stats.evaluated += self.cand.size * L
            self.stats.possible += self.cand.size * L
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
        )
        update = kern.lower_distances_parallel if m * E.size >= PARALLEL_MIN_WORK else kern.lower_distances
        update(self.G, self.F, self.cand, self.D, self.near, self._todo, m, self.k, E)
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


BACKENDS = ("numba", "torch")


def make_tracker(
    features: np.ndarray,
    G: np.ndarray,
    candidates: np.ndarray,
    capacity: int,
    prune: bool = True,
    backend: str = "numba",
    device: str = "cpu",
) -> CentreTracker:
    if backend == "numba":
        return CentreTracker(features, G, candidates, capacity, prune=prune)
    if backend == "torch":
        from uwe_cli.selection.torch_backend import TorchCentreTracker

        return TorchCentreTracker(features, G, candidates, capacity, prune=prune, device=device)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


@dataclass
class KCGResult:
    positions: np.ndarray  # indices into the candidate array, in pick order
    distances: np.ndarray  # Euclidean distance at pick time (norm for a first pick without centres)
    stats: TrackerStats


def k_center_greedy(
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
    """Algorithm 1 of the paper, exactly: argmax of the squared float64 distance, ties to the earlier candidate.

    Without centres the first pick is the candidate of largest embedding norm (its norm is reported as
    its distance). `backend` "numba" runs the CPU kernels; "torch" runs the updates on `device`.
    """
    features = np.ascontiguousarray(features)
    G = as_weights(weights, features.shape[0])
    candidates = np.asarray(candidates, dtype=np.int64)
    centres = np.asarray(centres, dtype=np.int64)
    tracker = make_tracker(features, G, candidates, centres.size + budget, prune, backend, device)
    positions = np.empty(budget, dtype=np.int64)
    distances = np.empty(budget, dtype=np.float64)
    step = max(1, budget // 200)
    if centres.size:
        tracker.init_centres(centres, use_faiss=use_faiss)
    elif budget:
        norms = tracker.live_sq_norms()
        t = int(np.argmax(norms))
        positions[0], distances[0] = t, np.sqrt(norms[t])
        tracker.take(t)
        if budget > 1:
            tracker.add(int(candidates[t]))
    first = 1 if (budget and not centres.size) else 0
    for b in range(first, budget):
        t, d = tracker.argmax()
        positions[b], distances[b] = t, np.sqrt(d)
        tracker.take(t)
        if b + 1 < budget:
            tracker.add(int(candidates[t]), max_d=d)
        if progress is not None and (b % step == 0 or b + 1 == budget):
            progress(b + 1, budget)
    return KCGResult(positions, distances, tracker.stats)


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
