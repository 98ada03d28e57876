"""`make bench`: every benchmark in turn, each printing its own figures and ratios.

Set UWE_BENCH_QUICK=1 for a short pass (small selection cases only), useful to check the scripts run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = os.environ.get("UWE_BENCH_QUICK", "") not in ("", "0")

RUNS: list[list[str]] = [
    ["peers.py", "--cases", "blobs-20k", "--peers", "torch-fps"] if QUICK else ["peers.py"],
    ["bench_select.py", "--cases", "small", "200k"] if QUICK else ["bench_select.py"],
    ["bench_classwise.py", "--pool", "bench-out/detection-100k.parquet", "--budget", "1000"],
    ["bench_extract_classification.py"],
    ["bench_extract_segmentation.py"],
    ["bench_remote_read.py"],
    ["bench_simulate.py", "--rows", "20000"] if QUICK else ["bench_simulate.py"],
]


def main() -> int:
    failed = []
    for args in RUNS:
        print(f"\n=== {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / args[0]), *args[1:]])
        if code:
            failed.append(args[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
