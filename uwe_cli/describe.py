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

from uwe_cli.pool import open_pool
from uwe_cli.pool.files import read_column
from uwe_cli.schema import UNCERTAINTY_MEASURES

_SKIP = {"id", "feature", "probs", "box", "pred", "label", "x", "y", "width", "height"}


def describe_pool(paths: Sequence[str | Path] | str | Path) -> dict[str, Any]:
    """Rows, files, feature dimension, task, per-column statistics of the float columns, and metadata."""
    source = open_pool(paths)
    schema = source.parquet[0].schema_arrow
    stat_cols = [
        f.name
        for f in schema
        if f.name not in _SKIP and (pa.types.is_floating(f.type) or f.name in UNCERTAINTY_MEASURES)
    ]
    stats: dict[str, dict[str, float | int]] = {}
    for name in stat_cols:
        lo, hi, total, count, nulls = np.inf, -np.inf, 0.0, 0, 0
        for f, pf in zip(source.files, source.parquet, strict=True):
            if name not in pf.schema_arrow.names:
                continue
            col = read_column(pf, f, name)
            nulls += col.null_count
            valid = col.drop_null()
            if len(valid):
                mm = pc.min_max(valid)
                lo = min(lo, mm["min"].as_py())
                hi = max(hi, mm["max"].as_py())
                total += pc.sum(valid.cast(pa.float64())).as_py()
                count += len(valid)
        stats[name] = {  # None (JSON null) when the column holds no value at all
            "min": lo if count else None,
            "mean": total / count if count else None,
            "max": hi if count else None,
            "nulls": nulls,
        }
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
