"""The batch file: `rank,id,uncertainty,distance` (+ `source` and region columns), written atomically."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import TextIO

from uwe_cli.outputs import Output, open_output


@dataclass
class Batch:
    ids: list[str]
    uncertainty: list[float | None]
    distance: list[float | None]
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def columns(self) -> list[str]:
        return ["rank", "id", "uncertainty", "distance", *self.extra]


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
