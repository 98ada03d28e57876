"""The two selection loops, written once over the tracker interface: K-Center-Greedy and K-Means++."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uwe_cli.selection.tracker import Progress, Tracker, TrackerStats, first_at_least

PROGRESS_STEPS = 200


@dataclass
class KCGResult:
    positions: np.ndarray  # indices into the candidate array, in pick order
    distances: np.ndarray  # Euclidean distance at pick time (norm for a first pick without centres)
    stats: TrackerStats


def _progress_step(budget: int) -> int:
    return max(1, budget // PROGRESS_STEPS)


def largest_norm_pick(tracker: Tracker) -> tuple[int, float, float]:
    """(position, its squared norm, the largest squared norm) with no centres yet: norms within
    rounding of the largest tie (`Tracker.tie_tolerance`), and the earliest of them wins."""
    t, top = tracker.largest_norm()
    if 0 < top < np.inf:
        t, sq = first_at_least(tracker.square_norms(), top * (1 - tracker.tie_tolerance))
        return t, sq, top
    return t, top, top


def next_pick(tracker: Tracker) -> tuple[int, float, float]:
    """(position, its D, the largest D): the candidate of largest D, where D within rounding of the
    largest tie (`Tracker.tie_tolerance`) and the earliest of them wins.

    Engines sum a squared distance in different orders (numba sequentially, numpy pairwise, torch in
    blocks), so distances equal in exact arithmetic come out a few ulps apart, differently per engine;
    a plain argmax would let that rounding choose. Counting them as ties makes every engine pick alike.
    """
    t, d = tracker.argmax()
    if 0 < d < np.inf:
        first, value = tracker.earliest_at_least(d * (1 - tracker.tie_tolerance))
        if 0 <= first < t:
            return first, value, d
    return t, d, d


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
        t, sq, _ = largest_norm_pick(tracker)
        positions[0], distances[0] = t, np.sqrt(sq)
        tracker.take(t)
        if budget > 1:
            tracker.add(int(tracker.candidates[t]))
        first = 1
    for b in range(first, budget):
        t, d, top = next_pick(tracker)
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
        t, _, _ = largest_norm_pick(tracker)
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
