"""The dense engine: uwe(x) = G[x] ⊗ F[x] rows, nearest-centre distances kept exactly in float64 (numba).

`CentreTracker` keeps, for each candidate, the squared distance D to its nearest centre, and for each
centre the list of candidates it is nearest to (its bucket) with their largest D. A new centre c only
visits buckets within reach (‖c − a‖ < 2·√max D(a), triangle inequality), and inside them skips, by
the same inequality and a norm bound, every candidate it cannot improve; the rest get an exact float64
distance. The result is the same D as a full pass; only the work differs.

Candidates live in *slots*: the tracker's own copy of their features (or the caller's matrix permuted
in place, when the caller hands it over), regrouped by bucket from time to time so that the members of
a bucket are read from contiguous memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from uwe_cli.selection import _kernels as kern
from uwe_cli.selection.embedded import DenseEmbedding, as_weights, available_memory
from uwe_cli.selection.greedy import KCGResult, k_center_greedy, kmeanspp_seeding
from uwe_cli.selection.tracker import Progress, Tracker, tracker_class

__all__ = ["CentreTracker", "DenseEmbedding", "as_weights", "dense_kcg", "dense_kmeanspp", "dense_tracker"]

KNN_NEIGHBOURS = 16
# Below this many multiply-adds an update runs on one thread: starting a thread team costs ~0.1 ms on
# an idle machine and many milliseconds on a loaded one. 1M (about 0.3 ms of work) measured best on 2
# idle cores: 1M × 512 with --max-memory 3G 58.5 → 53.9 s against 4M, 200k ReLU 22.3 → 20.1 s.
PARALLEL_MIN_WORK = 1_000_000
SEARCH_CHUNK_ROWS = 65_536
# Bands of labeled-centre norms for the certificate of `_norm_band_bound`; candidates searched together
# against one window of centre norms; centres either side of a block's norms that seed its upper bound
# (at most an eighth of them).
NORM_BANDS = 16
NORM_BLOCK_ROWS = 512
NORM_SEED = 256
OUTER_CHUNK_ENTRIES = 8_000_000  # (candidate, centre) pairs per block of the outer-product proposal
# (slot rows, their norms) -> (proposed centres, approximate squared distances, their tolerance) for `refine_knn`.
Proposal = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
# Slots are regrouped by bucket when the number of centres reaches 32, 128, 512, ... (each regrouping
# is one pass over the features), if the features are large enough for locality to matter.
RELAYOUT_FIRST = 32
RELAYOUT_FACTOR = 4
RELAYOUT_MIN_ELEMENTS = 1 << 22
# Spare slots, as a fraction of the candidates: room to append improved candidates to their new bucket
# before the dead slots they leave must be squeezed out. Each slot costs 28 bytes (and the screen's row):
# a quarter keeps the bookkeeping small at a few more squeezes (2M × 128, budget 1,000: 14 instead of 9,
# 0.5 s more of 32 s).
SPARE_SLOTS = 0.25
# Labeled centres are inserted farthest-first (spread-out centres first keep later reach small); the
# order is computed by K-Center-Greedy over at most this many of them, the rest follow in row order.
FARTHEST_FIRST_MAX = 4096
# The int8 screen (see _kernels.build_screen) costs a byte per feature and 8 bytes per slot (0.31× the
# float32 matrix with the spare slots). It is built for unweighted or scalar-weighted embeddings (K = 1)
# with at least SCREEN_MIN_DIM features, when it fits in the spare memory (`DenseEmbedding.spare_bytes`):
# on 1M × 512 it takes the run from about 80 s to 40 s; without it peak memory stays about 1.3× the matrix.
SCREEN_MIN_DIM = 256
SCREEN = True


def _embed32(G: np.ndarray, F: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 embeddings G[r]·F[r] (K = 1) of `rows`, for FAISS's approximate search only."""
    out = np.empty((rows.size, F.shape[1]), dtype=np.float32)
    kern.gather_scaled(G, F, np.ascontiguousarray(rows, dtype=np.int64), out)
    return out


