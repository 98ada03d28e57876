"""Detection head: per kept box, its class distribution and feature, tracked through post-processing.

torchvision's detectors return only boxes, labels and scores: post-processing drops each box's
class distribution and the link to the proposal or anchor that produced it, so neither the box's
uncertainty (paper Eq. 8) nor its feature (Eq. 9) survives. Each family module re-implements its
post-processing operation for operation on the model's own tensors while carrying that index along,
so the kept boxes are bit-for-bit the model's output (tested against `model(images)`). What each
family stores is listed in docs/extract-detection.md.

Uncertainty is computed on a box's *foreground* distribution (see `base.box_uncertainty`): a kept
box is an object by construction; what is uncertain is which object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uwe_cli import storage
from uwe_cli.data import ImageItem
from uwe_cli.errors import DataError, ModelError
from uwe_cli.extract.detection import dense_sigmoid, rcnn, ssd, user  # noqa: F401 - register the families
from uwe_cli.extract.detection.base import (
    FAMILIES,
    DetectorInfo,
    Family,
    ImageDetections,
    box_uncertainty,
    family_of,
    get_family,
)
from uwe_cli.extract.runner import ExtractConfig, ExtractionResult, ExtractionTask, ProgressFn, run_extraction
from uwe_cli.outputs import file_name_for_id
from uwe_cli.schema import detection_schema, fixed_list, record_batch

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILIES",
    "DetectionConfig",
    "DetectionTask",
    "DetectorInfo",
    "ImageDetections",
    "box_uncertainty",
    "detect",
    "detector_info",
    "extract_detection",
]

DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_MAX_DETECTIONS = 100


def detector_info(model: Any) -> DetectorInfo:
    """Number of classes, feature width and score kind, read from the model's layers."""
    return family_of(model).info(model)


def detect(
    model: Any,
    images: list[torch.Tensor],
    score_threshold: float | None = DEFAULT_SCORE_THRESHOLD,
    max_detections: int | None = DEFAULT_MAX_DETECTIONS,
    family: str | None = None,
) -> list[ImageDetections]:
    """Kept detections of a batch of CHW float images in [0, 1], with per-box probs and features.

    `score_threshold` / `max_detections` replace the model's own ``score_thresh`` /
    ``detections_per_img`` inside post-processing (before NMS, where torchvision applies them);
    None keeps the model's settings. The model must be in eval mode; no gradients are taken.
    """
    import torch

    fam = get_family(family) if family is not None else family_of(model)
    if max_detections is not None and max_detections < 1:
        raise ModelError(f"--max-detections must be at least 1, got {max_detections}")
    if not images:
        return []
    with torch.inference_mode():
        if fam.settings_owner is None:
            return fam.run(model, images, score_threshold, max_detections)
        owner = fam.settings_owner(model)
        thresh = float(owner.score_thresh if score_threshold is None else score_threshold)
        dets = int(owner.detections_per_img if max_detections is None else max_detections)
        return fam.run(model, images, thresh, dets)


@dataclass
class DetectionConfig(ExtractConfig):
    """`uwe extract detection`: the common options plus post-processing, resize and drawings."""

    score_threshold: float | None = DEFAULT_SCORE_THRESHOLD
    max_detections: int | None = DEFAULT_MAX_DETECTIONS
    min_size: int | None = None
    max_size: int | None = None
    write_probs: bool = True
    visualize: str | Path | None = None

    def make_task(self) -> DetectionTask:
        return DetectionTask(self)


def _to_tensor(image: Any) -> Any:
    """PIL → float CHW in [0, 1]: torchvision detectors normalise and resize inside the model."""
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image)


def _apply_sizes(module: Any, family: Family, min_size: int | None, max_size: int | None) -> None:
    """--min-size/--max-size replace the resize of GeneralizedRCNNTransform (not for SSD's fixed size)."""
    if min_size is None and max_size is None:
        return
    transform = getattr(module, "transform", None)
    if not family.resizable or transform is None or not hasattr(transform, "min_size"):
        raise ModelError(
            f"--min-size/--max-size apply to R-CNN, RetinaNet and FCOS models, not to a {family.name} detector"
        )
    if min_size is not None:
        transform.min_size = (int(min_size),)
    if max_size is not None:
        transform.max_size = int(max_size)


