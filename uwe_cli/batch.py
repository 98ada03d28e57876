"""The batch file: `rank,id,uncertainty,distance` (+ `source` and region columns), written atomically and read back."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from uwe_cli import storage
from uwe_cli.errors import BatchError
from uwe_cli.outputs import Output, open_output

# The csv module refuses fields above 128 KiB by default; IDs have no length limit.
csv.field_size_limit(2**31 - 1)


@dataclass
class Batch:
    ids: list[str]
    uncertainty: list[float | None]
    distance: list[float | None]
    extra: dict[str, list] = field(default_factory=dict)
    ranks: list[int] | None = None  # as read from a batch file; None means 1..n

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def columns(self) -> list[str]:
        return ["rank", "id", "uncertainty", "distance", *self.extra]


_CORE_COLUMNS = ("rank", "id", "uncertainty", "distance")


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_batch(batch: Batch, stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(batch.columns)
    extra = list(batch.extra.values())
    for i, id_ in enumerate(batch.ids):
        row = [i + 1, id_, _fmt(batch.uncertainty[i]), _fmt(batch.distance[i])]
        row += [_fmt(col[i]) for col in extra]
        writer.writerow(row)


def write_batch(batch: Batch, out: Output) -> None:
    """Write the batch CSV to a checked output: atomically for a file, streamed for stdout or a pipe."""
    with open_output(out) as fh:
        render_batch(batch, fh)


def _float_or_none(text: str, column: str, where: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise BatchError(f"{where}: '{column}' is not a number ({text[:40]!r})") from None


def read_batch(path: str | Path) -> Batch:
    """A batch CSV as `uwe select` writes it, in file order (the pick order).

    Only `id` is required (a list of IDs with a CSV header works); `rank` defaults to the line
    number, `uncertainty` and `distance` to empty. IDs are parsed as CSV, so quoted commas and
    quotes round-trip. Empty files, duplicate IDs and unreadable numbers are BatchErrors.
    """
    path = storage.as_location(path)
    text = storage.read_text_file(path, "batch file", BatchError)
    rows = storage.csv_rows(text, f"batch file {path}", BatchError)
    rows = [row for row in rows if row]
    if not rows or "id" not in rows[0]:
        raise BatchError(
            f"batch file {path}: no 'id' column in the header (expected rank,id,uncertainty,...)"
        )
    header = rows[0]
    col = {name: i for i, name in enumerate(header)}
    batch = Batch([], [], [], {name: [] for name in header if name not in _CORE_COLUMNS})
    ranks: list[int] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        where = f"batch file {path}, line {line}"
        if len(row) != len(header):
            raise BatchError(f"{where}: {len(row)} fields, the header has {len(header)}")
        unit_id = row[col["id"]]
        if unit_id in seen:
            raise BatchError(f"{where}: id '{unit_id}' appears twice (first on line {seen[unit_id]})")
        seen[unit_id] = line
        if "rank" in col:
            try:
                ranks.append(int(row[col["rank"]]))
            except ValueError:
                raise BatchError(f"{where}: 'rank' is not an integer ({row[col['rank']][:40]!r})") from None
        else:
            ranks.append(line - 1)
        batch.ids.append(unit_id)
        for name, values in (("uncertainty", batch.uncertainty), ("distance", batch.distance)):
            values.append(_float_or_none(row[col[name]], name, where) if name in col else None)
        for name, values in batch.extra.items():
            values.append(row[col[name]])
    if not batch.ids:
        raise BatchError(f"batch file {path} has no rows")
    batch.ranks = ranks
    return batch
