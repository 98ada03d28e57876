"""A batch joined with its pool: what each pick is, where its image is, and what the model predicted.

`uwe export` and `uwe report` both start here. Only the columns they need are read (IDs, sources,
region columns, predictions, boxes), and only the rows of picked units are kept, so pairing a batch
with a pool of millions of rows costs one streamed pass over a few narrow columns. Every problem
(a batch ID not in the pool, a class without a name) is a one-line UweError before any output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli import storage
from uwe_cli.batch import Batch, read_batch
from uwe_cli.errors import BatchError, DataError, ExportError, UweError
from uwe_cli.outputs import Output, refuse_inputs
from uwe_cli.pool import PoolSource, open_pool
from uwe_cli.pool.detection import DEFAULT_DETECTION_UNCERTAINTY
from uwe_cli.pool.files import iter_batches, resolve_uncertainty_column
from uwe_cli.schema import REGION_COLUMNS, UNCERTAINTY_MEASURES

T = TypeVar("T")


@dataclass
class PickBox:
    """A predicted box in image pixels (x1, y1, x2, y2) with its class, score and uncertainty."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: int
    score: float | None
    uncertainty: float | None
    representative: bool = False  # per class the box of largest uncertainty (Eq. 9, --aggregate max)


@dataclass
class Pick:
    rank: int
    id: str
    uncertainty: float | None
    distance: float | None
    image_id: str  # the image the unit lies in (the unit itself unless regions)
    source: str | None  # the pool's image reference (path or URI), if stored
    region: tuple[int, int, int, int] | None = None  # x, y, width, height in pixels
    label: int | None = None  # classification: predicted class
    score: float | None = None  # classification: its probability
    boxes: list[PickBox] = field(default_factory=list)

    @property
    def labels(self) -> list[int]:
        """The classes the model predicted for this pick (its boxes', or its class)."""
        return [b.label for b in self.boxes] + ([self.label] if self.label is not None else [])


@dataclass
class Picks:
    """The picks in batch order, with what the pool says about them."""

    picks: list[Pick]
    kind: str  # "classification" | "regions" | "segmentation" | "detection"
    class_names: list[str] | None
    metadata: dict[str, Any]
    source: PoolSource
    has_boxes: bool = False
    has_scores: bool = False
    has_class_predictions: bool = False
    batch: Batch | None = None

    def __len__(self) -> int:
        return len(self.picks)

    def class_name(self, label: int) -> str:
        """The name of a class: the pool's (or --class-names) name, else the label number."""
        if self.class_names is None:
            return str(label)
        if label >= len(self.class_names):
            raise ExportError(
                f"class {label} has no name ({len(self.class_names)} class names); give every class "
                "a name with --class-names"
            )
        return self.class_names[label]

    def check_names(self) -> None:
        """Every class the model predicted for a pick has a name (ExportError otherwise)."""
        for pick in self.picks:
            for label in pick.labels:
                self.class_name(label)

    def clip_boxes(self, sizes: dict[str, tuple[int, int]]) -> None:
        """Clip every predicted box to its image (width, height): a pool may hold boxes reaching out of
        the image, which annotation tools reject or draw across the page."""
        for pick in self.picks:
            w, h = sizes[pick.image_id]
            for box in pick.boxes:
                box.x1, box.x2 = (min(max(v, 0.0), float(w)) for v in (box.x1, box.x2))
                box.y1, box.y2 = (min(max(v, 0.0), float(h)) for v in (box.y1, box.y2))

    def display_name(self, label: int) -> str:
        """The class name for people: the name when there is a non-empty one, else the label number."""
        if self.class_names is not None and 0 <= label < len(self.class_names) and self.class_names[label]:
            return self.class_names[label]
        return str(label)


