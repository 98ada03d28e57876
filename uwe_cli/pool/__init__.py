"""Pools: `open_pool(paths)` opens the Parquet files once, decides the kind, and reads either kind.

Unit pools (one row per image or region) and detection pools (one row per box) have their own
readers (`unit.py`, `detection.py`); both sit behind `PoolSource`, which owns file listing,
metadata, the checks every pool shares, and the memory estimate made before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uwe_cli.errors import PoolError
from uwe_cli.pool.detection import DetectionPool, load_detection_pool
from uwe_cli.pool.files import (
    check_feature_type,
    check_string_column,
    feature_dim_of,
    iter_batches,
    open_parquet,
    pool_files,
    read_row_group,
)
from uwe_cli.pool.unit import UnitPool, load_unit_pool
from uwe_cli.schema import decode_metadata

__all__ = [
    "DetectionPool",
    "PoolSource",
    "UnitPool",
    "is_detection_pool",
    "open_pool",
    "pool_files",
    "read_detection_pool",
    "read_pool",
]

# Working memory of selection beyond the feature matrix, per row: distances, nearest centre, norms,
# norm order and positions, weights, IDs (measured ~115 bytes at the peak at 10M rows with 16-character
# IDs; longer IDs cost more); boxes also keep their image, label, row, score and coordinates.
# RUNTIME_BYTES: the interpreter and the libraries a selection loads (numba, Arrow, FAISS) with what
# their allocators keep (measured 250–400 MB).
PER_ROW_OVERHEAD_BYTES = 150
PER_BOX_OVERHEAD_BYTES = 180
RUNTIME_BYTES = 400 << 20


@dataclass
class PoolSource:
    """A pool's files, opened and schema-checked: kind, rows, feature size and metadata, nothing loaded."""

    files: list[Path]
    parquet: list[pq.ParquetFile]
    kind: str  # "unit" | "detection"
    rows: int
    dim: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    selection: list[np.ndarray | None] | None = None  # per file: sorted row numbers to read (None: all)

    def restrict(self, rows: np.ndarray) -> PoolSource:
        """The same pool read only at the given global rows (ascending): a distributed worker's share."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.cumsum([0] + [pf.metadata.num_rows for pf in self.parquet])
        files, parquet, selection = [], [], []
        for i, (f, pf) in enumerate(zip(self.files, self.parquet, strict=True)):
            lo, hi = np.searchsorted(rows, [starts[i], starts[i + 1]])
            if hi > lo:
                files.append(f)
                parquet.append(pf)
                selection.append(rows[lo:hi] - starts[i])
        return replace(self, files=files, parquet=parquet, rows=int(rows.size), selection=selection)

    def batches(self, columns: list[str], rows: int) -> Iterator[tuple[Path, pa.RecordBatch]]:
        """(file, record batch) over the pool's rows in order, honouring a `restrict`ed selection."""
        for i, (f, pf) in enumerate(zip(self.files, self.parquet, strict=True)):
            wanted = None if self.selection is None else self.selection[i]
            if wanted is None:
                for batch in iter_batches(pf, f, columns, rows):
                    yield f, batch
                continue
            group_starts = np.cumsum(
                [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            )
            groups = np.unique(np.searchsorted(group_starts, wanted, side="right") - 1)
            for g in groups:
                table = read_row_group(pf, f, int(g), columns)
                keep = wanted[(wanted >= group_starts[g]) & (wanted < group_starts[g + 1])] - group_starts[g]
                picked = table.take(pa.array(keep))
                for batch in picked.to_batches(max_chunksize=rows):
                    yield f, batch

    def feature_dim(self) -> int:
        """d, from the Arrow type or (variable-length lists) from the first stored vector."""
        if self.dim is not None:
            return self.dim
        for _, batch in self.batches(["feature"], 1024):
            valid = batch.column(0).drop_null()
            if len(valid):
                return len(valid[0].as_py())
        return 0

    def estimate_bytes(self, rows: int | None = None) -> int:
        """Memory selection needs for this pool (or for `rows` of it, one worker's share), from file
        metadata only (an upper bound for boxes)."""
        per_row = 4 * self.feature_dim()
        per_row += PER_BOX_OVERHEAD_BYTES if self.kind == "detection" else PER_ROW_OVERHEAD_BYTES
        return (self.rows if rows is None else rows) * per_row + RUNTIME_BYTES

    def read(
        self,
        uncertainty: str | None = None,
        need_uncertainty: bool = True,
        need_probs: bool = False,
        spare_rows: int = 0,
    ) -> UnitPool | DetectionPool:
        """Load the pool; detection pools always read their per-box uncertainty (it builds the embedding)."""
        if self.kind == "detection":
            return load_detection_pool(self, uncertainty)
        return load_unit_pool(self, uncertainty, need_uncertainty, need_probs, spare_rows=spare_rows)


def _kind(names: list[str], meta: dict[str, Any]) -> str:
    return "detection" if meta.get("task") == "detection" or "label" in names else "unit"


def _num_classes(path: Path, meta: dict[str, Any]) -> int | None:
    k = meta.get("num_classes")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PoolError(f"{path}: metadata 'num_classes' must be a positive integer, found {k!r}")
    return k


def open_pool(paths: Sequence[str | Path] | str | Path) -> PoolSource:
    """Open a pool (files and/or directories of parts) and check what every pool must satisfy.

    Raises a one-line PoolError naming the file and column of the first problem.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = [f for p in paths for f in pool_files(p)]
    seen: dict[Any, str | Path] = {}
    for f in files:
        key = str(f) if isinstance(f, str) else f.resolve()
        if key in seen:
            raise PoolError(f"the same pool file is given twice: {seen[key]} and {f}")
        seen[key] = f
    parquet = [open_parquet(f) for f in files]
    kind: str | None = None
    dim: int | None = None
    num_classes: int | None = None
    meta: dict[str, Any] = {}
    for f, pf in zip(files, parquet, strict=True):
        schema: pa.Schema = pf.schema_arrow
        names = schema.names
        this_meta = decode_metadata(schema, str(f))
        this_kind = _kind(names, this_meta)
        if kind is not None and this_kind != kind:
            raise PoolError(f"{f} is a {this_kind} pool but {files[0]} is a {kind} pool; select them apart")
        kind = this_kind
        required = ("id", "label", "feature") if kind == "detection" else ("id", "feature")
        for col in required:
            if col not in names:
                what = "detection pool" if kind == "detection" else "pool"
                raise PoolError(f"{f}: {what} has no '{col}' column (columns: {', '.join(names)})")
        check_string_column(f, schema, "id")
        check_feature_type(f, schema.field("feature").type)
        if kind == "detection":
            label_type = schema.field("label").type
            if not pa.types.is_integer(label_type):
                raise PoolError(f"{f}: column 'label' must be an integer, found {label_type}")
            k = _num_classes(f, this_meta)
            if k is not None:
                if num_classes is not None and k != num_classes:
                    raise PoolError(f"{f}: metadata num_classes {k} differs from {num_classes} in {files[0]}")
                num_classes = k
        meta = meta or this_meta
        fdim = feature_dim_of(schema.field("feature").type)
        if fdim is not None:
            if dim is not None and fdim != dim:
                raise PoolError(f"{f}: feature length {fdim} differs from {dim} in {files[0]}")
            dim = fdim
    rows = sum(pf.metadata.num_rows for pf in parquet)
    if rows == 0:
        raise PoolError(f"pool is empty: {', '.join(map(str, paths))}")
    assert kind is not None
    return PoolSource(files, parquet, kind, rows, dim, meta, num_classes)


def read_pool(
    paths: Sequence[str | Path] | str | Path, uncertainty: str | None = None, **kw: Any
) -> UnitPool:
    """A unit pool from paths (tests, benchmarks, library users); detection pools are refused."""
    source = open_pool(paths)
    if source.kind != "unit":
        raise PoolError(f"{source.files[0]}: this is a detection pool; read it with read_detection_pool")
    return load_unit_pool(source, uncertainty, **kw)


def read_detection_pool(
    paths: Sequence[str | Path] | str | Path, uncertainty: str | None = None
) -> DetectionPool:
    """A detection pool from paths (tests, benchmarks, library users); unit pools are refused."""
    source = open_pool(paths)
    if source.kind != "detection":
        raise PoolError(f"{source.files[0]}: not a detection pool (no 'label' column, task not detection)")
    return load_detection_pool(source, uncertainty)


def is_detection_pool(paths: Sequence[str | Path] | str | Path) -> bool:
    """True when the pool's files are detection files (by metadata task or a `label` column)."""
    return open_pool(paths).kind == "detection"
