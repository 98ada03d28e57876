"""`uwe extract classification|segmentation|detection`: parse options, build the task's config, run it.

Options every task shares are declared once here (`Annotated` aliases); a command spells out only
its own. `run_extract` is the one way an extract command reports: progress on stderr, warnings,
then a summary line, or one JSON line on stdout with `--json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uwe_cli.commands._common import (
    cli_errors,
    emit_json,
    progress_callback,
    refuse_two_stdout_outputs,
    show_progress,
    stderr,
    warn,
)
from uwe_cli.errors import DataError

Data = Annotated[
    Path, typer.Option("--data", help="Image folder (recursive) or manifest CSV/Parquet (id,path).")
]
Out = Annotated[
    str,
    typer.Option("--out", help="Pool file to write (.parquet), '-' for stdout; with --shard, a directory."),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", help="state_dict (or, with --trust-checkpoint, a pickled module or TorchScript)."
    ),
]
NumClasses = Annotated[
    int | None,
    typer.Option("--num-classes", help="Classes K of the head [default: read from the checkpoint]."),
]
Weights = Annotated[
    str | None,
    typer.Option(
        "--weights", help="torchvision weights (e.g. IMAGENET1K_V1, DEFAULT), from the local cache only."
    ),
]
ClassNames = Annotated[
    str | None,
    typer.Option("--class-names", help="File with one class name per line, or a comma-separated list."),
]
NumWorkers = Annotated[
    int, typer.Option("--num-workers", help="DataLoader worker processes decoding images.")
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Amp = Annotated[bool, typer.Option("--amp", help="Half-precision autocast (CUDA only).")]
Shard = Annotated[
    str | None,
    typer.Option("--shard", help="K/N: process the K-th (0-based) of N slices into OUT/part-K-of-N.parquet."),
]
SkipBadImages = Annotated[
    bool,
    typer.Option("--skip-bad-images", help="Leave unreadable images out and list them in OUT.skipped.csv."),
]
Trust = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow checkpoints that run code when loaded (pickled modules, TorchScript). Only for files you trust.",
    ),
]
Mean = Annotated[str | None, typer.Option("--mean", help="Normalisation mean R,G,B [default: ImageNet].")]
Std = Annotated[str | None, typer.Option("--std", help="Normalisation std R,G,B [default: ImageNet].")]
Json = Annotated[bool, typer.Option("--json", help="Print a one-line JSON summary on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """`--mean` / `--std`: three comma-separated numbers (R,G,B), or None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise DataError(f"{option} takes three comma-separated numbers, got '{text}'") from None
    if len(values) != 3:
        raise DataError(f"{option} takes three comma-separated numbers (R,G,B), got '{text}'")
    return values


def parse_class_names(text: str | None) -> tuple[list[str] | None, list[Path]]:
    """(names, files read): a text file with one name per line, or a comma-separated list."""
    if not text:
        return None, []
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise DataError(f"--class-names file {path} is empty")
        return names, [path]
    return [name.strip() for name in text.split(",")], []


def common(
    data: Path,
    out: str,
    model: str | None,
    num_classes: int | None,
    weights: str | None,
    class_names: str | None,
    batch_size: int,
    num_workers: int,
    device: str,
    shard: str | None,
    skip_bad_images: bool,
    trust_checkpoint: bool,
) -> dict[str, Any]:
    """The config fields every task shares, parsed."""
    from uwe_cli.data import parse_shard

    names, files = parse_class_names(class_names)
    return {
        "data": data,
        "out": out,
        "model": model,
        "num_classes": num_classes,
        "weights": weights,
        "class_names": names,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "shard": parse_shard(shard),
        "skip_bad_images": skip_bad_images,
        "trust_checkpoint": trust_checkpoint,
        "extra_inputs": files,
    }


def run_extract(cfg: Any, quiet: bool, json_summary: bool) -> None:
    """Run a task config through its extractor and report (progress, warnings, summary or JSON)."""
    from uwe_cli.extract.runner import run_extraction, task_for

    refuse_two_stdout_outputs(cfg.out, json_summary)
    with cli_errors():
        if getattr(cfg, "amp", False) and cfg.device == "cpu":
            warn("--amp only applies on CUDA; running in float32 on the CPU")
        task = task_for(cfg)
        with progress_callback(
            f"extracting ({task.name})", show_progress(quiet or json_summary), "images"
        ) as update:
            result = run_extraction(task, update)
        for item, message in result.skipped if result.skip_report is None else []:
            warn(f"left out {item.id}: {message}")
        if result.skip_report is not None:
            warn(f"{len(result.skipped)} unreadable image(s) left out; listed in {result.skip_report}")
        if json_summary:
            emit_json(result.summary())
        elif not quiet:
            s = result.summary()
            resumed = f", {s['resumed']} resumed" if s["resumed"] else ""
            redone = f", {s['redone']} redone (changed since)" if s["redone"] else ""
            extra = ", ".join(f"{k} {v}" for k, v in result.details.items() if v not in (None, "", 0))
            stderr.print(
                f"wrote {s['rows']:,} rows to {s['out']} ({task.name}, d={s['feature_dim']}, K={s['num_classes']}; "
                f"{s['processed']:,} images at {s['images_per_second']:.1f} images/s on {s['device']}"
                f"{resumed}{redone}{'; ' + extra if extra else ''})",
                soft_wrap=True,
            )


