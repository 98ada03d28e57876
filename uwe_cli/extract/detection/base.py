"""What every detector family shares: per-box results, the family registry, uncertainty, tensor plumbing.

A family (`Family`) is one module in this package: how to recognise the model, what it stores as a
box's probabilities and feature, and how to run it so that each kept box keeps the index of the
proposal or anchor that produced it. Adding a detector (DETR, a YOLO wrapper) is one module with
one `register_family(...)` call, imported in `__init__.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uwe_cli.errors import ModelError

if TYPE_CHECKING:
    import torch


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


RunFn = Callable[[Any, list[Any], Any, Any], list[ImageDetections]]


@dataclass(frozen=True)
class Family:
    """One kind of detector and everything uwe needs to know about it."""

    name: str
    matches: Callable[[Any], bool]  # is this model of the family?
    info: Callable[[Any], DetectorInfo]
    run: RunFn  # (model, images, score threshold, max detections) -> kept detections
    probs: str  # what the `probs` column holds (pool metadata, docs)
    feature: str  # what the `feature` column holds
    settings_owner: Callable[[Any], Any] | None = None  # object with score_thresh / detections_per_img
    classifier_key: Callable[[Any], str] | None = None  # state_dict key of the class-score layer
    resizable: bool = False  # --min-size / --max-size apply (GeneralizedRCNNTransform)


FAMILIES: dict[str, Family] = {}
FALLBACK = "user"


def register_family(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"detector family '{family.name}' registered twice")
    FAMILIES[family.name] = family
    return family


def family_of(model: Any) -> Family:
    """The first registered family that recognises the model; the user-detector contract otherwise."""
    for family in FAMILIES.values():
        if family.name != FALLBACK and family.matches(model):
            return family
    return FAMILIES[FALLBACK]


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown detector family '{name}' (one of {', '.join(FAMILIES)})") from None


# --------------------------------------------------------------------------------------------------
# uncertainty


def box_uncertainty(probs: torch.Tensor, background_class: int | None) -> dict[str, torch.Tensor]:
    """entropy / bvsb / least_confidence of each row of `probs` on its foreground distribution.

    The background column (softmax families) is dropped and the rest renormalised to sum 1; sigmoid
    scores are normalised to sum 1 too, which leaves bvsb unchanged and keeps entropy and
    least_confidence on the same scales for every detector (a sum of K binary entropies would grow
    with K). A row whose foreground scores are all zero counts as uniform rather than NaN.
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
# tensor plumbing shared by the torchvision families


def final_conv(module: Any) -> Any:
    """The last Conv2d of an SSD / SSDlite prediction block (the block itself for plain SSD)."""
    import torch.nn as nn

    last = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise ModelError(f"SSD classification block without a Conv2d: {type(module).__name__}")
    return last


def backbone_features(model: Any, tensors: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    import torch

    features = model.backbone(tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return features


def run_one_stage_head(
    model: Any, images: list[torch.Tensor], convs: Callable[[Any], list[Any]]
) -> tuple[list[tuple[int, int]], Any, list[torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]:
    """A one-stage detector's transform, backbone and head, recording the input of `convs(model)` (the
    final classification convs) per level. Returns (original sizes, image list, backbone features,
    head outputs, one recorded map per level)."""
    from uwe_cli.models import ForwardTap

    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = model.transform(images)
    features = list(backbone_features(model, image_list.tensors).values())
    recorder = ForwardTap(convs(model))
    try:
        head_outputs = model.head(features)
    finally:
        recorder.remove()
    return original_sizes, image_list, features, head_outputs, recorder.values[: len(features)]


def nms_keep(
    parts: dict[str, list[torch.Tensor]], nms_thresh: float, max_dets: int
) -> dict[str, torch.Tensor]:
    """One image's candidates (lists of per-level or per-class tensors, keys boxes, scores, labels and
    any carried along) after torchvision's batched NMS per label and its top `max_dets`."""
    import torch
    from torchvision.ops import boxes as box_ops

    cat = {k: torch.cat(v) for k, v in parts.items()}
    keep = box_ops.batched_nms(cat["boxes"], cat["scores"], cat["labels"], nms_thresh)[:max_dets]
    return {k: v[keep] for k, v in cat.items()}


def gather_level_features(
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


def rescale_and_finish(
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
