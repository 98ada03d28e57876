"""Write a synthetic detection pool (docs/schema.md) for benchmarks: clustered box features.

Images are written in chunks through one ParquetWriter, so generating 100,000 images × 1,024-d
needs memory for one chunk only. Box features are `cluster centre + noise`, the class of a box is
tied to its cluster (mostly), and a fraction of images has no detection (one null-label row).

    python benchmarks/make_detection_pool.py OUT.parquet --images 100000 --classes 80 --dim 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uwe_cli.schema import encode_metadata

SCHEMA_FIELDS = [
    ("id", pa.string()),
    ("label", pa.int32()),
    ("score", pa.float32()),
    ("box", pa.list_(pa.float32(), 4)),
    ("bvsb", pa.float32()),
    ("entropy", pa.float32()),
    ("least_confidence", pa.float32()),
]


def detection_schema(dim: int, num_classes: int) -> pa.Schema:
    fields = [
        pa.field(name, typ, nullable=name == "label" or name not in ("id",)) for name, typ in SCHEMA_FIELDS
    ]
    fields.append(pa.field("feature", pa.list_(pa.float32(), dim), nullable=True))
    meta = {"task": "detection", "num_classes": num_classes, "feature_dim": dim, "model": "synthetic"}
    return pa.schema(fields, metadata=encode_metadata(meta))


def _chunk(
    rng: np.random.Generator,
    first_image: int,
    n_images: int,
    centres: np.ndarray,
    centre_class: np.ndarray,
    num_classes: int,
    max_boxes: int,
    empty_fraction: float,
    noise: float,
) -> pa.Table:
    dim = centres.shape[1]
    boxes_per_image = rng.integers(1, max_boxes + 1, size=n_images)
    boxes_per_image[rng.random(n_images) < empty_fraction] = 0
    rows_per_image = np.maximum(boxes_per_image, 1)  # an empty image still has its null-label row
    n_rows = int(rows_per_image.sum())
    image = np.repeat(np.arange(first_image, first_image + n_images), rows_per_image)
    is_box = np.repeat(boxes_per_image > 0, rows_per_image)

    cluster = rng.integers(0, len(centres), size=n_rows)
    label = np.where(rng.random(n_rows) < 0.8, centre_class[cluster], rng.integers(0, num_classes, n_rows))
    features = rng.standard_normal((n_rows, dim), dtype=np.float32)
    features *= np.float32(noise)
    features += centres[cluster]
    features[~is_box] = 0.0
    probs_best = rng.uniform(0.3, 1.0, n_rows).astype(np.float32)
    probs_second = (rng.random(n_rows).astype(np.float32) * np.minimum(probs_best, 1 - probs_best)).astype(
        np.float32
    )
    xy = rng.uniform(0, 600, (n_rows, 2)).astype(np.float32)
    wh = rng.uniform(8, 200, (n_rows, 2)).astype(np.float32)

    null = ~is_box
    mask = pa.array(null)
    feature = pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), dim, mask=mask)
    box = pa.FixedSizeListArray.from_arrays(pa.array(np.hstack([xy, xy + wh]).ravel()), 4, mask=mask)
    rest = 1 - probs_best - probs_second
    entropy = -(
        probs_best * np.log(probs_best)
        + probs_second * np.log(np.maximum(probs_second, 1e-12))
        + rest * np.log(np.maximum(rest, 1e-12))
    )
    ids = np.char.add("img", np.char.zfill(image.astype(str), 7))
    columns = {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(label.astype(np.int32), mask=null),
        "score": pa.array(probs_best, mask=null),
        "box": box,
        "bvsb": pa.array(probs_second / probs_best, mask=null),
        "entropy": pa.array(entropy.astype(np.float32), mask=null),
        "least_confidence": pa.array(1 - probs_best, mask=null),
        "feature": feature,
    }
    return pa.table(columns)


def make_detection_pool(
    path: str | Path,
    n_images: int = 1000,
    num_classes: int = 20,
    dim: int = 64,
    max_boxes: int = 5,
    empty_fraction: float = 0.1,
    n_clusters: int = 64,
    noise: float = 0.5,
    seed: int = 0,
    chunk_images: int = 5000,
) -> Path:
    """Write the pool to `path` (one Parquet file) and return the path."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centre_class = rng.integers(0, num_classes, size=n_clusters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = detection_schema(dim, num_classes)
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for first in range(0, n_images, chunk_images):
            n = min(chunk_images, n_images - first)
            table = _chunk(
                rng, first, n, centres, centre_class, num_classes, max_boxes, empty_fraction, noise
            )
            writer.write_table(table.cast(schema))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--max-boxes", type=int, default=5)
    parser.add_argument("--empty-fraction", type=float, default=0.1)
    parser.add_argument("--clusters", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    make_detection_pool(
        args.out,
        args.images,
        args.classes,
        args.dim,
        args.max_boxes,
        args.empty_fraction,
        args.clusters,
        seed=args.seed,
    )
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
