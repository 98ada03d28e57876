"""`uwe inspect` as a library call: what a pool holds, read column by column (features are not loaded).

The pool is opened with the same checks as `uwe select` (`open_pool`), so a file `select` would
refuse is refused here too, with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli.pool import PoolSource, open_pool
from uwe_cli.pool.files import check_feature_type, check_numeric_column, check_uncertainty_values, read_column
from uwe_cli.schema import UNCERTAINTY_MEASURES

_SKIP = {"id", "feature", "probs", "box", "pred", "label", "x", "y", "width", "height"}


def _column_stats(source: PoolSource, name: str) -> dict[str, float | int | None]:
    """min, mean, max over the finite values (None when there are none), nulls, non-finite values.
    Uncertainty columns get `uwe select`'s checks: numeric, finite, non-negative."""
    lo, hi, total, count, nulls, non_finite = np.inf, -np.inf, 0.0, 0, 0, 0
    for f, pf in zip(source.files, source.parquet, strict=True):  # one file's column at a time
        if name not in pf.schema_arrow.names:
            continue
        measure = name in UNCERTAINTY_MEASURES
        if measure:
            check_numeric_column(f, pf.schema_arrow, name, "uncertainty")
        col = read_column(pf, f, name)
        nulls += col.null_count
        v = col.drop_null().cast(pa.float64()).to_numpy(zero_copy_only=False)
        if measure:
            check_uncertainty_values(v, name, lambda i, f=f: f"{f}: value {i}")
        finite = v[np.isfinite(v)]
        non_finite += v.size - finite.size
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            total += float(finite.sum())
            count += finite.size
    return {
        "min": lo if count else None,
        "mean": total / count if count else None,
        "max": hi if count else None,
        "nulls": nulls,
        "non_finite": non_finite,
    }


def describe_pool(paths: Sequence[str | Path] | str | Path) -> dict[str, Any]:
    """Rows, files, feature dimension, task, per-column statistics of the float columns, and metadata."""
    source = open_pool(paths)
    schema = source.parquet[0].schema_arrow
    stat_cols = [
        f.name
        for f in schema
        if f.name not in _SKIP and (pa.types.is_floating(f.type) or f.name in UNCERTAINTY_MEASURES)
    ]
    for f, pf in zip(source.files, source.parquet, strict=True):
        if "feature" in pf.schema_arrow.names:
            check_feature_type(f, pf.schema_arrow.field("feature").type)
    stats = {name: _column_stats(source, name) for name in stat_cols}
    shown = paths if isinstance(paths, (str, Path)) else ", ".join(map(str, paths))
    info: dict[str, Any] = {
        "path": str(shown),
        "files": len(source.files),
        "rows": source.rows,
        "kind": source.kind,
        "feature_dim": source.feature_dim(),
        "task": source.metadata.get("task", "detection" if source.kind == "detection" else "classification"),
        "columns": {f.name: str(f.type) for f in schema},
        "uncertainty": stats,
        "metadata": source.metadata,
    }
    if source.kind == "detection":
        ids = pa.chunked_array(
            [read_column(pf, f, "id") for f, pf in zip(source.files, source.parquet, strict=True)]
        )
        info["images"] = pc.count_distinct(ids).as_py()
    return info
