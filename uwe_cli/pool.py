"""The Parquet pool contract (DESIGN.md, schema version 1): locate, validate and load pools.

Features stream batch by batch into one preallocated C-contiguous matrix, so reading a pool never
holds more than the matrix plus one record batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uwe_cli.errors import PoolError

SCHEMA_VERSION = 1
METADATA_KEY = b"uwe"
UNCERTAINTY_COLUMNS = ("entropy", "bvsb", "least_confidence")
REGION_COLUMNS = ("image_id", "x", "y", "width", "height")
PASSTHROUGH_COLUMNS = ("source", *REGION_COLUMNS)
READ_BATCH_ROWS = 65_536


def batch_rows(dim: int | None) -> int:
    """Rows per record batch: about 32 MB of features, so reading adds little beyond the matrix."""
    if not dim:
        return 4096
    return max(256, min(READ_BATCH_ROWS, (32 << 20) // (4 * dim)))


def pool_files(path: str | Path) -> list[Path]:
    """The Parquet files making up a pool: the file itself, or a directory's parts in sorted order."""
    path = Path(path)
    if not path.exists():
        raise PoolError(f"pool not found: {path}")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*.parquet")
            if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
        if not files:
            raise PoolError(f"no .parquet files in pool directory: {path}")
        return files
    return [path]


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer (pyarrow's default) holds whole column chunks in memory while reading; streaming
        # row groups into the feature matrix needs only one batch at a time.
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PoolError(f"not a Parquet file: {path} ({str(exc).splitlines()[0]})") from None


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    """File-level metadata for pool writers (key `uwe`)."""
    return {METADATA_KEY: json.dumps({"schema": SCHEMA_VERSION, **meta}, sort_keys=True).encode()}


def feature_dim_of(field_type: pa.DataType) -> int | None:
    """d for fixed_size_list features, None for variable lists (checked row by row)."""
    if pa.types.is_fixed_size_list(field_type):
        return field_type.list_size
    return None


def _check_feature_type(path: Path, field_type: pa.DataType) -> None:
    if not (
        pa.types.is_fixed_size_list(field_type)
        or pa.types.is_list(field_type)
        or pa.types.is_large_list(field_type)
    ):
        raise PoolError(f"{path}: column 'feature' must be a list of floats, found {field_type}")
    if not pa.types.is_floating(field_type.value_type):
        raise PoolError(f"{path}: column 'feature' must hold floats, found {field_type.value_type}")


def list_to_matrix(arr: pa.Array, what: str, where: str) -> np.ndarray:
    """A (fixed-size) list array of equal-length float lists as an (n, d) numpy array (no nulls)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if arr.null_count:
        first = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
        raise PoolError(f"{where}: null {what} at row {first}")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        offsets = np.asarray(arr.offsets)
        lengths = np.diff(offsets)
        d = int(lengths[0]) if n else 0
        if n and (lengths != d).any():
            bad = int(np.flatnonzero(lengths != d)[0])
            raise PoolError(
                f"{where}: {what} lengths differ ({d} at row 0, {int(lengths[bad])} at row {bad})"
            )
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, d)


@dataclass
class Pool:
    """A loaded unit pool: one row per selectable unit."""

    ids: pa.Array
    features: np.ndarray
    uncertainty: np.ndarray | None
    uncertainty_column: str | None
    probs: np.ndarray | None = None
    extra: dict[str, pa.Array] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def task(self) -> str:
        return str(self.metadata.get("task", "classification"))


def resolve_uncertainty_column(names: list[str], requested: str | None, where: str) -> str:
    """`auto` (None) takes entropy, then bvsb, then least_confidence; any named float column works."""
    if requested in (None, "", "auto"):
        for name in UNCERTAINTY_COLUMNS:
            if name in names:
                return name
        raise PoolError(
            f"{where}: no uncertainty column (one of {', '.join(UNCERTAINTY_COLUMNS)}); "
            "name another float column with --uncertainty"
        )
    if requested not in names:
        raise PoolError(f"{where}: uncertainty column '{requested}' not found (columns: {', '.join(names)})")
    return requested


def estimate_matrix_bytes(paths: list[str | Path], dtype: str = "float32") -> tuple[int, int, int]:
    """(rows, d, bytes) of the feature matrix a pool would need, from file metadata only."""
    rows = 0
    dim = 0
    for path in paths:
        for file in pool_files(path):
            pf = open_parquet(file)
            rows += pf.metadata.num_rows
            idx = pf.schema_arrow.get_field_index("feature")
            if idx >= 0:
                dim = dim or (feature_dim_of(pf.schema_arrow.field(idx).type) or 0)
                if not dim and pf.metadata.num_rows:
                    first = pf.read_row_group(0, columns=["feature"]).column(0)
                    dim = len(first[0].as_py() or [])
    return rows, dim, rows * dim * np.dtype(dtype).itemsize


def read_pool(
    paths: list[str | Path] | str | Path,
    uncertainty: str | None = None,
    need_uncertainty: bool = True,
    need_probs: bool = False,
    dtype: str = "float32",
) -> Pool:
    """Load and validate a unit pool from Parquet files or directories of parts.

    Raises PoolError naming the file, column and row of the first problem found.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = [f for p in paths for f in pool_files(p)]
    if len({f.resolve() for f in files}) != len(files):
        raise PoolError("the same pool file is given twice")
    parquet = [open_parquet(f) for f in files]
    total = sum(pf.metadata.num_rows for pf in parquet)

    meta: dict[str, Any] = {}
    unc_col: str | None = None
    dim: int | None = None
    present_extra: list[str] | None = None
    for f, pf in zip(files, parquet, strict=True):
        schema = pf.schema_arrow
        names = schema.names
        for col in ("id", "feature"):
            if col not in names:
                raise PoolError(f"{f}: no '{col}' column (columns: {', '.join(names)})")
        if not pa.types.is_string(schema.field("id").type) and not pa.types.is_large_string(
            schema.field("id").type
        ):
            raise PoolError(f"{f}: column 'id' must be a string, found {schema.field('id').type}")
        _check_feature_type(f, schema.field("feature").type)
        this_meta = read_metadata(schema)
        if this_meta.get("task") == "detection" or "label" in names:
            raise PoolError(f"{f}: this is a detection pool; read it with read_detection_pool")
        meta = meta or this_meta
        if need_uncertainty:
            col = resolve_uncertainty_column(names, uncertainty if unc_col is None else unc_col, str(f))
            if unc_col is not None and col != unc_col:
                raise PoolError(f"{f}: uncertainty column '{unc_col}' missing")
            unc_col = col
            if not pa.types.is_floating(schema.field(unc_col).type) and not pa.types.is_integer(
                schema.field(unc_col).type
            ):
                raise PoolError(f"{f}: uncertainty column '{unc_col}' is not numeric")
        if need_probs and "probs" not in names:
            raise PoolError(f"{f}: no 'probs' column; --strategy badge needs class probabilities")
        extra = [c for c in PASSTHROUGH_COLUMNS if c in names]
        present_extra = extra if present_extra is None else [c for c in present_extra if c in extra]
        fdim = feature_dim_of(schema.field("feature").type)
        if fdim is not None:
            if dim is not None and fdim != dim:
                raise PoolError(f"{f}: feature length {fdim} differs from {dim} in {files[0]}")
            dim = fdim

    if total == 0:
        raise PoolError(f"pool is empty: {', '.join(map(str, paths))}")

    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    unc = np.empty(total, dtype=np.float64) if need_uncertainty else None
    id_chunks: list[pa.Array] = []
    extra_chunks: dict[str, list[pa.Array]] = {c: [] for c in present_extra or []}
    columns = ["id", "feature", *([unc_col] if unc_col else []), *(["probs"] if need_probs else [])]
    columns += list(extra_chunks)

    row = 0
    for f, pf in zip(files, parquet, strict=True):
        for batch in pf.iter_batches(batch_size=batch_rows(dim), columns=columns):
            n = batch.num_rows
            where = f"{f}, rows {row}-{row + n - 1}"
            ids = batch.column("id")
            if ids.null_count:
                raise PoolError(f"{f}: null id in column 'id'")
            id_chunks.append(ids.cast(pa.string()))
            mat = list_to_matrix(batch.column("feature"), "feature", str(f))
            if dim is None:
                dim = mat.shape[1]
            if mat.shape[1] != dim:
                raise PoolError(f"{f}: feature length {mat.shape[1]} differs from {dim}")
            if features is None:
                features = np.empty((total, dim), dtype=dtype)
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
                if (values < 0).any():
                    i = int(np.flatnonzero(values < 0)[0])
                    raise PoolError(f"{f}: negative '{unc_col}' ({values[i]}) for id '{ids[i].as_py()}'")
                unc[row : row + n] = values
            if need_probs:
                p = list_to_matrix(batch.column("probs"), "probs", where).astype(np.float32)
                if not np.isfinite(p).all():
                    raise PoolError(f"{f}: NaN or Inf in 'probs'")
                if probs is None:
                    probs = np.empty((total, p.shape[1]), dtype=np.float32)
                if p.shape[1] != probs.shape[1]:
                    raise PoolError(f"{f}: probs length {p.shape[1]} differs from {probs.shape[1]}")
                probs[row : row + n] = p
            for c in extra_chunks:
                extra_chunks[c].append(batch.column(c))
            row += n

    assert features is not None
    pa.default_memory_pool().release_unused()
    ids_all = pa.concat_arrays(id_chunks) if len(id_chunks) > 1 else id_chunks[0]
    check_unique_ids(ids_all, "pool")
    extra_cols = {c: pa.concat_arrays(chunks) for c, chunks in extra_chunks.items() if chunks}
    return Pool(
        ids=ids_all,
        features=features,
        uncertainty=unc,
        uncertainty_column=unc_col,
        probs=probs,
        extra=extra_cols,
        metadata=meta,
        files=files,
    )


def check_unique_ids(ids: pa.Array, what: str) -> None:
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    first = dup[0]["values"].as_py()
    raise PoolError(f"duplicate id in {what}: '{first}' ({len(dup)} ids appear more than once)")
