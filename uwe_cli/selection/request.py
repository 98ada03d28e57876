"""What every selection entry point checks and resolves before it selects, and what it returns.

`run_select` (locally or on a Ray cluster) and `uwe simulate` share these: the options (`check_request`),
the device, the memory a pool needs, and the labeled / excluded / candidate split of the pool's rows.
"""

from __future__ import annotations

import glob
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli.batch import Batch
from uwe_cli.embedding import check_selection_options
from uwe_cli.errors import ResourceError, SelectionError
from uwe_cli.ids import rows_of
from uwe_cli.pool import PoolSource
from uwe_cli.selection.embedded import available_memory
from uwe_cli.selection.small import is_small
from uwe_cli.selection.strategies import Strategy, get_strategy
from uwe_cli.selection.tracker import Progress

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SelectResult:
    batch: Batch
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    rows: np.ndarray | None = None  # pool rows of the batch, in pick order


def parse_memory(text: str) -> int:
    """'8G', '512M', '1.5GiB', '2000000000' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise SelectionError(f"--max-memory: cannot read '{text}' (examples: 8G, 512M)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes in messages, readable at any scale."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


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


def check_request(
    strategy: str, budget: int, seed: int, tau: float, normalize: str, aggregate: str
) -> Strategy:
    """The checks every selection entry point makes before reading anything; the strategy."""
    strat = get_strategy(strategy)
    if budget <= 0:
        raise SelectionError(f"--budget must be at least 1, got {budget}")
    if seed < 0:
        raise SelectionError(f"--seed must be >= 0, got {seed}")
    check_selection_options(tau, normalize, aggregate)
    return strat


def unit_engine(source: PoolSource, strat: Strategy, labeled: int, budget: int) -> str:
    """The CPU engine for a pool: "numpy" for small unit-pool problems (no compiler to load), else "numba".

    Decided from file metadata and the command's inputs only, so `--ray` workers make the same choice
    and sum distances the same way as a local run (the batch files are byte-identical).
    """
    if source.kind != "unit" or strat.embedding is None:
        return "numba"
    k = (source.num_classes or 1000) if strat.embedding == "badge" else 1
    return "numpy" if is_small(source.rows, source.feature_dim() * k, labeled + budget) else "numba"


def check_memory(source: PoolSource, max_memory: int | None) -> int:
    """Refuse, before loading, a pool whose selection would not fit in `max_memory` (or in free memory)."""
    need = source.estimate_bytes()
    limit = max_memory if max_memory is not None else available_memory()
    if limit is not None and need > limit:
        allowed = "--max-memory allows" if max_memory is not None else "only"
        tail = "" if max_memory is not None else " is available"
        raise ResourceError(
            f"pool needs about {human_bytes(need)} ({source.rows:,} rows × {source.feature_dim()} features) "
            f"but {allowed} {human_bytes(limit)}{tail}"
        )
    return need


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
    split = split_rows(len(pool_ids), labeled_rows, exclude_rows, budget)
    split.missing_labeled = missing_labeled
    split.warnings = warnings
    return split


def split_rows(n: int, labeled_rows: np.ndarray, exclude_rows: np.ndarray, budget: int) -> PoolSplit:
    """Labeled / excluded / candidate rows of an n-row pool from row indices; a labeled row is never excluded."""
    labeled_rows = np.unique(np.asarray(labeled_rows, dtype=np.int64))
    exclude_rows = np.unique(np.asarray(exclude_rows, dtype=np.int64))
    in_play = np.ones(n, dtype=bool)
    in_play[exclude_rows] = False
    is_cand = in_play.copy()
    is_cand[labeled_rows] = False
    in_play[labeled_rows] = True
    candidates = np.flatnonzero(is_cand)
    excluded = np.setdiff1d(exclude_rows, labeled_rows)
    if budget > candidates.size:
        raise SelectionError(
            f"--budget {budget} is larger than the {candidates.size} candidates "
            f"({n} in the pool, {labeled_rows.size} labeled, {excluded.size} excluded)"
        )
    return PoolSplit(labeled_rows, excluded, candidates, in_play, 0, [])


def split_summary(
    strategy: str, budget: int, pool_size: int, split: PoolSplit, tau: float, normalize: str, seed: int
) -> dict[str, Any]:
    """The fields of `--json` every selection reports, wherever it ran."""
    return {
        "strategy": strategy,
        "budget": budget,
        "pool_size": pool_size,
        "candidates": int(split.candidates.size),
        "labeled": int(split.labeled.size),
        "labeled_missing": split.missing_labeled,
        "excluded": int(split.excluded.size),
        "tau": tau,
        "normalize": normalize,
        "seed": seed,
    }


@dataclass(frozen=True)
class RayOptions:
    """Select on a Ray cluster: the pool spread over `workers` actors; `address` is HOST:PORT (default:
    RAY_ADDRESS, else a local instance); `on_actors` receives the actor handles once they run."""

    workers: int = 2
    address: str | None = None
    on_actors: Callable[[list[Any]], None] | None = None


@dataclass(frozen=True)
class SelectRequest:
    """A checked `run_select` call, as the local and the Ray path both select with it."""

    strategy: str
    strat: Strategy
    budget: int
    uncertainty: str | None
    tau: float
    normalize: str
    aggregate: str
    seed: int
    prune: bool
    progress: Progress | None
    labeled_ids: list[str]
    exclude_ids: list[str]
    started: float

    @property
    def need_uncertainty(self) -> bool:
        # A named uncertainty column is read (and validated) even by strategies that do not need one, so
        # the batch file reports it.
        return self.strat.needs_uncertainty or self.uncertainty not in (None, "", "auto")
