"""Hand a batch to annotation tools: Label Studio tasks with pre-annotations, COCO, or a flat CSV.

Every export keeps the batch order and holds every pick, also images without a detection. The
model's output becomes pre-annotations: the predicted class (`choices`) for classification pools,
the boxes (`rectanglelabels`, in Label Studio's percent-of-image coordinates) for detection pools,
and the region itself (`rectangle`) for region pools. COCO carries the same as annotations with a
`score` (the import format of CVAT, FiftyOne and Roboflow). Image references are the pool's
`source`, rewritten with `--path-map OLD=NEW` or built as `--url-prefix` + image ID, so that the
annotation server can reach them. Every image is opened (header only) to learn its size: an
unreachable image stops the export before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from uwe_cli import __version__
from uwe_cli.data import image_size
from uwe_cli.errors import ExportError
from uwe_cli.outputs import Output, open_output
from uwe_cli.picks import Pick, PickBox, Picks, load_picks, map_images

FORMATS = ("labelstudio", "coco", "csv")
PREDICTION_TYPES = ("auto", "choices", "rectanglelabels", "rectangle", "none")
DEFAULT_FROM_NAME = {"choices": "choice", "rectanglelabels": "label", "rectangle": "region"}
CSV_COLUMNS = (
    "rank",
    "id",
    "image",
    "image_id",
    "image_width",
    "image_height",
    "uncertainty",
    "distance",
    "label",
    "class_name",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
)
REGION_CATEGORY = {"id": 1, "name": "region", "supercategory": "uwe"}
_WEB_URL = re.compile(r"^https?://", re.IGNORECASE)

Progress = Callable[[int, int], None]


def parse_path_map(values: Sequence[str]) -> list[tuple[str, str]]:
    """`--path-map OLD=NEW` pairs (prefix rewrites, tried in the order given)."""
    pairs = []
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or old == "":
            raise ExportError(f"--path-map '{value}': expected OLD=NEW, e.g. /data/images=s3://bucket/images")
        pairs.append((old, new))
    return pairs


@dataclass
class ImageRefs:
    """How an image is named for the annotation server: `url_prefix` + quoted image ID, or the pool's
    `source` with the first matching `path_map` prefix replaced, or the `source` as stored."""

    url_prefix: str | None = None
    path_map: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.url_prefix is not None and self.path_map:
            raise ExportError("give --url-prefix or --path-map, not both")

    def __call__(self, pick: Pick) -> str:
        if self.url_prefix is not None:
            return self.url_prefix + urllib.parse.quote(pick.image_id, safe="/")
        if pick.source is None:
            raise ExportError(
                f"the pool has no 'source' column for '{pick.image_id}'; build image references from IDs "
                "with --url-prefix"
            )
        for old, new in self.path_map:
            if pick.source.startswith(old):
                rest = pick.source[len(old) :]
                # Into a URL the rest of the path goes quoted ('#', '?', ' ' and '%' in file names).
                return new + (urllib.parse.quote(rest, safe="/") if _WEB_URL.match(new) else rest)
        return pick.source


@dataclass
class ExportOptions:
    to: str = "labelstudio"
    predictions: str = "auto"
    min_score: float | None = None
    from_name: str | None = None
    to_name: str = "image"
    model_version: str = "uwe"
    refs: ImageRefs = field(default_factory=ImageRefs)
    images: Path | None = None  # where to read images locally (DIR / image ID), else the pool's source


@dataclass
class ExportResult:
    document: Any  # the tasks list, the COCO dict, or the CSV rows
    summary: dict[str, Any]


def check_options(opts: ExportOptions) -> None:
    if opts.to not in FORMATS:
        raise ExportError(f"unknown --to '{opts.to}' (choose from {', '.join(FORMATS)})")
    if opts.predictions not in PREDICTION_TYPES:
        raise ExportError(
            f"unknown --predictions '{opts.predictions}' (choose from {', '.join(PREDICTION_TYPES)})"
        )
    if opts.min_score is not None and not (math.isfinite(opts.min_score) and 0 <= opts.min_score <= 1):
        raise ExportError(f"--min-score must be within [0, 1], got {opts.min_score}")
    for option, name in (("--from-name", opts.from_name), ("--to-name", opts.to_name)):
        if name is not None and name.strip() == "":
            raise ExportError(f"{option} is empty; give the name of the tag in the Label Studio config")


def prediction_type(picks: Picks, requested: str) -> str:
    """The pre-annotation type for this pool; asking for one the pool cannot give is an error."""
    natural = {"detection": "rectanglelabels", "regions": "rectangle"}.get(picks.kind)
    if natural is None:
        natural = "choices" if picks.has_class_predictions else "none"
    if requested == "auto":
        return natural
    where = ", ".join(map(str, picks.source.files[:1]))
    if requested == "rectanglelabels" and not (picks.kind == "detection" and picks.has_boxes):
        raise ExportError(
            f"--predictions rectanglelabels needs a detection pool with a 'box' column; {where} has no boxes"
        )
    if requested == "rectangle" and picks.kind != "regions":
        raise ExportError(
            f"--predictions rectangle needs a region pool (image_id, x, y, width, height); {where} has no "
            "region columns"
        )
    if requested == "choices" and not picks.has_class_predictions:
        raise ExportError(
            f"--predictions choices needs a classification pool with 'pred' or 'probs'; {where} has neither"
        )
    return requested


def kept_boxes(picks: Picks, pick: Pick, min_score: float | None) -> list[PickBox]:
    """The boxes that become predictions: inside the image (clipped, not empty), score at least
    `min_score`, class with a non-empty name."""
    out = []
    for box in pick.boxes:
        if box.x2 <= box.x1 or box.y2 <= box.y1:
            continue
        if min_score is not None and (box.score is None or box.score < min_score):
            continue
        if picks.class_name(box.label) == "":
            continue
        out.append(box)
    return out


def predicted_class(picks: Picks, pick: Pick, min_score: float | None) -> str | None:
    """The class name that becomes a classification pre-annotation, or None (no prediction, score
    below `min_score`, or a class whose name is empty)."""
    if pick.label is None:
        return None
    if min_score is not None and (pick.score is None or pick.score < min_score):
        return None
    return picks.class_name(pick.label) or None


def _prediction_count(picks: Picks, pick: Pick, kind: str, min_score: float | None) -> int:
    """How many pre-annotations (classes, boxes, regions) a pick gets, in every format alike."""
    if kind == "choices":
        return int(predicted_class(picks, pick, min_score) is not None)
    if kind == "rectanglelabels":
        return len(kept_boxes(picks, pick, min_score))
    return int(kind == "rectangle" and pick.region is not None)


def image_sizes(
    picks: Picks, images: Path | None, progress: Progress | None = None, out: Output | None = None
) -> dict[str, tuple[int, int]]:
    """(width, height) per image ID, read from the image headers (`out` is refused if it is one)."""
    return map_images(picks, images, lambda _, path: image_size(path), progress, out=out)


def _percent(value: float, full: int) -> float:
    return min(max(value, 0.0), float(full)) / full * 100.0


def _rect_value(x1: float, y1: float, x2: float, y2: float, size: tuple[int, int]) -> dict[str, float]:
    """A pixel box as Label Studio's percent-of-image rectangle, clipped to the image."""
    w, h = size
    x, y = _percent(x1, w), _percent(y1, h)
    return {"x": x, "y": y, "width": _percent(x2, w) - x, "height": _percent(y2, h) - y, "rotation": 0}


