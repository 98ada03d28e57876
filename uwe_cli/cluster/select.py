"""`uwe select --ray`: exact selection with the pool partitioned across Ray actors.

The driver reads only what the batch file needs (IDs and the pass-through columns), splits the pool
into labeled / excluded / candidate rows exactly as `run_select` does, and gives each actor a
contiguous share of the rows (of the images, for detection pools). Each actor (`Shard`) reads its
share of the Parquet parts itself and keeps a tracker over its candidates: the same engine and
kernels as a local run. Global steps are reductions and broadcasts: the min–max bounds of the
uncertainty over the rows in play, the labeled units' embeddings, and, per pick, the new centre.

K-Center-Greedy costs one round trip per pick: every actor folds in the last centre and answers
with its local maximum; the driver keeps the largest (ties to the earliest pool row, as locally).
Distances are the same float64 sums of the same values, a received centre being an exact copy of
its embedding, so the batch file is byte-identical to a local run. K-Means++ draws the same seeded
numbers; its cumulative sum runs through the actors in pool order, so it is the same sum.

If an actor dies, Ray restarts it; the driver replays its journal (load, the labeled set, every
centre so far) into the new process and repeats the call: same state, same batch.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli import storage
from uwe_cli.batch import Batch
from uwe_cli.cluster.connect import ClusterError, check_resources, ray_session
from uwe_cli.embedding import minmax_bounds, normalize_uncertainty, underflow_message
from uwe_cli.errors import ResourceError, UweError
from uwe_cli.pool import PoolSource, open_pool
from uwe_cli.pool.detection import encode_images
from uwe_cli.pool.files import checked_ids
from uwe_cli.pool.unit import read_ids
from uwe_cli.schema import PASSTHROUGH_COLUMNS
from uwe_cli.selection.greedy import largest_norm_pick, next_pick
from uwe_cli.selection.request import (
    PoolSplit,
    RayOptions,
    SelectRequest,
    SelectResult,
    human_bytes,
    resolve_split,
    split_summary,
    unit_engine,
)
from uwe_cli.selection.strategies import badge_weights
from uwe_cli.selection.tracker import Progress, first_at_least

# A shard's K-Center-Greedy answer: (D, pool unit, position, the largest D it holds, the tie tolerance).
Answer = tuple[float, int, int, float, float]
RESTART_TIMEOUT = 120.0


@dataclass
class ShardSpec:
    """What one actor reads and keeps: the pool's files, its global rows, and the room for centres."""

    paths: list[str]
    rows: np.ndarray  # global pool rows this shard reads, ascending
    units: np.ndarray  # global unit indices (rows, or images) of its units, ascending
    uncertainty: str | None
    need_uncertainty: bool
    need_probs: bool
    spare: int  # centres it may receive: the labeled set plus the budget
    storage_options: dict[str, Any]  # the driver's --storage-option, for reading the pool here


