"""Classification head: images + classifier(s) → pool rows (id, feature, uncertainty, probs, pred).

The feature is the input of the model's last nn.Linear (the penultimate representation that the
paper and BADGE use), captured by a forward hook so any architecture works unchanged; the
uncertainty columns are computed on the device from softmax probabilities. Ensembles (several
checkpoints) and MC dropout average the probabilities and add a `bald` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uwe_cli import storage
from uwe_cli.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationPreprocess,
    ImageItem,
    check_mean_std,
    classification_preprocess,
    split_weights_transform,
)
from uwe_cli.errors import DataError, ModelError
from uwe_cli.extract.runner import ExtractConfig, ExtractionResult, ExtractionTask, ProgressFn, run_extraction
from uwe_cli.models import (
    ForwardTap,
    LoadedModel,
    TappedModel,
    enable_dropout,
    find_module,
    last_linear_name,
    load_model,
)
from uwe_cli.schema import record_batch, unit_schema
from uwe_cli.uncertainty import all_measures, bald


@dataclass
class ClassificationConfig(ExtractConfig):
    """`uwe extract classification`: the common options plus preprocessing, ensembles and MC dropout."""

    checkpoints: Sequence[str | Path] = ()  # several: an ensemble (mean probabilities, bald)
    feature_layer: str | None = None
    image_size: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    mc_dropout: int = 0
    write_probs: bool = True

    def checkpoint_paths(self) -> list[str | Path]:
        return [storage.as_location(c) for c in self.checkpoints] + super().checkpoint_paths()

    def make_task(self) -> ClassificationTask:
        return ClassificationTask(self)


def _split_output(output: Any) -> tuple[Any, Any]:
    """(logits, features or None) from a tensor, a (logits, features) tuple, or a dict."""
    if isinstance(output, dict):
        logits = output.get("logits", output.get("out"))
        return logits, output.get("features", output.get("feature"))
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


class Member(TappedModel):
    """One ensemble member with its feature tap."""

    def __init__(self, loaded: LoadedModel, feature_layer: str | None) -> None:
        super().__init__(loaded)
        module = loaded.module
        if loaded.scripted:
            if feature_layer:
                raise ModelError(
                    f"--feature-layer cannot hook inside TorchScript file {loaded.checkpoint}; "
                    "export a model whose forward returns (logits, features)"
                )
            return
        if feature_layer:
            self.tap = ForwardTap([find_module(module, feature_layer)], use_input=False)
        else:
            head = last_linear_name(module)
            if head is not None:
                self.tap = ForwardTap([find_module(module, head)])

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


class ClassificationTask(ExtractionTask):
    """Classifier(s) → per image: feature (input of the last Linear), uncertainty, probs, pred."""

    name = "classification"
    default_batch_size = 64
    cfg: ClassificationConfig

    def __init__(self, cfg: ClassificationConfig) -> None:
        super().__init__(cfg)
        self.preprocess: ClassificationPreprocess | None = None
        self.members: list[Member] = []
        self._schema: pa.Schema | None = None
        self._meta: dict[str, Any] = {}

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.mc_dropout < 0:
            raise ModelError(f"--mc-dropout must be ≥ 0, got {cfg.mc_dropout}")
        if cfg.image_size is not None and cfg.image_size < 1:
            raise DataError(f"--image-size must be positive, got {cfg.image_size}")
        if cfg.resize is not None and cfg.resize < 1:
            raise DataError(f"--resize must be positive, got {cfg.resize}")
        if cfg.mean is not None or cfg.std is not None:
            check_mean_std(cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD)
        if cfg.checkpoint is not None and cfg.checkpoints:
            raise ModelError("give the checkpoints of an ensemble as a list (checkpoints), not both forms")

    def load(self, device: Any) -> None:
        cfg = self.cfg
        paths: list[str | Path | None] = list(cfg.checkpoint_paths()) or [None]
        self.loaded = [
            load_model(
                cfg.model, "classification", cfg.num_classes, ckpt, cfg.weights, device, cfg.trust_checkpoint
            )
            for ckpt in paths
        ]
        self.members = [Member(m, cfg.feature_layer) for m in self.loaded]
        if cfg.mc_dropout:
            for m in self.loaded:
                if not enable_dropout(m.module):
                    raise ModelError(f"--mc-dropout: model {m.name} has no dropout layers")
        self.preprocess, self.transform_desc = _resolve_transform(cfg, self.loaded[0])
        self.class_names = list(cfg.class_names) if cfg.class_names else self.loaded[0].class_names
        self.with_bald = len(self.members) * max(cfg.mc_dropout, 1) > 1
        self.use_amp = cfg.amp and device.type == "cuda"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": self.loaded[0].name,
            "checkpoints": [m.checkpoint_sha256 for m in self.loaded],
            "feature_layer": self.cfg.feature_layer,
            "transform": self.transform_desc,
            "mc_dropout": self.cfg.mc_dropout,
            "probs": self.cfg.write_probs,
        }

    def transform(self) -> Any:
        assert self.preprocess is not None
        return self.preprocess.geometry

    def rows(self, items: list[ImageItem], payload: Any, device: Any) -> list[pa.RecordBatch]:
        import torch

        assert self.preprocess is not None
        images = self.preprocess.normalize(payload.to(device, non_blocking=True))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            probs, feats, extra = _predict(self.members, images, self.cfg.mc_dropout)
        if self._schema is None:
            shas = [m.checkpoint_sha256 for m in self.loaded]
            self._meta = self.pool_metadata(
                self.loaded[0].name, shas[0] if len(shas) == 1 else shas, probs.shape[1], self.class_names,
                feats.shape[1], feature_layer=self.cfg.feature_layer or "input of last nn.Linear",
                ensemble_size=len(self.loaded), mc_dropout=self.cfg.mc_dropout,
            )  # fmt: skip
            extra_columns = ["bald"] if self.with_bald else []
            self._schema = unit_schema(
                feats.shape[1], probs.shape[1] if self.cfg.write_probs else None, extra_columns, pred=True
            )
        return [_to_batch(items, probs, feats, extra, self._schema, self.cfg.write_probs)]

    def metadata(self) -> dict[str, Any]:
        return self._meta

    def close(self) -> None:
        for m in self.members:
            m.close()


def extract_classification(cfg: ClassificationConfig, progress: ProgressFn | None = None) -> ExtractionResult:
    """Run the classifier(s) over the images and write (or resume) the pool; never prints."""
    return run_extraction(ClassificationTask(cfg), progress)


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
    image_size = cfg.image_size if cfg.image_size is not None else 224
    mean = tuple(cfg.mean) if cfg.mean is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg.std is not None else IMAGENET_STD
    transform = classification_preprocess(image_size, cfg.resize, mean, std)
    desc = {"image_size": image_size, "resize": cfg.resize, "mean": list(mean), "std": list(std)}
    return transform, desc


def _predict(members: list[Member], images: Any, mc_dropout: int) -> tuple[Any, Any, dict[str, Any]]:
    """Mean probabilities over members (× MC passes), the first member's feature, and BALD if sampled."""
    import torch

    samples = []
    feats = None
    for j, member in enumerate(members):
        modules = member.loaded.module.modules() if mc_dropout else []
        dropouts = [m for m in modules if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        for m in dropouts:
            m.eval()
        logits, f = member.forward(images)  # with MC dropout, a deterministic pass for a noise-free feature
        for m in dropouts:
            m.train()
        feats = f if j == 0 else feats
        passes = [member.forward(images)[0] for _ in range(mc_dropout)] if mc_dropout else [logits]
        samples += [p.float().softmax(dim=1) for p in passes]
    if feats is None:
        loaded = members[0].loaded
        fix = (
            "a TorchScript model must return (logits, features)"
            if loaded.scripted
            else "name a layer with --feature-layer"
        )
        raise ModelError(f"model {loaded.name} has no nn.Linear head to take features from; {fix}")
    if len({tuple(p.shape) for p in samples}) > 1:
        counts = sorted({int(p.shape[1]) for p in samples})
        raise ModelError(
            f"the ensemble's models disagree on the number of classes ({', '.join(map(str, counts))}); "
            "give checkpoints of one architecture and head"
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
    columns: dict[str, Any] = {
        name: t.float().cpu().numpy() for name, t in all_measures(probs, dim=1).items()
    }
    columns.update({name: t.float().cpu().numpy() for name, t in extra.items()})
    columns["id"] = [item.id for item in items]
    columns["source"] = [str(item.path) for item in items]
    columns["feature"] = feats.cpu().numpy()
    if with_probs:
        columns["probs"] = probs.cpu().numpy()
    columns["pred"] = probs.argmax(dim=1).cpu().numpy().astype(np.int32)
    return record_batch(schema, columns)
