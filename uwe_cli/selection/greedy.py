"""The two selection loops, written once over the tracker interface: K-Center-Greedy and K-Means++."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from uwe_cli.selection.tracker import Progress, Tracker, TrackerStats

PROGRESS_STEPS = 200
TIE_CHUNK_ELEMENTS = 1 << 22  # (tied candidate, centre, feature) differences formed at once


@dataclass
class KCGResult:
    positions: np.ndarray  # indices into the candidate array, in pick order
    distances: np.ndarray  # Euclidean distance at pick time (norm for a first pick without centres)
    stats: TrackerStats


def _progress_step(budget: int) -> int:
    return max(1, budget // PROGRESS_STEPS)


def resolve_ties(tracker: Tracker, positions: np.ndarray, centre_rows: np.ndarray) -> tuple[int, float]:
    """The reference's choice among candidates whose D are within rounding of each other.

    Engines sum a squared distance in different orders (numba sequentially, numpy pairwise, torch in
    blocks), so distances that tie in exact arithmetic come out a few ulps apart, differently per
    engine. Recomputing the few near-tied candidates' distances to every centre as the float64
    reference does (direct differences summed by numpy; without centres, the squared norm) makes every
    engine pick what the reference picks; ties go to the earlier candidate. Identical embeddings are
    computed once.
    """
    X, inverse = np.unique(tracker.dense_rows(tracker.candidates[positions]), axis=0, return_inverse=True)
    if centre_rows.size == 0:
        D = (X**2).sum(axis=1)
    else:
        D = np.full(X.shape[0], np.inf)
        step = max(1, TIE_CHUNK_ELEMENTS // max(1, X.size))
        for s in range(0, centre_rows.size, step):
            C = tracker.dense_rows(centre_rows[s : s + step])
            np.minimum(D, ((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=2).min(axis=1), out=D)
    D = D[inverse.reshape(-1)]
    i = int(np.argmax(D))  # the first maximum: positions are ascending
    return int(positions[i]), float(D[i])


def largest_norm_pick(tracker: Tracker) -> tuple[int, float]:
    """The candidate of largest norm (no centres yet), near-ties resolved as the reference does."""
    t, sq = tracker.largest_norm()
    if sq > 0:
        near = np.flatnonzero(tracker.square_norms() >= sq * (1 - 2 * tracker.tie_tolerance))
        if near.size > 1:
            return resolve_ties(tracker, near, np.empty(0, dtype=np.int64))
    return t, sq


def next_pick(tracker: Tracker, centre_rows: Callable[[], np.ndarray]) -> tuple[int, float, float]:
    """(position, its D, the largest D the engine holds): the engine's argmax unless near-tied."""
    t, d = tracker.argmax()
    top = d
    if 0 < d < np.inf:
        near = tracker.near_max(d * (1 - tracker.tie_tolerance))
        if near.size > 1:
            t, d = resolve_ties(tracker, near, centre_rows())
    return t, d, top


def k_center_greedy(
    tracker: Tracker, centres: np.ndarray, budget: int, progress: Progress | None = None
) -> KCGResult:
    """Algorithm 1 of the paper, exactly: argmax of the squared float64 distance, ties to the earlier candidate.

    Without centres the first pick is the candidate of largest embedding norm (its norm is reported as
    its distance).
    """
    centres = np.asarray(centres, dtype=np.int64)
    positions = np.empty(budget, dtype=np.int64)
    distances = np.empty(budget, dtype=np.float64)
    step = _progress_step(budget)
    first = 0
    if centres.size:
        tracker.init_centres(centres)
    elif budget:
        t, sq = largest_norm_pick(tracker)
        positions[0], distances[0] = t, np.sqrt(sq)
        tracker.take(t)
        if budget > 1:
            tracker.add(int(tracker.candidates[t]))
        first = 1
    for b in range(first, budget):
        t, d, top = next_pick(
            tracker, lambda b=b: np.concatenate([centres, tracker.candidates[positions[:b]]])
        )
        positions[b], distances[b] = t, np.sqrt(d)
        tracker.take(t)
        if b + 1 < budget:
            tracker.add(int(tracker.candidates[t]), max_d=top)
        if progress is not None and (b % step == 0 or b + 1 == budget):
            progress(b + 1, budget)
    return KCGResult(positions, distances, tracker.stats)


def kmeanspp_seeding(
    tracker: Tracker, centres: np.ndarray, budget: int, seed: int, progress: Progress | None = None
) -> np.ndarray:
    """K-Means++ seeding: each pick drawn with probability ∝ squared distance to the nearest centre.

    Labeled rows start as centres; without them the first pick is the largest-norm candidate, as in
    BADGE's reference implementation. The draw: cumsum of D², uniform × total, searchsorted right.
    """
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, dtype=np.int64)
    positions = np.empty(budget, dtype=np.int64)
    step = _progress_step(budget)
    start = 0
    if centres.size:
        tracker.init_centres(centres)
    elif budget:
        t, _ = largest_norm_pick(tracker)
        positions[0] = t
        tracker.take(t)
        if budget > 1:
            tracker.add(int(tracker.candidates[t]))
        start = 1
    for b in range(start, budget):
        D = tracker.distances()
        mass = np.clip(D, 0.0, None)
        cum = np.cumsum(mass)
        total = cum[-1]
        if total > 0:
            t = int(np.searchsorted(cum, rng.random() * total, side="right"))
            t = min(t, cum.size - 1)
        else:  # every live candidate coincides with a centre: draw uniformly among them
            live = np.flatnonzero(D >= 0)
            t = int(live[rng.integers(live.size)])
        positions[b] = t
        tracker.take(t)
        if b + 1 < budget:
            tracker.add(int(tracker.candidates[t]))
        if progress is not None and (b % step == 0 or b + 1 == budget):
            progress(b + 1, budget)
    return positions
