"""Pools with real image files for the export and report tests: classification, regions, detection.

Written with the schema module's own builders (the contract the extractors follow), with IDs that
need quoting (commas, quotes, spaces, '#', '&') so references and CSV/JSON round trips are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from uwe_cli.schema import detection_schema, encode_metadata, record_batch, unit_schema

CLASS_NAMES = ["cat", "dog", "bird"]
DET_NAMES = ["car", "person", "bike"]


@dataclass
class Fixture:
    pool: Path
    images: Path
    ids: list[str]
    sizes: dict[str, tuple[int, int]]  # image ID -> (width, height)


def image_names(n: int) -> list[str]:
    odd = ['odd, "quoted" name.png', "a&b #1.jpg", "sub/dir/ü.png"]
    return [odd[i] if i < len(odd) else f"img{i:03d}.{'jpg' if i % 2 else 'png'}" for i in range(n)]


def write_images(root: Path, names: list[str], seed: int = 0) -> dict[str, tuple[int, int]]:
    """Small pictures (gradient, a few shapes) of varied sizes; returns (width, height) per name."""
    rng = np.random.default_rng(seed)
    sizes = {}
    for i, name in enumerate(names):
        w, h = 64 + 8 * (i % 5), 48 + 6 * (i % 4)
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), (37 * i) % 256)], axis=2)
        img = Image.fromarray(rgb.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            draw.rectangle([x0, y0, x0 + 10, y0 + 8], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        sizes[name] = (w, h)
    return sizes


def classification_pool(folder: Path, n: int = 40, d: int = 8, seed: int = 1) -> Fixture:
    rng = np.random.default_rng(seed)
    images = folder / "images"
    names = image_names(n)
    sizes = write_images(images, names, seed)
    probs = rng.dirichlet(np.ones(3) * 0.7, n).astype(np.float32)
    entropy = -(probs * np.log(probs)).sum(axis=1)
    schema = unit_schema(d, num_classes=3, pred=True)
    columns = {
        "id": names,
        "source": [str(images / name) for name in names],
        "feature": rng.gamma(2.0, 1.0, (n, d)).astype(np.float32),
        "entropy": entropy.astype(np.float32),
        "bvsb": np.sort(probs, axis=1)[:, -2] / probs.max(axis=1),
        "least_confidence": 1 - probs.max(axis=1),
        "probs": probs,
        "pred": probs.argmax(axis=1).astype(np.int32),
    }
    meta = {"task": "classification", "num_classes": 3, "class_names": CLASS_NAMES, "feature_dim": d}
    table = record_batch(schema, columns)
    path = folder / "cls.parquet"
    pq.write_table(_with_meta(table, meta), path)
    return Fixture(path, images, names, sizes)


def region_pool(folder: Path, n_images: int = 8, d: int = 8, seed: int = 2) -> Fixture:
    """Each image cut into a 2 × 2 grid of regions; region IDs `<image>#<k>`."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    names = image_names(n_images)
    sizes = write_images(images, names, seed)
    ids, image_ids, boxes = [], [], []
    for name in names:
        w, h = sizes[name]
        for k, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            ids.append(f"{name}#{k}")
            image_ids.append(name)
            boxes.append((x, y, (w - x) if x else w // 2, (h - y) if y else h // 2))
    n = len(ids)
    box = np.asarray(boxes, dtype=np.int32)
    u = rng.random((n, 3)).astype(np.float32)
    columns = {
        "id": ids,
        "source": [str(images / i) for i in image_ids],
        "feature": rng.gamma(2.0, 1.0, (n, d)).astype(np.float32),
        "entropy": u[:, 0],
        "bvsb": u[:, 1],
        "least_confidence": u[:, 2],
        "image_id": image_ids,
        "x": box[:, 0],
        "y": box[:, 1],
        "width": box[:, 2],
        "height": box[:, 3],
    }
    meta = {"task": "segmentation", "unit": "region", "num_classes": 4, "class_names": None}
    path = folder / "regions.parquet"
    pq.write_table(_with_meta(record_batch(unit_schema(d, regions=True), columns), meta), path)
    return Fixture(path, images, ids, sizes)


def detection_pool(folder: Path, n_images: int = 12, d: int = 8, seed: int = 3) -> Fixture:
    """0-4 boxes per image (images 1 and 5 have none), classes car/person/bike, boxes partly outside."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    names = image_names(n_images)
    sizes = write_images(images, names, seed)
    rows: dict[str, list] = {k: [] for k in ("id", "source", "label", "score", "box", "u", "feature")}
    for i, name in enumerate(names):
        w, h = sizes[name]
        count = 0 if i in (1, 5) else int(rng.integers(1, 5))
        for _ in range(max(count, 1)):
            x1, y1 = rng.uniform(-4, w * 0.6), rng.uniform(0, h * 0.6)
            rows["id"].append(name)
            rows["source"].append(str(images / name))
            rows["label"].append(int(rng.integers(0, 3)) if count else None)
            rows["score"].append(float(rng.uniform(0.05, 1.0)) if count else None)
            rows["box"].append([x1, y1, x1 + rng.uniform(5, w * 0.5), y1 + rng.uniform(5, h * 0.5)])
            rows["u"].append(float(rng.random()) if count else None)
            rows["feature"].append(rng.gamma(2.0, 1.0, d) if count else np.zeros(d))
    empty = np.array([label is None for label in rows["label"]])
    import pyarrow as pa

    from uwe_cli.schema import fixed_list

    u = pa.array(rows["u"], pa.float32())
    columns = {
        "id": rows["id"],
        "source": rows["source"],
        "label": pa.array(rows["label"], pa.int32()),
        "score": pa.array(rows["score"], pa.float32()),
        "box": fixed_list(np.asarray(rows["box"]), mask=pa.array(empty)),
        "bvsb": u,
        "entropy": u,
        "least_confidence": u,
        "feature": fixed_list(np.asarray(rows["feature"]), mask=pa.array(empty)),
    }
    meta = {"task": "detection", "num_classes": 3, "class_names": DET_NAMES, "background_class": None}
    path = folder / "det.parquet"
    pq.write_table(_with_meta(record_batch(detection_schema(d), columns), meta), path)
    return Fixture(path, images, names, sizes)


def _with_meta(batch, meta: dict):
    import pyarrow as pa

    table = pa.Table.from_batches([batch])
    return table.replace_schema_metadata(encode_metadata(meta))
