"""The files of a pool: listing, opening, type checks and batch reading shared by both readers.

Every problem is a one-line PoolError naming the file (and column, row or ID where there is one);
corrupt data found while decoding pages is reported the same way as a bad footer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uwe_cli import storage
from uwe_cli.errors import PoolError, StorageError
from uwe_cli.schema import UNCERTAINTY_MEASURES, check_ids

# Record batches of about 8 MB of features: larger ones leave the Arrow allocator holding hundreds of MB
# of freed batches while a big pool is read (measured: 1M × 512 peaks 370 MB higher with 32 MB batches),
# and decode no faster.
READ_BATCH_BYTES = 8 << 20
MAX_BATCH_ROWS = 65_536


def batch_rows(dim: int | None, target_bytes: int = READ_BATCH_BYTES) -> int:
    """Rows per record batch: about `target_bytes` of float32 features, so reading adds little memory."""
    if not dim:
        return 4096
    return max(256, min(MAX_BATCH_ROWS, target_bytes // (4 * dim)))


def pool_files(path: str | Path) -> list[Path]:
    """The Parquet files making up a pool: the file itself, or a directory's parts in sorted order.

    Hidden files and folders (`.name`, `_name`) are skipped: they hold an extraction's work in progress.
    A URL is a remote object or a prefix of parts (returned as URL strings).
    """
    if storage.is_url(path):
        url = str(path)
        if storage.isdir(url):
            parts = [u for u, _, _ in storage.find(url, [".parquet"])]
            if not parts:
                raise PoolError(f"no .parquet files under pool prefix: {url}")
            return parts  # type: ignore[return-value]
        if not storage.exists(url):
            raise PoolError(f"pool not found: {url}")
        return [url]  # type: ignore[list-item]
    path = storage.local_path(path)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer (pyarrow's default) holds whole column chunks in memory while reading; streaming
        # row groups into the feature matrix needs only one batch at a time.
        source = storage.open_input(path) if storage.is_url(path) else path
        return pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
    except StorageError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"not a Parquet file: {path} ({_first_line(exc)})") from None


def iter_batches(
    pf: pq.ParquetFile, path: Path, columns: list[str], rows: int, row_groups: list[int] | None = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of a file (or of some of its row groups); corrupt pages become a PoolError naming the
    file."""
    try:
        yield from pf.iter_batches(batch_size=rows, columns=columns, row_groups=row_groups)
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"{path}: unreadable Parquet data ({_first_line(exc)})") from None


def read_row_group(pf: pq.ParquetFile, path: Path, group: int, columns: list[str]) -> pa.Table:
    try:
        return pf.read_row_group(group, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"{path}: unreadable Parquet data ({_first_line(exc)})") from None


def read_column(pf: pq.ParquetFile, path: Path, column: str) -> pa.ChunkedArray:
    """One whole column of a file (small columns only: ids, labels, uncertainty)."""
    try:
        return pf.read(columns=[column]).column(0)
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"{path}: unreadable Parquet data ({_first_line(exc)})") from None


def feature_dim_of(field_type: pa.DataType) -> int | None:
    """d for fixed_size_list features, None for variable lists (checked row by row)."""
    if pa.types.is_fixed_size_list(field_type):
        return field_type.list_size
    return None


def check_feature_type(path: Path, field_type: pa.DataType, column: str = "feature") -> None:
    if not (
        pa.types.is_fixed_size_list(field_type)
        or pa.types.is_list(field_type)
        or pa.types.is_large_list(field_type)
    ):
        raise PoolError(f"{path}: column '{column}' must be a list of floats, found {field_type}")
    if not pa.types.is_floating(field_type.value_type):
        raise PoolError(f"{path}: column '{column}' must hold floats, found {field_type.value_type}")
    if pa.types.is_fixed_size_list(field_type) and field_type.list_size < 1:
        raise PoolError(f"{path}: column '{column}' holds empty vectors (length 0)")


def check_string_column(path: Path, schema: pa.Schema, column: str) -> None:
    field_type = schema.field(column).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise PoolError(f"{path}: column '{column}' must be a string, found {field_type}")


def check_numeric_column(path: Path, schema: pa.Schema, column: str, what: str) -> None:
    field_type = schema.field(column).type
    if not (pa.types.is_floating(field_type) or pa.types.is_integer(field_type)):
        raise PoolError(f"{path}: {what} column '{column}' is not numeric ({field_type})")


def list_to_matrix(arr: pa.Array | pa.ChunkedArray, what: str, where: str) -> np.ndarray:
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
    if n and d == 0:
        raise PoolError(f"{where}: {what} vectors are empty (length 0)")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, d)


def resolve_uncertainty_column(
    names: list[str], requested: str | None, where: str, default: str | None = None
) -> str:
    """`auto` (None) takes `default`, else entropy, then bvsb, then least_confidence; any named column works."""
    if requested in (None, "", "auto"):
        if default is not None:
            if default in names:
                return default
            raise PoolError(
                f"{where}: no '{default}' column (the default for this pool); "
                "name the uncertainty column with --uncertainty"
            )
        for name in UNCERTAINTY_MEASURES:
            if name in names:
                return name
        raise PoolError(
            f"{where}: no uncertainty column (one of {', '.join(UNCERTAINTY_MEASURES)}); "
            "name another float column with --uncertainty"
        )
    if requested not in names:
        raise PoolError(f"{where}: uncertainty column '{requested}' not found (columns: {', '.join(names)})")
    return requested


def check_uncertainty_values(values: np.ndarray, column: str, where_row) -> None:
    """Finite and non-negative; `where_row(i)` names the i-th value's file and ID."""
    if not np.isfinite(values).all():
        raise PoolError(
            f"{where_row(int(np.flatnonzero(~np.isfinite(values))[0]))}: NaN or Inf in '{column}'"
        )
    if (values < 0).any():
        i = int(np.flatnonzero(values < 0)[0])
        raise PoolError(f"{where_row(i)}: negative '{column}' ({values[i]})")


def checked_ids(path: Path | str, ids: pa.Array, first_row: int | None = None) -> pa.Array:
    """A batch's `id` column as strings; a PoolError naming the file (and the row, when the batch's
    first row is known) of a null or invalid ID."""
    if ids.null_count:
        at = "" if first_row is None else f" (row {first_row + int(np.flatnonzero(ids.is_null())[0])})"
        raise PoolError(f"{path}: null id in column 'id'{at}")
    ids = ids.cast(pa.string())
    check_ids(ids, str(path))
    return ids


def check_unique_ids(ids: pa.Array, what: str, where: Callable[[int], str] | None = None) -> None:
    """No ID twice; `where(i)` names the file (and row) of the i-th ID, for the message."""
    if len(pc.unique(ids)) == len(ids):  # a quarter of count_distinct's time
        return
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    first = dup[0]["values"].as_py()
    found = ""
    if where is not None:
        rows = np.flatnonzero(np.asarray(pc.equal(ids, pa.scalar(first, ids.type))))[:2]
        found = f" at {where(int(rows[0]))} and {where(int(rows[1]))}"
    raise PoolError(f"duplicate id in {what}: '{first}'{found} ({len(dup)} ids appear more than once)")
