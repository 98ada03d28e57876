from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uwe_cli.schema import encode_metadata


def fixed_list(mat: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), type=value_type), mat.shape[1])


def write_pool(
    path: Path,
    features: np.ndarray,
    uncertainty: np.ndarray | None = None,
    ids: list[str] | None = None,
    column: str = "entropy",
    probs: np.ndarray | None = None,
    extra: dict[str, pa.Array] | None = None,
    metadata: bool = True,
) -> Path:
    n = features.shape[0]
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids if ids is not None else [f"s{i:05d}" for i in range(n)], type=pa.string()),
        "feature": fixed_list(np.asarray(features, dtype=np.float32)),
    }
    if uncertainty is not None:
        cols[column] = pa.array(np.asarray(uncertainty, dtype=np.float32))
    if probs is not None:
        cols["probs"] = fixed_list(np.asarray(probs, dtype=np.float32))
    cols.update(extra or {})
    table = pa.table(cols)
    if metadata:
        table = table.replace_schema_metadata(encode_metadata({"task": "classification"}))
    pq.write_table(table, path)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def assert_one_line_error(result, needle: str, *absent: Path) -> None:
    """Exit 2, one `error:` line on stderr naming the culprit, and none of `absent` exists."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in " ".join(result.stderr.split()), (needle, result.stderr)
    for path in absent:
        assert not Path(path).exists(), path


def leftovers(folder: Path) -> list[Path]:
    """Temporary or work files an interrupted or refused run might leave (hidden files and folders)."""
    return [p for p in folder.rglob(".*")]


def missing_integration(message: str) -> None:
    """A real external program (Label Studio, Chromium) is missing: skip, or fail where integrations are
    required (`make test` sets UWE_REQUIRE_INTEGRATIONS=1, so CI never skips them)."""
    if os.environ.get("UWE_REQUIRE_INTEGRATIONS") == "1":
        pytest.fail(f"{message} (UWE_REQUIRE_INTEGRATIONS=1)")
    pytest.skip(message)


from s3_server import s3_bucket, s3_server  # noqa: E402, F401 - session fixtures (real S3 server)


class Killed(Exception):
    """Stands for a kill in the middle of an extraction (raised from its progress callback)."""


def kill_after(batches: int):
    """A progress callback that raises Killed on the call after `batches` batches (the first call
    reports the starting point)."""
    calls = {"n": 0}

    def progress(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] > batches:
            raise Killed

    return progress
