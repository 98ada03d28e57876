"""Selection strategies, registered by name so a new strategy is one function and one decorator.

A strategy sees a `SelectionProblem`, the same for unit and detection pools: the candidates, the
labeled rows, the budget, each unit's normalised uncertainty, and a factory that builds a tracker for
the embedding it asks for ("uwe": u^tau·f, "features": f, "badge": (p − onehot) ⊗ f).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from uwe_cli.errors import SelectionError
from uwe_cli.selection.greedy import k_center_greedy, kmeanspp_seeding
from uwe_cli.selection.tracker import Progress, Tracker

EMBEDDINGS = ("uwe", "features", "badge")


@dataclass
class SelectionProblem:
    """What every strategy may use. Rows index the pool's units; candidates are ascending rows."""

    candidates: np.ndarray
    labeled: np.ndarray
    budget: int
    seed: int
    unit_uncertainty: np.ndarray | None  # normalised uncertainty per unit (None: not read)
    make_tracker: Callable[[str], Tracker]  # embedding name -> a tracker over the candidates
    progress: Progress | None = None


@dataclass
class StrategyOutput:
    positions: np.ndarray  # into `candidates`, in pick order
    distances: np.ndarray | None  # KCG distance at pick time, None for non-KCG strategies
    skipped_fraction: float | None = None


@dataclass(frozen=True)
class Strategy:
    name: str
    func: Callable[[SelectionProblem], StrategyOutput]
    embedding: str | None  # what the tracker embeds, None when the strategy needs no tracker
    needs_uncertainty: bool
    needs_probs: bool
    kinds: tuple[str, ...]  # pool kinds it works on
    help: str


STRATEGIES: dict[str, Strategy] = {}


def register(
    name: str,
    *,
    embedding: str | None = None,
    needs_uncertainty: bool = True,
    needs_probs: bool = False,
    kinds: tuple[str, ...] = ("unit", "detection"),
    help: str = "",
) -> Callable[[Callable[[SelectionProblem], StrategyOutput]], Callable[[SelectionProblem], StrategyOutput]]:
    if embedding is not None and embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding '{embedding}' (one of {', '.join(EMBEDDINGS)})")

    def deco(
        func: Callable[[SelectionProblem], StrategyOutput],
    ) -> Callable[[SelectionProblem], StrategyOutput]:
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' registered twice")
        STRATEGIES[name] = Strategy(name, func, embedding, needs_uncertainty, needs_probs, kinds, help)
        return func

    return deco


def get_strategy(name: str, kind: str | None = None) -> Strategy:
    """The strategy called `name`; with `kind`, refused when it does not work on that pool kind."""
    try:
        strategy = STRATEGIES[name]
    except KeyError:
        raise SelectionError(f"unknown strategy '{name}' (choose from {', '.join(STRATEGIES)})") from None
    if kind is not None and kind not in strategy.kinds:
        usable = [s.name for s in STRATEGIES.values() if kind in s.kinds]
        raise SelectionError(f"--strategy {name} is not available for {kind} pools (use {', '.join(usable)})")
    return strategy


def strategy_help() -> str:
    """One line per strategy, for `--help`."""
    return "; ".join(f"{s.name}: {s.help}" for s in STRATEGIES.values())


def _kcg(problem: SelectionProblem, embedding: str) -> StrategyOutput:
    res = k_center_greedy(problem.make_tracker(embedding), problem.labeled, problem.budget, problem.progress)
    return StrategyOutput(res.positions, res.distances, res.stats.skipped_fraction)


def _seeded(problem: SelectionProblem, embedding: str) -> StrategyOutput:
    tracker = problem.make_tracker(embedding)
    positions = kmeanspp_seeding(tracker, problem.labeled, problem.budget, problem.seed, problem.progress)
    return StrategyOutput(positions, None, tracker.stats.skipped_fraction)


@register(
    "uwe", embedding="uwe", help="K-Center-Greedy on uncertainty-weighted embeddings u^tau·f (the paper)"
)
def uwe_kcg(problem: SelectionProblem) -> StrategyOutput:
    return _kcg(problem, "uwe")


@register("coreset", embedding="features", needs_uncertainty=False, help="K-Center-Greedy on raw features")
def coreset(problem: SelectionProblem) -> StrategyOutput:
    return _kcg(problem, "features")


@register("uncertainty", help="the top-k normalised uncertainty (ties to the earlier unit)")
def top_uncertainty(problem: SelectionProblem) -> StrategyOutput:
    assert problem.unit_uncertainty is not None
    u = problem.unit_uncertainty[problem.candidates]
    return StrategyOutput(np.argsort(-u, kind="stable")[: problem.budget], None)


@register("random", needs_uncertainty=False, help="a uniform random sample (seeded)")
def random_sample(problem: SelectionProblem) -> StrategyOutput:
    rng = np.random.default_rng(problem.seed)
    return StrategyOutput(rng.choice(problem.candidates.size, size=problem.budget, replace=False), None)


@register("kmeanspp", embedding="uwe", help="K-Means++ seeding on uncertainty-weighted embeddings (seeded)")
def kmeanspp(problem: SelectionProblem) -> StrategyOutput:
    return _seeded(problem, "uwe")


@register(
    "badge",
    embedding="badge",
    needs_uncertainty=False,
    needs_probs=True,
    kinds=("unit",),
    help="K-Means++ on BADGE gradient embeddings (needs a probs column)",
)
def badge(problem: SelectionProblem) -> StrategyOutput:
    return _seeded(problem, "badge")


def badge_weights(probs: np.ndarray) -> np.ndarray:
    """BADGE's loss gradient factor p − onehot(argmax p) (Eq. 1); the embedding is this ⊗ f(x)."""
    g = probs.astype(np.float64)
    g[np.arange(g.shape[0]), np.argmax(probs, axis=1)] -= 1.0
    return g
