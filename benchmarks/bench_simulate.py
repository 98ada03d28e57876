"""Benchmark `uwe simulate` on a 100k × 512 pool with 10 classes (target: under 10 minutes).

Generates a clustered pool (cached in bench-out/) whose ground truth is the cluster's class with
`--noise` of the labels replaced by a random class (clean clusters are separable at any budget, so
every curve would sit at 100%; noise also makes the probe's fits as slow as real data's), then runs
`uwe simulate` in a child process over 4 budgets up to 2,000, 5 strategies and 3 seeds, and prints
the wall time, the child's peak RSS, where the time went (probe fits, probe predictions, selection
per strategy) and the recommendation.

    python benchmarks/bench_simulate.py                      # the figure in docs/simulate.md
    python benchmarks/bench_simulate.py --rows 20000         # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from synthetic import make_unit_arrays, write_unit_pool

OUT = Path("bench-out")
TARGET_SECONDS = 600.0


def ensure_pool(rows: int, dim: int, classes: int, noise: float) -> tuple[Path, Path]:
    pool = OUT / f"sim-pool-{rows}x{dim}.parquet"
    labels = OUT / f"sim-labels-{rows}x{dim}-noise{noise:g}.csv"
    chunk = 100_000
    if not pool.exists():
        t = time.perf_counter()
        write_unit_pool(pool, rows, dim, clusters=20, num_classes=classes, with_probs=False, chunk_rows=chunk)
        print(f"  generated {pool} in {time.perf_counter() - t:.0f} s", flush=True)
    if not labels.exists():
        rng = np.random.default_rng(1)
        with labels.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label"])
            for start in range(0, rows, chunk):
                cols = make_unit_arrays(min(chunk, rows - start), dim, 20, classes, seed=0, start=start)
                truth = cols["class"]
                flip = rng.random(truth.size) < noise
                truth = np.where(flip, rng.integers(0, classes, truth.size), truth)
                writer.writerows(zip(cols["id"].tolist(), truth.tolist(), strict=True))
    return pool, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.1, help="share of labels replaced by a random class")
    ap.add_argument("--budgets", default="250,500,1000,2000")
    ap.add_argument("--strategies", default="uwe,coreset,uncertainty,random,badge")
    ap.add_argument("--tau", default="1")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    print(f"machine: {os.cpu_count()} cores")
    print(
        f"pool {args.rows:,} × {args.dim}, {args.classes} classes ({args.noise:.0%} label noise); "
        f"budgets {args.budgets}; "
        f"strategies {args.strategies}; tau {args.tau}; {args.seeds} seeds",
        flush=True,
    )
    pool, labels = ensure_pool(args.rows, args.dim, args.classes, args.noise)
    out = OUT / "simulate"
    cmd = [sys.executable, "-m", "uwe_cli.cli", "simulate", str(pool), "--labels", str(labels)]
    cmd += ["--budgets", args.budgets, "--strategies", args.strategies, "--tau", args.tau]
    cmd += ["--seeds", str(args.seeds), "--out", str(out), "--json"]
    t = time.perf_counter()
    with open(OUT / "simulate.json", "w") as stdout, open(OUT / "simulate.err", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env={**os.environ, "UWE_NO_PROGRESS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"uwe simulate failed: {(OUT / 'simulate.err').read_text()}")
    summary = json.loads((OUT / "simulate.json").read_text())
    print((OUT / "simulate.err").read_text(), end="")
    parts = summary["seconds"]
    print("\ntime by phase (s):", ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items()) if k != "total"))
    print(
        f"\nuwe simulate: {seconds:.1f} s wall ({seconds / 60:.1f} min; target {TARGET_SECONDS / 60:.0f} min, "
        f"{TARGET_SECONDS / seconds:.2f}× under it), peak RSS {usage.ru_maxrss / 2**20:.2f} GiB "
        f"(features {args.rows * args.dim * 4 / 2**30:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
