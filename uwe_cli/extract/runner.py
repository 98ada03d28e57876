"""The one extraction runner: images in, a Parquet pool out, for every task.

The runner owns everything the tasks share: option checks, listing and sharding the images,
checking every output against the inputs, resuming an interrupted run (redoing images that changed
since), the DataLoader, bad-image handling, the writer, progress and the result. A task
(`ExtractionTask`: classification, segmentation, detection) supplies only model loading, the
per-image transform, the forward pass to rows, and its fingerprint and metadata.

Order matters for the guarantees: every check that can fail on the options runs before anything is
written, and no file or folder exists until the first part of rows is complete.
"""

from __future__ import annotations

import csv
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from uwe_cli import __version__, storage
from uwe_cli.data import ImageItem, LoaderBatch, check_loader_options, list_images, make_loader, shard_items
from uwe_cli.errors import DataError, ModelError, OutputError
from uwe_cli.extract.writer import DEFAULT_PART_ROWS, ResumablePoolWriter, shard_target, work_dir_for
from uwe_cli.outputs import Output, check_not_input, open_output, resolve_output

ProgressFn = Callable[[int, int], None]


@dataclass
class ExtractConfig:
    """What every `uwe extract` task accepts; tasks add their own fields. None means the default."""

    data: str | Path
    out: str | Path
    model: str | None = None
    checkpoint: str | Path | None = None
    num_classes: int | None = None
    weights: str | None = None
    class_names: Sequence[str] | None = None
    batch_size: int | None = None  # None: the task's default
    num_workers: int = 0
    device: str = "auto"
    amp: bool = False
    shard: tuple[int, int] | None = None
    skip_bad_images: bool = False
    trust_checkpoint: bool = False
    part_rows: int = DEFAULT_PART_ROWS
    io_concurrency: int = 16  # remote images fetched at once
    ray: bool = False  # run the model on a Ray cluster (see cluster/extract.py)
    workers: int = 2
    gpus_per_worker: float = 0.0
    ray_address: str | None = None
    extra_inputs: Sequence[str | Path] = ()  # other files the command read (e.g. --class-names)

    def checkpoint_paths(self) -> list[str | Path]:
        return [storage.as_location(self.checkpoint)] if self.checkpoint is not None else []

    def make_task(self) -> ExtractionTask:
        """The task this config runs (each task module's config class says which)."""
        raise NotImplementedError


@dataclass
class ExtractionResult:
    """What a run did, for the CLI summary (`--json`) and for callers who chain steps."""

    out: Output
    task: str
    rows: int
    processed: int
    resumed: int
    redone: int = 0
    skipped: list[tuple[ImageItem, str]] = field(default_factory=list)
    skip_report: str | Path | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0
    feature_dim: int = 0
    num_classes: int = 0
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # task-specific counts (boxes, heatmaps, ...)

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (`--json`)."""
        return {
            "task": self.task,
            "out": str(self.out),
            "rows": self.rows,
            "processed": self.processed,
            "resumed": self.resumed,
            "redone": self.redone,
            "skipped": len(self.skipped),
            "skip_report": str(self.skip_report) if self.skip_report else None,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "device": self.device,
            **self.details,
        }


class ExtractionTask(ABC):
    """One task head. The runner calls, in order: `validate`, `side_outputs`, `load`, `fingerprint`,
    then `transform`/`stack` for the loader, `rows` per batch, `finish`, `metadata`, `details`, `close`.
    """

    name: str = ""
    default_batch_size: int = 8
    resume_column: str = "id"

    def __init__(self, cfg: ExtractConfig) -> None:
        self.cfg = cfg

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size if self.cfg.batch_size is not None else self.default_batch_size

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check the task's own options; nothing is read or written yet."""

    def side_outputs(self) -> list[tuple[str | Path, str]]:
        """Folders the task writes besides the pool, as (path, option), checked against the inputs."""
        return []

    @abstractmethod
    def load(self, device: Any) -> None:
        """Load the model(s) onto `device`."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the common options that changes the rows (a resume must match it)."""

    @abstractmethod
    def transform(self) -> Callable[[Any], Any]:
        """PIL image -> the per-image sample the loader collates (runs in DataLoader workers)."""

    stack: bool = True  # collate samples into one tensor (equal sizes) or keep a list

    @abstractmethod
    def rows(self, items: list[ImageItem], payload: Any, device: Any) -> list[pa.RecordBatch]:
        """The pool rows of a batch of images (possibly none yet, if the task buffers)."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """The `uwe` metadata of the pool (task, model, classes, feature size, ...)."""

    def pool_metadata(
        self, model: str, sha: Any, num_classes: int, class_names: Sequence[str] | None, feature_dim: int,
        has: str = "", **own: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """The metadata every pool records, then the task's `own`; class names must match the classes
        (`has` words the count in the error, default "the model has K classes")."""
        if class_names is not None and len(class_names) != num_classes:
            has = has or f"the model has {num_classes} classes"
            raise ModelError(f"{len(class_names)} class names given but {has}")
        return {
            "task": self.name,
            "model": model,
            "checkpoint_sha256": sha,
            "num_classes": num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "feature_dim": feature_dim,
            "weights": self.cfg.weights,
            "uwe_version": __version__,
            **own,
        }

    def finish(self) -> list[pa.RecordBatch]:
        """Rows still buffered at the end of the run."""
        return []

    def details(self) -> dict[str, Any]:
        """Task-specific result fields."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release hooks and buffers."""