def _norm_band_bound(q_norm: np.ndarray, last: np.ndarray, rel: float, bands: np.ndarray) -> np.ndarray:
    """A lower bound on a row's squared distance to every centre FAISS did not list before its last one.

    Such a centre c has a float32 distance ≥ `last`, off by at most rel·(‖q‖² + ‖c‖²), and lies at least
    |‖q‖ − ‖c‖| away. Taking both per band of centre norms [lo, hi] (`bands`, one row each) instead of
    the largest norm of all keeps rows of small norm (small uncertainty weights) certifiable: for
    them the global error bound dwarfs the distances, while the norm gap rules out the large centres.
    """
    lo, hi = bands[:, 0][None, :], bands[:, 1][None, :]
    q = q_norm[:, None]
    gap = np.maximum(np.maximum(lo - q, q - hi), 0.0)
    by_error = last[:, None] - rel * (q * q + hi * hi)
    return np.maximum(by_error, gap * gap * (1 - kern.NORM_SLACK)).min(axis=1)


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a declared dependency
        return None
    return faiss


class CentreTracker(Tracker):
    """Squared distance from every candidate to its nearest centre, updated exactly as centres are added."""

    def _setup(self, embedding: DenseEmbedding, device: str) -> None:
        F = np.ascontiguousarray(embedding.features, dtype=np.float32)
        G = as_weights(embedding.weights, F.shape[0])
        candidates = self.candidates
        n = candidates.size
        self.n = n
        K, d = G.shape[1], F.shape[1]
        idx = np.int32 if n < 2**31 - 1 else np.int64
        sq = kern.sq_norms(G, F, candidates)
        top = int(np.argmax(sq)) if n else -1
        self._largest = (top, float(sq[top])) if n else None  # for `largest_norm`
        # Rows and slots start in norm order: a first, coarse locality for the first centres.
        order = np.argsort(sq, kind="stable").astype(idx)
        rows = candidates[order]
        self._owned = bool(embedding.reorder) and F is embedding.features and F.flags.writeable
        # The weights follow the features when they can be permuted too; read-only weights are copied.
        self._g_owned = self._owned and G.flags.writeable and G.flags.c_contiguous
        if self._owned:
            # Candidates (in slot order) to the front, other rows after them in row order (no copy).
            rest = np.setdiff1d(np.arange(F.shape[0]), candidates, assume_unique=True)
            perm = np.concatenate([rows, rest])
            del rest
            done = np.empty(F.shape[0], dtype=np.bool_)
            kern.permute_rows(F, perm, done)
            if self._g_owned:
                kern.permute_rows(G, perm, done)
                self.g = G[:n]
            else:
                self.g = np.ascontiguousarray(G[rows])
            del perm, done
            self.X = F[:n]
        else:
            self.X = np.empty((n, d), dtype=np.float32)
            kern.gather_rows(F, rows, self.X)
            self.g = np.ascontiguousarray(G[rows])
        del rows
        self._F = F
        self._G = G
        self.rowpos = np.empty(n, dtype=idx)  # position in `candidates` -> feature row
        self.rowpos[order] = np.arange(n, dtype=idx)
        # Slots: room for SPARE_SLOTS of the candidates again, so improved candidates can be appended to
        # their new bucket; the dead slots they leave are squeezed out when the room runs out.
        cap_slots = n + int(n * SPARE_SLOTS) + 64
        self.D = np.full(cap_slots, -1.0)
        self.D[:n] = np.inf
        self.near = np.full(cap_slots, -1, dtype=idx)
        self.norms = np.zeros(cap_slots)
        self.norms[:n] = np.sqrt(sq[order])
        del sq
        self.orig = np.zeros(cap_slots, dtype=idx)  # slot -> position in `candidates`
        self.orig[:n] = order
        self.xrow = np.zeros(cap_slots, dtype=idx)  # slot -> feature row
        self.xrow[:n] = np.arange(n, dtype=idx)
        self.slot_of = self.rowpos.copy()  # position -> slot (-1 once picked)
        del order
        self.used = n
        cap = self.capacity
        self.orphan = cap  # bucket of candidates without a centre yet
        self.start = np.zeros(cap + 1, dtype=np.int64)
        self.count = np.zeros(cap + 1, dtype=np.int64)
        self.maxD = np.full(cap + 1, -1.0)
        self.argslot = np.full(cap + 1, -1, dtype=np.int64)
        if n:
            self.count[self.orphan] = n
            kern.bucket_top(self.start, self.count, self.maxD, self.argslot, self.orig, self.D, self.orphan)
        self._todo = np.empty(n, dtype=idx)
        self._flags = np.empty(n, dtype=np.int8)
        self._reach = np.empty(cap + 1, dtype=np.int64)
        self._reach_cc = np.empty(cap + 1, dtype=np.float64)
        self._reach_all = np.empty(cap + 1, dtype=np.float64)
        self._cc = np.zeros(cap + 1, dtype=np.float64)
        self._dirty: set[int] = set()
        self.CX = np.empty((cap, d), dtype=np.float32)
        self.Cg = np.empty((cap, K), dtype=np.float64)
        self.Cnorm = np.empty(cap, dtype=np.float64)
        self.centre_rows = np.empty(cap, dtype=np.int64)
        self.k = 0
        self.use_faiss = True  # kept for callers; the labeled set is inserted exactly like picks
        self.taken = 0
        self.width = K * d
        self._next_relayout = RELAYOUT_FIRST
        self.screen = bool(SCREEN and self.prune and K == 1 and d >= SCREEN_MIN_DIM and n)
        if self.screen:
            need = cap_slots * (d + 8)
            spare = embedding.spare_bytes
            if spare is None:
                avail = available_memory()
                spare = need if avail is None else avail // 2
            self.screen = need <= spare
        if self.screen:
            # Screen rows live in slots (rows and slots coincide now): a bucket scan reads them in order.
            self.Q = np.empty((cap_slots, d), dtype=np.int8)
            self.qa = np.zeros(cap_slots, dtype=np.float32)
            self.qr = np.zeros(cap_slots, dtype=np.float32)
            kern.build_screen(self.g, self.X, self.Q[:n], self.qa[:n], self.qr[:n])
        else:
            self.Q = np.zeros((1, 1), dtype=np.int8)
            self.qa = np.zeros(1, dtype=np.float32)
            self.qr = np.zeros(1, dtype=np.float32)
        self._bound = kern.screen_constants(d)

    # -- rows of the pool --------------------------------------------------------------------------

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 features, float64 weights) of pool row `row`, wherever it now lives."""
        p = int(np.searchsorted(self.candidates, row))
        if p < self.n and self.candidates[p] == row:
            r = self.rowpos[p]
            return self.X[r], self.g[r]
        if self._owned:  # other rows sit after the candidates, in row order
            return self._F[self.n + row - p], self._G[self.n + row - p if self._g_owned else row]
        return self._F[row], self._G[row]

    # -- Tracker interface -------------------------------------------------------------------------

    def largest_norm(self) -> tuple[int, float]:
        if self._largest is None:
            raise ValueError("no candidate")
        return self._largest

    def init_centres(self, rows: np.ndarray) -> None:
        """Start from a set of centres (the labeled rows): exact nearest-centre distance for every candidate.

        Many labeled rows: FAISS's float32 k-NN proposes neighbours, distances are recomputed exactly in
        float64, and rows whose true nearest centre might lie beyond the k proposed are scanned in full;
        the candidates are then grouped into the labeled centres' buckets. Few rows (or no FAISS): they
        are inserted one by one like picks, farthest-first, so early centres spread over the pool.
        """
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        L = rows.size
        if L == 0:
            return
        faiss = _faiss() if self.use_faiss else None
        fresh = self.k == 0 and self.taken == 0 and self.n > 0
        if faiss is None or L <= KNN_NEIGHBOURS or not fresh:
            for row in self._farthest_first(rows):
                self.add(int(row))
            return
        self._knn_init(rows, faiss)

    def _knn_init(self, rows: np.ndarray, faiss) -> None:
        L, n = rows.size, self.n
        if self.capacity < L:
            raise ValueError(f"more centres than the capacity ({self.capacity}) given to the tracker")
        for i, r in enumerate(rows):
            self.CX[i], self.Cg[i] = self._row(int(r))
        self.centre_rows[:L] = rows
        every = np.arange(L)
        self.Cnorm[:L] = np.sqrt(kern.sq_norms(self.Cg, self.CX, every))
        kk = min(KNN_NEIGHBOURS, L)
        D = np.empty(n)
        near = np.empty(n, dtype=self.near.dtype)
        unsure = np.zeros(n, dtype=np.bool_)
        slots_rows = self.xrow[:n].astype(np.int64)
        propose = self._outer_proposal(L, kk) if self.g.shape[1] > 1 else self._faiss_proposal(L, kk, faiss)
        for start in range(0, n, SEARCH_CHUNK_ROWS):
            sl = slice(start, min(start + SEARCH_CHUNK_ROWS, n))
            idx, approx, tol = propose(slots_rows[sl], self.norms[sl])
            kern.refine_knn(
                self.g,
                self.X,
                slots_rows[sl],
                self.Cg[:L],
                self.CX[:L],
                idx,
                approx,
                tol,
                D[sl],
                near[sl],
                unsure[sl],
            )
        del propose
        self.stats.evaluated += n * kk
        self.stats.possible += n * L
        which = np.flatnonzero(unsure)
        if which.size:
            Dw = np.empty(which.size)
            nw = np.empty(which.size, dtype=near.dtype)
            kern.nearest_centre(self.g, self.X, slots_rows[which], self.Cg[:L], self.CX[:L], Dw, nw)
            D[which] = Dw
            near[which] = nw
            self.stats.unsure_rows += int(which.size)
            self.stats.evaluated += int(which.size) * L
        # Group the slots into the centres' buckets, each sorted by D (largest first).
        order = np.lexsort((-D, near))
        self.D[:n] = D[order]
        self.near[:n] = near[order]
        del D, near
        self.norms[:n] = self.norms[:n][order]
        self.orig[:n] = self.orig[:n][order]
        self.xrow[:n] = self.xrow[:n][order]
        self.slot_of[self.orig[:n]] = np.arange(n, dtype=self.slot_of.dtype)
        if self.screen:
            kern.permute_rows(self.Q[:n], order, np.empty(n, dtype=np.bool_))
            self.qa[:n] = self.qa[:n][order]
            self.qr[:n] = self.qr[:n][order]
        sizes = np.bincount(self.near[:n], minlength=L)
        self.count[:L] = sizes
        self.start[:L] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.count[self.orphan] = 0
        kern.install(self.start, self.count, self.maxD, self.argslot, self.orig, self.D, L)
        self.k = L
        if self.n * self.X.shape[1] >= RELAYOUT_MIN_ELEMENTS:
            self._relayout_rows()
        while self._next_relayout <= self.k:
            self._next_relayout *= RELAYOUT_FACTOR

    def _faiss_proposal(self, L: int, kk: int, faiss) -> Proposal:
        """Neighbour proposals from FAISS's float32 k-NN over the L centres' embeddings, with the float32
        error bound of each squared distance (‖x‖² + ‖y‖² − 2x·y, relative to the norms involved).

        Centres are sorted by norm and candidates come in norm order (the tracker starts so), so a block
        of candidates is searched only against the centres whose norms lie within reach:
        |‖x‖ − ‖c‖| < √(an upper bound on x's nearest distance, from the centres of about its own norm).
        With uncertainty weights, norms spread and this skips much of the n × L product.

        `refine_knn` flags a row for a full exact scan when its last proposal value, less the tolerance,
        does not clear the exact best. That value is set to the least lower bound of every centre not
        listed before it (outside the window: the norm gap; inside: `_norm_band_bound`) + tolerance."""
        order = np.argsort(self.Cnorm[:L], kind="stable")
        cnorms = self.Cnorm[:L][order]
        emb = _embed32(self.Cg, self.CX, order)  # centres in norm order
        rel = max(1e-5, 4.0 * emb.shape[1] * float(np.finfo(np.float32).eps)) * (1 + 1e-6)
        edges = np.linspace(0, L, min(NORM_BANDS, L) + 1).astype(np.int64)
        bands = np.stack([cnorms[edges[:-1]], cnorms[edges[1:] - 1]], axis=1)
        lab_norm2 = float(cnorms[-1]) ** 2
        slack = 1 - kern.NORM_SLACK
        seed = max(kk, min(NORM_SEED, L // 8))

        def search(q: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
            """FAISS's k smallest among the centres a:b (norm order), padded to kk with (-1, ∞)."""
            k = min(kk, b - a)
            idx = np.full((q.shape[0], kk), -1, dtype=np.int64)
            vals = np.full((q.shape[0], kk), np.inf)
            if k:
                sq32, local = faiss.knn(q, emb[a:b], k)
                idx[:, :k] = order[a + local]
                vals[:, :k] = sq32
            return idx, vals

        def block(q: np.ndarray, norms: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
            # The centres of about the block's norms first; their nearest bounds each row's nearest
            # distance from above, which sets the window of norms still worth searching.
            a = max(0, int(np.searchsorted(cnorms, norms.min())) - seed)
            b = min(L, int(np.searchsorted(cnorms, norms.max())) + seed)
            idx, vals = search(q, a, b)
            reach = np.sqrt(vals[:, 0] + tol) * (1 + 1e-9)
            lo = min(a, int(np.searchsorted(cnorms, (norms - reach).min(), side="left")))
            hi = max(b, int(np.searchsorted(cnorms, (norms + reach).max(), side="right")))
            if lo < a or hi > b:  # merge the k smallest of the seed and the two sides
                parts = [(idx, vals), search(q, lo, a), search(q, b, hi)]
                idx = np.concatenate([p[0] for p in parts], axis=1)
                vals = np.concatenate([p[1] for p in parts], axis=1)
                top = np.argsort(vals, axis=1, kind="stable")[:, :kk]
                idx = np.take_along_axis(idx, top, axis=1)
                vals = np.take_along_axis(vals, top, axis=1)
            # Centres outside the window: at least the norm gap to its nearest excluded neighbours.
            below = (norms - cnorms[lo - 1]) ** 2 if lo > 0 else np.full(q.shape[0], np.inf)
            above = (cnorms[hi] - norms) ** 2 if hi < L else np.full(q.shape[0], np.inf)
            bound = np.minimum(below, above) * slack
            if hi - lo >= kk:  # those inside past the kk listed, and the last listed itself (never
                # below kth − tol: each band's error term is at most the row's tolerance)
                bound = np.minimum(bound, _norm_band_bound(norms, vals[:, -1], rel, bands))
            vals[:, -1] = bound + tol
            return idx, vals, hi - lo

        def propose(rows: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            q = _embed32(self.g, self.X, rows)
            tol = rel * (norms * norms + lab_norm2) + 1e-30
            idx = np.empty((rows.size, kk), dtype=np.int64)
            vals = np.empty((rows.size, kk))
            for s in range(0, rows.size, NORM_BLOCK_ROWS):
                sl = slice(s, s + NORM_BLOCK_ROWS)
                idx[sl], vals[sl], width = block(q[sl], norms[sl], tol[sl])
                self.stats.labeled_pairs += width * q[sl].shape[0]
            return idx, vals, tol

        return propose

    def _outer_proposal(self, L: int, kk: int) -> Proposal:
        """Neighbour proposals for outer-product rows (BADGE, K > 1) without K·d vectors: ‖a − b‖² =
        ‖a‖² + ‖b‖² − 2(g_a·g_b)(f_a·f_b) from two float64 matrix products, K and d wide instead of K·d
        (FAISS on 10 × 512 = 5,120-wide vectors was most of a BADGE cycle). The form cancels, so its
        tolerance is `kern.OUTER_SLACK` of the norms, far above its rounding; `refine_knn` decides exactly."""
        Cg, CX = self.Cg[:L], self.CX[:L].astype(np.float64)
        lab_sq = self.Cnorm[:L] ** 2
        lab_max = float(lab_sq.max())

        def propose(rows: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            q_sq = norms**2
            idx_all = np.empty((rows.size, kk), dtype=np.int64)
            vals_all = np.empty((rows.size, kk))
            step = max(256, OUTER_CHUNK_ENTRIES // L)
            for a in range(0, rows.size, step):
                r = rows[a : a + step]
                approx = (self.g[r] @ Cg.T) * (self.X[r].astype(np.float64) @ CX.T)
                approx *= -2.0
                approx += q_sq[a : a + step, None]
                approx += lab_sq[None, :]
                idx = (
                    np.argpartition(approx, kk - 1, axis=1)[:, :kk] if kk < L else np.argsort(approx, axis=1)
                )
                vals = np.take_along_axis(approx, idx, axis=1)
                order = np.argsort(vals, axis=1, kind="stable")
                idx_all[a : a + step] = np.take_along_axis(idx, order, axis=1)
                vals_all[a : a + step] = np.take_along_axis(vals, order, axis=1)
            return idx_all, vals_all, kern.OUTER_SLACK * (q_sq + lab_max)

        return propose

    def _farthest_first(self, rows: np.ndarray) -> np.ndarray:
        L = rows.size
        if L <= 2:
            return rows
        head = rows if L <= FARTHEST_FIRST_MAX else rows[:FARTHEST_FIRST_MAX]
        feats = np.empty((head.size, self.X.shape[1]), dtype=np.float32)
        weights = np.empty((head.size, self.g.shape[1]), dtype=np.float64)
        for i, r in enumerate(head):
            feats[i], weights[i] = self._row(int(r))
        sub = CentreTracker(DenseEmbedding(feats, weights), np.arange(head.size), head.size, self.prune)
        picked = k_center_greedy(sub, np.empty(0, dtype=np.int64), head.size).positions
        return np.concatenate([head[picked], rows[head.size :]])

    def add(self, row: int, max_d: float | None = None) -> None:
        """Make pool row `row` a centre and lower every candidate's D accordingly.

        `max_d` is accepted for the interface; buckets know their own largest D.
        """
        f, gr = self._row(row)
        E = kern.embed(gr, f)
        cnorm = float(np.sqrt((E * E).sum()))
        k = self.k
        if k >= self.capacity:
            raise ValueError(f"more centres than the capacity ({self.capacity}) given to the tracker")
        self.CX[k] = f
        self.Cg[k] = gr
        self.Cnorm[k] = cnorm
        self.centre_rows[k] = row
        self._refresh_dirty()
        # Most buckets are cleared by the norm bound before any feature is read: a lower threshold.
        reach = kern.reach_parallel if 4 * k * self.X.shape[1] >= PARALLEL_MIN_WORK else kern.reach
        nb = reach(
            self.Cg,
            self.CX,
            self.Cnorm,
            k,
            E,
            cnorm,
            self.count,
            self.maxD,
            self.prune,
            self.orphan,
            self._reach,
            self._reach_cc,
            self._reach_all,
        )
        buckets = self._reach[:nb]
        self._cc[buckets] = self._reach_cc[:nb]
        m = kern.collect(self.start, self.count, buckets, nb, self._cc, self.D, self._todo)
        screen = self.screen and float(np.abs(E).max()) <= kern.SCREEN_MAX_ABS
        c32 = E[0].astype(np.float32)
        rc = float(np.sqrt(((E[0] - c32.astype(np.float64)) ** 2).sum())) * (1 + 1e-9) if screen else 0.0
        triage = kern.triage_parallel if m * self.X.shape[1] >= PARALLEL_MIN_WORK else kern.triage
        triage(
            self.norms,
            self.D,
            self.near,
            self._cc,
            self._todo,
            m,
            cnorm,
            self.prune,
            self.Q,
            self.qa,
            self.qr,
            c32,
            rc,
            self._bound,
            screen,
            self._flags,
        )
        exact, screened = kern.keep_exact(self._todo, m, self._flags)
        lower = kern.lower_exact_parallel if exact * E.size >= PARALLEL_MIN_WORK else kern.lower_exact
        improved = lower(
            self.g,
            self.X,
            self.xrow,
            self.D,
            self.near,
            self._todo,
            exact,
            E,
            k,
            self.norms,
            gr,
            f,
            cnorm * cnorm,
        )
        scanned, m = m, exact  # from here on todo lists the slots that got an exact distance
        if self.count[self.orphan] == 0 and self.used + improved > self.D.size:
            self._compact(new_id=k)  # no room to append them: compact, with the improved ones last
        else:
            self.used = kern.apply(
                *self._slot_records(),
                buckets,
                nb,
                self._todo,
                m,
                self.used,
                k,
                self.orphan,
            )
        self.stats.screened += int(screened)
        self.stats.evaluated += int(exact)
        self.stats.possible += self.n - self.taken
        self.stats.scanned += scanned
        self.k += 1
        if self.k >= self._next_relayout:
            self._next_relayout *= RELAYOUT_FACTOR
            if self.n * self.X.shape[1] >= RELAYOUT_MIN_ELEMENTS and self.count[self.orphan] == 0:
                self._relayout_rows()

    def _compact(self, new_id: int = -1) -> None:
        self.used = kern.compact(*self._slot_records(), self.capacity + 1, new_id)
        if new_id >= 0:  # the moved slots' norms were not set aside: recompute them from their rows
            lo, hi = int(self.start[new_id]), int(self.start[new_id] + self.count[new_id])
            self.norms[lo:hi] = np.sqrt(kern.sq_norms(self.g, self.X, self.xrow[lo:hi].astype(np.int64)))

    def _slot_records(self) -> tuple:
        """Bucket ranges and slot records, in the order `kern.apply` and `kern.compact` take them."""
        return (
            self.start,
            self.count,
            self.maxD,
            self.argslot,
            self.D,
            self.near,
            self.norms,
            self.orig,
            self.xrow,
            self.slot_of,
            self.Q,
            self.qa,
            self.qr,
            self.screen,
        )

    def _relayout_rows(self) -> None:
        """Move feature rows into slot order, so that exact distances in a bucket read nearby memory."""
        self._compact()
        live = self.used
        # Index arrays in the slots' own width (int32 below 2**31 rows): this runs on the whole pool, and
        # its temporaries add to the peak memory.
        idx = self.xrow.dtype
        referenced = np.zeros(self.n, dtype=np.bool_)
        referenced[self.xrow[:live]] = True
        rest = np.flatnonzero(~referenced)
        perm = np.empty(live + rest.size, dtype=np.int64)
        perm[:live] = self.xrow[:live]
        perm[live:] = rest
        del rest
        done = referenced  # reused as permute_rows' scratch
        kern.permute_rows(self.X, perm, done)
        kern.permute_rows(self.g, perm, done)
        del done, referenced
        inv = np.empty(self.n, dtype=idx)
        inv[perm] = np.arange(perm.size, dtype=idx)
        del perm
        self.rowpos[:] = inv[self.rowpos]
        self.xrow[:live] = np.arange(live, dtype=idx)

    def _refresh_dirty(self) -> None:
        for a in self._dirty:
            kern.bucket_top(self.start, self.count, self.maxD, self.argslot, self.orig, self.D, a)
        self._dirty.clear()

    def distances(self) -> np.ndarray:
        """D for every candidate in the caller's order (-1 for picked ones)."""
        live = self.slot_of >= 0
        out = np.full(self.n, -1.0)
        out[live] = self.D[self.slot_of[live]]
        return out

    def argmax(self) -> tuple[int, float]:
        """The live candidate of largest D and its D; ties go to the earliest candidate in the caller's order."""
        self._refresh_dirty()
        s = kern.best_bucket(self.maxD, self.argslot, self.count, self.orig, self.k, self.orphan)
        if s < 0:
            raise ValueError("no candidate left")
        return int(self.orig[s]), float(self.D[s])

    def earliest_at_least(self, threshold: float) -> tuple[int, float]:
        self._refresh_dirty()
        t, d = kern.earliest_at_least(self.maxD, self.start, self.count, self.D, self.orig, threshold)
        return int(t), float(d)

    def square_norms(self) -> np.ndarray:
        slots = self.slot_of
        return np.where(slots >= 0, self.norms[slots] ** 2, -1.0)

    def take(self, t: int) -> None:
        """Remove candidate position t from play (it has been selected)."""
        s = int(self.slot_of[t])
        self.D[s] = -1.0
        self.slot_of[t] = -1
        a = int(self.near[s])
        self._dirty.add(self.orphan if a < 0 else a)
        self.taken += 1


def warm_up(labeled: int = 0) -> None:
    """Run the kernels once on a tiny pool, so later calls find them loaded (or compiled and cached).

    With more than KNN_NEIGHBOURS labeled rows the real run takes the FAISS path, so that is warmed too.
    """
    rng = np.random.default_rng(0)
    n, d = 96, SCREEN_MIN_DIM
    F = rng.random((n, d), dtype=np.float32)
    w = rng.random(n)
    lab = KNN_NEIGHBOURS + 1 if labeled > KNN_NEIGHBOURS else min(labeled, 4)
    dense_kcg(F, w, np.arange(lab, n), np.arange(lab), 8)


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
