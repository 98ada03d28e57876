"""`uwe select` as a library call: pool(s) + labeled IDs → the next batch."""

from __future__ import annotations

import glob
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli.batch import Batch
from uwe_cli.embedding import normalize_uncertainty, uwe_weights
from uwe_cli.errors import ResourceError, SelectionError
from uwe_cli.ids import read_id_file, rows_of
from uwe_cli.pool import Pool, estimate_matrix_bytes, pool_files, read_pool
from uwe_cli.selection.engine import Progress
from uwe_cli.selection.strategies import StrategyInput, get_strategy

DEVICES = ("auto", "cpu", "cuda")
# Working memory of the selection beyond the feature matrix, per row: distances, nearest centre, norms,
# norm order and positions, weights, IDs (measured ~110 bytes at 10M rows).
PER_ROW_OVERHEAD_BYTES = 120


@dataclass
class SelectResult:
    batch: Batch
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def parse_memory(text: str) -> int:
    """'8G', '512M', '1.5GiB', '2000000000' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise SelectionError(f"--max-memory: cannot read '{text}' (examples: 8G, 512M)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_device(device: str) -> tuple[str, str]:
    """(backend, device): the numba CPU engine, or the torch engine on CUDA (auto picks CUDA when present)."""
    if device not in DEVICES:
        raise SelectionError(f"unknown --device '{device}' (choose from {', '.join(DEVICES)})")
    if device == "cpu":
        return "numba", "cpu"
    if device == "auto" and not glob.glob("/dev/nvidia[0-9]*") and "torch" not in sys.modules:
        # No NVIDIA device node: do not pay torch's import (hundreds of MB of CUDA libraries) to learn that.
        return "numba", "cpu"
    import torch

    if torch.cuda.is_available():
        return "torch", "cuda"
    if device == "cuda":
        raise ResourceError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return "numba", "cpu"


def check_memory(paths: list[Path], max_memory: int | None) -> int:
    rows, dim, matrix = estimate_matrix_bytes(paths)
    need = matrix + rows * PER_ROW_OVERHEAD_BYTES
    limit = max_memory if max_memory is not None else available_memory()
    if limit is not None and need > limit:
        raise ResourceError(
            f"pool needs about {need / 2**30:.1f} GiB ({rows:,} rows × {dim} features) but "
            f"{'--max-memory allows' if max_memory is not None else 'only'} {limit / 2**30:.1f} GiB "
            f"{'' if max_memory is not None else 'is available'}".rstrip()
        )
    return need


def run_select(
    pools: list[str | Path],
    budget: int,
    strategy: str = "uwe",
    uncertainty: str | None = None,
    tau: float = 1.0,
    normalize: str = "minmax",
    labeled: str | Path | None = None,
    exclude: str | Path | None = None,
    aggregate: str = "max",
    seed: int = 0,
    device: str = "auto",
    max_memory: int | None = None,
    prune: bool = True,
    progress: Progress | None = None,
) -> SelectResult:
    """Select `budget` units. Raises UweError subclasses for every bad input, before any output exists."""
    started = time.perf_counter()
    strat = get_strategy(strategy)
    if budget <= 0:
        raise SelectionError(f"--budget must be at least 1, got {budget}")
    if aggregate not in ("max", "mean"):
        raise SelectionError(f"unknown --aggregate '{aggregate}' (choose from max, mean)")
    if not np.isfinite(tau) or tau < 0:
        raise SelectionError(f"--tau must be a finite number >= 0, got {tau}")
    backend, device = resolve_device(device)
    paths = [Path(p) for p in pools]
    for p in paths:
        pool_files(p)
    labeled_ids = read_id_file(labeled, "--labeled") if labeled else []
    exclude_ids = read_id_file(exclude, "--exclude") if exclude else []

    from uwe_cli.detection_pool import is_detection_pool

    if any(is_detection_pool(p) for p in paths):
        from uwe_cli.detection_select import run_detection_select

        return run_detection_select(
            paths,
            budget,
            strategy,
            uncertainty,
            tau,
            normalize,
            labeled_ids,
            exclude_ids,
            aggregate,
            seed,
            prune,
            progress,
            started,
        )

    check_memory(paths, max_memory)
    # A named uncertainty column is read (and validated) even by strategies that do not need one, so the
    # batch file reports it.
    need_uncertainty = strat.needs_uncertainty or uncertainty not in (None, "", "auto")
    pool = read_pool(paths, uncertainty, need_uncertainty=need_uncertainty, need_probs=strat.needs_probs)
    return _select_units(
        pool,
        budget,
        strategy,
        tau,
        normalize,
        labeled_ids,
        exclude_ids,
        seed,
        prune,
        progress,
        started,
        backend,
        device,
    )


@dataclass
class PoolSplit:
    """Which rows are labeled, excluded, candidates and in play, plus the warnings for unknown IDs."""

    labeled: np.ndarray
    excluded: np.ndarray
    candidates: np.ndarray
    in_play: np.ndarray
    missing_labeled: int
    warnings: list[str]


def resolve_split(
    pool_ids: pa.Array, labeled_ids: list[str], exclude_ids: list[str], budget: int
) -> PoolSplit:
    """Map --labeled / --exclude IDs onto pool rows and check the budget against the candidates."""
    labeled_rows, missing_labeled = rows_of(labeled_ids, pool_ids)
    exclude_rows, missing_excluded = rows_of(exclude_ids, pool_ids)
    warnings = []
    if missing_labeled:
        warnings.append(f"{missing_labeled} labeled IDs are not in the pool (ignored)")
    if missing_excluded:
        warnings.append(f"{missing_excluded} excluded IDs are not in the pool (ignored)")
    candidates, in_play = split_pool(len(pool_ids), labeled_rows, exclude_rows, budget)
    excluded = np.setdiff1d(exclude_rows, labeled_rows)
    return PoolSplit(labeled_rows, excluded, candidates, in_play, missing_labeled, warnings)


def split_pool(
    n: int, labeled_rows: np.ndarray, exclude_rows: np.ndarray, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, in_play mask): candidates = pool − labeled − excluded; in play = labeled + candidates."""
    in_play = np.ones(n, dtype=bool)
    in_play[exclude_rows] = False
    is_cand = in_play.copy()
    is_cand[labeled_rows] = False
    in_play[labeled_rows] = True
    candidates = np.flatnonzero(is_cand)
    if budget > candidates.size:
        raise SelectionError(
            f"--budget {budget} is larger than the {candidates.size} candidates "
            f"({n} in the pool, {labeled_rows.size} labeled, {np.setdiff1d(exclude_rows, labeled_rows).size} excluded)"
        )
    return candidates, in_play


