"""ID lists (`--labeled`, `--exclude`): a CSV with an `id` column, or one ID per line; and the one
reader of `--class-names` lists.

Every ID a pool may hold (see `schema.id_problem`) round-trips: the batch CSV quotes what needs
quoting and is parsed as CSV (quoted commas, quotes, very long IDs), and plain-text lists keep
each line as it is apart from the line break and surrounding spaces or tabs, which pool IDs never
have. Lines are split on '\\n' only, so IDs may contain other Unicode line separators.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli import storage
from uwe_cli.errors import DataError, SelectionError

# The csv module refuses fields above 128 KiB by default; IDs have no length limit.
csv.field_size_limit(2**31 - 1)


def read_id_file(path: str | Path, option: str) -> list[str]:
    """IDs from a CSV whose header has an `id` column (a previous batch file works), else one per line."""
    path = storage.as_location(path)
    text = storage.read_text_file(path, f"{option} file", SelectionError)
    first, _, _ = text.partition("\n")
    header = [h.strip() for h in next(csv.reader([first.rstrip("\r")]), [])]
    if "id" in header:
        col = header.index("id")
        rows = [row for row in storage.csv_rows(text, f"{option} file {path}", SelectionError) if row]
        for row in rows:
            if col >= len(row):
                raise SelectionError(
                    f"{option} file {path}: a row has no value in the 'id' column (row: {row[:3]})"
                )
        return [row[col] for row in rows[1:]]
    if storage.name(path).lower().endswith(".csv"):
        raise SelectionError(f"{option} file {path}: a CSV needs an 'id' column (header: {first[:80]})")
    return [line for line in (raw.rstrip("\r").strip(" \t") for raw in text.split("\n")) if line]


def rows_of(ids: list[str], pool_ids: pa.Array) -> tuple[np.ndarray, int]:
    """Pool rows of the given IDs (ascending, unique) and how many IDs are not in the pool."""
    if not ids:
        return np.empty(0, dtype=np.int64), 0
    unique = pa.array(sorted(set(ids)), type=pa.string())
    idx = pc.index_in(unique, value_set=pool_ids)
    found = idx.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
    return np.unique(found), len(unique) - len(found)


def read_class_names(value: str | None) -> tuple[list[str] | None, list[str | Path]]:
    """`--class-names`: a text file or URL with one name per line, or 'a,b,c'; returns (names, files read).

    Names keep their positions (an empty line or ',,' is an empty name; trailing empty lines go). A
    value that looks like a file name (a '/' or an extension, no comma) but is no file is refused, or
    a mistyped file name would become a class called 'nmaes.txt'.
    """
    if value is None or value == "":
        return None, []
    if storage.is_url(value) or Path(value).is_file():
        path = storage.as_location(value)
        names = [
            line.strip() for line in storage.read_text_file(path, "--class-names file", DataError).split("\n")
        ]
        while names and names[-1] == "":
            names.pop()
        files: list[str | Path] = [path]
    elif "," not in value and ("/" in value or Path(value).suffix):  # a file name, mistyped
        raise DataError(
            f"--class-names {value}: no such file (give a file with one name per line, or names "
            "separated by commas, e.g. 'cat,dog')"
        )
    else:
        names, files = [name.strip() for name in value.split(",")], []
    if all(name == "" for name in names):
        raise DataError(f"--class-names {value} holds no names")
    return names, files
