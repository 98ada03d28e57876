"""Classification head: images + classifier(s) → pool rows (id, feature, uncertainty, probs, pred).

The feature is the input of the model's last nn.Linear (the penultimate representation that the
paper and BADGE use), captured by a forward hook so any architecture works unchanged; the
uncertainty columns are computed on the device from softmax probabilities. Ensembles (several
checkpoints) and MC dropout average the probabilities and add a `bald` column.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli import __version__
from uwe_cli.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationPreprocess,
    ImageItem,
    classification_preprocess,
    list_images,
    make_loader,
    shard_items,
    split_weights_transform,
)
from uwe_cli.errors import DataError, ModelError
from uwe_cli.extract.common import finish_run, open_writer, record_failures
from uwe_cli.extract.writer import DEFAULT_PART_ROWS, shard_target
from uwe_cli.models import (
    LoadedModel,
    enable_dropout,
    find_module,
    last_linear_name,
    load_model,
    resolve_device,
)
from uwe_cli.uncertainty import all_measures, bald

ProgressFn = Callable[[int, int], None]


@dataclass
class ClassificationConfig:
    """Everything `uwe extract classification` accepts; None means "the default" (see README)."""

    data: str | Path
    out: str | Path
    model: str | None = None
    checkpoints: Sequence[str | Path] = ()
    num_classes: int | None = None
    weights: str | None = None
    feature_layer: str | None = None
    class_names: Sequence[str] | None = None
    image_size: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    amp: bool = False
    mc_dropout: int = 0
    shard: tuple[int, int] | None = None
    skip_bad_images: bool = False
    write_probs: bool = True
    part_rows: int = DEFAULT_PART_ROWS


@dataclass
class ExtractionResult:
    """What a run did, for the CLI summary and for callers who chain steps."""

    out: Path
    rows: int
    processed: int
    resumed: int
    skipped: list[tuple[ImageItem, str]] = field(default_factory=list)
    skip_report: Path | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0
    feature_dim: int = 0
    num_classes: int = 0
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)


class FeatureTap:
    """Forward hook keeping the last value seen at one module: its input (default head) or output."""

    def __init__(self, module: Any, use_input: bool) -> None:
        self.value: Any = None
        self.use_input = use_input
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        value = inputs[0] if self.use_input else output
        if isinstance(value, (tuple, list)):
            value = value[0]
        if isinstance(value, dict):
            value = next(iter(value.values()))
        self.value = value

    def take(self) -> Any:
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()


def _split_output(output: Any) -> tuple[Any, Any]:
    """(logits, features or None) from a tensor, a (logits, features) tuple, or a dict."""
    if isinstance(output, dict):
        logits = output.get("logits", output.get("out"))
        return logits, output.get("features", output.get("feature"))
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


class Member:
    """One ensemble member with its feature tap."""

    def __init__(self, loaded: LoadedModel, feature_layer: str | None) -> None:
        self.loaded = loaded
        self.tap: FeatureTap | None = None
        module = loaded.module
        if loaded.scripted:
            if feature_layer:
                raise ModelError(
                    f"--feature-layer cannot hook inside TorchScript file {loaded.checkpoint}; "
                    "export a model whose forward returns (logits, features)"
                )
            return
        if feature_layer:
            self.tap = FeatureTap(find_module(module, feature_layer), use_input=False)
        else:
            head = last_linear_name(module)
            if head is not None:
                self.tap = FeatureTap(find_module(module, head), use_input=True)

    def forward(self, images: Any) -> tuple[Any, Any]:
        """(logits (B, K), flattened features (B, d) or None)."""
        logits, feats = _split_output(self.loaded.module(images))
        if self.tap is not None:
            feats = self.tap.take()
        if logits is None or logits.ndim != 2:
            shape = None if logits is None else tuple(logits.shape)
            raise ModelError(
                f"model {self.loaded.name} must output (batch, classes) logits, got shape {shape}"
            )
        if feats is not None:
            feats = feats.reshape(feats.shape[0], -1)
        return logits, feats

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def _resolve_transform(
    cfg: ClassificationConfig, first: LoadedModel
) -> tuple[ClassificationPreprocess, dict[str, Any]]:
    """The preprocessing and its description (which goes into the resume fingerprint).

    Split in two (see ClassificationPreprocess): uint8 geometry in the loader, float conversion and
    normalisation once per batch on the device; the values equal the one-image transform's.
    """
    custom = any(v is not None for v in (cfg.image_size, cfg.resize, cfg.mean, cfg.std))
    if first.weights_transform is not None and not custom:
        desc = {"weights_transform": str(first.weights_transform)}
        return split_weights_transform(first.weights_transform), desc
    image_size = cfg.image_size or 224
    mean = tuple(cfg.mean) if cfg.mean is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg.std is not None else IMAGENET_STD
    transform = classification_preprocess(image_size, cfg.resize, mean, std)
    desc = {"image_size": image_size, "resize": cfg.resize, "mean": list(mean), "std": list(std)}
    return transform, desc


def _schema(feature_dim: int, num_classes: int, with_bald: bool, with_probs: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("feature", pa.list_(pa.float32(), feature_dim), nullable=False),
        pa.field("entropy", pa.float32()),
        pa.field("bvsb", pa.float32()),
        pa.field("least_confidence", pa.float32()),
    ]
    if with_bald:
        fields.append(pa.field("bald", pa.float32()))
    if with_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32(), num_classes)))
    fields.append(pa.field("pred", pa.int32()))
    return pa.schema(fields)


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def extract_classification(cfg: ClassificationConfig, progress: ProgressFn | None = None) -> ExtractionResult:
    """Run the classifier(s) over the images and write (or resume) the pool; never prints."""
    import torch

    if cfg.mc_dropout < 0:
        raise ModelError(f"--mc-dropout must be ≥ 0, got {cfg.mc_dropout}")
    items = shard_items(list_images(cfg.data), cfg.shard)
    target = shard_target(cfg.out, cfg.shard) if cfg.shard else Path(cfg.out)
    if cfg.shard is None and target.is_dir():
        raise DataError(f"--out {target} is a directory; give a .parquet file (or use --shard K/N)")

    device = resolve_device(cfg.device)
    checkpoints: list[str | Path | None] = list(cfg.checkpoints) or [None]
    loaded = [
        load_model(cfg.model, "classification", cfg.num_classes, ckpt, cfg.weights, device)
        for ckpt in checkpoints
    ]
    members = [Member(m, cfg.feature_layer) for m in loaded]
    if cfg.mc_dropout:
        for m in loaded:
            if not enable_dropout(m.module):
                raise ModelError(f"--mc-dropout: model {m.name} has no dropout layers")
    transform, transform_desc = _resolve_transform(cfg, loaded[0])
    class_names = list(cfg.class_names) if cfg.class_names else loaded[0].class_names
    n_samples = len(members) * max(cfg.mc_dropout, 1)
    with_bald = n_samples > 1

    fingerprint = {
        "task": "classification",
        "model": loaded[0].name,
        "checkpoints": [m.checkpoint_sha256 for m in loaded],
        "num_classes": cfg.num_classes,
        "weights": cfg.weights,
        "feature_layer": cfg.feature_layer,
        "transform": transform_desc,
        "mc_dropout": cfg.mc_dropout,
        "probs": cfg.write_probs,
        "shard": list(cfg.shard) if cfg.shard else None,
    }
    writer, done, todo = open_writer(target, fingerprint, items, cfg.part_rows)
    total = len(items)
    use_amp = cfg.amp and device.type == "cuda"
    loader = make_loader(
        todo, transform.geometry, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda"
    )

    skipped: list[tuple[ImageItem, str]] = []
    processed = 0
    meta: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        if progress is not None:
            progress(len(done), total)
        with torch.inference_mode():
            for batch in loader:
                record_failures(batch.failures, todo, skipped, cfg.skip_bad_images)
                if batch.images is not None:
                    images = transform.normalize(batch.images.to(device, non_blocking=True))
                    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                        probs, feats, extra = _predict(members, images, cfg.mc_dropout)
                    batch_items = [todo[i] for i in batch.indices]
                    if writer.schema is None:
                        meta = _metadata(cfg, loaded, class_names, feats.shape[1], probs.shape[1], with_bald)
                        writer.set_schema(
                            _schema(feats.shape[1], probs.shape[1], with_bald, cfg.write_probs), meta
                        )
                    writer.write(_to_batch(batch_items, probs, feats, extra, writer.schema, cfg.write_probs))
                    processed += len(batch_items)
                if progress is not None:
                    progress(len(done) + processed + len(skipped), total)
        if not processed and not done:
            raise DataError(f"no readable images in {cfg.data} ({len(skipped)} skipped)")
        rows = writer.finish()
    except BaseException:
        writer.abandon()
        raise
    finally:
        for m in members:
            m.close()
    summary = finish_run(
        target,
        start=start,
        rows=rows,
        processed=processed,
        resumed=len(done),
        skipped=skipped,
        meta=meta,
        device=device,
    )
    return ExtractionResult(**summary)


def _predict(members: list[Member], images: Any, mc_dropout: int) -> tuple[Any, Any, dict[str, Any]]:
    """Mean probabilities over members (× MC passes), the first member's feature, and BALD if sampled."""
    import torch

    samples = []
    feats = None
    for j, member in enumerate(members):
        if mc_dropout:
            module = member.loaded.module
            dropouts = [m for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
            for m in dropouts:
                m.eval()
            _, f = member.forward(images)  # deterministic pass for a noise-free feature
            for m in dropouts:
                m.train()
            if j == 0:
                feats = f
            for _ in range(mc_dropout):
                logits, _ = member.forward(images)
                samples.append(logits.float().softmax(dim=1))
        else:
            logits, f = member.forward(images)
            if j == 0:
                feats = f
            samples.append(logits.float().softmax(dim=1))
    if feats is None:
        raise ModelError(
            f"model {members[0].loaded.name} has no nn.Linear head to take features from; "
            "name a layer with --feature-layer"
        )
    stack = torch.stack(samples)
    probs = stack.mean(dim=0)
    extra: dict[str, Any] = {}
    if len(samples) > 1:
        extra["bald"] = bald(stack, dim=1)
    feats = feats.float()
    if not bool(torch.isfinite(probs).all()) or not bool(torch.isfinite(feats).all()):
        raise ModelError(f"model {members[0].loaded.name} produced NaN or Inf outputs")
    return probs, feats, extra


def _to_batch(
    items: list[ImageItem], probs: Any, feats: Any, extra: dict[str, Any], schema: pa.Schema, with_probs: bool
) -> pa.RecordBatch:
    columns: dict[str, Any] = {name: t for name, t in all_measures(probs, dim=1).items()}
    columns.update(extra)
    host = {name: t.float().cpu().numpy() for name, t in columns.items()}
    arrays: dict[str, pa.Array] = {
        "id": pa.array([item.id for item in items], pa.string()),
        "source": pa.array([str(item.path) for item in items], pa.string()),
        "feature": _fixed_list(feats.cpu().numpy()),
    }
    for name, values in host.items():
        arrays[name] = pa.array(values.astype(np.float32))
    if with_probs:
        arrays["probs"] = _fixed_list(probs.cpu().numpy())
    arrays["pred"] = pa.array(probs.argmax(dim=1).cpu().numpy().astype(np.int32))
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


def _metadata(
    cfg: ClassificationConfig,
    loaded: list[LoadedModel],
    class_names: list[str] | None,
    feature_dim: int,
    num_classes: int,
    with_bald: bool,
) -> dict[str, Any]:
    if class_names is not None and len(class_names) != num_classes:
        raise ModelError(f"{len(class_names)} class names given but the model has {num_classes} classes")
    shas = [m.checkpoint_sha256 for m in loaded]
    return {
        "task": "classification",
        "model": loaded[0].name,
        "checkpoint_sha256": shas[0] if len(shas) == 1 else shas,
        "num_classes": num_classes,
        "class_names": class_names,
        "feature_dim": feature_dim,
        "feature_layer": cfg.feature_layer or "input of last nn.Linear",
        "weights": cfg.weights,
        "ensemble_size": len(loaded),
        "mc_dropout": cfg.mc_dropout,
        "uwe_version": __version__,
    }
