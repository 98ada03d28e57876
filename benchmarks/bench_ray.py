"""`uwe select --ray` and `uwe extract --ray` against local runs, on this machine and on a simulated
multi-node cluster (ray.cluster_utils.Cluster: several raylets on one host).

Selection: the whole `uwe select` command on a 1M × 512 pool (cached in bench-out/), locally and
with 1, 2 and 4 actors; per pick, the slowest worker's compute and the rest (round trips, driver).
The batches must be byte-identical. Extraction: images/s of a randomly initialised ResNet-18 at
112 px, locally and with 1 and 2 actors.

    python benchmarks/bench_ray.py [--rows 1000000] [--budget 1000] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path("bench-out")
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def select(pool: Path, budget: int, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "uwe_cli.cli", "select", str(pool), "--budget", str(budget)]
    cmd += ["--out", str(out), "--json", "-q", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "UWE_NO_PROGRESS": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr)
    summary = json.loads(proc.stdout)
    summary["wall"] = time.perf_counter() - started
    return summary


def bench_select(rows: int, dim: int, budget: int, workers: list[int]) -> None:
    from synthetic import write_unit_pool

    pool = OUT / f"pool-{rows}x{dim}.parquet"
    if not pool.exists():
        OUT.mkdir(exist_ok=True)
        write_unit_pool(pool, rows, dim, clusters=50, with_probs=False)
    local = select(pool, budget, OUT / "ray-local.csv")
    print(f"\nselection: {rows:,} x {dim}, budget {budget:,}, uwe, no labeled set")
    print(
        f"{'run':<14} {'command s':>10} {'ratio':>7} {'ms/pick compute':>16} {'ms/pick other':>14} {'identical':>10}"
    )
    print(f"{'local':<14} {local['wall']:>10.1f} {1.0:>6.2f}x {'':>16} {'':>14} {'':>10}")
    for n in workers:
        out = OUT / f"ray-{n}.csv"
        s = select(pool, budget, out, "--ray", "--workers", str(n))
        compute = s["worker_step_seconds"] / budget * 1000
        other = (s["selection_seconds"] - s["worker_step_seconds"]) / budget * 1000
        same = out.read_bytes() == (OUT / "ray-local.csv").read_bytes()
        print(
            f"{f'ray, {n} actors':<14} {s['wall']:>10.1f} {local['wall'] / s['wall']:>6.2f}x {compute:>16.2f} {other:>14.2f} {same!s:>10}"
        )


def bench_cluster(budget: int) -> None:
    """Three raylets on this host (a head without CPUs, two 1-CPU workers): the multi-node path."""
    from ray.cluster_utils import Cluster
    from synthetic import write_unit_pool

    from uwe_cli.select import run_select
    from uwe_cli.selection.request import RayOptions

    pool = OUT / "pool-200000x512.parquet"
    if not pool.exists():
        write_unit_pool(pool, 200_000, 512, clusters=50, with_probs=False)
    os.makedirs("/tmp/ray", exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "temp_dir": tempfile.mkdtemp(prefix="ray", dir="/tmp")},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    import ray

    ray.init(address=cluster.address, log_to_driver=False, logging_level="error")
    try:
        t = time.perf_counter()
        local = run_select([pool], budget)
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        dist = run_select([pool], budget, ray=RayOptions(workers=2))
        dist_s = time.perf_counter() - t
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\nsimulated cluster (head + 2 one-CPU nodes): 200,000 x 512, budget {budget}")
    print(
        f"local {local_s:.1f} s; ray 2 nodes {dist_s:.1f} s (selection loop {dist.summary['selection_seconds']:.1f} s, "
        f"slowest worker's steps {dist.summary['worker_step_seconds']:.1f} s); identical: {dist.batch == local.batch}"
    )


def bench_extract(images: int, workers: list[int]) -> None:
    import torch
    import torchvision
    from _images import write_images

    from uwe_cli.extract.classification import ClassificationConfig, extract_classification

    work = Path(tempfile.mkdtemp(prefix="uwe-bench-ray-"))
    write_images(work / "imgs", n=images, size=128)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), work / "r18.pth")

    def run(name: str, **kw: object) -> float:
        cfg = ClassificationConfig(
            data=work / "imgs", out=work / f"{name}.parquet", model="resnet18", checkpoint=work / "r18.pth",
            image_size=112, batch_size=32, device="cpu", **kw,
        )  # fmt: skip
        t = time.perf_counter()
        extract_classification(cfg)
        return images / (time.perf_counter() - t)

    local = run("local")
    print(f"\nextraction: {images} images, ResNet-18 at 112 px, batch 32, whole run incl. start-up")
    print(f"local: {local:.1f} images/s")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        for n in workers:
            rate = run(f"ray{n}", ray=True, workers=n)
            print(f"ray, {n} actors: {rate:.1f} images/s ({rate / local:.2f}x local)")
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    bench_select(args.rows, args.dim, args.budget, args.workers)
    bench_cluster(min(args.budget, 500))
    bench_extract(args.images, [w for w in args.workers if w <= 2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
