"""`uwe select` as a library call: pool(s) + labeled IDs → the next batch, for unit and detection pools.

One pipeline: open the pool (kind decided once), check memory, read, split into labeled / excluded /
candidates, build a `SelectionProblem` whose tracker factory knows the pool kind and device, run the
registered strategy, and return the batch with a summary. Every bad input raises a UweError before
any output exists. `select_loaded` is the part after the read, so callers holding a pool in memory
(`uwe simulate`, which selects many times per run) use exactly the code `uwe select` runs.
"""

from __future__ import annotations

import glob
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli.batch import Batch
from uwe_cli.embedding import check_selection_options, normalize_uncertainty, underflow_warning, uwe_weights
from uwe_cli.errors import ResourceError, SelectionError
from uwe_cli.ids import read_id_file, rows_of
from uwe_cli.pool import DetectionPool, PoolSource, UnitPool, open_pool
from uwe_cli.selection.embedded import available_memory
from uwe_cli.selection.small import is_small
from uwe_cli.selection.strategies import SelectionProblem, Strategy, badge_weights, get_strategy
from uwe_cli.selection.tracker import Progress, Tracker, tracker_class

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


def warm_up_dense_engine(labeled: int) -> threading.Thread:
    """Load the compiled engine in the background while the pool is read.

    Loading numba and its cached kernels is half a second of mostly Python work; Parquet decoding
    releases the GIL, so the two overlap. Errors are left for the foreground to meet and report.
    """

    def load() -> None:
        try:
            from uwe_cli.selection.dense import warm_up

            warm_up(labeled)
        except Exception:  # pragma: no cover - the foreground meets the same error and reports it
            pass

    thread = threading.Thread(target=load, name="uwe-warm-up", daemon=True)
    thread.start()
    return thread


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


@dataclass
class _Built:
    problem: SelectionProblem
    summary: dict[str, Any]
    warnings: list[str]


def _unit_problem(
    pool: UnitPool, split: PoolSplit, strat: Strategy, opts: dict[str, Any], backend: str, device: str
) -> _Built:
    u_norm = weights = None
    warnings: list[str] = []
    if pool.uncertainty is not None:
        u_norm = normalize_uncertainty(pool.uncertainty, split.in_play, opts["normalize"])
        weights = uwe_weights(u_norm, opts["tau"])
        if strat.embedding == "uwe":
            message = underflow_warning(u_norm[split.in_play], weights[split.in_play], opts["tau"])
            warnings += [message] if message else []
        if opts["reorder"]:  # handed over: the batch file reports u_norm; 8 bytes a row less at the peak
            pool.uncertainty = None
    capacity = split.labeled.size + opts["budget"]
    handed_over = False

    def make_tracker(embedding: str) -> Tracker:
        from uwe_cli.selection.embedded import DenseEmbedding, as_weights

        nonlocal handed_over
        if handed_over:  # the first engine may have reordered the rows in place
            raise RuntimeError("the feature matrix was handed to a selection engine already")
        handed_over = True
        G = weights if embedding == "uwe" else None
        if embedding == "badge":
            assert pool.probs is not None
            G = badge_weights(pool.probs)
        # `uwe select` does not read the features after selection: there the engine may reorder them in
        # place instead of copying them.
        dense = DenseEmbedding(pool.features, as_weights(G, pool.size), opts["reorder"], opts["spare_bytes"])
        cls = tracker_class("unit", backend)
        return cls(dense, split.candidates, capacity, prune=opts["prune"], device=device)

    problem = SelectionProblem(
        split.candidates, split.labeled, opts["budget"], opts["seed"], u_norm, make_tracker, opts["progress"]
    )
    summary = {"feature_dim": pool.dim, "task": pool.task}
    return _Built(problem, summary, warnings)


def _detection_problem(
    pool: DetectionPool, split: PoolSplit, strat: Strategy, opts: dict[str, Any], backend: str, device: str
) -> _Built:
    from uwe_cli.selection.classwise import box_weights, build_classwise, image_uncertainty

    warnings: list[str] = []
    if strat.embedding == "uwe":
        _, u_norm, weights = box_weights(pool, split.in_play, opts["normalize"], opts["tau"])
        message = underflow_warning(u_norm, weights, opts["tau"], "boxes")
        warnings += [message] if message else []
    capacity = split.labeled.size + opts["budget"]

    def make_tracker(embedding: str) -> Tracker:
        tau = 0.0 if embedding == "features" else opts["tau"]
        emb = build_classwise(pool, split.in_play, tau, opts["normalize"], opts["aggregate"])
        cls = tracker_class("detection", backend)
        return cls(emb, split.candidates, capacity, prune=opts["prune"], device=device)

    problem = SelectionProblem(
        split.candidates,
        split.labeled,
        opts["budget"],
        opts["seed"],
        image_uncertainty(pool, split.in_play, opts["normalize"]),
        make_tracker,
        opts["progress"],
    )
    summary = {
        "feature_dim": pool.dim,
        "task": "detection",
        "boxes": pool.num_boxes,
        "num_classes": pool.num_classes,
        "aggregate": opts["aggregate"],
    }
    return _Built(problem, summary, warnings)


