"""`uwe extract classification`: parse and validate options, run the library, report on stderr."""

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


def classification(
    data: Data,
    out: Out,
    model: str | None = typer.Option(
        None, "--model", help="torchvision model name (e.g. resnet18) or pkg.module:factory."
    ),
    checkpoint: list[Path] = typer.Option(
        [], "--checkpoint", help="state_dict, pickled nn.Module or TorchScript file; repeat for an ensemble."
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="Classes of the head (default: read from the checkpoint)."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="torchvision weights (e.g. IMAGENET1K_V1), from the local cache only."
    ),
    feature_layer: str | None = typer.Option(
        None,
        "--feature-layer",
        help="Dotted module name whose output is the feature (default: last Linear input).",
    ),
    class_names: ClassNames = None,
    image_size: int | None = typer.Option(
        None, "--image-size", help="Centre-crop size in pixels (default 224)."
    ),
    resize: int | None = typer.Option(
        None, "--resize", help="Shorter side before cropping (default image-size / 0.875)."
    ),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean R,G,B (default ImageNet)."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std R,G,B (default ImageNet)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    num_workers: NumWorkers = 2,
    device: Device = "auto",
    amp: bool = typer.Option(False, "--amp", help="Half-precision autocast (CUDA only)."),
    mc_dropout: int = typer.Option(0, "--mc-dropout", help="Stochastic passes with dropout on (adds bald)."),
    shard: Shard = None,
    skip_bad_images: SkipBadImages = False,
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the probs column."),
    quiet: Quiet = False,
) -> None:
    """Run a classifier over images and write a Parquet pool (feature, uncertainty, probs, pred)."""
    with cli_errors():
        from uwe_cli.data import parse_shard
        from uwe_cli.extract.classification import ClassificationConfig, extract_classification

        cfg = ClassificationConfig(
            data=data,
            out=out,
            model=model,
            checkpoints=list(checkpoint),
            num_classes=num_classes,
            weights=weights,
            feature_layer=feature_layer,
            class_names=parse_class_names(class_names),
            image_size=image_size,
            resize=resize,
            mean=parse_floats(mean, "--mean"),
            std=parse_floats(std, "--std"),
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            amp=amp,
            mc_dropout=mc_dropout,
            shard=parse_shard(shard),
            skip_bad_images=skip_bad_images,
            write_probs=not no_probs,
        )
        warn_amp_on_cpu(amp, device)
        with _progress(show_progress(quiet)) as update:
            result = extract_classification(cfg, progress=update)
        warn_skipped(result)
        if not quiet:
            resumed = f", {result.resumed} resumed from an earlier run" if result.resumed else ""
            stderr.print(
                f"wrote {result.rows} rows to {result.out} (d={result.feature_dim}, K={result.num_classes}"
                f"{resumed}; {result.processed} images at {result.images_per_second:.1f} images/s on "
                f"{result.device})",
                soft_wrap=True,
            )


class _progress:
    """A rich progress bar with images/s on stderr, or a no-op callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("extracting"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} images/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        )
        self.bar.__enter__()
        task = self.bar.add_task("extracting", total=None, rate="-")
        state = {"start": None, "first": 0}

        def update(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            if state["start"] is None:
                state["start"], state["first"] = now, done
            elapsed = now - state["start"]
            rate = f"{(done - state['first']) / elapsed:.1f}" if elapsed > 0 else "-"
            self.bar.update(task, completed=done, total=total, rate=rate)  # type: ignore[union-attr]

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)  # type: ignore[arg-type]
