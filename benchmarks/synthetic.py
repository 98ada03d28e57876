"""Synthetic unit pools for tests, benchmarks and the README examples.

Features are clustered and non-negative (like post-ReLU penultimate features); uncertainty is
correlated with the distance to the cluster centre, as a real model's would be near class boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uwe_cli.outputs import atomic_path
from uwe_cli.schema import encode_metadata


def make_unit_arrays(
    n: int, dim: int, clusters: int = 20, num_classes: int = 10, seed: int = 0, start: int = 0
) -> dict[str, np.ndarray]:
    """Columns for rows start..start+n of a reproducible pool (chunks concatenate to the same pool)."""
    centre_rng = np.random.default_rng(seed)
    centres = centre_rng.gamma(2.0, 1.0, size=(clusters, dim)).astype(np.float32)
    spread = centre_rng.uniform(0.2, 0.8, size=clusters).astype(np.float32)
    rng = np.random.default_rng([seed, start])
    label = rng.integers(0, clusters, size=n)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * spread[label, None]
    feature = np.maximum(centres[label] + noise, 0.0, dtype=np.float32)
    offcentre = np.linalg.norm(noise, axis=1) / np.sqrt(dim) / spread[label]
    logits = rng.standard_normal((n, num_classes)).astype(np.float32) * (3.0 / (0.5 + offcentre[:, None]))
    logits[np.arange(n), label % num_classes] += 2.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs = probs.astype(np.float32)
    top2 = np.sort(probs, axis=1)[:, -2:]
    return {
        "id": np.array([f"img_{i:08d}.png" for i in range(start, start + n)]),
        "feature": feature,
        "entropy": (-(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)).astype(np.float32),
        "bvsb": (top2[:, 0] / top2[:, 1]).astype(np.float32),
        "least_confidence": (1.0 - top2[:, 1]).astype(np.float32),
        "probs": probs,
        "pred": probs.argmax(axis=1).astype(np.int32),
        "class": (label % num_classes).astype(np.int32),  # ground truth for simulations (not written)
    }


def unit_table(cols: dict[str, np.ndarray], with_probs: bool = True) -> pa.Table:
    def fixed(mat: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])

    arrays = {
        "id": pa.array(cols["id"], type=pa.string()),
        "feature": fixed(cols["feature"]),
        "entropy": pa.array(cols["entropy"]),
        "bvsb": pa.array(cols["bvsb"]),
        "least_confidence": pa.array(cols["least_confidence"]),
    }
    if with_probs:
        arrays["probs"] = fixed(cols["probs"])
        arrays["pred"] = pa.array(cols["pred"])
    return pa.table(arrays)


def write_unit_pool(
    path: str | Path,
    n: int,
    dim: int,
    clusters: int = 20,
    num_classes: int = 10,
    seed: int = 0,
    with_probs: bool = True,
    chunk_rows: int = 100_000,
) -> Path:
    """Write a synthetic pool in row groups (memory stays at one chunk), atomically."""
    path = Path(path)
    meta = encode_metadata(
        {
            "task": "classification",
            "num_classes": num_classes,
            "feature_dim": dim,
            "model": "synthetic",
            "generator_seed": seed,
        }
    )
    with atomic_path(path) as tmp:
        writer = None
        for start in range(0, n, chunk_rows):
            cols = make_unit_arrays(min(chunk_rows, n - start), dim, clusters, num_classes, seed, start)
            table = unit_table(cols, with_probs)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta))
            writer.write_table(table)
        assert writer is not None
        writer.close()
    return path
