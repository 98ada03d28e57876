"""Benchmark `uwe select` against the paper's algorithm implemented plainly, in the same run.

For each case: generate a clustered pool (cached in bench-out/), run `uwe select` in a child process
(wall time and peak RSS of that process), time the naive per-pick full pass (numpy, float64, the
baseline) and check that the orders are identical. Where the naive pass would take too long, it runs
the first `--naive-picks` picks, its time is extrapolated linearly (each naive pick costs the same
full pass) and the order is compared on those picks; small cases compare the full order.

    python benchmarks/bench_select.py                 # the README table (takes ~15-25 minutes)
    python benchmarks/bench_select.py --cases small   # a quick look
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
from naive import k_center_greedy_naive
from synthetic import write_unit_pool

from uwe_cli.embedding import normalize_uncertainty, uwe_weights
from uwe_cli.pool import read_pool

OUT = Path("bench-out")
CASES = {
    # name: (rows, dim, labeled, budget, naive picks measured (None = all))
    "small": (20_000, 512, 200, 500, None),
    "200k": (200_000, 512, 2_000, 2_000, 20),
    "1M": (1_000_000, 512, 0, 10_000, 5),
    "10M": (10_000_000, 128, 0, 1_000, 3),
}


def ensure_pool(rows: int, dim: int) -> Path:
    path = OUT / f"pool-{rows}x{dim}.parquet"
    if not path.exists():
        t = time.perf_counter()
        write_unit_pool(path, rows, dim, clusters=50, with_probs=False)
        print(f"  generated {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def run_uwe(pool: Path, labeled: Path | None, budget: int, out: Path) -> tuple[float, float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "uwe_cli.cli",
        "select",
        str(pool),
        "--budget",
        str(budget),
        "--out",
        str(out),
        "--json",
        "--quiet",
    ]
    if labeled is not None:
        cmd += ["--labeled", str(labeled)]
    t = time.perf_counter()
    with open(out.with_suffix(".json"), "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env={**os.environ, "UWE_NO_PROGRESS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"uwe select failed: {out.with_suffix('.err').read_text()}")
    return seconds, usage.ru_maxrss * 1024, json.loads(out.with_suffix(".json").read_text())


def naive_order(pool_path: Path, labeled_rows: np.ndarray, picks: int):
    """(candidate-relative picks, seconds for the first pick incl. labeled init, seconds per extra pick)."""
    pool = read_pool([pool_path])
    n = pool.size
    cand = np.setdiff1d(np.arange(n), labeled_rows)
    in_play = np.ones(n, dtype=bool)
    w = uwe_weights(normalize_uncertainty(pool.uncertainty, in_play, "minmax"), 1.0)
    t = time.perf_counter()
    first = k_center_greedy_naive(pool.features, w, cand, labeled_rows, 1, gemm_init=True)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    res = k_center_greedy_naive(pool.features, w, cand, labeled_rows, picks, gemm_init=True)
    t_all = time.perf_counter() - t
    per_pick = max(t_all - t_first, 0.0) / max(picks - 1, 1)
    assert res.positions[0] == first.positions[0]
    return cand[res.positions], pool.ids, t_first, per_pick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--skip-naive", action="store_true", help="only time uwe select")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    print(f"machine: {os.cpu_count()} cores; numpy {np.__version__}")
    header = (
        f"{'case':>6} {'rows×dim':>13} {'labeled':>7} {'budget':>6} {'uwe s':>8} {'naive s':>10} "
        f"{'speed-up':>8} {'peak RSS':>9} {'matrix':>8} {'RSS/matrix':>10} {'order':>18}"
    )
    lines = []
    for name in args.cases:
        rows, dim, n_lab, budget, naive_picks = CASES[name]
        print(f"[{name}] {rows:,} × {dim}, labeled {n_lab:,}, budget {budget:,}", flush=True)
        pool = ensure_pool(rows, dim)
        labeled_rows = np.arange(0, rows, rows // n_lab)[:n_lab] if n_lab else np.empty(0, dtype=np.int64)
        labeled = None
        if n_lab:
            labeled = OUT / f"labeled-{name}.txt"
            labeled.write_text("".join(f"img_{i:08d}.png\n" for i in labeled_rows))
        out = OUT / f"batch-{name}.csv"
        seconds, rss, summary = run_uwe(pool, labeled, budget, out)
        matrix = rows * dim * 4
        with open(out, newline="") as fh:
            got = [r["id"] for r in csv.DictReader(fh)]
        naive_s, order = float("nan"), "not checked"
        if not args.skip_naive:
            k = budget if naive_picks is None else naive_picks
            ref_rows, ids, t_first, per_pick = naive_order(pool, labeled_rows, k)
            naive_s = t_first + per_pick * (budget - 1)
            ref_ids = ids.take(ref_rows).to_pylist()
            same = got[:k] == ref_ids
            order = (
                f"{'identical' if same else 'DIFFERENT'} ({k})"
                if naive_picks
                else ("identical (all)" if same else "DIFFERENT")
            )
            naive_s_label = f"{naive_s:.0f}*" if naive_picks else f"{naive_s:.1f}"
        else:
            naive_s_label = "-"
        line = (
            f"{name:>6} {f'{rows:,}×{dim}':>13} {n_lab:>7,} {budget:>6,} {seconds:>8.1f} {naive_s_label:>10} "
            f"{(naive_s / seconds if naive_s == naive_s else float('nan')):>7.1f}× "
            f"{rss / 2**30:>7.2f}G {matrix / 2**30:>6.2f}G {rss / matrix:>10.2f} {order:>18}"
        )
        print(header)
        print(line, flush=True)
        print(f"  skipped distance work: {summary.get('skipped_distance_fraction'):.4f}", flush=True)
        lines.append(line)
    print("\n" + header)
    print("\n".join(lines))
    print("* naive time extrapolated from the picks measured (every naive pick is the same full pass).")


if __name__ == "__main__":
    main()
