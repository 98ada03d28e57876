"""Selection strategies, registered by name so a new strategy is one function and one decorator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from uwe_cli.errors import SelectionError
from uwe_cli.selection.engine import Progress, as_weights, k_center_greedy, make_tracker


@dataclass
class StrategyInput:
    """What every strategy may use. Rows index the pool; candidates are ascending pool rows."""

    features: np.ndarray
    u_norm: np.ndarray | None  # normalised uncertainty per pool row
    weights: np.ndarray | None  # u^tau per pool row (None: unweighted)
    probs: np.ndarray | None
    candidates: np.ndarray
    labeled: np.ndarray
    budget: int
    seed: int
    prune: bool = True
    progress: Progress | None = None
    backend: str = "numba"
    device: str = "cpu"


@dataclass
class StrategyOutput:
    positions: np.ndarray  # into `candidates`, in pick order
    distances: np.ndarray | None  # KCG distance at pick time, None for non-KCG strategies
    skipped_fraction: float | None = None


@dataclass(frozen=True)
class Strategy:
    name: str
    func: Callable[[StrategyInput], StrategyOutput]
    needs_uncertainty: bool
    needs_probs: bool
    help: str


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, needs_uncertainty: bool = True, needs_probs: bool = False, help: str = ""):
    def deco(func: Callable[[StrategyInput], StrategyOutput]) -> Callable[[StrategyInput], StrategyOutput]:
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' registered twice")
        STRATEGIES[name] = Strategy(name, func, needs_uncertainty, needs_probs, help)
        return func

    return deco


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise SelectionError(f"unknown strategy '{name}' (choose from {', '.join(STRATEGIES)})") from None


def _kcg(inp: StrategyInput, weights: np.ndarray | None) -> StrategyOutput:
    res = k_center_greedy(
        inp.features,
        weights,
        inp.candidates,
        inp.labeled,
        inp.budget,
        prune=inp.prune,
        progress=inp.progress,
        backend=inp.backend,
        device=inp.device,
    )
    return StrategyOutput(res.positions, res.distances, res.stats.skipped_fraction)


@register("uwe", help="K-Center-Greedy on uncertainty-weighted embeddings u^tau·f (the paper's method)")
def uwe_kcg(inp: StrategyInput) -> StrategyOutput:
    return _kcg(inp, inp.weights)


@register("coreset", needs_uncertainty=False, help="K-Center-Greedy on raw features (CoreSet)")
def coreset(inp: StrategyInput) -> StrategyOutput:
    return _kcg(inp, None)


@register("uncertainty", help="top-k normalised uncertainty (ties to the earlier row)")
def top_uncertainty(inp: StrategyInput) -> StrategyOutput:
    assert inp.u_norm is not None
    u = inp.u_norm[inp.candidates]
    order = np.argsort(-u, kind="stable")[: inp.budget]
    return StrategyOutput(order, None)


@register("random", needs_uncertainty=False, help="uniform random sample (seeded)")
def random_sample(inp: StrategyInput) -> StrategyOutput:
    rng = np.random.default_rng(inp.seed)
    return StrategyOutput(rng.choice(inp.candidates.size, size=inp.budget, replace=False), None)


def kmeanspp_seeding(
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
    """K-Means++ seeding: each pick drawn with probability ∝ squared distance to the nearest centre.

    Labeled rows start as centres; without them the first pick is the largest-norm candidate, as in
    BADGE's reference implementation. Distances are the same exact values KCG uses.
    """
    rng = np.random.default_rng(seed)
    tracker = make_tracker(features, G, candidates, centres.size + budget, prune, backend, device)
    positions = np.empty(budget, dtype=np.int64)
    start = 0
    if centres.size:
        tracker.init_centres(centres)
    elif budget:
        t = int(np.argmax(tracker.live_sq_norms()))
        positions[0] = t
        tracker.take(t)
        if budget > 1:
            tracker.add(int(candidates[t]))
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
            tracker.add(int(candidates[t]))
        if progress is not None:
            progress(b + 1, budget)
    return positions


def _seeded(inp: StrategyInput, G: np.ndarray) -> StrategyOutput:
    pos = kmeanspp_seeding(
        inp.features,
        G,
        inp.candidates,
        inp.labeled,
        inp.budget,
        inp.seed,
        inp.prune,
        inp.progress,
        inp.backend,
        inp.device,
    )
    return StrategyOutput(pos, None)


@register("kmeanspp", help="K-Means++ seeding on uncertainty-weighted embeddings (seeded)")
def kmeanspp(inp: StrategyInput) -> StrategyOutput:
    return _seeded(inp, as_weights(inp.weights, inp.features.shape[0]))


def badge_weights(probs: np.ndarray) -> np.ndarray:
    """BADGE's loss gradient factor p − onehot(argmax p) (Eq. 1); the embedding is this ⊗ f(x)."""
    g = probs.astype(np.float64)
    g[np.arange(g.shape[0]), np.argmax(probs, axis=1)] -= 1.0
    return g


@register("badge", needs_uncertainty=False, needs_probs=True, help="K-Means++ on BADGE gradient embeddings")
def badge(inp: StrategyInput) -> StrategyOutput:
    assert inp.probs is not None
    return _seeded(inp, badge_weights(inp.probs))