def _check_common(cfg: ExtractConfig, task: ExtractionTask) -> None:
    check_loader_options(task.batch_size, cfg.num_workers)
    if cfg.io_concurrency < 1:
        raise DataError(f"--io-concurrency must be positive, got {cfg.io_concurrency}")
    if cfg.ray and (cfg.workers < 1 or cfg.gpus_per_worker < 0):
        raise DataError(
            f"--workers must be ≥ 1 and --gpus-per-worker ≥ 0, got {cfg.workers}, {cfg.gpus_per_worker}"
        )
    if cfg.part_rows < 1:
        raise DataError(f"part_rows must be positive, got {cfg.part_rows}")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise DataError(f"--num-classes must be positive, got {cfg.num_classes}")
    empty = [i for i, name in enumerate(cfg.class_names or []) if name == ""]
    if empty:  # in the pool, an empty name would make `uwe export` drop that class's predictions
        raise DataError(f"--class-names: the name of class {empty[0]} is empty; every class needs a name")


def run_warnings(cfg: ExtractConfig) -> list[str]:
    """What a user should hear before a run starts: a torchvision or timm architecture without
    --checkpoint or --weights (random weights), and --amp where it does nothing."""
    from uwe_cli.models import resolve_device

    found = []
    model = cfg.model
    # hf: directories and factories bring their own weights
    bare = model is not None and (":" not in model or model.startswith("timm:"))
    if bare and not cfg.weights and not cfg.checkpoint_paths():
        found.append(
            f"--model {model} has neither --checkpoint nor --weights: it runs with random weights, so "
            "the pool's uncertainty and features say nothing about your data"
        )
    if getattr(cfg, "amp", False) and resolve_device(cfg.device).type == "cpu":
        found.append("--amp only applies on CUDA; running in float32 on the CPU")
    return found


def _resolve_target(cfg: ExtractConfig, inputs: list[Path], keys: list[tuple[int, int]]) -> Output:
    """The pool file (or the shard's part in the --out directory), checked against every input."""
    if cfg.shard is not None:
        folder = resolve_output(cfg.out, "--out", inputs=inputs, input_keys=keys, directory=True)
        assert folder.path is not None
        _check_split(folder.path, cfg.shard)
        part = shard_target(folder.path, cfg.shard)
        return resolve_output(part, "--out", inputs=inputs, input_keys=keys)
    target = resolve_output(cfg.out, "--out", inputs=inputs, input_keys=keys)
    if target.kind == "file" and target.path is not None:
        for side in (work_dir_for(target.path), skip_report_path(target.path)):
            check_not_input(Path(side), "--out", inputs, keys)
    return target


