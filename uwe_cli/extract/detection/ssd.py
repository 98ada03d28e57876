"""SSD and SSDlite: softmax at the default box; the input of the level's final classification conv."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uwe_cli.extract.detection.base import (
    DetectorInfo,
    Family,
    ImageDetections,
    final_conv,
    gather_level_features,
    nms_keep,
    register_family,
    rescale_and_finish,
    run_one_stage_head,
)

if TYPE_CHECKING:
    import torch


def _matches(model: Any) -> bool:
    from torchvision.models.detection.ssd import SSD

    return isinstance(model, SSD)  # SSDlite is an SSD with other heads


def _info(model: Any) -> DetectorInfo:
    head = model.head.classification_head
    widths = [int(final_conv(m).in_channels) for m in head.module_list]
    return DetectorInfo("ssd", int(head.num_columns), max(widths), 0, "softmax")


def _classifier_key(probe: Any) -> str:
    first = probe.head.classification_head.module_list[0]
    conv = final_conv(first)
    sub = next(n for n, m in first.named_modules() if m is conv)
    prefix = "head.classification_head.module_list.0"
    return f"{prefix}.{sub}.weight" if sub else f"{prefix}.weight"


def run_ssd(
    model: Any, images: list[torch.Tensor], score_thresh: float, max_dets: int
) -> list[ImageDetections]:
    """SSD forward, recording the input of each level's final classification conv, then
    ``SSD.postprocess_detections`` (per class: threshold, top-k candidates; batched NMS, top
    detections) with the default-box index carried along."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    cls_head = model.head.classification_head
    finals = [final_conv(m) for m in cls_head.module_list]
    original_sizes, image_list, features, head_outputs, level_maps = run_one_stage_head(
        model, images, lambda _: finals
    )
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
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("boxes", "scores", "labels", "anchor")}
        for label in range(1, num_classes):
            score = all_scores[:, label]
            keep_idxs = score > score_thresh
            score = score[keep_idxs]
            box = boxes_all[keep_idxs]
            idx = torch.where(keep_idxs)[0]
            num_topk = det_utils._topk_min(score, model.topk_candidates, 0)
            score, order = score.topk(num_topk)
            parts["boxes"].append(box[order])
            parts["scores"].append(score)
            parts["labels"].append(torch.full_like(score, fill_value=label, dtype=torch.int64, device=device))
            parts["anchor"].append(idx[order])
        kept = nms_keep(parts, model.nms_thresh, max_dets)
        anchor = kept.pop("anchor")
        kept["probs"] = all_scores[anchor]
        kept["features"] = gather_level_features(level_maps, anchors_per_location, index, anchor, width)
        results.append(kept)
    return rescale_and_finish(model, results, image_list.image_sizes, original_sizes)


register_family(
    Family(
        name="ssd",
        matches=_matches,
        info=_info,
        run=run_ssd,
        probs="softmax over all classes (0 = background) at the box's default box",
        feature="input of the final classification conv of the box's level at its location, zero-padded",
        settings_owner=lambda model: model,
        classifier_key=_classifier_key,
    )
)
