"""Unit pools: one row per selectable unit (an image or an image region).

Features stream batch by batch into one preallocated C-contiguous matrix, so reading a pool never
holds more than the matrix plus one record batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uwe_cli.errors import PoolError
from uwe_cli.pool.files import (
    batch_rows,
    check_numeric_column,
    check_uncertainty_values,
    check_unique_ids,
    list_to_matrix,
    resolve_uncertainty_column,
)
from uwe_cli.schema import PASSTHROUGH_COLUMNS, check_ids

if TYPE_CHECKING:
    from uwe_cli.pool import PoolSource


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


def load_unit_pool(
    source: PoolSource,
    uncertainty: str | None = None,
    need_uncertainty: bool = True,
    need_probs: bool = False,
    dtype: str = "float32",
    spare_rows: int = 0,
) -> UnitPool:
    """Load and validate a unit pool; PoolError naming the file, column and ID of the first problem.

    `spare_rows` leaves that many zero rows after the pool's in `features` (and `probs`): room for
    centres a distributed worker receives from the others.
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

    total = source.rows
    dim = source.dim
    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    unc = np.empty(total, dtype=np.float64) if need_uncertainty else None
    id_chunks: list[pa.Array] = []
    extra_chunks: dict[str, list[pa.Array]] = {c: [] for c in present_extra or []}
    columns = ["id", "feature", *([unc_col] if unc_col else []), *(["probs"] if need_probs else [])]
    columns += list(extra_chunks)

    row = 0
    for f, batch in source.batches(columns, batch_rows(dim)):
        n = batch.num_rows
        ids = batch.column("id")
        if ids.null_count:
            raise PoolError(f"{f}: null id in column 'id'")
        ids = ids.cast(pa.string())
        check_ids(ids, str(f))
        id_chunks.append(ids)

        def where_row(i: int, _f: Path = f, _ids: pa.Array = ids) -> str:
            return f"{_f}: id '{_ids[i].as_py()}'"

        mat = list_to_matrix(batch.column("feature"), "feature", str(f))
        if dim is None:
            dim = mat.shape[1]
        if mat.shape[1] != dim:
            raise PoolError(f"{f}: feature length {mat.shape[1]} differs from {dim}")
        if features is None:
            features = np.empty((total + spare_rows, dim), dtype=dtype)
        bad = ~np.isfinite(mat).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PoolError(f"{f}: NaN or Inf in 'feature' of id '{ids[i].as_py()}'")
        features[row : row + n] = mat
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
        if need_probs:
            p = list_to_matrix(batch.column("probs"), "probs", f"{f}, rows {row}-{row + n - 1}")
            p = p.astype(np.float32)
            if not np.isfinite(p).all():
                raise PoolError(f"{f}: NaN or Inf in 'probs'")
            if probs is None:
                probs = np.empty((total + spare_rows, p.shape[1]), dtype=np.float32)
            if p.shape[1] != probs.shape[1]:
                raise PoolError(f"{f}: probs length {p.shape[1]} differs from {probs.shape[1]}")
            probs[row : row + n] = p
        for c in extra_chunks:
            extra_chunks[c].append(batch.column(c))
        row += n

    assert features is not None
    features[total:] = 0
    if probs is not None:
        probs[total:] = 0
    pa.default_memory_pool().release_unused()
    ids_all = pa.concat_arrays(id_chunks) if len(id_chunks) > 1 else id_chunks[0]
    check_unique_ids(ids_all, "pool")
    extra_cols = {c: pa.concat_arrays(chunks) for c, chunks in extra_chunks.items() if chunks}
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
