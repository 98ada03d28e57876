"""`uwe inspect` as a library call: what a pool holds, read column by column (features are not loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli.pool import UNCERTAINTY_COLUMNS, feature_dim_of, open_parquet, pool_files, read_metadata

_SKIP = {"id", "feature", "probs", "box", "pred", "label", "x", "y", "width", "height"}


def describe_pool(path: str | Path) -> dict[str, Any]:
    """Rows, files, feature dimension, task, per-column statistics of the float columns, and metadata."""
    files = pool_files(path)
    parquet = [open_parquet(f) for f in files]
    schema = parquet[0].schema_arrow
    meta = read_metadata(schema)
    rows = sum(pf.metadata.num_rows for pf in parquet)
    ftype = schema.field("feature").type if "feature" in schema.names else None
    dim = feature_dim_of(ftype) if ftype is not None else None
    if dim is None and ftype is not None and rows:
        first = parquet[0].read_row_group(0, columns=["feature"]).column(0).drop_null()
        dim = len(first[0].as_py()) if len(first) else None
    stat_cols = [
        f.name
        for f in schema
        if f.name not in _SKIP and (pa.types.is_floating(f.type) or f.name in UNCERTAINTY_COLUMNS)
    ]
    stats: dict[str, dict[str, float | int]] = {}
    for name in stat_cols:
        lo, hi, total, count, nulls = np.inf, -np.inf, 0.0, 0, 0
        for pf in parquet:
            if name not in pf.schema_arrow.names:
                continue
            col = pf.read(columns=[name]).column(0)
            nulls += col.null_count
            valid = col.drop_null()
            if len(valid):
                mm = pc.min_max(valid)
                lo = min(lo, mm["min"].as_py())
                hi = max(hi, mm["max"].as_py())
                total += pc.sum(valid.cast(pa.float64())).as_py()
                count += len(valid)
        stats[name] = {
            "min": lo if count else float("nan"),
            "mean": total / count if count else float("nan"),
            "max": hi if count else float("nan"),
            "nulls": nulls,
        }
    info: dict[str, Any] = {
        "path": str(path),
        "files": len(files),
        "rows": rows,
        "feature_dim": dim,
        "task": meta.get("task", "detection" if "label" in schema.names else "classification"),
        "columns": {f.name: str(f.type) for f in schema},
        "uncertainty": stats,
        "metadata": meta,
    }
    if "label" in schema.names:
        ids = pa.chunked_array([pf.read(columns=["id"]).column(0) for pf in parquet])
        info["images"] = pc.count_distinct(ids).as_py()
    return info
