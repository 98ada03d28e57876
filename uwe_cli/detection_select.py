"""`uwe select` on detection pools: class-wise aggregated UWEs (Eq. 9), wired to uwe_cli.selection.classwise."""

from __future__ import annotations

from pathlib import Path

from uwe_cli.pool import open_parquet, pool_files, read_metadata


def is_detection_pool(path: str | Path) -> bool:
    """A detection pool says task=detection in its metadata, or has a `label` column."""
    first = pool_files(path)[0]
    schema = open_parquet(first).schema_arrow
    return read_metadata(schema).get("task") == "detection" or "label" in schema.names