def _check_split(folder: str | Path, shard: tuple[int, int]) -> None:
    """Parts of an N-way split in the folder refuse a shard of another split: the pool would hold both."""
    n = shard[1]
    if not storage.exists(folder):
        return
    for part in storage.glob(storage.join(folder, "part-*-of-*.parquet")):
        other = storage.name(part).removesuffix(".parquet").rpartition("-of-")[2]
        if other.isdigit() and int(other) != n:
            raise DataError(
                f"--out {folder} holds parts of a {int(other)}-way split ({storage.name(part)}); "
                f"--shard K/{n} would mix with them: use another folder or --shard K/{int(other)}"
            )


def _check_apart(folder: str | Path, option: str, target: Output) -> None:
    """A side folder (--heatmaps, --visualize) is none of the files the pool's writing owns: the pool,
    its work folder (removed when the pool is done) or its skip report."""
    if target.kind != "file" or target.path is None or storage.is_url(folder):
        return
    real = Path(os.path.realpath(folder))
    owned = (
        (target.path, "the --out pool"),
        (work_dir_for(target.path), "the --out pool's work folder"),
        (skip_report_path(target.path), "the --out pool's skip report"),
    )
    for path, what in owned:
        other = Path(os.path.realpath(path))
        if real == other or other in real.parents:
            raise OutputError(f"{option} {folder} is {what} ({path}); give another folder")


def skip_report_path(target: str | Path) -> str | Path:
    """`OUT.skipped.csv` beside the pool (or the shard's part file)."""
    return storage.join(
        storage.parent(target), storage.name(target).removesuffix(".parquet") + ".skipped.csv"
    )


def write_skip_report(path: str | Path, records: Sequence[tuple[ImageItem, str]]) -> None:
    """The images left out by --skip-bad-images, as CSV (id, path, error), written atomically."""
    out = Output("--out", "remote" if storage.is_url(path) else "file", path)
    with open_output(out) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "path", "error"])
        for item, message in records:
            writer.writerow([item.id, str(item.path), message])


def _resume(writer: ResumablePoolWriter, items: list[ImageItem]) -> tuple[int, int, list[ImageItem]]:
    """(images kept from the interrupted run, images redone because they changed, items still to do)."""
    done = writer.done()
    if not done:
        return 0, 0, items
    current = {item.id: (list(item.stamp) if item.stamp is not None else None) for item in items}
    stale = {image_id for image_id, stamp in done.items() if current.get(image_id, "gone") != stamp}
    gone = {image_id for image_id in stale if image_id not in current}
    writer.discard(stale)
    kept = {image_id for image_id in done if image_id not in stale}
    todo = [item for item in items if item.id not in kept]
    return len(kept), len(stale - gone), todo