def run_select(
    pools: Sequence[str | Path],
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
    strat = check_request(strategy, budget, seed, tau, normalize, aggregate)
    backend, device = resolve_device(device)
    source = open_pool(pools)
    get_strategy(strategy, source.kind)
    need = check_memory(source, max_memory)
    limit = max_memory if max_memory is not None else available_memory()
    # What the engine may spend on optional speed-ups (the int8 screen).
    spare = None if limit is None else max(0, limit - need)
    labeled_ids = read_id_file(labeled, "--labeled") if labeled else []
    exclude_ids = read_id_file(exclude, "--exclude") if exclude else []

    if backend == "numba":
        backend = unit_engine(source, strat, len(labeled_ids), budget)
        if backend == "numba" and source.kind == "unit" and strat.embedding is not None:
            warm_up_dense_engine(len(labeled_ids))
    # A named uncertainty column is read (and validated) even by strategies that do not need one, so the
    # batch file reports it.
    need_uncertainty = strat.needs_uncertainty or uncertainty not in (None, "", "auto")
    pool = source.read(uncertainty, need_uncertainty=need_uncertainty, need_probs=strat.needs_probs)
    split = resolve_split(pool.ids, labeled_ids, exclude_ids, budget)
    result = select_loaded(
        pool,
        split,
        budget,
        strategy=strategy,
        tau=tau,
        normalize=normalize,
        aggregate=aggregate,
        seed=seed,
        backend=backend,
        device=device,
        prune=prune,
        progress=progress,
        reorder=True,
        spare_bytes=spare,
    )
    result.summary["seconds"] = round(time.perf_counter() - started, 3)
    return result


def select_loaded(
    pool: UnitPool | DetectionPool,
    split: PoolSplit,
    budget: int,
    strategy: str = "uwe",
    tau: float = 1.0,
    normalize: str = "minmax",
    aggregate: str = "max",
    seed: int = 0,
    backend: str = "numba",
    device: str = "cpu",
    prune: bool = True,
    progress: Progress | None = None,
    reorder: bool = False,
    spare_bytes: int | None = None,
) -> SelectResult:
    """Select `budget` units from a pool already in memory, given its split (`resolve_split`, `split_rows`).

    The body of `run_select` after the read: a unit pool's `uncertainty` (and `probs`, for badge) may come
    from anywhere, e.g. a probe refitted each cycle, without writing or re-reading Parquet. `reorder` hands
    the pool over: the engine may permute `pool.features` in place and `pool.uncertainty` is dropped once
    normalised (the caller must not use either afterwards); `spare_bytes`
    is the memory it may spend on optional speed-ups (see `DenseEmbedding`).
    """
    started = time.perf_counter()
    check_request(strategy, budget, seed, tau, normalize, aggregate)
    strat = get_strategy(strategy, pool.kind)
    if isinstance(pool, UnitPool):
        if strat.needs_uncertainty and pool.uncertainty is None:
            raise SelectionError(f"--strategy {strategy} needs an uncertainty column")
        if strat.needs_probs and pool.probs is None:
            raise SelectionError(f"--strategy {strategy} needs class probabilities (a probs column)")
    opts = {
        "budget": budget,
        "seed": seed,
        "tau": tau,
        "normalize": normalize,
        "aggregate": aggregate,
        "prune": prune,
        "progress": progress,
        "spare_bytes": spare_bytes,
        "reorder": reorder,
    }
    build = _detection_problem if isinstance(pool, DetectionPool) else _unit_problem
    built = build(pool, split, strat, opts, backend, device)  # type: ignore[arg-type]
    out = strat.func(built.problem)

    rows = split.candidates[out.positions]
    u = built.problem.unit_uncertainty
    extra: dict[str, list[Any]] = {}
    if isinstance(pool, DetectionPool):
        if pool.sources is not None:
            extra["source"] = pool.sources.take(rows).to_pylist()
    else:
        extra = {name: col.take(rows).to_pylist() for name, col in pool.extra.items()}
    batch = Batch(
        ids=pool.ids.take(rows).to_pylist(),
        uncertainty=[float(v) for v in u[rows]] if u is not None else [None] * len(rows),
        distance=[float(v) for v in out.distances] if out.distances is not None else [None] * len(rows),
        extra=extra,
    )
    summary = {
        "strategy": strategy,
        "budget": budget,
        "pool_size": pool.size,
        "candidates": int(split.candidates.size),
        "labeled": int(split.labeled.size),
        "labeled_missing": split.missing_labeled,
        "excluded": int(split.excluded.size),
        **built.summary,
        "uncertainty": pool.uncertainty_column,
        "tau": tau,
        "normalize": normalize,
        "seed": seed,
        "device": device,
        "skipped_distance_fraction": out.skipped_fraction,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return SelectResult(batch, summary, split.warnings + built.warnings, rows)