def _rows_of_ids(source: PoolSource, ids: set[str], columns: list[str]) -> pa.Table:
    """The pool rows whose `id` is in `ids` (file order), only `columns`, streamed batch by batch."""
    wanted = pa.array(sorted(ids), type=pa.string())
    tables = []
    for f, pf in zip(source.files, source.parquet, strict=True):
        names = pf.schema_arrow.names
        cols = [c for c in columns if c in names]
        for batch in iter_batches(pf, f, cols, 1 << 16):
            mask = pc.is_in(batch.column("id").cast(pa.string()), value_set=wanted)
            if pc.any(mask).as_py():
                tables.append(pa.Table.from_batches([batch.filter(mask)]))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in ["id"]})
    return pa.concat_tables(tables, promote_options="permissive")


def _check_all_found(batch: Batch, found: set[str], batch_path: Path, pool_paths: Sequence[Path]) -> None:
    missing = [i for i in batch.ids if i not in found]
    if missing:
        pools = ", ".join(map(str, pool_paths))
        raise BatchError(
            f"{len(missing)} of the {len(batch)} IDs in {batch_path} are not in the pool {pools} "
            f"(first: '{missing[0]}'); was the batch selected from another pool?"
        )


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def load_picks(
    batch_path: str | Path,
    pools: Sequence[str | Path],
    class_names: list[str] | None = None,
    uncertainty: str | None = None,
) -> Picks:
    """Pair a batch file with its pool: one `Pick` per batch row, in batch order.

    `class_names` replaces the pool's metadata names. For detection pools `uncertainty` names the
    per-box column that decides each class's representative box (default bvsb, as `uwe select`).
    """
    batch_path = storage.as_location(batch_path)
    pool_paths = [storage.as_location(p) for p in pools]
    source = open_pool(pool_paths)
    batch = read_batch(batch_path)
    meta = source.metadata
    names = class_names if class_names is not None else meta.get("class_names")
    ranks = batch.ranks or list(range(1, len(batch) + 1))
    if source.kind == "detection":
        schema = source.parquet[0].schema_arrow.names
        picks = Picks(
            _detection_picks(source, batch, ranks, uncertainty, batch_path, pool_paths),
            "detection",
            names,
            meta,
            source,
            has_boxes="box" in schema,
            has_scores="score" in schema,
            batch=batch,
        )
    else:
        picks = _unit_picks(source, batch, ranks, names, batch_path, pool_paths)
    if class_names is not None:  # names the user gave must cover every class of the batch
        picks.check_names()
    return picks


def _unit_picks(
    source: PoolSource,
    batch: Batch,
    ranks: list[int],
    names: list[str] | None,
    batch_path: Path,
    pool_paths: list[Path],
) -> Picks:
    schema = source.parquet[0].schema_arrow.names
    regions = all(c in schema for c in REGION_COLUMNS)
    columns = ["id", "source", "pred", "probs", *(REGION_COLUMNS if regions else ())]
    table = _rows_of_ids(source, set(batch.ids), columns)
    row_of = {unit_id: i for i, unit_id in enumerate(table.column("id").to_pylist())}
    _check_all_found(batch, set(row_of), batch_path, pool_paths)
    col = {name: table.column(name).to_pylist() for name in table.column_names if name != "probs"}
    probs = None
    if "probs" in table.column_names:
        probs = table.column("probs").combine_chunks()
    task = str(source.metadata.get("task", "classification"))
    predicts = task == "classification" and ("pred" in col or probs is not None)
    picks = []
    for k, unit_id in enumerate(batch.ids):
        i = row_of[unit_id]
        pick = Pick(
            rank=ranks[k],
            id=unit_id,
            uncertainty=batch.uncertainty[k],
            distance=batch.distance[k],
            image_id=col["image_id"][i] if regions else unit_id,
            source=col["source"][i] if "source" in col else None,
        )
        if regions:
            pick.region = tuple(int(col[c][i]) for c in REGION_COLUMNS[1:])  # type: ignore[assignment]
        if predicts:
            p = None if probs is None or not probs[i].is_valid else np.asarray(probs[i].as_py())
            label = col["pred"][i] if "pred" in col else (int(p.argmax()) if p is not None else None)
            if label is not None:
                pick.label = int(label)
                if p is not None and 0 <= pick.label < len(p):
                    pick.score = float(p[pick.label])
        picks.append(pick)
    kind = "regions" if regions else task
    return Picks(
        picks,
        kind,
        names,
        source.metadata,
        source,
        has_scores=probs is not None,
        has_class_predictions=predicts,
    )