def labelstudio_tasks(
    picks: Picks, sizes: dict[str, tuple[int, int]], opts: ExportOptions, kind: str
) -> list[dict[str, Any]]:
    """One task per pick: the image reference, uwe's numbers in `data`, the model's output in `predictions`."""
    from_name = opts.from_name or DEFAULT_FROM_NAME.get(kind, "label")
    tasks = []
    for pick in picks.picks:
        size = sizes[pick.image_id]
        data: dict[str, Any] = {
            "image": opts.refs(pick),
            "uwe_id": pick.id,
            "rank": pick.rank,
            "uncertainty": pick.uncertainty,
            "distance": pick.distance,
        }
        if pick.region is not None:
            data["image_id"] = pick.image_id
            data["region"] = dict(zip(("x", "y", "width", "height"), pick.region, strict=True))
        base = {
            "from_name": from_name,
            "to_name": opts.to_name,
            "original_width": size[0],
            "original_height": size[1],
            "image_rotation": 0,
        }
        results: list[dict[str, Any]] = []
        score: float | None = None
        name = predicted_class(picks, pick, opts.min_score) if kind == "choices" else None
        if name is not None:
            value = {"choices": [name]}
            results.append({"id": f"{pick.rank}-0", **base, "type": "choices", "value": value})
            score = pick.score
        elif kind == "rectanglelabels":
            boxes = kept_boxes(picks, pick, opts.min_score)
            for j, box in enumerate(boxes):
                value = {
                    **_rect_value(box.x1, box.y1, box.x2, box.y2, size),
                    "rectanglelabels": [picks.class_name(box.label)],
                }
                result = {"id": f"{pick.rank}-{j}", **base, "type": "rectanglelabels", "value": value}
                if box.score is not None:
                    result["score"] = box.score
                results.append(result)
            scored = [b.score for b in boxes if b.score is not None]
            score = sum(scored) / len(scored) if scored else None
        elif kind == "rectangle" and pick.region is not None:
            x, y, w, h = pick.region
            value = _rect_value(x, y, x + w, y + h, size)
            results.append({"id": f"{pick.rank}-0", **base, "type": "rectangle", "value": value})
        task: dict[str, Any] = {"data": data}
        if results or kind == "rectanglelabels":  # an empty result says "the detector found nothing"
            prediction: dict[str, Any] = {"model_version": opts.model_version, "result": results}
            if score is not None:
                prediction["score"] = score
            task["predictions"] = [prediction]
        tasks.append(task)
    return tasks


