"""`uwe select` on detection pools: class-wise aggregated UWEs (Eq. 9) and exact block-sparse KCG."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from uwe_cli.batch import Batch
from uwe_cli.detection_pool import is_detection_pool, read_detection_pool
from uwe_cli.errors import SelectionError
from uwe_cli.selection.engine import Progress

__all__ = ["is_detection_pool", "run_detection_select"]
DETECTION_STRATEGIES = ("uwe", "coreset", "uncertainty", "random")


def run_detection_select(
    paths: list[Path],
    budget: int,
    strategy: str,
    uncertainty: str | None,
    tau: float,
    normalize: str,
    labeled_ids: list[str],
    exclude_ids: list[str],
    aggregate: str,
    seed: int,
    prune: bool,
    progress: Progress | None,
    started: float,
):
    """Select images from a detection pool; `coreset` is class-wise KCG with tau = 0 (raw box features)."""
    from uwe_cli.select import SelectResult, resolve_split
    from uwe_cli.selection.classwise import build_classwise, classwise_kcg

    if strategy not in DETECTION_STRATEGIES:
        raise SelectionError(
            f"--strategy {strategy} is not available for detection pools (use {', '.join(DETECTION_STRATEGIES)})"
        )
    pool = read_detection_pool(paths, None if uncertainty in (None, "", "auto") else uncertainty)
    split = resolve_split(pool.image_ids, labeled_ids, exclude_ids, budget)
    labeled_rows, candidates, in_play = split.labeled, split.candidates, split.in_play
    emb = build_classwise(pool, in_play, 0.0 if strategy == "coreset" else tau, normalize, aggregate)
    stats: dict[str, int] = {}
    distances: np.ndarray | None = None
    if strategy in ("uwe", "coreset"):
        picks, distances = classwise_kcg(emb, candidates, labeled_rows, budget, progress, prune, stats)
    elif strategy == "uncertainty":
        order = np.argsort(-emb.image_uncertainty[candidates], kind="stable")[:budget]
        picks = candidates[order]
    else:
        picks = candidates[np.random.default_rng(seed).choice(candidates.size, size=budget, replace=False)]
    u = emb.image_uncertainty[picks]
    extra = {}
    if pool.sources is not None:
        extra["source"] = pool.sources.take(picks).to_pylist()
    batch = Batch(
        ids=pool.image_ids.take(picks).to_pylist(),
        uncertainty=[float(v) for v in u],
        distance=[float(v) for v in distances] if distances is not None else [None] * len(picks),
        extra=extra,
    )
    unpruned = stats.get("distances_unpruned", 0)
    summary = {
        "strategy": strategy,
        "budget": budget,
        "pool_size": pool.num_images,
        "boxes": pool.num_boxes,
        "candidates": int(candidates.size),
        "labeled": int(labeled_rows.size),
        "labeled_missing": split.missing_labeled,
        "excluded": int(split.excluded.size),
        "feature_dim": pool.dim,
        "num_classes": pool.num_classes,
        "task": "detection",
        "aggregate": aggregate,
        "uncertainty": pool.uncertainty_column,
        "tau": tau,
        "normalize": normalize,
        "seed": seed,
        "skipped_distance_fraction": (1 - stats.get("distances", 0) / unpruned) if unpruned else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return SelectResult(batch, summary, split.warnings)
