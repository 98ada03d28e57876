"""Run plumbing shared by the extractors: resumable writer setup, bad-image bookkeeping, and the
end of a run (skipped-images report, metadata read back on a fully resumed run, result fields)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from uwe_cli.data import ImageItem, write_skip_report
from uwe_cli.errors import DataError
from uwe_cli.extract.writer import ResumablePoolWriter


def open_writer(
    target: Path,
    fingerprint: Any,
    items: Sequence[ImageItem],
    part_rows: int,
    id_column: str = "id",
) -> tuple[ResumablePoolWriter, set[str], list[ImageItem]]:
    """The resumable writer, the IDs an interrupted run already wrote, and the items still to do."""
    writer = ResumablePoolWriter(target, fingerprint, part_rows=part_rows, id_column=id_column)
    done = writer.done_ids()
    todo = [item for item in items if item.id not in done]
    return writer, done, todo


def record_failures(
    failures: Iterable[tuple[int, str]],
    todo: Sequence[ImageItem],
    skipped: list[tuple[ImageItem, str]],
    skip_bad_images: bool,
) -> None:
    """Unreadable images of a batch: an error, or (with --skip-bad-images) appended to `skipped`."""
    for index, message in failures:
        if not skip_bad_images:
            raise DataError(f"{message} (use --skip-bad-images to leave such files out)")
        skipped.append((todo[index], message))


def skip_report_path(target: Path) -> Path:
    """`OUT.skipped.csv` beside the pool (or the shard's part file)."""
    return target.with_name(target.name.removesuffix(".parquet") + ".skipped.csv")


def finish_run(
    target: Path,
    *,
    start: float,
    rows: int,
    processed: int,
    resumed: int,
    skipped: list[tuple[ImageItem, str]],
    meta: dict[str, Any],
    device: Any,
) -> dict[str, Any]:
    """After `writer.finish()`: write (or remove a stale) skip report, read the metadata back when
    this run wrote no batch itself, and return the result fields every extractor shares."""
    seconds = time.perf_counter() - start
    report = None
    report_path = skip_report_path(target)
    if skipped:
        write_skip_report(report_path, skipped)
        report = report_path
    elif report_path.exists():
        report_path.unlink()
    if not meta:
        import pyarrow.parquet as pq

        from uwe_cli.schema import decode_metadata

        meta = decode_metadata(pq.read_schema(target), str(target))
    return {
        "out": target,
        "rows": rows,
        "processed": processed,
        "resumed": resumed,
        "skipped": skipped,
        "skip_report": report,
        "seconds": seconds,
        "images_per_second": processed / seconds if seconds > 0 else 0.0,
        "feature_dim": int(meta.get("feature_dim", 0)),
        "num_classes": int(meta.get("num_classes", 0)),
        "device": str(device),
        "metadata": meta,
    }
