"""`uwe extract classification|segmentation|detection`: parse options, build the task's config, run it.

Options every task shares are declared once here (`Annotated` aliases); a command spells out only
its own. `run_extract` is the one way an extract command reports: progress on stderr, warnings,
then a summary line, or one JSON line on stdout with `--json`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from uwe_cli.commands import _common as ui
from uwe_cli.errors import DataError

Data = Annotated[
    str,
    typer.Option(
        "--data", help="Image folder or URL prefix (recursive), or a manifest CSV/Parquet (id,path)."
    ),
]
Out = Annotated[
    str,
    typer.Option("--out", help="Pool file to write (.parquet), '-' for stdout; with --shard, a directory."),
]
Checkpoint = Annotated[
    str | None,
    typer.Option(
        "--checkpoint", help="state_dict (or, with --trust-checkpoint, a pickled module or TorchScript)."
    ),
]
NumClasses = Annotated[
    int | None,
    typer.Option("--num-classes", help="Classes K of the head (default: read from the checkpoint)."),
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
Mean = Annotated[str | None, typer.Option("--mean", help="Normalisation mean R,G,B (default: ImageNet).")]
Std = Annotated[str | None, typer.Option("--std", help="Normalisation std R,G,B (default: ImageNet).")]


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


# Options every extract command takes, added to each command's signature by `shared_options`, so they
# are declared (flags, help, default) once. The order here is the order in `--help`.
SHARED: dict[str, tuple[Any, Any]] = {
    "data": (Data, ...),
    "out": (Out, ...),
    "num_classes": (NumClasses, None),
    "weights": (Weights, None),
    "class_names": (ClassNames, None),
    "num_workers": (NumWorkers, 2),
    "device": (Device, "auto"),
    "shard": (Shard, None),
    "skip_bad_images": (SkipBadImages, False),
    "trust_checkpoint": (Trust, False),
    "io_concurrency": (
        Annotated[int, typer.Option("--io-concurrency", help="Remote images fetched at once (URL --data).")],
        16,
    ),
    "storage_option": (ui.StorageOption, []),
    "ray": (
        Annotated[bool, typer.Option("--ray", help="Run the model in Ray actors (see --workers).")],
        False,
    ),
    "workers": (
        Annotated[int | None, typer.Option("--workers", help="With --ray: model actors (default 2).")],
        None,
    ),
    "gpus_per_worker": (
        Annotated[
            float | None,
            typer.Option("--gpus-per-worker", help="With --ray: GPUs per model actor (default 0)."),
        ],
        None,
    ),
    "ray_address": (ui.RayAddress, None),
    "json_summary": (ui.JsonSummary, False),
    "quiet": (ui.Quiet, False),
}


def shared_options(func: Callable[..., None]) -> Callable[..., None]:
    """Give an extract command the SHARED options as keyword parameters (Typer reads `__signature__`)."""
    signature = inspect.signature(func, eval_str=True)
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=keyword) for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = [inspect.Parameter(name, keyword, default=d, annotation=a) for name, (a, d) in SHARED.items()]
    func.__signature__ = signature.replace(parameters=[*shared, *own])  # type: ignore[attr-defined]
    return func


def run_extract(config: type, options: dict[str, Any], **task_options: Any) -> None:
    """Build the task's config from the shared and the task's options, run it, and report."""
    from uwe_cli.data import parse_shard
    from uwe_cli.ids import read_class_names

    quiet, json_summary = options.pop("quiet"), options.pop("json_summary")
    storage_options = options.pop("storage_option")
    ray_given = {k: options[k] for k in ("workers", "gpus_per_worker", "ray_address")}
    ui.refuse_ray_options_without_ray(options["ray"], **ray_given)
    for key in ("workers", "gpus_per_worker"):  # unset: the config's defaults
        if options[key] is None:
            del options[key]
    with ui.cli_errors():
        ui.apply_storage_options(storage_options)
        names, files = read_class_names(options.pop("class_names"))
        shard = parse_shard(options.pop("shard"))
        cfg = config(**options, **task_options, class_names=names, shard=shard, extra_inputs=files)
    _run(cfg, quiet, json_summary)


def _run(cfg: Any, quiet: bool, json_summary: bool) -> None:
    """Run a task config through its extractor and report (progress, warnings, summary or JSON)."""
    from uwe_cli.extract.runner import run_extraction

    ui.refuse_two_stdout_outputs(cfg.out, json_summary)
    with ui.cli_errors():
        task = cfg.make_task()
        with ui.progress_callback(
            f"extracting ({task.name})", ui.show_progress(quiet or json_summary), "images"
        ) as update:
            result = run_extraction(task, update, ui.warn)
        for item, message in result.skipped if result.skip_report is None else []:
            ui.warn(f"left out {item.id}: {message}")
        if result.skip_report is not None:
            ui.warn(f"{len(result.skipped)} unreadable image(s) left out; listed in {result.skip_report}")
        if json_summary:
            ui.emit_json(result.summary())
        elif not quiet and result.rows:  # (an empty shard has said so in its warning)
            s = result.summary()
            resumed = f", {s['resumed']} resumed" if s["resumed"] else ""
            redone = f", {s['redone']} redone (changed since)" if s["redone"] else ""
            extra = ", ".join(f"{k} {v}" for k, v in result.details.items() if v not in (None, "", 0))
            ui.stderr.print(
                f"wrote {s['rows']:,} rows to {s['out']} ({task.name}, d={s['feature_dim']}, K={s['num_classes']}; "
                f"{s['processed']:,} images at {s['images_per_second']:.1f} images/s on {s['device']}"
                f"{resumed}{redone}{'; ' + extra if extra else ''})",
                soft_wrap=True,
                markup=False,
            )


@shared_options
def classification(
    model: str | None = typer.Option(
        None, "--model", help="torchvision model name (e.g. resnet18) or pkg.module:factory."
    ),
    checkpoint: list[str] = typer.Option(
        [],
        "--checkpoint",
        help="state_dict (or, trusted, a pickled module / TorchScript); repeat for an ensemble.",
    ),
    feature_layer: str | None = typer.Option(
        None,
        "--feature-layer",
        help="Dotted module name whose output is the feature (default: last Linear input).",
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Centre-crop size in pixels (default: 224)."
    ),
    resize: int | None = typer.Option(
        None, "--resize", help="Shorter side before cropping (default: image-size / 0.875)."
    ),
    mean: Mean = None,
    std: Std = None,
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    amp: Amp = False,
    mc_dropout: int = typer.Option(0, "--mc-dropout", help="Stochastic passes with dropout on (adds bald)."),
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the probs column."),
    **options: Any,
) -> None:
    """Run a classifier over images and write a Parquet pool (feature, uncertainty, probs, pred)."""
    from uwe_cli.extract.classification import ClassificationConfig

    with ui.cli_errors():
        mean_rgb, std_rgb = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    run_extract(
        ClassificationConfig, options, model=model, checkpoints=list(checkpoint), feature_layer=feature_layer,
        image_size=image_size, resize=resize, mean=mean_rgb, std=std_rgb, batch_size=batch_size, amp=amp,
        mc_dropout=mc_dropout, write_probs=not no_probs,
    )  # fmt: skip


@shared_options
def segmentation(
    model: str | None = typer.Option(
        None,
        "--model",
        help="torchvision segmentation model (e.g. deeplabv3_resnet50) or pkg.module:factory.",
    ),
    checkpoint: Checkpoint = None,
    feature_layer: str | None = typer.Option(
        None,
        "--feature-layer",
        help="Dotted module name whose INPUT is the pixel feature (default: last Conv2d with K outputs).",
    ),
    region_size: str | None = typer.Option(
        None, "--region-size", help="none (one row per image), N or HxW: one row per region of the grid."
    ),
    region_stride: str | None = typer.Option(
        None, "--region-stride", help="N or HxW step between regions (default: the region size)."
    ),
    resize: str | None = typer.Option(
        None, "--resize", help="none (native size), N (shorter side) or HxW before the model."
    ),
    mean: Mean = None,
    std: Std = None,
    batch_size: int = typer.Option(2, "--batch-size", help="Images per forward pass (equal sizes only)."),
    amp: Amp = False,
    heatmaps: str | None = typer.Option(
        None, "--heatmaps", help="Write DIR/<image id>.png: pixel uncertainty as a colour map."
    ),
    heatmap_measure: str = typer.Option(
        "entropy", "--heatmap-measure", help="entropy, bvsb or least_confidence for --heatmaps."
    ),
    **options: Any,
) -> None:
    """Run a segmentation model over images; write a Parquet pool of mean pixel uncertainty and features."""
    from uwe_cli.extract.segmentation import SegmentationConfig

    with ui.cli_errors():
        mean_rgb, std_rgb = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    run_extract(
        SegmentationConfig, options, model=model, checkpoint=checkpoint, feature_layer=feature_layer,
        region_size=region_size, region_stride=region_stride, resize=resize, mean=mean_rgb, std=std_rgb,
        batch_size=batch_size, amp=amp, heatmaps=heatmaps, heatmap_measure=heatmap_measure,
    )  # fmt: skip


@shared_options
def detection(
    model: str | None = typer.Option(
        None,
        "--model",
        help="torchvision detector (e.g. fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn_v2, "
        "fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large) or pkg.module:factory.",
    ),
    checkpoint: Checkpoint = None,
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
        help="Shorter side the detector resizes to (R-CNN, RetinaNet, FCOS) (default: the model's own).",
    ),
    max_size: int | None = typer.Option(
        None,
        "--max-size",
        help="Longer-side cap of that resize (R-CNN, RetinaNet, FCOS) (default: the model's own).",
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per forward pass."),
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the per-box probs column."),
    visualize: str | None = typer.Option(
        None, "--visualize", help="Folder for PNGs with the kept boxes; per class the max-bvsb box in bold."
    ),
    **options: Any,
) -> None:
    """Run a detector over images and write a detection pool: one row per kept box (label, score, box,
    bvsb/entropy/least_confidence, probs, feature) and a null-label row per image without boxes.

    --num-classes counts class outputs as torchvision does: background included for R-CNN and SSD (VOC: 21).
    """
    from uwe_cli.extract.detection import DetectionConfig

    run_extract(
        DetectionConfig, options, model=model, checkpoint=checkpoint, score_threshold=score_threshold,
        max_detections=max_detections, min_size=min_size, max_size=max_size, batch_size=batch_size,
        write_probs=not no_probs, visualize=visualize,
    )  # fmt: skip
