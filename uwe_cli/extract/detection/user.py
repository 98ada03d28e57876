"""Your own detector: any module that returns, per image, the boxes with their class scores and features.

Contract: in eval mode, called with a list of CHW float images in [0, 1], it returns one dict per
image with `boxes` (N×4, x1 y1 x2 y2 in input pixels), `labels` (N), `scores` (N), `probs` (N×K)
and `features` (N×d); a `(losses, detections)` pair is accepted too. These are stored as they are.
Optional attributes: `num_classes`, `background_class`, `class_names`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uwe_cli.errors import ModelError
from uwe_cli.extract.detection.base import DetectorInfo, Family, ImageDetections, register_family

if TYPE_CHECKING:
    import torch

USER_KEYS = ("boxes", "labels", "scores", "probs", "features")


def _info(model: Any) -> DetectorInfo:
    k = getattr(model, "num_classes", None)
    bg = getattr(model, "background_class", None)
    return DetectorInfo(
        "user", int(k) if k is not None else None, None, int(bg) if bg is not None else None, "user"
    )


def run_user(
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


register_family(
    Family(
        name="user",
        matches=lambda model: True,
        info=_info,
        run=run_user,
        probs="probs returned by the model",
        feature="features returned by the model",
    )
)
