"""Benchmark: class-wise UWE + exact KCG on a generated detection pool, against a dense baseline.

Full run (default): 100,000 images × 80 classes × 1,024-d box features, ≤ 5 boxes per image,
budget 1,000, no labeled images. The dense K×d embedding of that pool would need 33 GB in
float32; the block-sparse one never exists densely. Then, on a subset that fits (first 2,000
images), the same selection is timed block-sparse and dense (numpy, float64, ‖x‖² + ‖c‖² − 2x·c)
and the two pick orders are compared.

    python benchmarks/bench_classwise.py [--pool PATH] [--images 100000] [--budget 1000] [--json]

Peak RSS comes from getrusage (the generator runs in a subprocess so it does not count).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from uwe_cli.pool import read_detection_pool
from uwe_cli.selection.classwise import build_classwise, classwise_kcg, to_dense


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Timer:
    """Wall-clock and process CPU seconds (the machine is shared: CPU time shows contention)."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def dense_kcg(x: np.ndarray, centres: np.ndarray, budget: int) -> np.ndarray:
    """The textbook dense KCG over all rows of x (candidates = rows not in centres)."""
    sq = np.einsum("ij,ij->i", x, x)
    min_d2 = np.full(len(x), np.inf)
    for start in range(0, len(centres), 256):  # the labeled set by matrix products, 256 at a time
        cols = centres[start : start + 256]
        d2 = sq[:, None] + sq[cols][None, :] - 2 * (x @ x[cols].T)
        min_d2 = np.minimum(min_d2, np.maximum(d2, 0).min(axis=1))
    taken = np.zeros(len(x), dtype=bool)
    taken[centres] = True
    picks = []
    for t in range(budget):
        if t == 0 and len(centres) == 0:
            p = int(np.argmax(np.where(taken, -1, sq)))
        else:
            p = int(np.argmax(np.where(taken, -1, min_d2)))
        taken[p] = True
        picks.append(p)
        min_d2 = np.minimum(min_d2, np.maximum(sq + sq[p] - 2 * (x @ x[p]), 0))
    return np.array(picks, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="bench-out/detection-100k.parquet")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--labeled", type=int, default=0, help="first N images act as the labeled set")
    parser.add_argument("--aggregate", default="max", choices=["max", "mean"])
    parser.add_argument("--subset", type=int, default=2000, help="images in the dense comparison")
    parser.add_argument("--subset-budget", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    pool_path = Path(args.pool)
    generate_s = None
    if not pool_path.exists():
        start = time.perf_counter()
        generator = Path(__file__).with_name("make_detection_pool.py")
        shape = ["--images", str(args.images), "--classes", str(args.classes), "--dim", str(args.dim)]
        subprocess.run(
            [sys.executable, str(generator), str(pool_path), *shape],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        generate_s = time.perf_counter() - start

    result: dict[str, object] = {"pool": str(pool_path), "generate_s": generate_s}
    with Timer() as t_read:
        pool = read_detection_pool(pool_path)
    result.update(
        images=pool.num_images,
        boxes=pool.num_boxes,
        classes=pool.num_classes,
        dim=pool.dim,
        box_features_mb=pool.box_features.nbytes / 2**20,
        dense_embedding_float32_gb=pool.num_images * pool.num_classes * pool.dim * 4 / 1e9,
        read_s=t_read.wall,
        rss_after_read_mb=peak_rss_mb(),
    )

    warm = np.zeros(pool.num_images, dtype=bool)
    warm[:50] = True  # compile (or load cached) numba kernels before timing
    classwise_kcg(build_classwise(pool, warm, aggregate=args.aggregate), np.arange(10, 50), np.arange(10), 3)

    labeled = np.arange(args.labeled, dtype=np.int64)
    candidates = np.arange(args.labeled, pool.num_images, dtype=np.int64)
    with Timer() as t_build:
        emb = build_classwise(pool, None, tau=1.0, aggregate=args.aggregate)
    stats: dict[str, int] = {}
    with Timer() as t_kcg:
        classwise_kcg(emb, candidates, labeled, args.budget, stats=stats)
    result.update(
        aggregate=args.aggregate,
        budget=args.budget,
        labeled=args.labeled,
        blocks=emb.num_blocks,
        embedding_extra_mb=emb.nbytes / 2**20,
        build_s=t_build.wall,
        kcg_s=t_kcg.wall,
        kcg_cpu_s=t_kcg.cpu,
        distances_computed_fraction=stats["distances"] / max(stats["distances_unpruned"], 1),
        peak_rss_mb=peak_rss_mb(),
    )

    # Dense comparison on a subset: same images in play, same selection, two implementations.
    subset = np.zeros(pool.num_images, dtype=bool)
    subset[: args.subset] = True
    sub_idx = np.flatnonzero(subset)
    sub_labeled = sub_idx[: min(args.labeled, args.subset // 2)]
    sub_candidates = sub_idx[len(sub_labeled) :]
    with Timer() as t_sparse:
        sub_emb = build_classwise(pool, subset, tau=1.0, aggregate=args.aggregate)
        sparse_picks, _ = classwise_kcg(sub_emb, sub_candidates, sub_labeled, args.subset_budget)
    with Timer() as t_densify:
        dense = to_dense(sub_emb, sub_idx)
    with Timer() as t_dense:
        dense_picks = sub_idx[dense_kcg(dense, np.arange(len(sub_labeled)), args.subset_budget)]
    agree = int(np.argmin(np.append(sparse_picks == dense_picks, False)))  # length of the common prefix
    result.update(
        subset_images=args.subset,
        subset_budget=args.subset_budget,
        subset_dense_mb=dense.nbytes / 2**20,
        subset_sparse_s=t_sparse.wall,
        subset_densify_s=t_densify.wall,
        subset_dense_kcg_s=t_dense.wall,
        subset_dense_over_sparse=t_dense.wall / t_sparse.wall,
        subset_orders_identical=bool((sparse_picks == dense_picks).all()),
        subset_common_prefix=agree,
        peak_rss_with_dense_subset_mb=peak_rss_mb(),
    )

    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")


if __name__ == "__main__":
    main()