def classification(
    data: Data,
    out: Out,
    model: str | None = typer.Option(
        None, "--model", help="torchvision model name (e.g. resnet18) or pkg.module:factory."
    ),
    checkpoint: list[Path] = typer.Option(
        [],
        "--checkpoint",
        help="state_dict (or, trusted, a pickled module / TorchScript); repeat for an ensemble.",
    ),
    num_classes: NumClasses = None,
    weights: Weights = None,
    feature_layer: str | None = typer.Option(
        None,
        "--feature-layer",
        help="Dotted module name whose output is the feature [default: last Linear input].",
    ),
    class_names: ClassNames = None,
    image_size: int | None = typer.Option(
        None, "--image-size", help="Centre-crop size in pixels [default: 224]."
    ),
    resize: int | None = typer.Option(
        None, "--resize", help="Shorter side before cropping [default: image-size / 0.875]."
    ),
    mean: Mean = None,
    std: Std = None,
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    num_workers: NumWorkers = 2,
    device: Device = "auto",
    amp: Amp = False,
    mc_dropout: int = typer.Option(0, "--mc-dropout", help="Stochastic passes with dropout on (adds bald)."),
    shard: Shard = None,
    skip_bad_images: SkipBadImages = False,
    trust_checkpoint: Trust = False,
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the probs column."),
    json_summary: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run a classifier over images and write a Parquet pool (feature, uncertainty, probs, pred)."""
    from uwe_cli.extract.classification import ClassificationConfig

    with cli_errors():
        shared = common(
            data, out, model, num_classes, weights, class_names, batch_size, num_workers, device, shard,
            skip_bad_images, trust_checkpoint,
        )  # fmt: skip
        cfg = ClassificationConfig(
            **shared,
            checkpoints=list(checkpoint),
            feature_layer=feature_layer,
            image_size=image_size,
            resize=resize,
            mean=parse_floats(mean, "--mean"),
            std=parse_floats(std, "--std"),
            amp=amp,
            mc_dropout=mc_dropout,
            write_probs=not no_probs,
        )
    run_extract(cfg, quiet, json_summary)


def segmentation(
    data: Data,
    out: Out,
    model: str | None = typer.Option(
        None,
        "--model",
        help="torchvision segmentation model (e.g. deeplabv3_resnet50) or pkg.module:factory.",
    ),
    checkpoint: Checkpoint = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    feature_layer: str | None = typer.Option(
        None,
        "--feature-layer",
        help="Dotted module name whose INPUT is the pixel feature [default: last Conv2d with K outputs].",
    ),
    class_names: ClassNames = None,
    region_size: str | None = typer.Option(
        None, "--region-size", help="none (one row per image), N or HxW: one row per region of the grid."
    ),
    region_stride: str | None = typer.Option(
        None, "--region-stride", help="N or HxW step between regions [default: the region size]."
    ),
    resize: str | None = typer.Option(
        None, "--resize", help="none (native size), N (shorter side) or HxW before the model."
    ),
    mean: Mean = None,
    std: Std = None,
    batch_size: int = typer.Option(2, "--batch-size", help="Images per forward pass (equal sizes only)."),
    num_workers: NumWorkers = 2,
    device: Device = "auto",
    amp: Amp = False,
    shard: Shard = None,
    skip_bad_images: SkipBadImages = False,
    trust_checkpoint: Trust = False,
    heatmaps: Path | None = typer.Option(
        None, "--heatmaps", help="Write DIR/<image id>.png: pixel uncertainty as a colour map."
    ),
    heatmap_measure: str = typer.Option(
        "entropy", "--heatmap-measure", help="entropy, bvsb or least_confidence for --heatmaps."
    ),
    json_summary: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run a segmentation model over images; write a Parquet pool of mean pixel uncertainty and features."""
    from uwe_cli.extract.segmentation import SegmentationConfig

    with cli_errors():
        shared = common(
            data, out, model, num_classes, weights, class_names, batch_size, num_workers, device, shard,
            skip_bad_images, trust_checkpoint,
        )  # fmt: skip
        cfg = SegmentationConfig(
            **shared,
            checkpoint=checkpoint,
            feature_layer=feature_layer,
            region_size=region_size,
            region_stride=region_stride,
            resize=resize,
            mean=parse_floats(mean, "--mean"),
            std=parse_floats(std, "--std"),
            amp=amp,
            heatmaps=heatmaps,
            heatmap_measure=heatmap_measure,
        )
    run_extract(cfg, quiet, json_summary)


def detection(
    data: Data,
    out: Out,
    model: str | None = typer.Option(
        None,
        "--model",
        help="torchvision detector (e.g. fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn_v2, "
        "fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large) or pkg.module:factory.",
    ),
    checkpoint: Checkpoint = None,
    num_classes: int | None = typer.Option(
        None,
        "--num-classes",
        help="Class outputs of the detector, torchvision's convention: background included for R-CNN and "
        "SSD (VOC: 21) [default: read from the checkpoint].",
    ),
    weights: Weights = None,
    class_names: ClassNames = None,
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
    trust_checkpoint: Trust = False,
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the per-box probs column."),
    visualize: Path | None = typer.Option(
        None, "--visualize", help="Folder for PNGs with the kept boxes; per class the max-bvsb box in bold."
    ),
    json_summary: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run a detector over images and write a detection pool: one row per kept box (label, score, box,
    bvsb/entropy/least_confidence, probs, feature) and a null-label row per image without boxes."""
    from uwe_cli.extract.detection import DetectionConfig

    with cli_errors():
        shared = common(
            data, out, model, num_classes, weights, class_names, batch_size, num_workers, device, shard,
            skip_bad_images, trust_checkpoint,
        )  # fmt: skip
        cfg = DetectionConfig(
            **shared,
            checkpoint=checkpoint,
            score_threshold=score_threshold,
            max_detections=max_detections,
            min_size=min_size,
            max_size=max_size,
            write_probs=not no_probs,
            visualize=visualize,
        )
    run_extract(cfg, quiet, json_summary)
