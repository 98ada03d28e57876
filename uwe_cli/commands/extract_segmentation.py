"""`uwe extract segmentation`: parse options, run the library, report on stderr (no maths here)."""

from __future__ import annotations

from pathlib import Path

import typer

from uwe_cli.commands._common import cli_errors, show_progress, stderr
from uwe_cli.commands._extract_options import (
    ClassNames,
    Data,
    Device,
    NumWorkers,
    Out,
    Quiet,
    Shard,
    SkipBadImages,
    parse_class_names,
    parse_floats,
    warn_amp_on_cpu,
    warn_skipped,
)


def segmentation(
    data: Data,
    out: Out,
    model: str | None = typer.Option(
        None,
        "--model",
        help="torchvision segmentation model (e.g. deeplabv3_resnet50) or pkg.module:factory.",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="state_dict, whole pickled nn.Module, or training checkpoint."
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="Classes K of the head (default: what the model outputs)."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="torchvision weights (e.g. DEFAULT), from the local cache only."
    ),
    feature_layer: str | None = typer.Option(
        None,
        "--feature-layer",
        help="Dotted module name whose INPUT is the pixel feature (default: last Conv2d with K outputs).",
    ),
    class_names: ClassNames = None,
    region_size: str | None = typer.Option(
        None, "--region-size", help="none (one row per image), N or HxW: one row per region of the grid."
    ),
    region_stride: str | None = typer.Option(
        None, "--region-stride", help="N or HxW step between regions (default: the region size)."
    ),
    resize: str | None = typer.Option(
        None, "--resize", help="none (native size), N (shorter side) or HxW before the model."
    ),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean R,G,B (default: ImageNet)."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std R,G,B (default: ImageNet)."),
    batch_size: int = typer.Option(2, "--batch-size", help="Images per forward pass (equal sizes only)."),
    num_workers: NumWorkers = 2,
    device: Device = "auto",
    amp: bool = typer.Option(False, "--amp", help="Half-precision autocast for the model (CUDA only)."),
    shard: Shard = None,
    skip_bad_images: SkipBadImages = False,
    heatmaps: Path | None = typer.Option(
        None, "--heatmaps", help="Write DIR/<image id>.png: pixel uncertainty as a colour map."
    ),
    heatmap_measure: str = typer.Option(
        "entropy", "--heatmap-measure", help="entropy, bvsb or least_confidence for --heatmaps."
    ),
    quiet: Quiet = False,
) -> None:
    """Run a segmentation model over images; write a Parquet pool of mean pixel uncertainty and features."""
    with cli_errors():
        from uwe_cli.commands.extract_classification import _progress
        from uwe_cli.data import parse_shard
        from uwe_cli.extract.segmentation import SegmentationConfig, extract_segmentation

        cfg = SegmentationConfig(
            data=data,
            out=out,
            model=model,
            checkpoint=checkpoint,
            num_classes=num_classes,
            weights=weights,
            feature_layer=feature_layer,
            class_names=parse_class_names(class_names),
            region_size=region_size,
            region_stride=region_stride,
            resize=resize,
            mean=parse_floats(mean, "--mean"),
            std=parse_floats(std, "--std"),
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            amp=amp,
            shard=parse_shard(shard),
            skip_bad_images=skip_bad_images,
            heatmaps=heatmaps,
            heatmap_measure=heatmap_measure,
        )
        warn_amp_on_cpu(amp, device)
        with _progress(show_progress(quiet)) as update:
            result = extract_segmentation(cfg, progress=update)
        warn_skipped(result)
        if not quiet:
            resumed = f", {result.resumed} images resumed from an earlier run" if result.resumed else ""
            heat = f"; {result.heatmaps} heatmaps in {heatmaps}" if result.heatmaps else ""
            stderr.print(
                f"wrote {result.rows} rows to {result.out} (d={result.feature_dim}, K={result.num_classes}, "
                f"features: {result.feature_layer}{resumed}; {result.processed} images at "
                f"{result.images_per_second:.2f} images/s on {result.device}{heat})",
                soft_wrap=True,
            )
