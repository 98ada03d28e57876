"""Detection head: per kept box, its class distribution and feature, tracked through post-processing.

torchvision's detectors return only ``boxes``, ``labels`` and ``scores``: their
``postprocess_detections`` throws away the class distribution of each box and the link to the
proposal or anchor that produced it, so neither the box's uncertainty (paper Eq. 8) nor its feature
(Eq. 9) can be recovered from the standard output. This module runs the detector's own components
(transform, backbone, RPN / heads, anchors) and re-implements each family's post-processing
operation for operation -- the same score filter, top-k, small-box removal, batched NMS and
detections-per-image cut, on the same tensors -- while carrying the index of the proposal/anchor
along. The kept boxes are therefore bit-for-bit the model's standard output boxes (the tests check
this against ``model(images)``), and for each we gather:

=====================  ==========================================  ===================================
family                 ``probs`` (K = model's class outputs)       ``feature``
=====================  ==========================================  ===================================
Faster / Mask /        softmax over the K classes (index 0 =       input of ``roi_heads.box_predictor``
Keypoint R-CNN         background) of the box's proposal           for that proposal (box-head output,
                                                                   1,024-d for the FPN models)
RetinaNet (v1, v2)     sigmoid of the K class logits at the        input of the classification head's
                       anchor that produced the box                final conv (``cls_logits``) at the
                                                                   anchor's location (256-d)
FCOS                   sqrt(sigmoid(class logit) *                 input of ``cls_logits`` at the
                       sigmoid(centerness)) per class at the       location (256-d)
                       location -- exactly what FCOS ranks by
SSD, SSDlite           softmax over the K classes (index 0 =       input of the final classification
                       background) at the default box              conv of the box's feature level at
                                                                   its location, zero-padded to the
                                                                   widest level
=====================  ==========================================  ===================================

Labels keep the model's own numbering (torchvision class 0 = background for the softmax families),
so they match the checkpoint's category list and the user's annotation IDs; ``num_classes`` in the
pool metadata is the model's number of class outputs K (background included where it exists).

Uncertainty of a box is computed on its *foreground* distribution: the background column (softmax
families) is dropped and the rest renormalised to sum 1; for sigmoid families the K independent
scores are normalised to sum 1. A kept box is an object by construction (its score carries the
objectness); what is uncertain is which object, which is what BvSB measures (Brust et al., 2018,
on class probabilities conditional on objectness). Normalising the sigmoid scores instead of
treating the classes as K independent binary problems keeps ``bvsb`` unchanged (a ratio is scale
invariant), and keeps ``entropy`` and ``least_confidence`` on the same [0, log K] / [0, 1) scales
as for the softmax families, so that pools of different detectors read alike; a sum of K binary
entropies would grow with K and be dominated by the many near-zero classes.

A user's own detector plugs in by returning, in eval mode, for a list of CHW float images in
[0, 1], one dict per image with ``boxes`` (N×4, x1 y1 x2 y2 in input pixels), ``labels`` (N),
``scores`` (N), ``probs`` (N×K) and ``features`` (N×d): these are stored as they are (see
`UserDetector`).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uwe_cli import __version__
from uwe_cli.data import Batch, ImageDataset, ImageItem, list_images, shard_items
from uwe_cli.errors import DataError, ModelError, UweError
from uwe_cli.extract.common import finish_run, open_writer, record_failures
from uwe_cli.extract.writer import DEFAULT_PART_ROWS, shard_target
from uwe_cli.outputs import atomic_path

if TYPE_CHECKING:
    import torch

FAMILIES = ("rcnn", "retinanet", "fcos", "ssd", "user")
DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_MAX_DETECTIONS = 100
USER_KEYS = ("boxes", "labels", "scores", "probs", "features")
ProgressFn = Callable[[int, int], None]


@dataclass
class ImageDetections:
    """The kept detections of one image, on the CPU, boxes in input-image pixels."""

    boxes: torch.Tensor  # (n, 4) float32
    scores: torch.Tensor  # (n,) float32
    labels: torch.Tensor  # (n,) int64
    probs: torch.Tensor  # (n, K) float32
    features: torch.Tensor  # (n, d) float32

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class DetectorInfo:
    """What the pool metadata needs to know about a detector."""

    family: str
    num_classes: int | None
    feature_dim: int | None
    background_class: int | None
    score_activation: str  # "softmax" | "sigmoid" | "user"


# --------------------------------------------------------------------------------------------------
# uncertainty


def box_uncertainty(probs: torch.Tensor, background_class: int | None) -> dict[str, torch.Tensor]:
    """entropy / bvsb / least_confidence of each row of `probs` on its foreground distribution.

    The background column is dropped and the remaining scores renormalised to sum 1 (see the
    module docstring for why); a row whose foreground scores are all zero counts as uniform
    (maximally uncertain) rather than producing NaN.
    """
    import torch

    from uwe_cli.uncertainty import all_measures

    p = probs.to(torch.float32)
    if background_class is not None and p.shape[1] > 1:
        keep = [c for c in range(p.shape[1]) if c != background_class]
        p = p[:, keep]
    p = p.clamp_min(0.0)
    total = p.sum(dim=1, keepdim=True)
    zero = (total <= 0).squeeze(1)
    q = p / total.clamp_min(torch.finfo(torch.float32).tiny)
    if zero.any():
        q[zero] = 1.0 / max(p.shape[1], 1)
    return all_measures(q, dim=1)


# --------------------------------------------------------------------------------------------------
# family detection


def detector_family(model: Any) -> str:
    """Which post-processing to mirror: by torchvision class, else the user-detector contract."""
    from torchvision.models.detection.faster_rcnn import FasterRCNN
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, FasterRCNN):  # Mask R-CNN and Keypoint R-CNN subclass it
        return "rcnn"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, SSD):  # SSDlite is an SSD with other heads
        return "ssd"
    return "user"


def _final_conv(module: Any) -> Any:
    """The last Conv2d of an SSD / SSDlite prediction block (the block itself for plain SSD)."""
    import torch.nn as nn

    last = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise ModelError(f"SSD classification block without a Conv2d: {type(module).__name__}")
    return last


def detector_info(model: Any) -> DetectorInfo:
    """Number of classes, feature width and score kind, read from the model's layers."""
    family = detector_family(model)
    if family == "rcnn":
        predictor = model.roi_heads.box_predictor
        cls = getattr(predictor, "cls_score", None)
        k = getattr(cls, "out_features", None)
        d = getattr(cls, "in_features", None)
        return DetectorInfo(family, k, d, 0, "softmax")
    if family in ("retinanet", "fcos"):
        head = model.head.classification_head
        return DetectorInfo(family, int(head.num_classes), int(head.cls_logits.in_channels), None, "sigmoid")
    if family == "ssd":
        head = model.head.classification_head
        widths = [int(_final_conv(m).in_channels) for m in head.module_list]
        return DetectorInfo(family, int(head.num_columns), max(widths), 0, "softmax")
    k = getattr(model, "num_classes", None)
    bg = getattr(model, "background_class", None)
    return DetectorInfo(
        "user", int(k) if k is not None else None, None, int(bg) if bg is not None else None, "user"
    )


