"""Unit pools: one row per selectable unit (an image or an image region).

Features stream batch by batch into one preallocated C-contiguous matrix, so reading a pool never
holds more than the matrix plus one record batch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uwe_cli import storage
from uwe_cli.errors import PoolError
from uwe_cli.pool.files import (
    batch_rows,
    check_numeric_column,
    check_uncertainty_values,
    check_unique_ids,
    checked_ids,
    iter_batches,
    list_to_matrix,
    open_parquet,
    resolve_uncertainty_column,
)
from uwe_cli.schema import PASSTHROUGH_COLUMNS

if TYPE_CHECKING:
    from uwe_cli.pool import PoolSource

# Row groups decoded at once (each by one thread, streaming batches into the matrix).
READ_THREADS = 2


@dataclass
class UnitPool:
    """A loaded unit pool: one row per selectable unit."""

    ids: pa.Array
    features: np.ndarray
    uncertainty: np.ndarray | None
    uncertainty_column: str | None
    probs: np.ndarray | None = None
    extra: dict[str, pa.Array] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    kind = "unit"

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def task(self) -> str:
        return str(self.metadata.get("task", "classification"))


@dataclass
class _Part:
    """One row group of one file: where its rows go in the pool and what it yields besides them."""

    file: Path
    row_group: int
    first_row: int
    extra: dict[str, list[pa.Array]] = field(default_factory=dict)


def _row_groups(source: PoolSource) -> list[_Part]:
    parts = []
    row = 0
    for f, pf in zip(source.files, source.parquet, strict=True):
        md = pf.metadata
        for g in range(md.num_row_groups):
            parts.append(_Part(f, g, row))
            row += md.row_group(g).num_rows
    return parts


def _first_width(source: PoolSource, column: str) -> int | None:
    """Length of the first non-null list in `column` (the probability vector size)."""
    for f, pf in zip(source.files, source.parquet, strict=True):
        for batch in iter_batches(pf, f, [column], 1024):
            valid = batch.column(0).drop_null()
            if len(valid):
                return len(valid[0].as_py())
    return None


def read_ids(source: PoolSource) -> pa.Array:
    """The pool's IDs as one string array, checked: no nulls, valid text, no duplicates."""
    chunks, files, file_start = [], [], {}
    for f, batch in source.batches(["id"], 1 << 18):
        file_start.setdefault(f, sum(len(c) for c in chunks))
        chunks.append(checked_ids(f, batch.column(0)))
        files.append(f)
    ends = np.cumsum([len(c) for c in chunks])
    ids_all = pa.concat_arrays(chunks) if chunks else pa.array([], type=pa.string())
    del chunks

    def where(i: int) -> str:
        f = files[int(np.searchsorted(ends, i, side="right"))]
        return f"{f} row {i - file_start[f]}"

    # Arrow's allocator keeps freed memory until asked (mimalloc, pyarrow's default): about 140 bytes
    # per pool row of decoded batches and hash table.
    pa.default_memory_pool().release_unused()
    check_unique_ids(ids_all, "pool", where)
    pa.default_memory_pool().release_unused()
    return ids_all


