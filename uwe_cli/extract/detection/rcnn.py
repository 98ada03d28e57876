"""Faster / Mask / Keypoint R-CNN: softmax over the classes of the box's proposal; the box-head output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uwe_cli.extract.detection.base import (
    DetectorInfo,
    Family,
    ImageDetections,
    backbone_features,
    register_family,
    rescale_and_finish,
)

if TYPE_CHECKING:
    import torch


def _matches(model: Any) -> bool:
    from torchvision.models.detection.faster_rcnn import FasterRCNN

    return isinstance(model, FasterRCNN)  # Mask R-CNN and Keypoint R-CNN subclass it


def _info(model: Any) -> DetectorInfo:
    predictor = model.roi_heads.box_predictor
    cls = getattr(predictor, "cls_score", None)
    return DetectorInfo(
        "rcnn", getattr(cls, "out_features", None), getattr(cls, "in_features", None), 0, "softmax"
    )


def run_rcnn(
    model: Any, images: list[torch.Tensor], score_thresh: float, max_dets: int
) -> list[ImageDetections]:
    """GeneralizedRCNN.forward up to the box head, then RoIHeads.postprocess_detections with the
    proposal index carried along. Masks and keypoints are not computed (boxes only)."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import boxes as box_ops

    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, _ = model.transform(images)
    features = backbone_features(model, image_list.tensors)
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
    return rescale_and_finish(model, results, image_list.image_sizes, original_sizes)


register_family(
    Family(
        name="rcnn",
        matches=_matches,
        info=_info,
        run=run_rcnn,
        probs="softmax over all classes (0 = background) of the box's proposal",
        feature="input of roi_heads.box_predictor for the box's proposal",
        settings_owner=lambda model: model.roi_heads,
        classifier_key=lambda probe: "roi_heads.box_predictor.cls_score.weight",
        resizable=True,
    )
)