def _categories(picks: Picks, kind: str) -> list[dict[str, Any]]:
    if kind == "rectangle":
        return [REGION_CATEGORY]
    background = picks.metadata.get("background_class")
    if picks.class_names is not None:
        labels = range(len(picks.class_names))
    else:
        seen = {p.label for p in picks.picks if p.label is not None}
        seen |= {b.label for p in picks.picks for b in p.boxes}
        k = picks.metadata.get("num_classes")
        labels = range(int(k)) if isinstance(k, int) and k > max(seen, default=-1) else sorted(seen)
    return [
        {"id": label, "name": picks.class_name(label), "supercategory": ""}
        for label in labels
        if label != background and picks.class_name(label) != ""
    ]


def coco_dataset(
    picks: Picks, sizes: dict[str, tuple[int, int]], opts: ExportOptions, kind: str
) -> dict[str, Any]:
    """COCO detection JSON: images in batch order, the predictions as annotations with `score`.

    Category IDs are the pool's class labels. Classification predictions are whole-image boxes;
    regions are boxes of category `region`. uwe's numbers ride along as `uwe_*` keys.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    image_ids: dict[str, int] = {}

    def annotate(image: int, box: tuple[float, float, float, float], category: int, **extra: Any) -> None:
        x1, y1, x2, y2 = box
        w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image,
                "category_id": category,
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
                **{k: v for k, v in extra.items() if v is not None},
            }
        )

    pick_info = ("uwe_id", "uwe_rank", "uwe_uncertainty", "uwe_distance")
    for pick in picks.picks:
        info = dict(zip(pick_info, (pick.id, pick.rank, pick.uncertainty, pick.distance), strict=True))
        if pick.image_id not in image_ids:
            image_ids[pick.image_id] = len(images) + 1
            width, height = sizes[pick.image_id]
            entry = {"id": len(images) + 1, "file_name": opts.refs(pick), "width": width, "height": height}
            if pick.region is None:
                entry.update(info)
            images.append(entry)
        image = image_ids[pick.image_id]
        if kind == "rectangle" and pick.region is not None:
            x, y, w, h = pick.region
            annotate(image, (x, y, x + w, y + h), REGION_CATEGORY["id"], **info)
        elif kind == "choices" and predicted_class(picks, pick, opts.min_score) is not None:
            assert pick.label is not None
            width, height = sizes[pick.image_id]
            annotate(image, (0.0, 0.0, float(width), float(height)), pick.label, score=pick.score)
        elif kind == "rectanglelabels":
            for box in kept_boxes(picks, pick, opts.min_score):
                annotate(image, (box.x1, box.y1, box.x2, box.y2), box.label, score=box.score)
    return {
        "info": {
            "description": "uwe batch: images to label next, with the model's predictions",
            "version": __version__,
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(picks, kind),
    }


def csv_rows(
    picks: Picks, sizes: dict[str, tuple[int, int]], opts: ExportOptions, kind: str
) -> list[list[Any]]:
    """One row per pick and kept box (a pick without boxes keeps one row with empty box fields)."""
    rows: list[list[Any]] = []
    for pick in picks.picks:
        width, height = sizes[pick.image_id]
        head = [pick.rank, pick.id, opts.refs(pick), pick.image_id, width, height]
        head += [pick.uncertainty, pick.distance]
        if kind == "rectanglelabels":
            boxes = kept_boxes(picks, pick, opts.min_score)
            for box in boxes:
                name = picks.class_name(box.label)
                rows.append([*head, box.label, name, box.score, box.x1, box.y1, box.x2, box.y2])
            if not boxes:
                rows.append([*head, None, None, None, None, None, None, None])
        elif kind == "rectangle" and pick.region is not None:
            x, y, w, h = pick.region
            rows.append([*head, None, None, None, x, y, x + w, y + h])
        elif kind == "choices" and (name := predicted_class(picks, pick, opts.min_score)) is not None:
            rows.append([*head, pick.label, name, pick.score, None, None, None, None])
        else:
            rows.append([*head, None, None, None, None, None, None, None])
    return rows


def write_document(to: str, document: Any, stream: IO[str]) -> None:
    if to == "csv":
        import csv

        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in document:
            writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])
        return
    json.dump(document, stream, indent=1, ensure_ascii=False, allow_nan=False)
    stream.write("\n")


def build_export(
    batch: str | Path,
    pools: Sequence[str | Path],
    opts: ExportOptions,
    class_names: list[str] | None = None,
    progress: Progress | None = None,
    out: Output | None = None,
) -> ExportResult:
    """Everything up to the bytes: read, check, size the images, build the document. Raises UweError
    (also when `out` is one of the images)."""
    started = time.perf_counter()
    check_options(opts)
    picks = load_picks(batch, pools, class_names)
    kind = prediction_type(picks, opts.predictions)
    if opts.min_score is not None and kind == "rectanglelabels" and not picks.has_scores:
        raise ExportError(f"--min-score: the pool {picks.source.files[0]} has no 'score' column")
    if kind in ("choices", "rectanglelabels"):  # every label has a name (or the export would be partial)
        picks.check_names()
    sizes = image_sizes(picks, opts.images, progress, out)
    picks.clip_boxes(sizes)
    build = {"labelstudio": labelstudio_tasks, "coco": coco_dataset, "csv": csv_rows}[opts.to]
    document = build(picks, sizes, opts, kind)
    counts = [_prediction_count(picks, pick, kind, opts.min_score) for pick in picks.picks]
    summary = {
        "to": opts.to,
        "picks": len(picks),
        "images": len(sizes),
        "kind": picks.kind,
        "predictions": kind,
        "predicted_picks": sum(1 for c in counts if c),
        "results": sum(counts),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return ExportResult(document, summary)


def run_export(
    batch: str | Path,
    pools: Sequence[str | Path],
    out: Output,
    opts: ExportOptions,
    class_names: list[str] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Build the export and write it to a checked output (atomically; nothing on any error)."""
    result = build_export(batch, pools, opts, class_names, progress, out)
    with open_output(out) as stream:
        write_document(opts.to, result.document, stream)
    result.summary["out"] = str(out)
    return result
