"""`uwe extract detection`: parse and validate options, run the library, report on stderr."""

from __future__ import annotations

from pathlib import Path

import typer

from uwe_cli.commands._common import cli_errors, progress_callback, show_progress, stderr
from uwe_cli.commands._extract_options import (
    Data,
    Device,
    NumWorkers,
    Out,
    Quiet,
    Shard,
    SkipBadImages,
    parse_class_names,
    warn_skipped,
)


def detection(
    data: Data,
    out: Out,
    model: str | None = typer.Option(
        None,
        "--model",
        help="torchvision detector (e.g. fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn_v2, "
        "fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large) or pkg.module:factory.",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="state_dict, pickled nn.Module or TorchScript file."
    ),
    num_classes: int | None = typer.Option(
        None,
        "--num-classes",
        help="Class outputs of the detector, torchvision's convention: background included for R-CNN and "
        "SSD (VOC: 21) [default: read from the checkpoint].",
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="torchvision weights (e.g. COCO_V1 or DEFAULT), from the local cache only."
    ),
    class_names: str | None = typer.Option(
        None, "--class-names", help="File with one class name per line, or a comma-separated list (K names)."
    ),
    score_threshold: float = typer.Option(
        0.05,
        "--score-threshold",
        help="Keep detections scoring above this (inside post-processing, before NMS).",
    ),
    max_detections: int = typer.Option(
        100, "--max-detections", help="Keep at most this many boxes per image."
    ),
    min_size: int | None = typer.Option(
        None,
        "--min-size",
        help="Shorter side the detector resizes to (R-CNN, RetinaNet, FCOS) [model's own].",
    ),
    max_size: int | None = typer.Option(
        None, "--max-size", help="Longer-side cap of that resize (R-CNN, RetinaNet, FCOS) [model's own]."
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per forward pass."),
    num_workers: NumWorkers = 2,
    device: Device = "auto",
    shard: Shard = None,
    skip_bad_images: SkipBadImages = False,
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the per-box probs column."),
    visualize: Path | None = typer.Option(
        None, "--visualize", help="Folder for PNGs with the kept boxes; per class the max-bvsb box in bold."
    ),
    quiet: Quiet = False,
) -> None:
    """Run a detector over images and write a detection pool: one row per kept box (label, score, box,
    bvsb/entropy/least_confidence, probs, feature) and a null-label row per image without boxes."""
    with cli_errors():
        from uwe_cli.data import parse_shard
        from uwe_cli.extract.detection import DetectionConfig, extract_detection

        cfg = DetectionConfig(
            data=data,
            out=out,
            model=model,
            checkpoint=checkpoint,
            num_classes=num_classes,
            weights=weights,
            class_names=parse_class_names(class_names),
            score_threshold=score_threshold,
            max_detections=max_detections,
            min_size=min_size,
            max_size=max_size,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            shard=parse_shard(shard),
            skip_bad_images=skip_bad_images,
            write_probs=not no_probs,
            visualize=visualize,
        )
        with progress_callback("detecting", show_progress(quiet)) as update:
            result = extract_detection(cfg, progress=update)
        warn_skipped(result)
        if not quiet:
            resumed = f", {result.resumed} resumed from an earlier run" if result.resumed else ""
            stderr.print(
                f"wrote {result.out}: {result.detections:,} boxes from {result.processed:,} images "
                f"({result.empty_images:,} without boxes{resumed}), {result.family} detector, "
                f"K={result.num_classes}, d={result.feature_dim}, {result.images_per_second:.1f} images/s "
                f"on {result.device}"
                + (f"; {result.visualized} drawings in {visualize}" if visualize is not None else "")
            )