def run_extraction(
    task: ExtractionTask, progress: ProgressFn | None = None, warn: Callable[[str], None] | None = None
) -> ExtractionResult:
    """Run a task over the configured images and write (or resume) its pool; never prints. `warn` hears
    `run_warnings` once every check has passed and the model is loaded, before the first image."""
    from uwe_cli.models import resolve_device

    cfg = task.cfg
    _check_common(cfg, task)
    task.validate()
    items = shard_items(list_images(cfg.data), cfg.shard)
    inputs = [cfg.data, *cfg.checkpoint_paths(), *cfg.extra_inputs]
    keys = [item.key for item in items if item.key is not None]
    target = _resolve_target(cfg, inputs, keys)
    for folder, option in task.side_outputs():
        resolve_output(folder, option, inputs=inputs, input_keys=keys, directory=True)
        _check_apart(folder, option, target)
    if cfg.shard is not None and not items:  # a job array larger than the data set: nothing to do
        if warn is not None:
            warn(
                f"shard {cfg.shard[0]}/{cfg.shard[1]} holds none of the images in {cfg.data}; nothing written"
            )
        return ExtractionResult(out=target, task=task.name, rows=0, processed=0, resumed=0)
    device = resolve_device(cfg.device)
    task.load(device)
    for message in run_warnings(cfg) if warn is not None else []:
        warn(message)
    fingerprint = {
        "task": task.name,
        "model": cfg.model,
        "num_classes": cfg.num_classes,
        "weights": cfg.weights,
        "shard": list(cfg.shard) if cfg.shard else None,
        **task.fingerprint(),
    }
    writer = ResumablePoolWriter(target, fingerprint, cfg.part_rows, task.resume_column)
    total = len(items)
    skipped: list[tuple[ImageItem, str]] = []
    processed = 0
    start = time.perf_counter()
    try:
        resumed, redone, todo = _resume(writer, items)
        stamps = {item.id: (list(item.stamp) if item.stamp else None) for item in todo}
        if progress is not None:
            progress(resumed, total)
        if cfg.ray:
            from uwe_cli.cluster.extract import ray_rows

            produced = ray_rows(task, todo)
        else:
            produced = _local_rows(task, todo, device)
        for indices, batches, failures, metadata in produced:
            for index, message in failures:
                if not cfg.skip_bad_images:
                    raise DataError(f"{message} (use --skip-bad-images to leave such files out)")
                skipped.append((todo[index], message))
            _write(writer, batches, metadata, stamps, task.resume_column)
            processed += len(indices)
            if progress is not None:
                progress(resumed + processed + len(skipped), total)
        if not processed and not resumed:
            raise DataError(f"no readable images in {cfg.data} ({len(skipped)} skipped)")
        rows, schema = writer.finish([item.id for item in items] if resumed else None)
    except BaseException:
        writer.abandon()
        raise
    finally:
        task.close()
    seconds = time.perf_counter() - start
    report = None
    if target.is_regular and target.path is not None:
        report_path = skip_report_path(target.path)
        if skipped:
            write_skip_report(report_path, skipped)
            report = report_path
        elif storage.exists(report_path):
            storage.remove(report_path)
    from uwe_cli.schema import decode_metadata

    meta = decode_metadata(schema, str(target))
    return ExtractionResult(
        out=target,
        task=task.name,
        rows=rows,
        processed=processed,
        resumed=resumed,
        redone=redone,
        skipped=skipped,
        skip_report=report,
        seconds=seconds,
        images_per_second=processed / seconds if seconds > 0 else 0.0,
        feature_dim=int(meta.get("feature_dim", 0)),
        num_classes=int(meta.get("num_classes", 0)),
        device=str(device),
        metadata=meta,
        details=task.details(),
    )


Produced = Iterator[
    tuple[list[int], list[pa.RecordBatch], list[tuple[int, str]], Callable[[], dict[str, Any]]]
]


def _local_rows(task: ExtractionTask, todo: list[ImageItem], device: Any) -> Produced:
    """(item positions, their rows, failures, the pool metadata) per loader batch, in this process."""
    cfg = task.cfg
    loader = make_loader(
        todo, task.transform(), task.batch_size, cfg.num_workers, device.type == "cuda", task.stack,
        cfg.io_concurrency,
    )  # fmt: skip
    batch: LoaderBatch
    for batch in loader:
        rows = (
            task.rows([todo[i] for i in batch.indices], batch.payload, device)
            if batch.payload is not None
            else []
        )
        yield batch.indices, rows, batch.failures, task.metadata
    yield [], task.finish(), [], task.metadata


def _write(
    writer: ResumablePoolWriter,
    batches: list[pa.RecordBatch],
    metadata: Callable[[], dict[str, Any]],
    stamps: dict[str, list[int] | None],
    resume_column: str,
) -> None:
    """Hand rows to the writer with the input stamps of their images (fixing the schema first)."""
    if not batches:
        return
    if writer.schema is None:
        writer.set_schema(batches[0].schema.remove_metadata(), metadata())
    for rows in batches:
        keys = set(rows.column(resume_column).to_pylist())
        writer.write(rows, {k: stamps.get(k) for k in keys})