# --------------------------------------------------------------------------------------------------
# shared pieces


class _InputRecorder:
    """Forward hooks that record the input of given modules, call after call (one call per level)."""

    def __init__(self, modules: Sequence[Any]) -> None:
        self.inputs: list[Any] = []
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self.inputs.append(args[0])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _backbone_features(model: Any, tensors: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    import torch

    features = model.backbone(tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return features


def _gather_level_features(
    level_maps: list[torch.Tensor],
    anchors_per_location: list[int],
    image: int,
    anchor_idx: torch.Tensor,
    width: int,
) -> torch.Tensor:
    """Feature vectors (n, width) at the locations of global anchor indices of one image.

    Heads lay their outputs out level after level, each level as (H, W, A) flattened, so a global
    index falls in level l at location (idx - offset_l) // A_l = h * W_l + w. Narrower levels are
    zero-padded to `width` (SSD levels differ in channels).
    """
    import torch

    sizes = [m.shape[2] * m.shape[3] * a for m, a in zip(level_maps, anchors_per_location, strict=True)]
    out = torch.zeros((anchor_idx.numel(), width), dtype=level_maps[0].dtype, device=level_maps[0].device)
    start = 0
    for fmap, a, size in zip(level_maps, anchors_per_location, sizes, strict=True):
        sel = (anchor_idx >= start) & (anchor_idx < start + size)
        if sel.any():
            loc = torch.div(anchor_idx[sel] - start, a, rounding_mode="floor")
            w_l = fmap.shape[3]
            h = torch.div(loc, w_l, rounding_mode="floor")
            w = loc % w_l
            out[sel, : fmap.shape[1]] = fmap[image, :, h, w].T
        start += size
    return out


def _finish(
    model: Any,
    per_image: list[dict[str, torch.Tensor]],
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
) -> list[ImageDetections]:
    """Rescale boxes to input pixels with the model's own transform and move results to the CPU."""
    import torch

    rescaled = model.transform.postprocess(
        [{"boxes": d["boxes"]} for d in per_image], image_sizes, original_sizes
    )
    out = []
    for d, r in zip(per_image, rescaled, strict=True):
        out.append(
            ImageDetections(
                boxes=r["boxes"].detach().to("cpu", torch.float32),
                scores=d["scores"].detach().to("cpu", torch.float32),
                labels=d["labels"].detach().to("cpu", torch.int64),
                probs=d["probs"].detach().to("cpu", torch.float32),
                features=d["features"].detach().to("cpu", torch.float32),
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# two-stage: Faster / Mask / Keypoint R-CNN


def _run_rcnn(
    model: Any, images: list[torch.Tensor], score_thresh: float, max_dets: int
) -> list[ImageDetections]:
    """GeneralizedRCNN.forward up to the box head, then RoIHeads.postprocess_detections with the
    proposal index carried along. Masks and keypoints are not computed (boxes only)."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import boxes as box_ops

    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = model.transform(images)
    features = _backbone_features(model, image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    rh = model.roi_heads
    box_features = rh.box_roi_pool(features, proposals, image_list.image_sizes)
    box_features = rh.box_head(box_features)
    class_logits, box_regression = rh.box_predictor(box_features)
    box_features = box_features.flatten(start_dim=1)  # what FastRCNNPredictor itself consumes

    device = class_logits.device
    num_classes = class_logits.shape[-1]
    boxes_per_image = [p.shape[0] for p in proposals]
    pred_boxes = rh.box_coder.decode(box_regression, proposals)
    pred_scores = F.softmax(class_logits, -1)

    results = []
    offset = 0
    for boxes, scores, image_shape, n_props in zip(
        pred_boxes.split(boxes_per_image, 0),
        pred_scores.split(boxes_per_image, 0),
        image_list.image_sizes,
        boxes_per_image,
        strict=True,
    ):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        rows = torch.arange(n_props, device=device).view(-1, 1).expand_as(scores)
        boxes, scores, labels, rows = boxes[:, 1:], scores[:, 1:], labels[:, 1:], rows[:, 1:]
        boxes = boxes.reshape(-1, 4)
        scores = scores.reshape(-1)
        labels = labels.reshape(-1)
        rows = rows.reshape(-1)
        inds = torch.where(scores > score_thresh)[0]
        boxes, scores, labels, rows = boxes[inds], scores[inds], labels[inds], rows[inds]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, rh.nms_thresh)
        keep = keep[:max_dets]
        boxes, scores, labels, rows = boxes[keep], scores[keep], labels[keep], rows[keep]
        proposal = rows + offset
        results.append(
            {
                "boxes": boxes,
                "scores": scores,
                "labels": labels,
                "probs": pred_scores[proposal],
                "features": box_features[proposal],
            }
        )
        offset += n_props
    return _finish(model, results, image_list.image_sizes, original_sizes)


# --------------------------------------------------------------------------------------------------
# one-stage, sigmoid: RetinaNet and FCOS share their post-processing


def _run_dense_sigmoid(
    model: Any, family: str, images: list[torch.Tensor], score_thresh: float, max_dets: int
) -> list[ImageDetections]:
    """RetinaNet/FCOS forward, recording the input of ``cls_logits`` per level, then their
    ``postprocess_detections`` (per level: threshold, top-k candidates, decode, clip; per image:
    batched NMS, top detections) with (level, anchor) carried along."""
    import torch
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = model.transform(images)
    features = list(_backbone_features(model, image_list.tensors).values())
    recorder = _InputRecorder([model.head.classification_head.cls_logits])
    try:
        head_outputs = model.head(features)
    finally:
        recorder.close()
    level_maps = recorder.inputs[: len(features)]
    anchors = model.anchor_generator(image_list, features)

    hw = [x.size(2) * x.size(3) for x in features]
    a = head_outputs["cls_logits"].size(1) // sum(hw) if family == "retinanet" else 1
    per_level = [n * a for n in hw]
    split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(x.split(per_level)) for x in anchors]
    width = int(level_maps[0].shape[1])
    starts = [sum(per_level[:i]) for i in range(len(per_level))]

    results = []
    for index, image_shape in enumerate(image_list.image_sizes):
        image_boxes, image_scores, image_labels, image_anchor, image_probs = [], [], [], [], []
        for level in range(len(per_level)):
            logits = split["cls_logits"][level][index]
            regression = split["bbox_regression"][level][index]
            level_anchors = split_anchors[index][level]
            num_classes = logits.shape[-1]
            if family == "retinanet":
                class_scores = torch.sigmoid(logits)
            else:
                ctrness = split["bbox_ctrness"][level][index]
                class_scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctrness))
            flat = class_scores.flatten()
            keep_idxs = flat > score_thresh
            scores = flat[keep_idxs]
            topk_idxs = torch.where(keep_idxs)[0]
            num_topk = det_utils._topk_min(topk_idxs, model.topk_candidates, 0)
            scores, idxs = scores.topk(num_topk)
            topk_idxs = topk_idxs[idxs]
            anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
            labels = topk_idxs % num_classes
            if family == "retinanet":
                boxes = model.box_coder.decode_single(regression[anchor_idxs], level_anchors[anchor_idxs])
            else:
                boxes = model.box_coder.decode(regression[anchor_idxs], level_anchors[anchor_idxs])
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            image_boxes.append(boxes)
            image_scores.append(scores)
            image_labels.append(labels)
            image_anchor.append(anchor_idxs + starts[level])
            image_probs.append(class_scores[anchor_idxs])
        boxes = torch.cat(image_boxes)
        scores = torch.cat(image_scores)
        labels = torch.cat(image_labels)
        anchor = torch.cat(image_anchor)
        probs = torch.cat(image_probs)
        keep = box_ops.batched_nms(boxes, scores, labels, model.nms_thresh)
        keep = keep[:max_dets]
        results.append(
            {
                "boxes": boxes[keep],
                "scores": scores[keep],
                "labels": labels[keep],
                "probs": probs[keep],
                "features": _gather_level_features(level_maps, [a] * len(hw), index, anchor[keep], width),
            }
        )
    return _finish(model, results, image_list.image_sizes, original_sizes)


# --------------------------------------------------------------------------------------------------
# one-stage, softmax: SSD and SSDlite


def _run_ssd(
    model: Any, images: list[torch.Tensor], score_thresh: float, max_dets: int
) -> list[ImageDetections]:
    """SSD forward, recording the input of each level's final classification conv, then
    ``SSD.postprocess_detections`` (per class: threshold, top-k candidates; batched NMS, top
    detections) with the default-box index carried along."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = model.transform(images)
    features = list(_backbone_features(model, image_list.tensors).values())
    cls_head = model.head.classification_head
    finals = [_final_conv(m) for m in cls_head.module_list]
    recorder = _InputRecorder(finals)
    try:
        head_outputs = model.head(features)
    finally:
        recorder.close()
    level_maps = recorder.inputs[: len(features)]
    anchors_per_location = [int(c.out_channels) // int(cls_head.num_columns) for c in finals]
    width = max(int(c.in_channels) for c in finals)
    image_anchors = model.anchor_generator(image_list, features)

    bbox_regression = head_outputs["bbox_regression"]
    pred_scores = F.softmax(head_outputs["cls_logits"], dim=-1)
    num_classes = pred_scores.size(-1)
    device = pred_scores.device

    results = []
    for index, (regression, all_scores, anchors, image_shape) in enumerate(
        zip(bbox_regression, pred_scores, image_anchors, image_list.image_sizes, strict=True)
    ):
        boxes_all = model.box_coder.decode_single(regression, anchors)
        boxes_all = box_ops.clip_boxes_to_image(boxes_all, image_shape)
        image_boxes, image_scores, image_labels, image_anchor = [], [], [], []
        for label in range(1, num_classes):
            score = all_scores[:, label]
            keep_idxs = score > score_thresh
            score = score[keep_idxs]
            box = boxes_all[keep_idxs]
            idx = torch.where(keep_idxs)[0]
            num_topk = det_utils._topk_min(score, model.topk_candidates, 0)
            score, order = score.topk(num_topk)
            image_boxes.append(box[order])
            image_scores.append(score)
            image_labels.append(torch.full_like(score, fill_value=label, dtype=torch.int64, device=device))
            image_anchor.append(idx[order])
        boxes = torch.cat(image_boxes)
        scores = torch.cat(image_scores)
        labels = torch.cat(image_labels)
        anchor = torch.cat(image_anchor)
        keep = box_ops.batched_nms(boxes, scores, labels, model.nms_thresh)
        keep = keep[:max_dets]
        results.append(
            {
                "boxes": boxes[keep],
                "scores": scores[keep],
                "labels": labels[keep],
                "probs": all_scores[anchor[keep]],
                "features": _gather_level_features(
                    level_maps, anchors_per_location, index, anchor[keep], width
                ),
            }
        )
    return _finish(model, results, image_list.image_sizes, original_sizes)


# --------------------------------------------------------------------------------------------------
# user detectors


def _run_user(
    model: Callable[[list[torch.Tensor]], Any],
    images: list[torch.Tensor],
    score_thresh: float | None,
    max_dets: int | None,
) -> list[ImageDetections]:
    """Call the model and take its per-image dicts as they are, after checking the contract.

    `--score-threshold` keeps scores strictly above it (torchvision's convention) and
    `--max-detections` keeps the highest scores, applied after the model's own post-processing.
    """
    import torch

    out = model(images)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):  # (losses, dets) style
        out = out[1]
    if not isinstance(out, (list, tuple)) or len(out) != len(images):
        raise ModelError(
            f"a user detector must return one dict per image ({len(images)}), got {type(out).__name__}"
        )
    results = []
    for i, det in enumerate(out):
        if not isinstance(det, dict):
            raise ModelError(f"user detector output {i} is a {type(det).__name__}, expected a dict")
        missing = [k for k in USER_KEYS if k not in det]
        if missing:
            raise ModelError(
                f"user detector output lacks {', '.join(missing)} (needs {', '.join(USER_KEYS)}); "
                "see docs/extract-detection.md"
            )
        boxes = torch.as_tensor(det["boxes"]).detach().to("cpu", torch.float32).reshape(-1, 4)
        n = boxes.shape[0]
        scores = torch.as_tensor(det["scores"]).detach().to("cpu", torch.float32).reshape(-1)
        labels = torch.as_tensor(det["labels"]).detach().to("cpu", torch.int64).reshape(-1)
        probs = torch.as_tensor(det["probs"]).detach().to("cpu", torch.float32)
        feats = torch.as_tensor(det["features"]).detach().to("cpu", torch.float32)
        probs = probs.reshape(n, -1) if n else probs.reshape(0, probs.shape[-1] if probs.dim() else 0)
        feats = feats.reshape(n, -1) if n else feats.reshape(0, feats.shape[-1] if feats.dim() else 0)
        if not (scores.shape[0] == labels.shape[0] == probs.shape[0] == feats.shape[0] == n):
            raise ModelError(
                f"user detector output {i}: boxes, labels, scores, probs and features disagree on the "
                f"number of detections ({n}, {labels.shape[0]}, {scores.shape[0]}, {probs.shape[0]}, "
                f"{feats.shape[0]})"
            )
        keep = torch.arange(n)
        if score_thresh is not None:
            keep = keep[scores[keep] > score_thresh]
        order = torch.argsort(scores[keep], descending=True, stable=True)
        keep = keep[order]
        if max_dets is not None:
            keep = keep[:max_dets]
        results.append(ImageDetections(boxes[keep], scores[keep], labels[keep], probs[keep], feats[keep]))
    return results


# --------------------------------------------------------------------------------------------------
# public entry point for one batch


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

    family = family or detector_family(model)
    if family not in FAMILIES:
        raise ModelError(f"unknown detector family '{family}' (one of {', '.join(FAMILIES)})")
    if max_detections is not None and max_detections < 1:
        raise ModelError(f"--max-detections must be at least 1, got {max_detections}")
    if not images:
        return []
    with torch.inference_mode():
        if family == "user":
            return _run_user(model, images, score_threshold, max_detections)
        owner = model.roi_heads if family == "rcnn" else model
        thresh = float(owner.score_thresh if score_threshold is None else score_threshold)
        dets = int(owner.detections_per_img if max_detections is None else max_detections)
        if family == "rcnn":
            return _run_rcnn(model, images, thresh, dets)
        if family in ("retinanet", "fcos"):
            return _run_dense_sigmoid(model, family, images, thresh, dets)
        return _run_ssd(model, images, thresh, dets)


# --------------------------------------------------------------------------------------------------
# the extractor: images -> detection pool


@dataclass
class DetectionConfig:
    """Everything `uwe extract detection` accepts; None means "the default" (docs/extract-detection.md)."""

    data: str | Path
    out: str | Path
    model: str | None = None
    checkpoint: str | Path | None = None
    num_classes: int | None = None
    weights: str | None = None
    class_names: Sequence[str] | None = None
    score_threshold: float | None = DEFAULT_SCORE_THRESHOLD
    max_detections: int | None = DEFAULT_MAX_DETECTIONS
    min_size: int | None = None
    max_size: int | None = None
    batch_size: int = 4
    num_workers: int = 0
    device: str = "auto"
    shard: tuple[int, int] | None = None
    skip_bad_images: bool = False
    write_probs: bool = True
    visualize: str | Path | None = None
    part_rows: int = DEFAULT_PART_ROWS


@dataclass
class DetectionResult:
    """What a run did, for the CLI summary and for callers who chain steps."""

    out: Path
    rows: int
    processed: int
    resumed: int
    detections: int = 0
    empty_images: int = 0
    skipped: list[tuple[ImageItem, str]] = field(default_factory=list)
    skip_report: Path | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0
    feature_dim: int = 0
    num_classes: int = 0
    family: str = ""
    device: str = "cpu"
    visualized: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


FEATURE_DESCRIPTIONS = {
    "rcnn": "input of roi_heads.box_predictor for the box's proposal",
    "retinanet": "input of head.classification_head.cls_logits at the anchor's location",
    "fcos": "input of head.classification_head.cls_logits at the box's location",
    "ssd": "input of the final classification conv of the box's level at its location, zero-padded",
    "user": "features returned by the model",
}
PROBS_DESCRIPTIONS = {
    "rcnn": "softmax over all classes (0 = background) of the box's proposal",
    "retinanet": "sigmoid of each class logit at the box's anchor",
    "fcos": "sqrt(sigmoid(class logit) * sigmoid(centerness)) per class at the box's location",
    "ssd": "softmax over all classes (0 = background) at the box's default box",
    "user": "probs returned by the model",
}


def _check_config(cfg: DetectionConfig) -> None:
    if cfg.score_threshold is not None and not (0.0 <= cfg.score_threshold < 1.0):
        raise DataError(f"--score-threshold must be in [0, 1), got {cfg.score_threshold}")
    if cfg.max_detections is not None and cfg.max_detections < 1:
        raise DataError(f"--max-detections must be at least 1, got {cfg.max_detections}")
    for name, value in (("--min-size", cfg.min_size), ("--max-size", cfg.max_size)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be positive, got {value}")
    if cfg.batch_size < 1:
        raise DataError(f"--batch-size must be positive, got {cfg.batch_size}")


def _to_tensor(image: Any) -> Any:
    """PIL → float CHW in [0, 1]: torchvision detectors normalise and resize inside the model."""
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image)


def _collate_list(samples: list[tuple[int, Any, str | None]]) -> Batch:
    """Like data.collate, but images keep their own sizes (a list, as detectors take them)."""
    good = [(i, t) for i, t, err in samples if err is None]
    failures = [(i, err) for i, _, err in samples if err is not None]
    return Batch([i for i, _ in good], [t for _, t in good] if good else None, failures)


def _make_loader(items: Sequence[ImageItem], batch_size: int, num_workers: int, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    if num_workers < 0:
        raise DataError(f"--num-workers must be ≥ 0, got {num_workers}")
    return DataLoader(
        ImageDataset(items, _to_tensor),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_list,
        pin_memory=pin,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def _apply_sizes(module: Any, family: str, min_size: int | None, max_size: int | None) -> None:
    """--min-size/--max-size replace the resize of GeneralizedRCNNTransform (not for SSD's fixed size)."""
    if min_size is None and max_size is None:
        return
    transform = getattr(module, "transform", None)
    if family in ("user", "ssd") or transform is None or not hasattr(transform, "min_size"):
        raise ModelError(
            f"--min-size/--max-size apply to R-CNN, RetinaNet and FCOS models, not to a {family} detector"
        )
    if min_size is not None:
        transform.min_size = (int(min_size),)
    if max_size is not None:
        transform.max_size = int(max_size)


def _schema(feature_dim: int, num_classes: int, with_probs: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("box", pa.list_(pa.float32(), 4)),
        pa.field("bvsb", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("least_confidence", pa.float32()),
    ]
    if with_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32(), num_classes)))
    fields.append(pa.field("feature", pa.list_(pa.float32(), feature_dim)))
    return pa.schema(fields)


def _fixed_list(matrix: np.ndarray, width: int, valid: np.ndarray) -> pa.Array:
    """A fixed_size_list array, null where `valid` is False (the empty-image rows)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1, width)
    values = pa.array(matrix.reshape(-1), pa.float32())
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(values, width, mask=mask)


def detections_to_batch(
    items: Sequence[ImageItem],
    dets: Sequence[ImageDetections],
    schema: pa.Schema,
    background_class: int | None,
) -> pa.RecordBatch:
    """Pool rows for a batch of images: one per detection, one null-label row per empty image."""
    import torch

    num_classes = schema.field("probs").type.list_size if "probs" in schema.names else None
    d = schema.field("feature").type.list_size
    ids: list[str] = []
    sources: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "score", "box", "probs", "feature")}
    unc: dict[str, list[np.ndarray]] = {k: [] for k in ("bvsb", "entropy", "least_confidence")}
    valid: list[np.ndarray] = []
    k_width = num_classes if num_classes is not None else (dets[0].probs.shape[1] if dets else 0)
    for item, det in zip(items, dets, strict=True):
        n = len(det)
        rows = max(n, 1)
        ids.extend([item.id] * rows)
        sources.extend([str(item.path)] * rows)
        if n == 0:
            valid.append(np.zeros(1, dtype=bool))
            parts["label"].append(np.zeros(1, np.int32))
            parts["score"].append(np.zeros(1, np.float32))
            parts["box"].append(np.zeros((1, 4), np.float32))
            parts["probs"].append(np.zeros((1, k_width), np.float32))
            parts["feature"].append(np.zeros((1, d), np.float32))
            for key in unc:
                unc[key].append(np.zeros(1, np.float32))
            continue
        if det.features.shape[1] != d:
            raise ModelError(f"image {item.id}: feature length {det.features.shape[1]} differs from {d}")
        if num_classes is not None and det.probs.shape[1] != num_classes:
            raise ModelError(f"image {item.id}: {det.probs.shape[1]} class scores, expected {num_classes}")
        finite = (
            torch.isfinite(det.probs).all()
            and torch.isfinite(det.features).all()
            and torch.isfinite(det.boxes).all()
            and torch.isfinite(det.scores).all()
        )
        if not bool(finite):
            raise ModelError(f"the detector produced NaN or Inf for image {item.id}")
        if n and (
            int(det.labels.min()) < 0 or (num_classes is not None and int(det.labels.max()) >= num_classes)
        ):
            raise ModelError(f"image {item.id}: label outside [0, {num_classes}) from the detector")
        valid.append(np.ones(n, dtype=bool))
        parts["label"].append(det.labels.numpy().astype(np.int32))
        parts["score"].append(det.scores.numpy())
        parts["box"].append(det.boxes.numpy())
        parts["probs"].append(det.probs.numpy())
        parts["feature"].append(det.features.numpy())
        for key, values in box_uncertainty(det.probs, background_class).items():
            unc[key].append(values.numpy().astype(np.float32))
    ok = np.concatenate(valid) if valid else np.zeros(0, dtype=bool)
    null = None if ok.all() else pa.array(~ok)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    arrays: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()),
        "source": pa.array(sources, pa.string()),
        "label": pa.array(cat["label"].astype(np.int32), pa.int32(), mask=None if null is None else ~ok),
        "score": pa.array(cat["score"].astype(np.float32), pa.float32(), mask=None if null is None else ~ok),
        "box": _fixed_list(cat["box"], 4, ok),
        "feature": _fixed_list(cat["feature"], d, ok),
    }
    for key, values in unc.items():
        arr = np.concatenate(values) if values else np.zeros(0, np.float32)
        arrays[key] = pa.array(arr, pa.float32(), mask=None if null is None else ~ok)
    if "probs" in schema.names:
        arrays["probs"] = _fixed_list(cat["probs"], k_width, ok)
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_") or "image"


def visualize_detections(
    image: Any,
    det: ImageDetections,
    path: Path,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        pil.save(tmp, format="PNG")


def _infer_num_classes(name: str, checkpoint: Path) -> int | None:
    """Classes of a torchvision detector's checkpoint, from its classification layer.

    models.load_model infers classes from the last nn.Linear, which for a detector is the box
    regressor (4·K outputs) or absent; the classification layer's outputs are A·K, so compare them
    with a probe model built with the default K.
    """
    import torch

    from uwe_cli.models import build_torchvision, read_checkpoint, unwrap_state_dict

    obj = read_checkpoint(checkpoint)
    if isinstance(obj, torch.nn.Module) or not isinstance(obj, dict):
        return None
    state = unwrap_state_dict(obj, checkpoint)
    probe, _ = build_torchvision(name, "detection", None, None)
    info = detector_info(probe)
    family = info.family
    if family == "rcnn":
        key = "roi_heads.box_predictor.cls_score.weight"
    elif family in ("retinanet", "fcos"):
        key = "head.classification_head.cls_logits.weight"
    elif family == "ssd":
        first = probe.head.classification_head.module_list[0]
        conv = _final_conv(first)
        sub = next(n for n, m in first.named_modules() if m is conv)
        prefix = "head.classification_head.module_list.0"
        key = f"{prefix}.{sub}.weight" if sub else f"{prefix}.weight"
    else:
        return None
    own = probe.state_dict().get(key)
    theirs = state.get(key)
    if own is None or theirs is None or info.num_classes is None:
        return None
    per_class = own.shape[0] // info.num_classes
    return int(theirs.shape[0] // per_class) if per_class else None


def extract_detection(cfg: DetectionConfig, progress: ProgressFn | None = None) -> DetectionResult:
    """Run the detector over the images and write (or resume) the detection pool; never prints."""
    from uwe_cli.models import load_model, resolve_device

    _check_config(cfg)
    items = shard_items(list_images(cfg.data), cfg.shard)
    target = shard_target(cfg.out, cfg.shard) if cfg.shard else Path(cfg.out)
    if cfg.shard is None and target.is_dir():
        raise DataError(f"--out {target} is a directory; give a .parquet file (or use --shard K/N)")
    device = resolve_device(cfg.device)
    num_classes = cfg.num_classes
    if (
        num_classes is None
        and cfg.checkpoint is not None
        and cfg.model is not None
        and ":" not in cfg.model
        and not cfg.weights
    ):
        num_classes = _infer_num_classes(cfg.model, Path(cfg.checkpoint))
    loaded = load_model(cfg.model, "detection", num_classes, cfg.checkpoint, cfg.weights, device)
    module = loaded.module
    family = detector_family(module)
    _apply_sizes(module, family, cfg.min_size, cfg.max_size)
    info = detector_info(module)
    class_names = list(cfg.class_names) if cfg.class_names else loaded.class_names
    if cfg.class_names is None and class_names is None:
        class_names = getattr(module, "class_names", None)

    fingerprint = {
        "task": "detection",
        "model": loaded.name,
        "checkpoint": loaded.checkpoint_sha256,
        "num_classes": cfg.num_classes,
        "weights": cfg.weights,
        "score_threshold": cfg.score_threshold,
        "max_detections": cfg.max_detections,
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "probs": cfg.write_probs,
        "shard": list(cfg.shard) if cfg.shard else None,
    }
    writer, done, todo = open_writer(target, fingerprint, items, cfg.part_rows)
    total = len(items)
    loader = _make_loader(todo, cfg.batch_size, cfg.num_workers, pin=device.type == "cuda")
    vis_dir = Path(cfg.visualize) if cfg.visualize is not None else None

    skipped: list[tuple[ImageItem, str]] = []
    pending: list[tuple[list[ImageItem], list[ImageDetections]]] = []
    processed = detections = empty = visualized = 0
    meta: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        if progress is not None:
            progress(len(done), total)
        for batch in loader:
            record_failures(batch.failures, todo, skipped, cfg.skip_bad_images)
            if batch.images is not None:
                images = [t.to(device, non_blocking=True) for t in batch.images]
                try:
                    dets = detect(module, images, cfg.score_threshold, cfg.max_detections, family)
                except UweError:
                    raise
                except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
                    raise ModelError(
                        f"detector {loaded.name} failed on a batch starting with "
                        f"{todo[batch.indices[0]].id}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                    ) from None
                batch_items = [todo[i] for i in batch.indices]
                if writer.schema is None:
                    k, d = info.num_classes, info.feature_dim
                    for det in dets:
                        if k is None and det.probs.dim() == 2 and det.probs.shape[1]:
                            k = int(det.probs.shape[1])
                        if d is None and det.features.dim() == 2 and det.features.shape[1]:
                            d = int(det.features.shape[1])
                    if k is not None and d is not None:
                        meta = _metadata(cfg, loaded.name, loaded.checkpoint_sha256, info, k, d, class_names)
                        writer.set_schema(_schema(d, k, cfg.write_probs), meta)
                if writer.schema is None:
                    pending.append((batch_items, dets))
                else:
                    for p_items, p_dets in pending:
                        writer.write(
                            detections_to_batch(p_items, p_dets, writer.schema, info.background_class)
                        )
                    pending = []
                    writer.write(detections_to_batch(batch_items, dets, writer.schema, info.background_class))
                for item, image, det in zip(batch_items, batch.images, dets, strict=True):
                    detections += len(det)
                    empty += len(det) == 0
                    if vis_dir is not None:
                        visualize_detections(
                            image,
                            det,
                            vis_dir / f"{_safe_name(item.id)}.png",
                            info.background_class,
                            class_names,
                        )
                        visualized += 1
                processed += len(batch_items)
            if progress is not None:
                progress(len(done) + processed + len(skipped), total)
        if pending:
            raise ModelError(
                f"detector {loaded.name} found no box in any image and does not declare num_classes; "
                "its probs/features sizes are unknown"
            )
        if not processed and not done:
            raise DataError(f"no readable images in {cfg.data} ({len(skipped)} skipped)")
        rows = writer.finish()
    except BaseException:
        writer.abandon()
        raise
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
    return DetectionResult(
        **summary, detections=detections, empty_images=empty, family=family, visualized=visualized
    )


def _metadata(
    cfg: DetectionConfig,
    name: str,
    sha: str | None,
    info: DetectorInfo,
    num_classes: int,
    feature_dim: int,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    if class_names is not None and len(class_names) != num_classes:
        raise ModelError(
            f"{len(class_names)} class names given but the detector has {num_classes} class outputs"
            + (" (background included, as index 0)" if info.background_class == 0 else "")
        )
    return {
        "task": "detection",
        "model": name,
        "checkpoint_sha256": sha,
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "feature_dim": feature_dim,
        "detector_family": info.family,
        "background_class": info.background_class,
        "score_activation": info.score_activation,
        "probs": PROBS_DESCRIPTIONS[info.family],
        "feature": FEATURE_DESCRIPTIONS[info.family],
        "uncertainty": "on the foreground class distribution (background dropped, renormalised to sum 1)",
        "score_threshold": cfg.score_threshold,
        "max_detections": cfg.max_detections,
        "weights": cfg.weights,
        "uwe_version": __version__,
    }