def infer_num_classes(name: str, checkpoint: str | Path, trust: bool = False) -> int | None:
    """Classes of a torchvision detector's checkpoint, from its classification layer.

    models.load_model infers classes from the last nn.Linear, which for a detector is the box
    regressor (4·K outputs) or absent; the classification layer's outputs are A·K, so compare them
    with a probe model built with the default K.
    """
    import torch

    from uwe_cli.models import build_torchvision, read_checkpoint, unwrap_state_dict

    with storage.local_copy(checkpoint) as local:
        obj = read_checkpoint(local, trust, shown=checkpoint)
    if isinstance(obj, torch.nn.Module) or not isinstance(obj, dict):
        return None
    state = unwrap_state_dict(obj, checkpoint)
    probe, _ = build_torchvision(name, "detection", None, None)
    family = family_of(probe)
    info = family.info(probe)
    if family.classifier_key is None or info.num_classes is None:
        return None
    key = family.classifier_key(probe)
    own = probe.state_dict().get(key)
    theirs = state.get(key)
    if own is None or theirs is None:
        return None
    per_class = own.shape[0] // info.num_classes
    return int(theirs.shape[0] // per_class) if per_class else None


class DetectionTask(ExtractionTask):
    """Detector → one row per kept box (label, score, box, uncertainty, probs, feature), one null-label
    row per image without boxes."""

    name = "detection"
    default_batch_size = 4
    stack = False  # detectors take a list of images of their own sizes
    cfg: DetectionConfig

    def __init__(self, cfg: DetectionConfig) -> None:
        super().__init__(cfg)
        self._schema: pa.Schema | None = None
        self._meta: dict[str, Any] = {}
        self.pending: list[tuple[list[ImageItem], list[ImageDetections]]] = []
        self.detections = self.empty = self.visualized = 0
        self.vis_dir = storage.as_location(cfg.visualize) if cfg.visualize is not None else None

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.score_threshold is not None and not (0.0 <= cfg.score_threshold < 1.0):
            raise DataError(f"--score-threshold must be in [0, 1), got {cfg.score_threshold}")
        if cfg.max_detections is not None and cfg.max_detections < 1:
            raise DataError(f"--max-detections must be at least 1, got {cfg.max_detections}")
        for name, value in (("--min-size", cfg.min_size), ("--max-size", cfg.max_size)):
            if value is not None and value < 1:
                raise DataError(f"{name} must be positive, got {value}")

    def side_outputs(self) -> list[tuple[str | Path, str]]:
        return [(self.vis_dir, "--visualize")] if self.vis_dir is not None else []

    def load(self, device: Any) -> None:
        from uwe_cli.models import load_model

        cfg = self.cfg
        num_classes = cfg.num_classes
        if (
            num_classes is None
            and cfg.checkpoint is not None
            and cfg.model
            and ":" not in cfg.model
            and not cfg.weights
        ):
            num_classes = infer_num_classes(
                cfg.model, storage.as_location(cfg.checkpoint), cfg.trust_checkpoint
            )
        self.loaded = load_model(
            cfg.model, "detection", num_classes, cfg.checkpoint, cfg.weights, device, cfg.trust_checkpoint
        )
        module = self.loaded.module
        self.family = family_of(module)
        _apply_sizes(module, self.family, cfg.min_size, cfg.max_size)
        self.info = self.family.info(module)
        names = list(cfg.class_names) if cfg.class_names else self.loaded.class_names
        self.class_names = names if names is not None else getattr(module, "class_names", None)

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model": self.loaded.name,
            "checkpoint": self.loaded.checkpoint_sha256,
            "score_threshold": cfg.score_threshold,
            "max_detections": cfg.max_detections,
            "min_size": cfg.min_size,
            "max_size": cfg.max_size,
            "probs": cfg.write_probs,
        }

    def transform(self) -> Any:
        return _to_tensor

    def rows(self, items: list[ImageItem], payload: Any, device: Any) -> list[pa.RecordBatch]:
        images = [t.to(device, non_blocking=True) for t in payload]
        try:
            dets = detect(
                self.loaded.module,
                images,
                self.cfg.score_threshold,
                self.cfg.max_detections,
                self.family.name,
            )
        except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise ModelError(
                f"detector {self.loaded.name} failed on a batch starting with {items[0].id}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from None
        for item, image, det in zip(items, payload, dets, strict=True):
            self.detections += len(det)
            self.empty += len(det) == 0
            if self.vis_dir is not None:
                path = storage.join(self.vis_dir, file_name_for_id(item.id, ".png"))
                visualize_detections(image, det, path, self.info.background_class, self.class_names)
                self.visualized += 1
        if self._schema is None:
            k, d = self.info.num_classes, self.info.feature_dim
            for det in dets:
                if k is None and det.probs.dim() == 2 and det.probs.shape[1]:
                    k = int(det.probs.shape[1])
                if d is None and det.features.dim() == 2 and det.features.shape[1]:
                    d = int(det.features.shape[1])
            if k is None or d is None:  # a user detector that found nothing yet: sizes unknown
                self.pending.append((items, dets))
                return []
            background = " (background included, as index 0)" if self.info.background_class == 0 else ""
            self._meta = self.pool_metadata(
                self.loaded.name, self.loaded.checkpoint_sha256, k, self.class_names, d,
                has=f"the detector has {k} class outputs{background}",
                detector_family=self.family.name, background_class=self.info.background_class,
                score_activation=self.info.score_activation, probs=self.family.probs,
                feature=self.family.feature,
                uncertainty="on the foreground class distribution (background dropped, renormalised to sum 1)",
                score_threshold=self.cfg.score_threshold, max_detections=self.cfg.max_detections,
            )  # fmt: skip
            self._schema = detection_schema(d, k if self.cfg.write_probs else None)
        pending, self.pending = self.pending, []
        batches = [
            detections_to_batch(p_items, p_dets, self._schema, self.info.background_class)
            for p_items, p_dets in pending
        ]
        return [*batches, detections_to_batch(items, dets, self._schema, self.info.background_class)]

    def finish(self) -> list[pa.RecordBatch]:
        if self.pending:
            raise ModelError(
                f"detector {self.loaded.name} found no box in any image and does not declare num_classes; "
                "its probs/features sizes are unknown"
            )
        return []

    def metadata(self) -> dict[str, Any]:
        return self._meta

    def details(self) -> dict[str, Any]:
        return {
            "detections": self.detections,
            "empty_images": self.empty,
            "family": self.family.name if hasattr(self, "family") else "",
            "visualized": self.visualized,
        }


def extract_detection(cfg: DetectionConfig, progress: ProgressFn | None = None) -> ExtractionResult:
    """Run the detector over the images and write (or resume) the detection pool; never prints."""
    return run_extraction(DetectionTask(cfg), progress)


def detections_to_batch(
    items: Sequence[ImageItem],
    dets: Sequence[ImageDetections],
    schema: pa.Schema,
    background_class: int | None,
) -> pa.RecordBatch:
    """Pool rows for a batch of images: one per detection, one null-label row per empty image."""
    import torch

    k = schema.field("probs").type.list_size if "probs" in schema.names else None
    d = schema.field("feature").type.list_size
    width = k if k is not None else (dets[0].probs.shape[1] if dets else 0)
    zeros = torch.zeros
    blank = ImageDetections(zeros(1, 4), zeros(1), zeros(1, dtype=torch.int64), zeros(1, width), zeros(1, d))
    kept: list[ImageDetections] = []
    valid: list[bool] = []
    columns: dict[str, Any] = {"id": [], "source": []}
    for item, det in zip(items, dets, strict=True):
        if len(det):
            _check_detections(item.id, det, d, k)
        rows = det if len(det) else blank
        kept.append(rows)
        valid += [len(det) > 0] * len(rows)
        columns["id"] += [item.id] * len(rows)
        columns["source"] += [str(item.path)] * len(rows)
    cat = {
        f: torch.cat([getattr(x, f) for x in kept])
        for f in ("boxes", "scores", "labels", "probs", "features")
    }
    empty = ~np.asarray(valid, dtype=bool)
    mask, list_mask = (empty, pa.array(empty)) if empty.any() else (None, None)
    columns["label"] = pa.array(cat["labels"].numpy().astype(np.int32), pa.int32(), mask=mask)
    columns["score"] = pa.array(cat["scores"].numpy(), pa.float32(), mask=mask)
    columns["box"] = fixed_list(cat["boxes"].numpy(), mask=list_mask)
    columns["feature"] = fixed_list(cat["features"].numpy(), mask=list_mask)
    columns["probs"] = fixed_list(cat["probs"].numpy(), mask=list_mask)
    for name, values in box_uncertainty(cat["probs"], background_class).items():
        columns[name] = pa.array(values.numpy().astype(np.float32), pa.float32(), mask=mask)
    return record_batch(schema, columns)


def _check_detections(image_id: str, det: ImageDetections, d: int, k: int | None) -> None:
    """A detector's output for one image must fit the pool's sizes and be finite."""
    import torch

    if det.features.shape[1] != d:
        raise ModelError(f"image {image_id}: feature length {det.features.shape[1]} differs from {d}")
    if k is not None and det.probs.shape[1] != k:
        raise ModelError(f"image {image_id}: {det.probs.shape[1]} class scores, expected {k}")
    if not all(bool(torch.isfinite(t).all()) for t in (det.probs, det.features, det.boxes, det.scores)):
        raise ModelError(f"the detector produced NaN or Inf for image {image_id}")
    if int(det.labels.min()) < 0 or (k is not None and int(det.labels.max()) >= k):
        raise ModelError(f"image {image_id}: label outside [0, {k}) from the detector")


def visualize_detections(
    image: Any,
    det: ImageDetections,
    path: str | Path,
    background_class: int | None,
    class_names: Sequence[str] | None,
) -> None:
    """Draw every kept box (thin) and, per class, the box of largest bvsb (thick): the box that
    represents its class in the image embedding (Eq. 9, --aggregate max), labelled with class,
    score and u = bvsb."""
    from PIL import ImageDraw
    from torchvision.transforms.functional import to_pil_image

    pil = to_pil_image(image.detach().cpu().clamp(0, 1)).convert("RGB")
    draw = ImageDraw.Draw(pil)
    if len(det):
        u = box_uncertainty(det.probs, background_class)["bvsb"]
        chosen: dict[int, int] = {}
        for i, label in enumerate(det.labels.tolist()):
            if label not in chosen or float(u[i]) > float(u[chosen[label]]):
                chosen[label] = i
        palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
        picked = set(chosen.values())
        for i in range(len(det)):
            label = int(det.labels[i])
            colour = palette[label % len(palette)]
            x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=3 if i in picked else 1)
            if i in picked:
                name = class_names[label] if class_names and label < len(class_names) else str(label)
                draw.text(
                    (x1 + 2, y1 + 1), f"{name} {float(det.scores[i]):.2f} u={float(u[i]):.2f}", fill=colour
                )
    storage.save_png(path, pil)
