"""`uwe extract ... --ray`: the model runs in Ray Data actors, the rest of the run stays local.

The driver keeps everything that makes a run safe and resumable (listing, output checks, the resume
decision, the writer, bad-image bookkeeping, progress); only the two expensive stages move to the
cluster, as Ray Data stages in pool order: decoding and the task's transform in CPU tasks, then the
task's forward pass in `--workers` actors, each loading the model once on its device (one GPU each
with `--gpus-per-worker 1`). Rows come back to the driver as Arrow IPC, in order, and are written
as parts exactly as a local run writes them, so an interrupted run resumes the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli import storage
from uwe_cli.cluster.connect import check_resources, ray_session
from uwe_cli.data import ImageDataset, ImageItem
from uwe_cli.errors import ModelError

_ITEMS: dict[str, list[ImageItem]] = {}


def _items(ref: Any) -> list[ImageItem]:
    """The run's item list from the object store, fetched once per worker process."""
    import ray

    key = ref.hex()
    if key not in _ITEMS:
        _ITEMS.clear()
        _ITEMS[key] = ray.get(ref)
    return _ITEMS[key]


def decode(
    batch: dict[str, np.ndarray], items: Any, transform: Any, storage_options: dict[str, Any]
) -> dict[str, np.ndarray]:
    """CPU stage: read and transform images; a sample travels pickled, a failure as its message."""
    storage.configure(storage_options)  # the driver's --storage-option, in this worker process
    dataset = ImageDataset(_items(items), transform)
    payload, errors = [], []
    for index in batch["id"]:
        _, sample, error = dataset[int(index)]
        payload.append(pickle.dumps(sample) if error is None else b"")
        errors.append(error or "")
    return {
        "index": batch["id"],
        "payload": np.array(payload, dtype=object),
        "error": np.array(errors, dtype=object),
    }


class Infer:
    """Actor stage: the task's model, loaded once per actor; a batch of samples in, IPC rows out."""

    def __init__(self, cfg: Any, items: Any, storage_options: dict[str, Any]) -> None:
        from uwe_cli.models import resolve_device

        storage.configure(storage_options)  # a --checkpoint URL is read here
        self.items = _items(items)
        self.task = cfg.make_task()
        self.task.validate()
        self.device = resolve_device("cuda" if cfg.gpus_per_worker > 0 else "cpu")
        self.task.load(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        good = [i for i, e in enumerate(batch["error"]) if not e]
        failures = [(int(batch["index"][i]), str(e)) for i, e in enumerate(batch["error"]) if e]
        indices = [int(batch["index"][i]) for i in good]
        ipc = b""
        if good:
            samples = [pickle.loads(batch["payload"][i]) for i in good]
            payload = torch.stack(samples) if self.task.stack else samples
            rows = self.task.rows([self.items[i] for i in indices], payload, self.device)
            if not rows:
                raise ModelError(
                    "with --ray the detector must declare num_classes (its first images had no boxes)"
                )
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, rows[0].schema) as writer:
                for r in rows:
                    writer.write_batch(r)
            ipc = sink.getvalue().to_pybytes()
        return {
            "indices": np.array([json.dumps(indices)], dtype=object),
            "failures": np.array([json.dumps(failures)], dtype=object),
            "ipc": np.array([ipc], dtype=object),
            "metadata": np.array([json.dumps(self.task.metadata(), default=str)], dtype=object),
        }


def ray_rows(
    task: Any, todo: list[ImageItem]
) -> Iterator[tuple[list[int], list[pa.RecordBatch], list[Any], Any]]:
    """(item positions, their rows, failures, metadata) per batch, computed on the Ray cluster.

    `task` is the driver's `ExtractionTask` (loaded: its transform and fingerprint are the run's)."""
    cfg = task.cfg
    if not todo:
        return
    with ray_session(cfg.ray_address) as ray:
        total_cpus = ray.cluster_resources().get("CPU", 0.0)
        cpus = min(1.0, total_cpus / (cfg.workers + 1)) if total_cpus else 0.0
        check_resources(ray, cfg.workers, cpus, cfg.gpus_per_worker)
        import logging

        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO/WARNING lines are not for users
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in pool order
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        items = ray.put(todo)
        blocks = max(1, min(len(todo) // max(task.batch_size, 1), 8 * cfg.workers))
        # from_items builds the blocks in the driver: no read task competing with the actors for CPUs
        dataset = ray.data.from_items([{"id": i} for i in range(len(todo))], override_num_blocks=blocks)
        dataset = dataset.map_batches(
            decode,
            fn_args=(items, task.transform(), storage.options()),
            batch_size=task.batch_size,
            num_cpus=min(cpus, 0.5) or 0.5,
        )
        dataset = dataset.map_batches(
            Infer,
            fn_constructor_args=(cfg, items, storage.options()),
            batch_size=task.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            num_cpus=cpus,
            num_gpus=cfg.gpus_per_worker,
        )
        with native_stderr_hidden():
            yield from _results(dataset)


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Ray's C++ core writes notices straight to file descriptor 2 (e.g. at error level, that a
    restartable actor's arguments live in the object store); uwe reports failures itself. So fd 2 goes
    to /dev/null while the dataset runs, and Python's sys.stderr (progress, warnings) keeps the
    original destination."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    old = sys.stderr
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        replaced = old.fileno() == 2
    except (AttributeError, ValueError, io.UnsupportedOperation):
        replaced = False  # captured (tests): nothing of ours goes to fd 2 anyway
    try:
        if not replaced:
            yield
            return
        with open(
            os.dup(saved), "w", encoding=old.encoding, errors="backslashreplace", buffering=1
        ) as stream:
            sys.stderr = stream
            try:
                yield
            finally:
                sys.stderr = old
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _results(dataset: Any) -> Iterator[tuple[list[int], list[pa.RecordBatch], list[tuple[int, str]], Any]]:
    for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for k in range(len(out["indices"])):
            rows: list[pa.RecordBatch] = []
            if out["ipc"][k]:
                rows = list(pa.ipc.open_stream(pa.py_buffer(out["ipc"][k])))
            metadata = json.loads(out["metadata"][k])
            failures = [(int(i), str(m)) for i, m in json.loads(out["failures"][k])]
            yield json.loads(out["indices"][k]), rows, failures, (lambda m=metadata: m)
