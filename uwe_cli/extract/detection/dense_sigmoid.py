"""RetinaNet (v1, v2) and FCOS: one-stage sigmoid detectors sharing their post-processing.

probs: sigmoid of the K class logits at the anchor (RetinaNet), or sqrt(sigmoid(logit) ·
sigmoid(centerness)) per class at the location (FCOS), exactly what each ranks by; feature: the
input of the classification head's final conv (`cls_logits`) at the anchor's location.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uwe_cli.extract.detection.base import (
    DetectorInfo,
    Family,
    ImageDetections,
    gather_level_features,
    nms_keep,
    register_family,
    rescale_and_finish,
    run_one_stage_head,
)

if TYPE_CHECKING:
    import torch


def _info(family: str):
    def info(model: Any) -> DetectorInfo:
        head = model.head.classification_head
        return DetectorInfo(family, int(head.num_classes), int(head.cls_logits.in_channels), None, "sigmoid")

    return info


def run_dense_sigmoid(
    model: Any, family: str, images: list[torch.Tensor], score_thresh: float, max_dets: int
) -> list[ImageDetections]:
    """RetinaNet/FCOS forward, recording the input of ``cls_logits`` per level, then their
    ``postprocess_detections`` (per level: threshold, top-k candidates, decode, clip; per image:
    batched NMS, top detections) with (level, anchor) carried along."""
    import torch
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    original_sizes, image_list, features, head_outputs, level_maps = run_one_stage_head(
        model, images, lambda m: [m.head.classification_head.cls_logits]
    )
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
        parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("boxes", "scores", "labels", "anchor", "probs")
        }
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
            parts["boxes"].append(box_ops.clip_boxes_to_image(boxes, image_shape))
            parts["scores"].append(scores)
            parts["labels"].append(labels)
            parts["anchor"].append(anchor_idxs + starts[level])
            parts["probs"].append(class_scores[anchor_idxs])
        kept = nms_keep(parts, model.nms_thresh, max_dets)
        anchor = kept.pop("anchor")
        kept["features"] = gather_level_features(level_maps, [a] * len(hw), index, anchor, width)
        results.append(kept)
    return rescale_and_finish(model, results, image_list.image_sizes, original_sizes)


def _matches(kind: str):
    def matches(model: Any) -> bool:
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.retinanet import RetinaNet

        return isinstance(model, RetinaNet if kind == "retinanet" else FCOS)

    return matches


def _run(kind: str):
    def run(model: Any, images: list[Any], thresh: float, max_dets: int) -> list[ImageDetections]:
        return run_dense_sigmoid(model, kind, images, thresh, max_dets)

    return run


for _kind, _probs, _feature in (
    (
        "retinanet",
        "sigmoid of each class logit at the box's anchor",
        "input of head.classification_head.cls_logits at the anchor's location",
    ),
    (
        "fcos",
        "sqrt(sigmoid(class logit) * sigmoid(centerness)) per class at the box's location",
        "input of head.classification_head.cls_logits at the box's location",
    ),
):
    register_family(
        Family(
            name=_kind,
            matches=_matches(_kind),
            info=_info(_kind),
            run=_run(_kind),
            probs=_probs,
            feature=_feature,
            settings_owner=lambda model: model,
            classifier_key=lambda probe: "head.classification_head.cls_logits.weight",
            resizable=True,
        )
    )