def _select_units(
    pool: Pool,
    budget: int,
    strategy: str,
    tau: float,
    normalize: str,
    labeled_ids: list[str],
    exclude_ids: list[str],
    seed: int,
    prune: bool,
    progress: Progress | None,
    started: float,
    backend: str = "numba",
    device: str = "cpu",
) -> SelectResult:
    strat = get_strategy(strategy)
    split = resolve_split(pool.ids, labeled_ids, exclude_ids, budget)
    labeled_rows, candidates, in_play = split.labeled, split.candidates, split.in_play

    u_norm = weights = None
    if pool.uncertainty is not None:
        u_norm = normalize_uncertainty(pool.uncertainty, in_play, normalize)
        weights = uwe_weights(u_norm, tau)
    out = strat.func(
        StrategyInput(
            features=pool.features,
            u_norm=u_norm,
            weights=weights,
            probs=pool.probs,
            candidates=candidates,
            labeled=labeled_rows,
            budget=budget,
            seed=seed,
            prune=prune,
            progress=progress,
            backend=backend,
            device=device,
        )
    )
    rows = candidates[out.positions]
    batch = Batch(
        ids=pool.ids.take(rows).to_pylist(),
        uncertainty=[float(v) for v in u_norm[rows]] if u_norm is not None else [None] * len(rows),
        distance=[float(v) for v in out.distances] if out.distances is not None else [None] * len(rows),
        extra={name: col.take(rows).to_pylist() for name, col in pool.extra.items()},
    )
    summary = {
        "strategy": strategy,
        "budget": budget,
        "pool_size": pool.size,
        "candidates": int(candidates.size),
        "labeled": int(labeled_rows.size),
        "labeled_missing": split.missing_labeled,
        "excluded": int(split.excluded.size),
        "feature_dim": pool.dim,
        "task": pool.task,
        "uncertainty": pool.uncertainty_column,
        "tau": tau,
        "normalize": normalize,
        "seed": seed,
        "device": device,
        "skipped_distance_fraction": out.skipped_fraction,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return SelectResult(batch, summary, split.warnings)
