"""Benchmark `uwe report` on a 100k-row pool with a 1,000-image batch (target: < 60 s, file < ~30 MB).

Setup (not timed, cached in bench-out/report/): a clustered 100k × 512 classification pool whose
`source` points at 1,000 photo-like 640 × 480 JPEGs (smooth gradients, shapes, sensor noise: they
compress like photographs, which decides the size of the embedded thumbnails), and the batch
`uwe select --budget 1000` picks from it. Timed in the same run:

- `uwe report` end to end (a child process: read the pool, map of 20k points, 1,000 thumbnails,
  histograms, HTML written);
- the baseline: the bare minimum any report needs, done plainly: decode the 1,000 picked images
  with PIL, shrink and JPEG-encode them one after the other (no pool, no map, no page).

    python benchmarks/bench_report.py            # prints seconds, ratio and file size
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from synthetic import make_unit_arrays, unit_table

from uwe_cli.batch import read_batch
from uwe_cli.schema import encode_metadata

OUT = Path("bench-out/report")


def write_photo(path: Path, rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> None:
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, (3, 3))
    rgb = np.stack(
        [
            base[c, 0] + (base[c, 1] - base[c, 0]) * xx / w + 40 * np.sin(yy / rng.uniform(20, 90))
            for c in range(3)
        ],
        -1,
    )
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(-50, w), rng.uniform(-50, h)
        box = [x0, y0, x0 + rng.uniform(20, 250), y0 + rng.uniform(20, 200)]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def setup(rows: int, dim: int, images: int, budget: int) -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    pool = OUT / f"pool-{rows}x{dim}.parquet"
    folder = OUT / "images"
    if not pool.exists():
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(images):
            path = folder / f"photo_{i:05d}.jpg"
            if not path.exists():
                write_photo(path, rng)
        writer = None
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            table = unit_table(make_unit_arrays(n, dim, seed=0, start=start))
            ids = [f"unit_{i:07d}.jpg" for i in range(start, start + n)]
            table = table.set_column(0, "id", pa.array(ids))
            sources = [
                str((folder / f"photo_{i % images:05d}.jpg").resolve()) for i in range(start, start + n)
            ]
            table = table.append_column("source", pa.array(sources))
            if writer is None:
                meta = encode_metadata({"task": "classification", "num_classes": 10, "feature_dim": dim})
                writer = pq.ParquetWriter(pool, table.schema.with_metadata(meta))
            writer.write_table(table)
        assert writer is not None
        writer.close()
    batch = OUT / f"batch-{budget}.csv"
    if not batch.exists():
        cmd = [
            sys.executable,
            "-m",
            "uwe_cli.cli",
            "select",
            str(pool),
            "--budget",
            str(budget),
            "--out",
            str(batch),
            "-q",
        ]
        subprocess.run(cmd, check=True)
    return pool, batch


def baseline(batch: Path, pool: Path, size: int) -> float:
    """Decode, shrink and encode each picked image, serially, with plain PIL (the irreducible work)."""
    from PIL import Image

    table = pq.read_table(pool, columns=["id", "source"])
    source = dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist(), strict=True))
    started = time.perf_counter()
    for unit in read_batch(batch).ids:
        with Image.open(source[unit]) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            img.save(io.BytesIO(), format="JPEG", quality=80)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=1_000)
    parser.add_argument("--budget", type=int, default=1_000)
    args = parser.parse_args()
    pool, batch = setup(args.rows, args.dim, args.images, args.budget)
    html = OUT / "report.html"
    cmd = [
        sys.executable,
        "-m",
        "uwe_cli.cli",
        "report",
        str(batch),
        "--pool",
        str(pool),
        "--out",
        str(html),
        "-q",
    ]
    env = {**os.environ, "UWE_NO_PROGRESS": "1"}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - started
    base = baseline(batch, pool, 224)
    mb = html.stat().st_size / 1e6
    print(
        f"pool {args.rows:,} × {args.dim}, batch {args.budget:,} picks of {args.images:,} JPEGs 640×480, cores {os.cpu_count()}"
    )
    print(
        f"uwe report (end to end, child process): {seconds:.1f} s   target < 60 s: {'met' if seconds < 60 else 'MISSED'}"
    )
    print(f"baseline (serial PIL decode + thumbnail + encode of the picks only): {base:.1f} s")
    print(f"ratio report / baseline: {seconds / base:.2f}x")
    print(f"report file: {mb:.1f} MB ({html})   target < ~30 MB: {'met' if mb < 30 else 'MISSED'}")


if __name__ == "__main__":
    main()