class Shard:
    """One actor's share of the pool and its tracker (the same engine a local run uses)."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.pool: Any = None
        self.tracker: Any = None

    def load(self) -> dict[str, Any]:
        import os

        import numba

        # Ray gives an actor OMP_NUM_THREADS = its CPUs; numba's thread pool must not oversubscribe them.
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        spec = self.spec
        storage.configure(spec.storage_options)
        source = open_pool(spec.paths).restrict(spec.rows)
        self.kind = source.kind
        self.pool = source.read(
            spec.uncertainty, spec.need_uncertainty, spec.need_probs, spare_rows=spec.spare
        )
        self.n = self.pool.size
        if self.n != len(spec.units):  # the driver's partition and the reader must agree
            raise ClusterError(f"shard read {self.n} units, expected {len(spec.units)}")
        self.used = 0
        self.compute = 0.0  # seconds spent in `step` (the per-pick work), for the cost model
        return {"uncertainty_column": self.pool.uncertainty_column, "dim": self.pool.dim}

    # -- global reductions
    def bounds(self, in_play: np.ndarray, normalize: str) -> tuple[float, float] | None:
        if normalize == "none":
            return None
        if self.kind == "detection":
            return minmax_bounds(self.pool.box_uncertainty[in_play[self.pool.box_image]])
        if self.pool.uncertainty is None:
            return None
        return minmax_bounds(self.pool.uncertainty[in_play])

    def prepare(
        self,
        in_play: np.ndarray,
        candidates: np.ndarray,
        bounds: tuple[float, float] | None,
        embedding: str | None,
        opts: dict[str, Any],
    ) -> dict[str, int]:
        """Build the embedding and tracker over the local candidates; count weights lost to underflow."""
        from uwe_cli.embedding import uwe_weights
        from uwe_cli.selection.tracker import tracker_class

        self.candidates = candidates
        capacity = self.spec.spare
        lost = total_in_play = 0
        if self.kind == "detection":
            from uwe_cli.selection.classwise import box_weights, build_classwise, image_uncertainty

            self.u_norm = image_uncertainty(self.pool, in_play, opts["normalize"], bounds)
            if embedding is not None:
                tau = 0.0 if embedding == "features" else opts["tau"]
                if embedding == "uwe":
                    _, u, w = box_weights(self.pool, in_play, opts["normalize"], tau, bounds)
                    lost, total_in_play = int(np.count_nonzero((u > 0) & (w == 0))), u.size
                emb = build_classwise(self.pool, in_play, tau, opts["normalize"], opts["aggregate"], bounds)
                self.tracker = tracker_class("detection", "numba")(
                    emb, candidates, capacity, prune=opts["prune"]
                )
            return {
                "lost": lost,
                "in_play": total_in_play,
                "boxes": self.pool.num_boxes,
                "num_classes": self.pool.num_classes,
            }
        from uwe_cli.selection.dense import DenseEmbedding

        total = self.n + capacity
        self.u_norm = None
        if self.pool.uncertainty is not None:
            self.u_norm = normalize_uncertainty(self.pool.uncertainty, None, opts["normalize"], bounds)
        if embedding is not None:
            G = np.ones((total, 1))
            if embedding == "uwe":
                weights = uwe_weights(self.u_norm, opts["tau"])
                lost = int(np.count_nonzero((self.u_norm[in_play] > 0) & (weights[in_play] == 0)))
                total_in_play = int(np.count_nonzero(in_play))
                G[: self.n, 0] = weights
            elif embedding == "badge":
                badge = badge_weights(self.pool.probs[: self.n])
                G = np.zeros((total, badge.shape[1]))
                G[: self.n] = badge
            self.G = G
            dense = DenseEmbedding(self.pool.features, G)
            cls = tracker_class("unit", opts["engine"])
            self.tracker = cls(dense, candidates, capacity, prune=opts["prune"])
        return {"lost": lost, "in_play": total_in_play}

    # -- centres
    def centre(self, position: int) -> Any:
        """The embedding of candidate `position`, as another shard needs it to use it as a centre."""
        unit = int(self.candidates[position])
        if self.kind == "detection":
            return self.tracker.blocks(unit)
        return self.G[unit].copy(), self.pool.features[unit].copy()

    def labeled(self, local_units: np.ndarray) -> list[Any]:
        if self.kind == "detection":
            return [self.tracker.blocks(int(u)) for u in local_units]
        return [(self.G[u].copy(), self.pool.features[u].copy()) for u in local_units]

    def _receive(self, centre: Any) -> int:
        """Store a broadcast centre in spare room; its index in this shard's embedding."""
        if self.kind == "detection":
            row = self.tracker.append_image(*centre)
        else:
            g, f = centre
            row = self.n + self.used
            self.used += 1
            self.G[row] = g
            self.pool.features[row] = f
        return row

    def init_labeled(self, centres: list[Any]) -> None:
        rows = np.array([self._receive(c) for c in centres], dtype=np.int64)
        self.tracker.init_centres(rows)

    # -- K-Center-Greedy: answers are `Answer`s (D, unit, position, largest D held, tie tolerance)
    def first(self) -> Answer | None:
        if not len(self.candidates):
            return None
        return self._answer(*largest_norm_pick(self.tracker))

    def _answer(self, t: int, d: float, top: float) -> Answer:
        return d, int(self.spec.units[self.candidates[t]]), t, top, self.tracker.tie_tolerance

    def earliest(self, threshold: float, norms: bool) -> tuple[float, int, int] | None:
        """(D or squared norm, unit, position) of the earliest candidate at or above `threshold`: the
        global tie rule of `greedy.next_pick` when another shard holds the largest value."""
        if norms:
            t, d = first_at_least(self.tracker.square_norms(), threshold)
        else:
            t, d = self.tracker.earliest_at_least(threshold)
        return None if t < 0 else (d, int(self.spec.units[self.candidates[t]]), t)

    def step(self, take: int | None, centre: Any, max_d: float | None) -> Answer | None:
        """Retire the candidate this shard lost to the batch, fold in the new centre, answer the local max."""
        started = time.perf_counter()
        try:
            return self._step(take, centre, max_d)
        finally:
            self.compute += time.perf_counter() - started

    def _step(self, take: int | None, centre: Any, max_d: float | None) -> Answer | None:
        if take is not None:
            self.tracker.take(take)
        if centre is not None:
            self.tracker.add(self._receive(centre), max_d=max_d)
        if not len(self.candidates) or np.all(self.tracker.distances() < 0):
            return None
        t, d, top = next_pick(self.tracker)
        return self._answer(t, d, top)

    # -- K-Means++
    def cumsum(self, start: float) -> float:
        """This shard's part of the running sum of D² over all candidates in pool order."""
        self.D = self.tracker.distances()
        self.cum = np.cumsum(np.concatenate([[start], np.clip(self.D, 0.0, None)]))[1:]
        return float(self.cum[-1]) if self.cum.size else start

    def count_at_most(self, target: float) -> int:
        return int(np.searchsorted(self.cum, target, side="right"))

    def live(self) -> np.ndarray:
        return np.flatnonzero(self.D >= 0)

    def take_and_add(self, take: int | None, centre: Any) -> None:
        if take is not None:
            self.tracker.take(take)
        if centre is not None:
            self.tracker.add(self._receive(centre))

    # -- other strategies and the batch file
    def top_uncertain(self, budget: int) -> list[tuple[float, int]]:
        u = self.u_norm[self.candidates]
        order = np.argsort(-u, kind="stable")[:budget]
        return [(float(u[i]), int(self.spec.units[self.candidates[i]])) for i in order]

    def uncertainty_of(self, units: np.ndarray) -> list[float | None]:
        if self.u_norm is None:
            return [None] * len(units)
        local = np.searchsorted(self.spec.units, units)
        return [float(v) for v in self.u_norm[local]]

    def stats(self) -> tuple[int, int, float]:
        s = self.tracker.stats if self.tracker is not None else None
        return (s.evaluated, s.possible, self.compute) if s is not None else (0, 0, self.compute)