def _detection_picks(
    source: PoolSource,
    batch: Batch,
    ranks: list[int],
    uncertainty: str | None,
    batch_path: Path,
    pool_paths: list[Path],
) -> list[Pick]:
    schema = source.parquet[0].schema_arrow.names
    requested = uncertainty if uncertainty not in (None, "", "auto") else None
    try:
        unc = resolve_uncertainty_column(
            schema, requested, str(source.files[0]), DEFAULT_DETECTION_UNCERTAINTY
        )
    except UweError:
        if requested is not None:
            raise
        unc = next((c for c in UNCERTAINTY_MEASURES if c in schema), None)
    columns = ["id", "source", "label", "score", "box", *([unc] if unc else [])]
    table = _rows_of_ids(source, set(batch.ids), columns)
    ids = table.column("id").to_pylist()
    _check_all_found(batch, set(ids), batch_path, pool_paths)
    labels = table.column("label").to_pylist()
    scores = table.column("score").to_pylist() if "score" in table.column_names else [None] * len(ids)
    boxes = table.column("box").to_pylist() if "box" in table.column_names else [None] * len(ids)
    us = table.column(unc).to_pylist() if unc else [None] * len(ids)
    sources = table.column("source").to_pylist() if "source" in table.column_names else None
    by_image: dict[str, list[int]] = {}
    for i, image in enumerate(ids):
        by_image.setdefault(image, []).append(i)
    picks = []
    for k, image in enumerate(batch.ids):
        rows = by_image[image]
        pick = Pick(
            rank=ranks[k],
            id=image,
            uncertainty=batch.uncertainty[k],
            distance=batch.distance[k],
            image_id=image,
            source=sources[rows[0]] if sources is not None else None,
        )
        for i in rows:
            if labels[i] is None or boxes[i] is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            if not all(np.isfinite((x1, y1, x2, y2))):
                raise DataError(f"image '{image}': a box with NaN or Inf coordinates in the pool")
            pick.boxes.append(PickBox(x1, y1, x2, y2, int(labels[i]), _float(scores[i]), _float(us[i])))
        _mark_representatives(pick.boxes)
        picks.append(pick)
    return picks


def _mark_representatives(boxes: list[PickBox]) -> None:
    """Per class, the box of largest uncertainty (the earliest on ties), as `--aggregate max` takes it."""
    best: dict[int, PickBox] = {}
    for box in boxes:
        current = best.get(box.label)
        u = -np.inf if box.uncertainty is None else box.uncertainty
        if current is None or u > (-np.inf if current.uncertainty is None else current.uncertainty):
            best[box.label] = box
    for box in best.values():
        box.representative = True


def image_path(pick: Pick, images: str | Path | None) -> str | Path:
    """Where to read a pick's image here: `--images DIR` / image ID, else the pool's `source` (paths or URLs)."""
    if images is not None:
        return storage.join(images, pick.image_id)
    if pick.source is None:
        raise DataError(
            f"the pool has no 'source' column for '{pick.image_id}'; give the image folder with --images DIR"
        )
    return storage.as_location(pick.source)


def map_images(
    picks: Picks,
    images: str | Path | None,
    func: Callable[[str, str | Path], T],
    progress: Callable[[int, int], None] | None = None,
    workers: int = 8,
    out: Output | None = None,
) -> dict[str, T]:
    """`func(image ID, image path)` once per image of the picks, in parallel threads (remote disks are
    slow), with progress per image; first `out`, the command's output, is refused if it is one of them."""
    paths: dict[str, str | Path] = {}
    for pick in picks.picks:
        if pick.image_id not in paths:
            paths[pick.image_id] = image_path(pick, images)
    if out is not None:
        refuse_inputs(out, paths.values())
    found: dict[str, T] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (image_id, value) in enumerate(
            zip(paths, pool.map(func, paths, paths.values()), strict=True), start=1
        ):
            found[image_id] = value
            if progress is not None:
                progress(done, len(paths))
    return found
