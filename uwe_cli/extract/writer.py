"""Streaming, resumable Parquet writer shared by all extractors (any pyarrow schema).

Rows go into numbered part files in a hidden work folder beside the target
(`<dir>/.<name>.parts/part-000000.parquet`). Each part is written to a temporary name and renamed
when complete, so a killed run leaves only whole parts behind. Each part also records, per image,
the stamp (size, mtime) its rows were computed from; restarting with the same command reads them
(`done`) and the runner redoes only images that are missing, changed or new, while rows of images
that changed or disappeared are dropped (`discard`). `finish()` streams the surviving rows part by
part into the target and removes the work folder, so memory stays at one part whatever the
dataset size, and the final pool holds every image exactly once.

Nothing is created before the first part is flushed: a run that fails validation leaves no trace.
When the target is a stream (stdout, a FIFO), parts live in a private temporary folder and the run
cannot be resumed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uwe_cli import storage
from uwe_cli.errors import OutputError, PoolError
from uwe_cli.outputs import Output, atomic_path, open_output
from uwe_cli.schema import encode_metadata

RUN_FILE = "_run.json"
STAMPS_KEY = b"uwe_inputs"
DEFAULT_PART_ROWS = 2048
MERGE_ROW_GROUP_ROWS = 4096

Stamp = list[int] | None


def shard_target(out_dir: str | Path, shard: tuple[int, int]) -> str | Path:
    """The part file a shard owns inside the output directory (or prefix)."""
    k, n = shard
    return storage.join(out_dir, f"part-{k:05d}-of-{n:05d}.parquet")


def work_dir_for(target: str | Path) -> str | Path:
    """Hidden folder (or prefix) beside the target holding the finished parts of an interrupted run."""
    return storage.join(storage.parent(target), f".{storage.name(target)}.parts")


def _read_schema(part: str | Path) -> pa.Schema:
    with storage.open_input(part) as fh:
        return pq.read_schema(fh)


def _read_table(part: str | Path, columns: list[str] | None = None) -> pa.Table:
    with storage.open_input(part) as fh:
        return pq.read_table(fh, columns=columns)


def _differences(before: Any, now: dict[str, Any]) -> str:
    """' (key: old → new, ...)' for the settings that changed, or '' when the old ones are unreadable."""
    if not isinstance(before, dict):
        return ""
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    shown = [f"{k}: {json.dumps(before.get(k))} → {json.dumps(now.get(k))}" for k in changed[:3]]
    return f" ({', '.join(shown)}{', …' if len(changed) > 3 else ''})" if shown else ""


class ResumablePoolWriter:
    """Write record batches of one schema into `target`, resumably.

    Usage: `w = ResumablePoolWriter(target, fingerprint)`; compare `w.done()` with the current inputs
    and `w.discard(...)` what changed; `w.set_schema(...)` once the schema is known;
    `w.write(batch, stamps)` per batch (a batch holds all rows of its images: parts never split an
    image); `w.finish()`. `fingerprint` is any JSON-able description of everything that changes the
    output (model, checkpoint hashes, preprocessing); a leftover work folder from a different
    fingerprint is an error rather than silently mixed into the pool.
    """

    def __init__(
        self,
        target: Output,
        fingerprint: Any,
        part_rows: int = DEFAULT_PART_ROWS,
        id_column: str = "id",
    ) -> None:
        self.target = target
        self.resumable = target.is_regular
        self.work = work_dir_for(target.path) if self.resumable and target.path is not None else None
        self.part_rows = max(1, int(part_rows))
        self.id_column = id_column
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.schema: pa.Schema | None = None
        self._buffer: list[pa.RecordBatch] = []
        self._stamps: dict[str, Stamp] = {}
        self._buffered = 0
        self._owner: dict[str, int] = {}  # image ID -> index of the part holding its current rows
        self._superseded: set[int] = set()  # parts holding rows no longer current
        self.rows_written = 0
        if self.work is not None and storage.exists(storage.join(self.work, RUN_FILE)):
            try:
                previous = json.loads(storage.read_text(storage.join(self.work, RUN_FILE)))
            except (OSError, ValueError):
                previous = None
            if previous != self.fingerprint:
                raise PoolError(
                    f"{self.work} holds parts of an interrupted run with different settings"
                    f"{_differences(previous, self.fingerprint)}; rerun the same command to resume, or "
                    "delete that folder to start over"
                )

    def parts(self) -> list[str | Path]:
        """Completed part files, in write order."""
        if self.work is None:
            return []
        return storage.glob(storage.join(self.work, "part-*.parquet"))

    def done(self) -> dict[str, Stamp]:
        """Image ID -> input stamp for every image whose rows completed parts hold (latest part wins)."""
        stamps: dict[str, Stamp] = {}
        for index, part in enumerate(self.parts()):
            meta = _read_schema(part).metadata or {}
            recorded = json.loads(meta.get(STAMPS_KEY, b"{}"))
            ids = _read_table(part, [self.id_column]).column(0).unique().to_pylist()
            for image_id in ids:
                stamps[image_id] = recorded.get(image_id)
                self._own(image_id, index)
        return stamps

    def _own(self, image_id: str, index: int) -> None:
        previous = self._owner.get(image_id)
        if previous is not None and previous != index:
            self._superseded.add(previous)
        self._owner[image_id] = index

    def discard(self, image_ids: set[str]) -> None:
        """Leave the rows completed parts hold for these images out of the final pool (their input
        changed or disappeared); rows written from now on for them count."""
        for image_id in image_ids:
            self._own(image_id, -1)

    def set_schema(self, schema: pa.Schema, metadata: dict[str, Any] | None = None) -> None:
        """Fix the schema (with the `uwe` metadata JSON) before the first write."""
        if metadata is not None:
            schema = schema.with_metadata(encode_metadata(metadata))
        existing = self.parts()
        if existing:
            old = _read_schema(existing[0])
            if not old.remove_metadata().equals(schema.remove_metadata()):
                raise PoolError(
                    f"{self.work}: the interrupted run wrote a different schema; delete that folder to start "
                    "over"
                )
        self.schema = schema

    def write(self, batch: pa.RecordBatch | pa.Table, stamps: dict[str, Stamp] | None = None) -> None:
        """Buffer rows and their images' input stamps; a full part is flushed as soon as it reaches `part_rows`."""
        if self.schema is None:
            raise RuntimeError("set_schema() must be called before write()")
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            if b.num_rows:
                self._buffer.append(b.cast(self.schema) if not b.schema.equals(self.schema) else b)
                self._buffered += b.num_rows
        self._stamps.update(stamps or {})
        if self._buffered >= self.part_rows:
            self.flush()

    def _ensure_work(self) -> None:
        if self.work is None:
            self.work = Path(tempfile.mkdtemp(prefix="uwe-parts-"))
        run = storage.join(self.work, RUN_FILE)
        if not storage.exists(run):
            storage.write_bytes(run, json.dumps(self.fingerprint, sort_keys=True).encode())

    def flush(self) -> None:
        """Write the buffered rows as the next numbered part (atomically), with their input stamps."""
        if not self._buffered or self.schema is None:
            return
        self._ensure_work()
        existing = self.parts()
        number = int(storage.name(existing[-1]).split("-")[1].split(".")[0]) + 1 if existing else 0
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        meta = dict(self.schema.metadata or {})
        meta[STAMPS_KEY] = json.dumps(self._stamps, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        assert self.work is not None
        part = storage.join(self.work, f"part-{number:06d}.parquet")
        if storage.is_url(part):
            with storage.atomic_remote(str(part)) as fh:
                pq.write_table(table, fh, row_group_size=max(self.part_rows, 1))
        else:
            with atomic_path(part) as tmp:
                pq.write_table(table, tmp, row_group_size=max(self.part_rows, 1))
        for image_id in self._stamps:
            self._own(image_id, len(existing))
        self.rows_written += table.num_rows
        self._buffer, self._buffered, self._stamps = [], 0, {}

    def _surviving(self, index: int, table: pa.Table) -> pa.Table:
        """Rows of part `index` that are current: not discarded and not redone in a later part."""
        if index not in self._superseded:
            return table
        ids = table.column(self.id_column).to_pylist()
        keep = [self._owner.get(i) == index for i in ids]
        return table.filter(pa.array(keep, pa.bool_()))

    def finish(self, order: Sequence[str] | None = None) -> tuple[int, pa.Schema]:
        """Merge the current rows of all parts into the target, drop the work folder; (rows, schema).

        `order` lists the image IDs in the order an uninterrupted run writes them: a resumed run that
        redid changed images or took in new ones wrote them into later parts, and the pool's row order
        decides ties in selection, so the rows are put back into that order.
        """
        self.flush()
        parts = self.parts()
        if not parts:
            raise PoolError(f"nothing to write to {self.target}: no rows were produced")
        base = self.schema or _read_schema(parts[0])
        schema = base.with_metadata({k: v for k, v in (base.metadata or {}).items() if k != STAMPS_KEY})
        plan = self._reorder_plan(parts, order) if order is not None and len(parts) > 1 else None
        rows = 0
        try:
            with open_output(self.target, binary=True) as fh, pq.ParquetWriter(fh, schema) as writer:
                for table in (
                    self._merged(parts, schema) if plan is None else self._reordered(parts, schema, plan)
                ):
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))
                    rows += table.num_rows
        except OSError as exc:
            raise OutputError(f"cannot write {self.target.option} {self.target}: {exc}") from None
        self._remove_work()
        return rows, schema

    def _merged(self, parts: list[str | Path], schema: pa.Schema) -> Iterator[pa.Table]:
        """The current rows, part after part, in tables of about MERGE_ROW_GROUP_ROWS rows."""
        pending: list[pa.Table] = []
        pending_rows = 0
        for index, part in enumerate(parts):
            table = self._surviving(index, _read_table(part)).cast(schema)
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= MERGE_ROW_GROUP_ROWS:
                yield pa.concat_tables(pending)
                pending, pending_rows = [], 0
        if pending:
            yield pa.concat_tables(pending)

    def _reorder_plan(
        self, parts: list[str | Path], order: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(part, row within the part's current rows) of every output row in `order`, or None when the
        parts already are in that order (no resume, or one that changed nothing): only IDs are read."""
        rank = {image_id: i for i, image_id in enumerate(order)}
        keys, part_of, row_of = [], [], []
        for index, part in enumerate(parts):
            ids = self._surviving(index, _read_table(part, [self.id_column])).column(0).to_pylist()
            keys.append(np.array([rank.get(i, len(rank)) for i in ids], dtype=np.int64))
            part_of.append(np.full(len(ids), index, dtype=np.int64))
            row_of.append(np.arange(len(ids), dtype=np.int64))
        key = np.concatenate(keys)
        if np.all(key[1:] >= key[:-1]):
            return None
        by = np.argsort(key, kind="stable")  # an image's rows keep their order
        return np.concatenate(part_of)[by], np.concatenate(row_of)[by]

    def _reordered(
        self, parts: list[str | Path], schema: pa.Schema, plan: tuple[np.ndarray, np.ndarray]
    ) -> Iterator[pa.Table]:
        """The current rows in the planned order, a row group at a time; each group reads the parts it
        draws from (a resume interleaves two or three runs of parts, so few per group)."""
        part_of, row_of = plan
        for s in range(0, part_of.size, MERGE_ROW_GROUP_ROWS):
            p, r = part_of[s : s + MERGE_ROW_GROUP_ROWS], row_of[s : s + MERGE_ROW_GROUP_ROWS]
            pieces, slots = [], []
            for index in np.unique(p):
                mine = np.flatnonzero(p == index)
                table = self._surviving(int(index), _read_table(parts[int(index)])).cast(schema)
                pieces.append(table.take(pa.array(r[mine])))
                slots.append(mine)
            table = pa.concat_tables(pieces)
            yield table.take(pa.array(np.argsort(np.concatenate(slots), kind="stable")))

    def _remove_work(self) -> None:
        if self.work is not None:
            storage.remove_tree(self.work)

    def abandon(self) -> None:
        """On failure: drop the unflushed buffer, keep completed parts for a resume (no parts: no folder)."""
        self._buffer, self._buffered, self._stamps = [], 0, {}
        if not self.resumable or not self.parts():
            self._remove_work()
