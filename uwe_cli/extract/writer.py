"""Streaming, resumable Parquet writer shared by all extractors (any pyarrow schema).

Rows go into numbered part files in a hidden work folder beside the target
(`<dir>/.<name>.parts/part-000000.parquet`). Each part is written to a temporary name and renamed
when complete, so a killed run leaves only whole parts behind; restarting with the same command
reads their IDs (`done_ids`) and processes only what is missing. `finish()` streams the parts row
group by row group into the target (atomically) and removes the work folder, so memory stays at one
part whatever the dataset size, and the final pool holds every unit exactly once.

A shard writes `<out_dir>/part-KKKKK-of-NNNNN.parquet` with the same mechanism (`shard_target`),
so N jobs fill one directory that `read_pool` reads whole (hidden work folders are ignored).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uwe_cli.errors import PoolError
from uwe_cli.outputs import atomic_path
from uwe_cli.schema import encode_metadata

RUN_FILE = "_run.json"
DEFAULT_PART_ROWS = 2048
MERGE_ROW_GROUP_ROWS = 4096


def shard_target(out_dir: str | Path, shard: tuple[int, int]) -> Path:
    """The part file a shard owns inside the output directory."""
    k, n = shard
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PoolError(f"--shard writes into a directory, but {out_dir} is a file")
    return out_dir / f"part-{k:05d}-of-{n:05d}.parquet"


def work_dir_for(target: Path) -> Path:
    """Hidden folder holding the finished parts of an interrupted run."""
    return target.parent / f".{target.name}.parts"


class ResumablePoolWriter:
    """Write record batches of one schema into `target`, resumably.

    Usage: `w = ResumablePoolWriter(target, fingerprint)`; skip `w.done_ids()`; `w.set_schema(...)`
    once the schema is known (e.g. after the first forward pass gives the feature size);
    `w.write(batch)` per batch (a batch must hold all rows of its images: parts never split an
    image); `w.finish()`. `fingerprint` is any JSON-able description of everything that changes
    the output (model, checkpoint hashes, preprocessing); a leftover work folder from a different
    fingerprint is an error rather than silently mixed into the pool.
    """

    def __init__(
        self,
        target: str | Path,
        fingerprint: Any,
        part_rows: int = DEFAULT_PART_ROWS,
        id_column: str = "id",
    ) -> None:
        self.target = Path(target)
        self.work = work_dir_for(self.target)
        self.part_rows = max(1, int(part_rows))
        self.id_column = id_column
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.schema: pa.Schema | None = None
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows_written = 0
        self.resumed_rows = 0
        self._prepare()

    def _prepare(self) -> None:
        if self.work.exists():
            run = self.work / RUN_FILE
            try:
                previous = json.loads(run.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != self.fingerprint:
                raise PoolError(
                    f"{self.work} holds parts of an interrupted run with different settings; "
                    "rerun the same command to resume, or delete that folder to start over"
                )
        else:
            self.work.mkdir(parents=True)
            with atomic_path(self.work / RUN_FILE) as tmp:
                tmp.write_text(json.dumps(self.fingerprint, sort_keys=True))

    def parts(self) -> list[Path]:
        """Completed part files, in write order."""
        return sorted(self.work.glob("part-*.parquet"))

    def done_ids(self) -> set[str]:
        """IDs already in completed parts: the units a resumed run must not process again."""
        done: set[str] = set()
        for part in self.parts():
            table = pq.read_table(part, columns=[self.id_column])
            done.update(table.column(0).to_pylist())
            self.resumed_rows += table.num_rows
        return done

    def set_schema(self, schema: pa.Schema, metadata: dict[str, Any] | None = None) -> None:
        """Fix the schema (with the `uwe` metadata JSON) before the first write."""
        if metadata is not None:
            schema = schema.with_metadata(encode_metadata(metadata))
        existing = self.parts()
        if existing:
            old = pq.read_schema(existing[0])
            if not old.remove_metadata().equals(schema.remove_metadata()):
                raise PoolError(
                    f"{self.work}: the interrupted run wrote a different schema; delete that folder to start "
                    "over"
                )
        self.schema = schema

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Buffer rows; a full part is flushed to disk as soon as it reaches `part_rows`."""
        if self.schema is None:
            raise RuntimeError("set_schema() must be called before write()")
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            if b.num_rows:
                self._buffer.append(b.cast(self.schema) if not b.schema.equals(self.schema) else b)
                self._buffered += b.num_rows
        if self._buffered >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next numbered part (atomically)."""
        if not self._buffered or self.schema is None:
            return
        existing = self.parts()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        with atomic_path(self.work / f"part-{number:06d}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=max(self.part_rows, 1))
        self.rows_written += table.num_rows
        self._buffer, self._buffered = [], 0

    def finish(self) -> int:
        """Merge all parts into the target atomically, drop the work folder; returns the row count."""
        self.flush()
        parts = self.parts()
        if not parts:
            raise PoolError(f"nothing to write to {self.target}: no rows were produced")
        schema = self.schema or pq.read_schema(parts[0])
        rows = 0
        with atomic_path(self.target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            pending: list[pa.Table] = []
            pending_rows = 0
            for part in parts:
                pf = pq.ParquetFile(part)
                for i in range(pf.num_row_groups):
                    group = pf.read_row_group(i).cast(schema)
                    pending.append(group)
                    pending_rows += group.num_rows
                    if pending_rows >= MERGE_ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
                        rows += pending_rows
                        pending, pending_rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
                rows += pending_rows
        shutil.rmtree(self.work, ignore_errors=True)
        return rows

    def abandon(self) -> None:
        """On failure: drop the unflushed buffer, keep completed parts for a resume (no parts: no folder)."""
        self._buffer, self._buffered = [], 0
        if not self.parts():
            shutil.rmtree(self.work, ignore_errors=True)