def load_unit_pool(
    source: PoolSource,
    uncertainty: str | None = None,
    need_uncertainty: bool = True,
    need_probs: bool = False,
    dtype: str = "float32",
    spare_rows: int = 0,
) -> UnitPool:
    """Load and validate a unit pool; PoolError naming the file, column and ID of the first problem.

    Row groups are decoded in parallel threads (Parquet decoding releases the GIL), each streaming its
    batches straight into its rows of one preallocated matrix, so memory stays at the matrix plus a
    batch per thread. IDs are read and checked first (`read_ids`); then the first problem in file
    order is the one reported. A `restrict`ed source (a
    distributed worker's share) is read in order through `PoolSource.batches`. `spare_rows` leaves that
    many zero rows after the pool's in `features` (and `probs`): room for centres a distributed worker
    receives from the others.
    """
    unc_col: str | None = None
    present_extra: list[str] | None = None
    for f, pf in zip(source.files, source.parquet, strict=True):
        names = pf.schema_arrow.names
        if need_uncertainty:
            col = resolve_uncertainty_column(names, uncertainty if unc_col is None else unc_col, str(f))
            if unc_col is not None and col != unc_col:
                raise PoolError(f"{f}: uncertainty column '{unc_col}' missing")
            unc_col = col
            check_numeric_column(f, pf.schema_arrow, unc_col, "uncertainty")
        if need_probs and "probs" not in names:
            raise PoolError(f"{f}: no 'probs' column; --strategy badge needs class probabilities")
        extra = [c for c in PASSTHROUGH_COLUMNS if c in names]
        present_extra = extra if present_extra is None else [c for c in present_extra if c in extra]

    # IDs first, before the feature matrix exists: the uniqueness check's hash table (60-120 bytes per
    # row) then never adds to the peak.
    ids_all = read_ids(source)
    total = source.rows
    dim = source.feature_dim()
    features = np.empty((total + spare_rows, dim), dtype=dtype)
    features[total:] = 0
    unc = np.empty(total, dtype=np.float64) if need_uncertainty else None
    probs: np.ndarray | None = None
    if need_probs:
        width = _first_width(source, "probs") or 0
        probs = np.zeros((total + spare_rows, width), dtype=np.float32)
    extra_names = list(present_extra or [])
    columns = ["feature", *([unc_col] if unc_col else []), *(["probs"] if need_probs else [])]
    columns += extra_names
    rows_per_batch = batch_rows(dim)

    def consume(part: _Part, f: Path, batch: pa.RecordBatch, row: int) -> int:
        """Check one record batch and store it at `row`; the row after it."""
        n = batch.num_rows
        ids = ids_all.slice(row, n)

        def where_row(i: int, _f: Path = f, _ids: pa.Array = ids) -> str:
            return f"{_f}: id '{_ids[i].as_py()}'"

        mat = list_to_matrix(batch.column("feature"), "feature", str(f))
        if mat.shape[1] != dim:
            raise PoolError(f"{f}: feature length {mat.shape[1]} differs from {dim}")
        block = features[row : row + n]
        block[...] = mat
        del mat
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PoolError(f"{f}: NaN or Inf in 'feature' of id '{ids[i].as_py()}'")
        if unc is not None and unc_col is not None:
            col = batch.column(unc_col)
            if col.null_count:
                i = int(np.flatnonzero(np.asarray(col.is_null()))[0])
                raise PoolError(f"{f}: null '{unc_col}' for id '{ids[i].as_py()}'")
            values = col.to_numpy(zero_copy_only=False).astype(np.float64)
            if not np.isfinite(values).all():
                i = int(np.flatnonzero(~np.isfinite(values))[0])
                raise PoolError(f"{f}: NaN or Inf in '{unc_col}' of id '{ids[i].as_py()}'")
            check_uncertainty_values(values, unc_col, where_row)
            unc[row : row + n] = values
        if probs is not None:
            p = list_to_matrix(batch.column("probs"), "probs", f"{f}, rows {row}-{row + n - 1}")
            p = p.astype(np.float32)
            if not np.isfinite(p).all():
                raise PoolError(f"{f}: NaN or Inf in 'probs'")
            if p.shape[1] != probs.shape[1]:
                raise PoolError(f"{f}: probs length {p.shape[1]} differs from {probs.shape[1]}")
            probs[row : row + n] = p
        for c in extra_names:
            part.extra[c].append(batch.column(c))
        return row + n

    def read_part(part: _Part) -> _Part:
        pf = open_parquet(part.file)
        row = part.first_row
        for batch in iter_batches(pf, part.file, columns, rows_per_batch, row_groups=[part.row_group]):
            row = consume(part, part.file, batch, row)
        return part

    # A worker's share (`restrict`) and remote files are read in order: opening a remote file per row
    # group would fetch its footer again each time.
    if source.selection is not None or any(storage.is_url(f) for f in source.files):
        whole = _Part(source.files[0] if source.files else Path("."), 0, 0)
        whole.extra = {c: [] for c in extra_names}
        row = 0
        for f, batch in source.batches(columns, rows_per_batch):
            row = consume(whole, f, batch, row)
        parts = [whole]
        threads = 0
    else:
        parts = _row_groups(source)
        for part in parts:
            part.extra = {c: [] for c in extra_names}
        threads = min(READ_THREADS, len(parts), os.cpu_count() or 1)
    if threads > 1:
        pool = ThreadPoolExecutor(max_workers=threads)
        try:
            parts = list(pool.map(read_part, parts))  # the first failing part, in file order, raises
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    elif threads == 1:
        parts = [read_part(part) for part in parts]

    extra_cols = {
        c: pa.concat_arrays([a for part in parts for a in part.extra[c]]) for c in extra_names if total
    }
    del parts
    pa.default_memory_pool().release_unused()
    return UnitPool(
        ids=ids_all,
        features=features,
        uncertainty=unc,
        uncertainty_column=unc_col,
        probs=probs,
        extra=extra_cols,
        metadata=source.metadata,
        files=source.files,
    )
