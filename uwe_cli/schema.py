"""The pool contract, declared once: columns, Arrow types, pool kinds, metadata, version, unit IDs.

Writers (the extractors, `synthetic`, benchmarks, tests) build their Arrow schemas from here and
readers validate against it, so the two cannot drift. `docs/schema.md` is checked against this
module by a test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli.errors import PoolError

SCHEMA_VERSION = 1
METADATA_KEY = b"uwe"
UNCERTAINTY_MEASURES = ("entropy", "bvsb", "least_confidence")
REGION_COLUMNS = ("image_id", "x", "y", "width", "height")
PASSTHROUGH_COLUMNS = ("source", *REGION_COLUMNS)
TASKS = ("classification", "segmentation", "detection")

# A unit ID: any non-empty string without control characters (U+0000-U+001F, U+007F) and without a
# leading or trailing space. Such IDs round-trip through the batch CSV and plain-text ID lists.
_BAD_ID = re.compile(r"^$|[\x00-\x1f\x7f]|^ | $")
_BAD_ID_RE2 = r"^$|[\x00-\x1f\x7f]|^ | $"


def id_problem(unit_id: str) -> str | None:
    """Why a unit ID is not allowed, or None when it is."""
    if unit_id == "":
        return "an empty ID"
    if re.search(r"[\x00-\x1f\x7f]", unit_id):
        return f"ID {unit_id!r} contains a control character (newline, tab, ...)"
    if unit_id != unit_id.strip(" "):
        return f"ID {unit_id!r} starts or ends with a space"
    return None


def check_id(unit_id: str, where: str) -> None:
    problem = id_problem(unit_id)
    if problem is not None:
        raise PoolError(
            f"{where}: {problem}; IDs must be non-empty, without control characters or edge spaces"
        )


def check_ids(ids: pa.Array | pa.ChunkedArray, where: str) -> None:
    """Vectorised `check_id` over a string column (one regex pass in Arrow)."""
    if len(ids) == 0:
        return
    bad = pc.match_substring_regex(ids, _BAD_ID_RE2)
    if pc.any(bad).as_py():
        first = pc.index(bad, True).as_py()
        check_id(ids[first].as_py(), where)


def first_bad_id(ids: Iterable[str]) -> str | None:
    for unit_id in ids:
        if _BAD_ID.search(unit_id):
            return unit_id
    return None


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    """File-level metadata for pool writers: key `uwe`, JSON with the schema version first."""
    return {METADATA_KEY: json.dumps({"schema": SCHEMA_VERSION, **meta}, sort_keys=True).encode()}


def decode_metadata(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The `uwe` metadata of a file ({} when absent); malformed JSON or a future version is refused."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise PoolError(f"{where}: metadata key 'uwe' is not valid JSON") from None
    if not isinstance(meta, dict):
        raise PoolError(f"{where}: metadata key 'uwe' must hold a JSON object, found {type(meta).__name__}")
    version = meta.get("schema", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise PoolError(f"{where}: metadata 'schema' must be an integer version, found {version!r}")
    if version != SCHEMA_VERSION:
        raise PoolError(
            f"{where}: pool schema version {version}; this uwe reads version {SCHEMA_VERSION} "
            "(upgrade uwe to read newer pools)"
        )
    task = meta.get("task")
    if task is not None and task not in TASKS:
        raise PoolError(f"{where}: metadata 'task' is '{task}' (one of {', '.join(TASKS)})")
    return meta
