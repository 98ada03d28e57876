"""ID lists (`--labeled`, `--exclude`): a CSV with an `id` column, or one ID per line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli.errors import SelectionError


def read_id_file(path: str | Path, option: str) -> list[str]:
    """IDs from a CSV whose header has an `id` column (a previous batch file works), else one per line."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"{option} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SelectionError(f"{option} file is not UTF-8 text: {path}") from None
    lines = text.splitlines()
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    if "id" in [h.strip() for h in header] and (len(header) > 1 or path.suffix.lower() == ".csv"):
        col = [h.strip() for h in header].index("id")
        ids = []
        for lineno, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row:
                continue
            if col >= len(row):
                raise SelectionError(f"{option} file {path}: line {lineno} has no value in the 'id' column")
            ids.append(row[col])
        return ids
    if len(header) > 1:
        raise SelectionError(f"{option} file {path}: a CSV needs an 'id' column (header: {lines[0][:80]})")
    ids = [line.strip() for line in lines if line.strip()]
    if ids and ids[0] == "id":
        ids = ids[1:]
    return ids


def rows_of(ids: list[str], pool_ids: pa.Array) -> tuple[np.ndarray, int]:
    """Pool rows of the given IDs (ascending, unique) and how many IDs are not in the pool."""
    if not ids:
        return np.empty(0, dtype=np.int64), 0
    unique = pa.array(sorted(set(ids)), type=pa.string())
    idx = pc.index_in(unique, value_set=pool_ids)
    found = idx.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
    return np.unique(found), len(unique) - len(found)
