"""`uwe select` as a library call: pool(s) + labeled IDs → the next batch, for unit and detection pools.

One pipeline: open the pool (kind decided once), check memory, read, split into labeled / excluded /
candidates, build a `SelectionProblem` whose tracker factory knows the pool kind and device, run the
registered strategy, and return the batch with a summary. Every bad input raises a UweError before
any output exists. `select_loaded` is the part after the read, so callers holding a pool in memory
(`uwe simulate`, which selects many times per run) use exactly the code `uwe select` runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uwe_cli.batch import Batch
from uwe_cli.embedding import normalize_uncertainty, underflow_warning, uwe_weights
from uwe_cli.errors import SelectionError
from uwe_cli.ids import read_id_file
from uwe_cli.pool import DetectionPool, UnitPool, open_pool
from uwe_cli.selection.embedded import available_memory
from uwe_cli.selection.request import (
    PoolSplit,
    RayOptions,
    SelectRequest,
    SelectResult,
    check_memory,
    check_request,
    resolve_device,
    resolve_split,
    split_summary,
    unit_engine,
)
from uwe_cli.selection.strategies import SelectionProblem, Strategy, badge_weights, get_strategy
from uwe_cli.selection.tracker import Progress, Tracker, tracker_class


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
    ray: RayOptions | None = None,
) -> SelectResult:
    """Select `budget` units, here or (with `ray`) on a Ray cluster: the same batch either way.

    Raises UweError subclasses for every bad input, before any output exists.
    """
    started = time.perf_counter()
    strat = check_request(strategy, budget, seed, tau, normalize, aggregate)
    if ray is None:
        backend, device = resolve_device(device)
    elif ray.workers < 1:
        raise SelectionError(f"--workers must be at least 1, got {ray.workers}")
    elif device == "cuda":
        raise SelectionError("--ray runs the CPU engine on every worker; drop --device cuda")
    source = open_pool(pools)
    get_strategy(strategy, source.kind)
    if ray is None:
        need = check_memory(source, max_memory)
    labeled_ids = read_id_file(labeled, "--labeled") if labeled else []
    exclude_ids = read_id_file(exclude, "--exclude") if exclude else []
    req = SelectRequest(
        strategy, strat, budget, uncertainty, tau, normalize, aggregate, seed, prune, progress,
        labeled_ids, exclude_ids, started,
    )  # fmt: skip
    if ray is not None:
        from uwe_cli.cluster.select import select_on_ray

        return select_on_ray(source, req, ray, max_memory)

    limit = max_memory if max_memory is not None else available_memory()
    spare = None if limit is None else max(0, limit - need)  # for optional speed-ups (the int8 screen)
    if backend == "numba":
        backend = unit_engine(source, strat, len(labeled_ids), budget)
        if backend == "numba" and source.kind == "unit" and strat.embedding is not None:
            warm_up_dense_engine(len(labeled_ids))
    pool = source.read(uncertainty, need_uncertainty=req.need_uncertainty, need_probs=strat.needs_probs)
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
        **split_summary(strategy, budget, pool.size, split, tau, normalize, seed),
        **built.summary,
        "uncertainty": pool.uncertainty_column,
        "device": device,
        "skipped_distance_fraction": out.skipped_fraction,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return SelectResult(batch, summary, split.warnings + built.warnings, rows)
