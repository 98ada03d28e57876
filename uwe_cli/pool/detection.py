"""Detection pools: one row per detected box, plus a null-`label` row per image without boxes.

Reading keeps boxes, not images: box features stream into one preallocated float32 matrix (sized
by a cheap first pass over the `label` column), so the dense K×d image embedding never exists.
Image IDs are numbered in order of first appearance, which is the "pool order" selection ties use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli.errors import PoolError
from uwe_cli.pool.files import (
    batch_rows,
    check_numeric_column,
    check_uncertainty_values,
    checked_ids,
    list_to_matrix,
    resolve_uncertainty_column,
)

if TYPE_CHECKING:
    from uwe_cli.pool import PoolSource

DEFAULT_DETECTION_UNCERTAINTY = "bvsb"  # the paper's choice for boxes (Section 3.4, Eq. 8)
OPTIONAL_COLUMNS = ("score", "box", "source")


@dataclass
class DetectionPool:
    """A loaded detection pool: per-image IDs plus flat per-box arrays (rows with a non-null label)."""

    image_ids: pa.Array  # string, one per image, first-appearance order
    box_image: np.ndarray  # int64 (n_boxes,): index into image_ids
    box_label: np.ndarray  # int32 (n_boxes,)
    box_uncertainty: np.ndarray  # float64 (n_boxes,), raw (not normalised)
    box_features: np.ndarray  # float32 (n_boxes, d), C-contiguous
    box_row: np.ndarray  # int64 (n_boxes,): global row number over the pool's files (error messages)
    num_classes: int
    uncertainty_column: str
    box_score: np.ndarray | None = None  # float32 (n_boxes,)
    box_coords: np.ndarray | None = None  # float32 (n_boxes, 4): x1, y1, x2, y2
    sources: pa.Array | None = None  # per image: `source` of its first row
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    kind = "detection"

    @property
    def ids(self) -> pa.Array:
        """The selectable units' IDs (images), as for unit pools."""
        return self.image_ids

    @property
    def size(self) -> int:
        return len(self.image_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        return len(self.box_label)

    @property
    def dim(self) -> int:
        return int(self.box_features.shape[1])

    @property
    def task(self) -> str:
        return "detection"


def _first_index(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def encode_images(
    id_chunks: list[pa.Array], source_chunks: list[pa.Array]
) -> tuple[pa.Array, np.ndarray, pa.Array | None]:
    """(image IDs in order of first appearance, each row's image, each image's first source or None)."""
    encoded = pc.dictionary_encode(pa.concat_arrays(id_chunks))
    row_image = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    sources = None
    if source_chunks:
        _, first_row = np.unique(row_image, return_index=True)
        sources = pa.concat_arrays(source_chunks).take(pa.array(first_row))
    return encoded.dictionary, row_image, sources


def load_detection_pool(source: PoolSource, uncertainty: str | None = None) -> DetectionPool:
    """Load and validate a detection pool.

    `uncertainty` names the per-box uncertainty column (default `bvsb`, as in the paper). Raises a
    one-line PoolError naming the file, column and image ID of the first problem found.
    """
    requested = uncertainty if uncertainty not in (None, "", "auto") else None
    unc_col: str | None = None
    optional: list[str] | None = None
    for f, pf in zip(source.files, source.parquet, strict=True):
        schema = pf.schema_arrow
        col = resolve_uncertainty_column(
            schema.names, unc_col or requested, str(f), default=DEFAULT_DETECTION_UNCERTAINTY
        )
        check_numeric_column(f, schema, col, "uncertainty")
        unc_col = col
        present = [c for c in OPTIONAL_COLUMNS if c in schema.names]
        optional = present if optional is None else [c for c in optional if c in present]
    assert unc_col is not None
    num_classes = source.num_classes
    dim = source.dim

    # Pass 1 (label column only): the number of boxes, so features go into one exact allocation.
    n_boxes = 0
    for _, batch in source.batches(["label"], 1 << 16):
        n_boxes += len(batch) - batch.column(0).null_count

    optional = optional or []
    features: np.ndarray | None = None if dim is None else np.empty((n_boxes, dim), dtype=np.float32)
    box_unc = np.empty(n_boxes, dtype=np.float64)
    box_label = np.empty(n_boxes, dtype=np.int32)
    box_row = np.empty(n_boxes, dtype=np.int64)
    box_score = np.empty(n_boxes, dtype=np.float32) if "score" in optional else None
    box_coords = np.empty((n_boxes, 4), dtype=np.float32) if "box" in optional else None
    id_chunks: list[pa.Array] = []
    source_chunks: list[pa.Array] = []
    columns = ["id", "label", "feature", unc_col, *optional]

    row = 0
    b = 0  # boxes written so far
    max_label = -1
    rows_per_batch = batch_rows(dim, 64 << 20)
    for f, batch in source.batches(columns, rows_per_batch):
        n = batch.num_rows
        ids = checked_ids(f, batch.column("id"), row)
        id_chunks.append(ids)
        if "source" in optional:
            source_chunks.append(batch.column("source").cast(pa.string()))
        is_box = np.asarray(batch.column("label").is_valid())
        pos = np.flatnonzero(is_box)
        m = len(pos)
        if m == 0:
            row += n
            continue
        take = pa.array(pos)

        def where(i: int, _f: Path = f, _ids: pa.Array = ids, _pos: np.ndarray = pos) -> str:
            return f"{_f}: id '{_ids[int(_pos[i])].as_py()}'"

        feat_col = batch.column("feature")
        null_feature = np.asarray(feat_col.is_null())[pos]
        if null_feature.any():
            i = _first_index(null_feature)
            raise PoolError(
                f"{where(i)} has a box (label {batch.column('label')[int(pos[i])]}) with a null 'feature'"
            )
        if features is None or not pa.types.is_fixed_size_list(feat_col.type):
            mat = list_to_matrix(feat_col.take(take), "feature", str(f))
            if dim is None:
                dim = mat.shape[1]
            if mat.shape[1] != dim:
                raise PoolError(f"{f}: feature length {mat.shape[1]} differs from {dim}")
            if features is None:
                features = np.empty((n_boxes, dim), dtype=np.float32)
            features[b : b + m] = mat
        else:
            # Gather the box rows straight from the flat child values: one copy, no filtered batch.
            flat = feat_col.values.slice(feat_col.offset * dim, n * dim).to_numpy(zero_copy_only=False)
            if flat.dtype == np.float32:
                np.take(flat.reshape(n, dim), pos, axis=0, out=features[b : b + m], mode="clip")
            else:  # float16 (or float64) features are upcast/rounded to float32
                features[b : b + m] = flat.reshape(n, dim)[pos]
        bad = ~np.isfinite(features[b : b + m]).all(axis=1)
        if bad.any():
            raise PoolError(f"{where(_first_index(bad))}: NaN or Inf in 'feature'")

        unc = batch.column(unc_col).take(take)
        if unc.null_count:
            raise PoolError(f"{where(_first_index(np.asarray(unc.is_null())))}: null '{unc_col}' on a box")
        values = unc.to_numpy(zero_copy_only=False).astype(np.float64)
        check_uncertainty_values(values, unc_col, where)

        labels = batch.column("label").take(take).to_numpy(zero_copy_only=False).astype(np.int64)
        if (labels < 0).any():
            i = _first_index(labels < 0)
            raise PoolError(f"{where(i)}: negative 'label' ({labels[i]})")
        if num_classes is not None and (labels >= num_classes).any():
            i = _first_index(labels >= num_classes)
            raise PoolError(
                f"{where(i)}: 'label' {labels[i]} outside [0, {num_classes}) (metadata num_classes)"
            )
        if labels.max() > np.iinfo(np.int32).max:
            raise PoolError(f"{where(int(labels.argmax()))}: 'label' {labels.max()} too large")
        max_label = max(max_label, int(labels.max()))

        if box_score is not None:
            score = batch.column("score").take(take)
            box_score[b : b + m] = score.fill_null(np.nan).to_numpy(zero_copy_only=False)
        if box_coords is not None:
            coords = batch.column("box").take(take)
            if coords.null_count:
                box_coords[b : b + m] = np.nan
                valid = np.asarray(coords.is_valid())
                coords = coords.filter(pa.array(valid))
                box_coords[b : b + m][valid] = list_to_matrix(coords, "box", str(f))
            else:
                box_coords[b : b + m] = list_to_matrix(coords, "box", str(f))

        box_unc[b : b + m] = values
        box_label[b : b + m] = labels
        box_row[b : b + m] = row + pos
        b += m
        row += n
    assert b == n_boxes
    if features is None:
        features = np.empty((0, dim or 0), dtype=np.float32)
    pa.default_memory_pool().release_unused()

    image_ids, row_image, sources = encode_images(id_chunks, source_chunks)

    return DetectionPool(
        image_ids=image_ids,
        box_image=row_image[box_row],
        box_label=box_label,
        box_uncertainty=box_unc,
        box_features=features,
        box_row=box_row,
        num_classes=num_classes if num_classes is not None else max_label + 1,
        uncertainty_column=unc_col,
        box_score=box_score,
        box_coords=box_coords,
        sources=sources,
        metadata=source.metadata,
        files=source.files,
    )
