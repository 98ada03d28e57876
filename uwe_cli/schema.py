"""The pool contract, declared once: columns, Arrow types, pool kinds, metadata, version, unit IDs.

Writers (the extractors, `synthetic`, benchmarks, tests) build their Arrow schemas from here and
readers validate against it, so the two cannot drift. `docs/schema.md` is checked against this
module by a test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
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


# --------------------------------------------------------------------------------------------------
# Columns: the contract's one declaration (the docs table is checked against it)


@dataclass(frozen=True)
class Column:
    """A pool column: name, Arrow type as written by uwe, which pools have it, and what it means."""

    name: str
    arrow: str
    required: str
    meaning: str


UNIT_COLUMNS = (
    Column(
        "id",
        "string",
        "yes",
        "unique unit ID, the value annotators receive: the image ID, or `<image_id>@x,y,WxH` for a region",
    ),
    Column(
        "feature",
        "fixed_size_list<float32>[d]",
        "yes",
        "f(x): the input of the classifier layer (mean over the unit's pixels for segmentation); "
        "list<float32> of constant length and float16/float64 values are read too",
    ),
    Column(
        "entropy",
        "float32",
        "one uncertainty column, for the strategies that read one",
        "−Σ p log p, natural log (Eq. 5); the first of the three that `--uncertainty auto` takes",
    ),
    Column("bvsb", "float32", "", "p(second best) / p(best) (Eq. 8): 1 = undecided, 0 = certain"),
    Column("least_confidence", "float32", "", "1 − p(best)"),
    Column(
        "bald",
        "float32",
        "no",
        "BALD: mutual information between the prediction and the model (ensemble members or MC-dropout "
        "passes); written with several checkpoints or `--mc-dropout`",
    ),
    Column(
        "probs",
        "fixed_size_list<float32>[K]",
        "for `--strategy badge`",
        "class probabilities (softmax, averaged over ensemble members and MC-dropout passes); "
        "`--no-probs` leaves the column out",
    ),
    Column("pred", "int32", "no", "predicted class (argmax of the probabilities)"),
    Column("source", "string", "no", "image path or URI; copied into the batch file"),
    Column("image_id", "string", "region pools", "the image a region belongs to; copied into the batch file"),
    Column("x", "int32", "region pools", "region left edge, in original-image pixels"),
    Column("y", "int32", "region pools", "region top edge, in original-image pixels"),
    Column("width", "int32", "region pools", "region width, in pixels (clipped at the image border)"),
    Column("height", "int32", "region pools", "region height, in pixels (clipped at the image border)"),
)

DETECTION_COLUMNS = (
    Column("id", "string", "yes", "image ID, repeated on every box row of the image"),
    Column("source", "string", "no", "image path or URI; copied into the batch file"),
    Column(
        "label",
        "int32, nullable",
        "yes",
        "predicted class of the box in the detector's own numbering; null on the one row of an image "
        "without boxes",
    ),
    Column("score", "float32", "no", "detector confidence of the box"),
    Column("box", "fixed_size_list<float32>[4]", "no", "x1, y1, x2, y2 in input-image pixels"),
    Column(
        "bvsb",
        "float32",
        "the uncertainty column (`bvsb` unless `--uncertainty` names another)",
        "q(second best) / q(best) on the box's foreground class distribution q (Eq. 8)",
    ),
    Column("entropy", "float32", "", "−Σ q log q on the foreground class distribution, natural log"),
    Column("least_confidence", "float32", "", "1 − max q"),
    Column(
        "probs",
        "fixed_size_list<float32>[K], nullable",
        "no",
        "the box's class scores as the detector gives them (softmax or per-class sigmoid); "
        "`--no-probs` leaves the column out",
    ),
    Column(
        "feature",
        "fixed_size_list<float32>[d], nullable",
        "yes",
        "the box's feature (what each detector family stores: [extract-detection.md](extract-detection.md)); "
        "null on empty-image rows",
    ),
)


def _vector(size: int) -> pa.DataType:
    return pa.list_(pa.float32(), size)


def unit_schema(
    feature_dim: int,
    num_classes: int | None = None,
    extra_floats: Iterable[str] = (),
    pred: bool = False,
    regions: bool = False,
    source: bool = True,
) -> pa.Schema:
    """A unit pool's Arrow schema as uwe writes it; `num_classes` adds `probs`, `extra_floats` e.g. `bald`."""
    fields = [pa.field("id", pa.string(), nullable=False)]
    if source:
        fields.append(pa.field("source", pa.string()))
    fields.append(pa.field("feature", _vector(feature_dim), nullable=False))
    fields += [pa.field(name, pa.float32()) for name in (*UNCERTAINTY_MEASURES, *extra_floats)]
    if num_classes is not None:
        fields.append(pa.field("probs", _vector(num_classes)))
    if pred:
        fields.append(pa.field("pred", pa.int32()))
    if regions:
        fields.append(pa.field("image_id", pa.string(), nullable=False))
        fields += [pa.field(name, pa.int32(), nullable=False) for name in REGION_COLUMNS[1:]]
    return pa.schema(fields)


def detection_schema(feature_dim: int, num_classes: int | None = None) -> pa.Schema:
    """A detection pool's Arrow schema as uwe writes it (`num_classes` adds the per-box `probs`)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("box", _vector(4)),
        *(pa.field(name, pa.float32()) for name in ("bvsb", "entropy", "least_confidence")),
    ]
    if num_classes is not None:
        fields.append(pa.field("probs", _vector(num_classes)))
    fields.append(pa.field("feature", _vector(feature_dim)))
    return pa.schema(fields)


def fixed_list(matrix: Any, mask: Any = None) -> pa.Array:
    """An (n, d) float32 matrix as a fixed_size_list array (`mask`: True where the row is null)."""
    import numpy as np

    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    values = pa.array(matrix.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1], mask=mask)


def record_batch(schema: pa.Schema, columns: dict[str, Any]) -> pa.RecordBatch:
    """Arrays (or numpy/lists, converted to the schema's types) into a batch of `schema`'s columns."""
    arrays = []
    for f in schema:
        value = columns[f.name]
        if not isinstance(value, (pa.Array, pa.ChunkedArray)):
            value = fixed_list(value) if pa.types.is_fixed_size_list(f.type) else pa.array(value, f.type)
        arrays.append(value)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def markdown_table(columns: Iterable[Column]) -> str:
    """The columns as the Markdown table in docs/schema.md."""
    lines = ["| column | Arrow type | required | meaning |", "|---|---|---|---|"]
    lines += [f"| `{c.name}` | {c.arrow} | {c.required} | {c.meaning} |" for c in columns]
    return "\n".join(lines)