# --------------------------------------------------------------------------------------------------
# the driver


@dataclass
class _Index:
    """What the driver reads of the pool: unit IDs, pass-through columns, and the row → unit map."""

    ids: pa.Array
    extra: dict[str, pa.Array]
    row_unit: np.ndarray  # per pool row, its unit (the row itself for unit pools, the image for detection)


def _read_index(source: PoolSource) -> _Index:
    if source.kind == "detection":
        has_source = all("source" in pf.schema_arrow.names for pf in source.parquet)
        chunks: list[pa.Array] = []
        sources: list[pa.Array] = []
        for f, batch in source.batches(["id", *(["source"] if has_source else [])], 1 << 16):
            chunks.append(checked_ids(f, batch.column("id")))
            if has_source:
                sources.append(batch.column("source").cast(pa.string()))
        image_ids, row_unit, first_sources = encode_images(chunks, sources)
        return _Index(image_ids, {"source": first_sources} if has_source else {}, row_unit)
    ids = read_ids(source)
    names = [c for c in PASSTHROUGH_COLUMNS if all(c in pf.schema_arrow.names for pf in source.parquet)]
    columns: dict[str, list[pa.Array]] = {c: [] for c in names}
    for _, batch in source.batches(names, 1 << 16) if names else ():
        for c in names:
            columns[c].append(batch.column(c))
    extra = {c: pa.concat_arrays(chunks) for c, chunks in columns.items()}
    return _Index(ids, extra, np.arange(len(ids), dtype=np.int64))


def _partition(index: _Index, workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous unit ranges of about equal size: (rows, units) per non-empty shard."""
    n_units = len(index.ids)
    bounds = np.linspace(0, n_units, workers + 1).round().astype(np.int64)
    shards = []
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            rows = np.flatnonzero((index.row_unit >= lo) & (index.row_unit < hi))
            shards.append((rows, np.arange(lo, hi, dtype=np.int64)))
    return shards


class _Cluster:
    """The actors plus a journal per actor of every state-changing call, replayed after a restart."""

    def __init__(self, ray: Any, actors: list[Any]) -> None:
        self.ray = ray
        self.actors = actors
        self.journal: list[list[tuple[str, tuple[Any, ...]]]] = [[] for _ in actors]

    def call(self, method: str, args: Sequence[tuple[Any, ...]], record: bool = False) -> list[Any]:
        """`method(*args[k])` on every actor k in parallel; restarts and replays actors that died."""
        refs = [getattr(a, method).remote(*arg) for a, arg in zip(self.actors, args, strict=True)]
        results = []
        for k, ref in enumerate(refs):
            results.append(self._get(k, ref, method, args[k]))
            if record:
                self.journal[k].append((method, args[k]))
        return results

    def call_one(self, k: int, method: str, *args: Any, record: bool = False) -> Any:
        result = self._get(k, getattr(self.actors[k], method).remote(*args), method, args)
        if record:
            self.journal[k].append((method, args))
        return result

    def _get(self, k: int, ref: Any, method: str, args: tuple[Any, ...]) -> Any:
        from ray.exceptions import RayActorError, RayTaskError

        deadline = time.monotonic() + RESTART_TIMEOUT
        while True:
            try:
                return self.ray.get(ref)
            except RayTaskError as exc:  # the method raised: a UweError reaches the user as it is
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                if isinstance(cause, UweError):
                    raise cause from None
                raise
            except RayActorError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"selection worker {k} died and did not come back") from None
                time.sleep(0.2)
                try:
                    for name, logged in self.journal[k]:  # a fresh process: rebuild its state
                        self.ray.get(getattr(self.actors[k], name).remote(*logged))
                except RayActorError:
                    continue
                ref = getattr(self.actors[k], method).remote(*args)


def _owner(units: np.ndarray, shard_units: list[np.ndarray]) -> np.ndarray:
    starts = np.array([u[0] for u in shard_units])
    return np.searchsorted(starts, units, side="right") - 1


def select_on_ray(
    source: PoolSource, req: SelectRequest, ray_opts: RayOptions, max_memory: int | None
) -> SelectResult:
    """`run_select(..., ray=RayOptions(...))`: the same batch, with the pool spread over the actors."""
    strat, budget = req.strat, req.budget
    index = _read_index(source)
    split = resolve_split(index.ids, req.labeled_ids, req.exclude_ids, budget)
    shards = _partition(index, ray_opts.workers)
    shard_units = [units for _, units in shards]
    if max_memory is not None:  # the limit applies to each worker's share
        need = max(source.estimate_bytes(len(rows)) for rows, _ in shards)
        if need > max_memory:
            raise ResourceError(
                f"a worker's share of the pool needs about {human_bytes(need)} but --max-memory allows "
                f"{human_bytes(max_memory)}; use more --workers"
            )
    need_uncertainty = source.kind == "detection" or req.need_uncertainty
    spare = split.labeled.size + budget
    paths = [str(p) for p in source.files]
    specs = [
        ShardSpec(
            paths, rows, units, req.uncertainty, need_uncertainty, strat.needs_probs, spare, storage.options()
        )
        for rows, units in shards
    ]
    with ray_session(ray_opts.address) as ray:
        total_cpus = ray.cluster_resources().get("CPU", 0.0)
        cpus = min(1.0, total_cpus / len(specs)) if total_cpus else 0.0
        check_resources(ray, len(specs), cpus)
        run = uuid.uuid4().hex[:8]
        Actor = ray.remote(max_restarts=-1, max_task_retries=0)(Shard)
        actors = [
            Actor.options(num_cpus=cpus, name=f"uwe-select-{run}-{k}").remote(s) for k, s in enumerate(specs)
        ]
        cluster = _Cluster(ray, actors)
        try:
            loaded = cluster.call("load", [()] * len(specs), record=True)
            if ray_opts.on_actors is not None:
                ray_opts.on_actors(actors)
            loop_started = time.perf_counter()
            engine = unit_engine(source, strat, len(req.labeled_ids), budget)
            result = _select(cluster, req, split, shard_units, engine)
            loop_seconds = time.perf_counter() - loop_started
            stats = cluster.call("stats", [()] * len(specs))
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
    rows, distances, u, infos, warnings = result
    batch = Batch(
        ids=index.ids.take(pa.array(rows)).to_pylist(),
        uncertainty=u,
        distance=[float(v) for v in distances] if distances is not None else [None] * len(rows),
        extra={name: col.take(pa.array(rows)).to_pylist() for name, col in index.extra.items()},
    )
    evaluated, possible = (sum(s[i] for s in stats) for i in (0, 1))
    summary: dict[str, Any] = {
        **split_summary(req.strategy, budget, len(index.ids), split, req.tau, req.normalize, req.seed),
        "feature_dim": loaded[0]["dim"],
        "task": source.metadata.get("task", "detection" if source.kind == "detection" else "classification"),
        **(
            {
                "boxes": sum(i["boxes"] for i in infos),
                "num_classes": infos[0]["num_classes"],
                "aggregate": req.aggregate,
            }
            if source.kind == "detection"
            else {}
        ),
        "uncertainty": loaded[0]["uncertainty_column"],
        "device": "cpu",
        "workers": len(specs),
        "selection_seconds": round(loop_seconds, 3),
        "worker_step_seconds": round(max(s[2] for s in stats), 3),
        "skipped_distance_fraction": (1 - evaluated / possible) if possible and strat.embedding else None,
        "seconds": round(time.perf_counter() - req.started, 3),
    }
    return SelectResult(batch, summary, split.warnings + warnings)


def _select(
    cluster: _Cluster, req: SelectRequest, split: PoolSplit, shard_units: list[np.ndarray], engine: str
) -> tuple[np.ndarray, np.ndarray | None, list[float | None], list[dict[str, Any]], list[str]]:
    strat, budget, seed, progress = req.strat, req.budget, req.seed, req.progress
    n_shards = len(shard_units)
    in_play = [split.in_play[u] for u in shard_units]
    is_candidate = np.zeros(split.in_play.size, dtype=bool)
    is_candidate[split.candidates] = True
    candidates = [np.flatnonzero(is_candidate[u]) for u in shard_units]
    found = cluster.call("bounds", [(m, req.normalize) for m in in_play])
    valid = [b for b in found if b is not None]
    bounds = (min(b[0] for b in valid), max(b[1] for b in valid)) if valid else None
    opts = {
        "tau": req.tau, "normalize": req.normalize, "aggregate": req.aggregate, "prune": req.prune,
        "engine": engine,
    }  # fmt: skip
    infos = cluster.call(
        "prepare",
        [(in_play[k], candidates[k], bounds, strat.embedding, opts) for k in range(n_shards)],
        record=True,
    )
    warnings = []
    if strat.embedding == "uwe":
        what = "boxes" if "boxes" in infos[0] else "units"
        message = underflow_message(
            sum(i["lost"] for i in infos), sum(i["in_play"] for i in infos), req.tau, what
        )
        warnings += [message] if message else []
    distances = None
    if strat.name == "random":
        rng = np.random.default_rng(seed)
        rows = split.candidates[rng.choice(split.candidates.size, size=budget, replace=False)]
    elif strat.name == "uncertainty":
        tops = [t for part in cluster.call("top_uncertain", [(budget,)] * n_shards) for t in part]
        rows = np.array(
            [unit for _, unit in sorted(tops, key=lambda t: (-t[0], t[1]))[:budget]], dtype=np.int64
        )
    else:
        if split.labeled.size:
            owners = _owner(split.labeled, shard_units)
            centres: list[Any] = []
            for k in range(n_shards):
                mine = split.labeled[owners == k] - shard_units[k][0]
                if mine.size:
                    centres += cluster.call_one(k, "labeled", mine)
            cluster.call("init_labeled", [(centres,)] * n_shards, record=True)
        if strat.name in ("uwe", "coreset"):
            rows, distances = _kcg(cluster, split, budget, progress)
        else:
            rows = _kmeanspp(cluster, split, shard_units, candidates, budget, seed, progress)
    owners = _owner(rows, shard_units)
    u: list[float | None] = [None] * len(rows)
    for k in range(n_shards):
        mine = np.flatnonzero(owners == k)
        if mine.size:
            for i, value in zip(mine, cluster.call_one(k, "uncertainty_of", rows[mine]), strict=True):
                u[i] = value
    return rows, distances, u, infos, warnings


def _best(
    cluster: _Cluster, answers: list[Answer | None], norms: bool = False
) -> tuple[int, float, int, int, float]:
    """(shard, D, unit, position, the largest D) of the pick, by `greedy.next_pick`'s rule over all
    shards: values within the tie tolerance of the largest tie, and the earliest pool unit wins. A shard
    whose own largest value is within the tolerance but below the largest is asked for its earliest
    candidate at the global threshold (each shard answered for its own)."""
    found = {k: a for k, a in enumerate(answers) if a is not None}
    top = max(a[3] for a in found.values())
    threshold = top * (1 - next(iter(found.values()))[4]) if 0 < top < np.inf else top
    picks = {}
    for k, (d, unit, position, own_top, _) in found.items():
        if own_top == top:
            picks[k] = (d, unit, position)
        elif own_top >= threshold:
            answer = cluster.call_one(k, "earliest", threshold, norms)
            if answer is not None:
                picks[k] = answer
    k = min(picks, key=lambda k: picks[k][1])
    d, unit, position = picks[k]
    return k, d, unit, position, top


def _kcg(
    cluster: _Cluster, split: Any, budget: int, progress: Progress | None
) -> tuple[np.ndarray, np.ndarray]:
    n_shards = len(cluster.actors)
    rows = np.empty(budget, dtype=np.int64)
    distances = np.empty(budget)
    step = max(1, budget // 200)
    if split.labeled.size:
        answers = cluster.call("step", [(None, None, None)] * n_shards, record=True)
    else:
        answers = cluster.call("first", [()] * n_shards)
    for b in range(budget):
        k, d, unit, position, top = _best(cluster, answers, norms=b == 0 and not split.labeled.size)
        rows[b], distances[b] = unit, np.sqrt(d)
        if b + 1 == budget:
            break
        centre = cluster.call_one(k, "centre", position)
        # the first pick without labeled units reports its norm; the next update uses the live max D
        max_d = None if (b == 0 and not split.labeled.size) else top
        answers = cluster.call(
            "step", [((position if j == k else None), centre, max_d) for j in range(n_shards)], record=True
        )
        if progress is not None and (b % step == 0 or b + 2 == budget):
            progress(b + 1, budget)
    if progress is not None:
        progress(budget, budget)
    return rows, distances


def _kmeanspp(
    cluster: _Cluster,
    split: Any,
    shard_units: list[np.ndarray],
    candidates: list[np.ndarray],
    budget: int,
    seed: int,
    progress: Progress | None,
) -> np.ndarray:
    """greedy.kmeanspp_seeding across shards: the same draws, the same cumulative sums, the same picks."""
    n_shards = len(cluster.actors)
    offsets = np.cumsum([0] + [len(c) for c in candidates])  # the global candidate array, shard by shard
    rng = np.random.default_rng(seed)
    rows = np.empty(budget, dtype=np.int64)
    step = max(1, budget // 200)

    def pick(b: int, k: int, position: int) -> None:
        rows[b] = shard_units[k][candidates[k][position]]
        centre = cluster.call_one(k, "centre", position) if b + 1 < budget else None
        cluster.call(
            "take_and_add", [((position if j == k else None), centre) for j in range(n_shards)], record=True
        )

    start = 0
    if not split.labeled.size:
        k, _, _, position, _ = _best(cluster, cluster.call("first", [()] * n_shards), norms=True)
        pick(0, k, position)
        start = 1
    for b in range(start, budget):
        total = 0.0
        for k in range(n_shards):  # the running sum in pool order, shard after shard: the local cumsum
            total = cluster.call_one(k, "cumsum", total)
        if total > 0:
            target = rng.random() * total
            t = min(sum(cluster.call("count_at_most", [(target,)] * n_shards)), int(offsets[-1]) - 1)
            k = int(np.searchsorted(offsets, t, side="right") - 1)
            position = t - int(offsets[k])
        else:  # every live candidate coincides with a centre: uniformly among them
            lives = cluster.call("live", [()] * n_shards)
            counts = np.cumsum([0] + [len(x) for x in lives])
            i = int(rng.integers(int(counts[-1])))
            k = int(np.searchsorted(counts, i, side="right") - 1)
            position = int(lives[k][i - counts[k]])
        pick(b, k, position)
        if progress is not None and (b % step == 0 or b + 1 == budget):
            progress(b + 1, budget)
    return rows
