"""`uwe extract classification`: parse and validate options, run the library, report on stderr."""

from __future__ import annotations

from pathlib import Path

import typer

from uwe_cli.commands._common import cli_errors, show_progress, stderr, warn
from uwe_cli.errors import DataError


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise DataError(f"{option} takes three comma-separated numbers, got '{text}'") from None
    if len(values) != 3:
        raise DataError(f"{option} takes three comma-separated numbers (R,G,B), got '{text}'")
    return values


def _class_names(text: str | None) -> list[str] | None:
    """A text file with one name per line, or a comma-separated list."""
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise DataError(f"--class-names file {path} is empty")
        return names
    return [name.strip() for name in text.split(",")]


def classification(
    data: Path = typer.Option(
        ..., "--data", help="Image folder (recursive) or manifest CSV/Parquet (id,path)."
    ),
    out: Path = typer.Option(..., "--out", help="Pool file to write (.parquet); with --shard, a directory."),
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
    class_names: str | None = typer.Option(
        None, "--class-names", help="File with one class name per line, or a comma-separated list."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Centre-crop size in pixels (default 224)."
    ),
    resize: int | None = typer.Option(
        None, "--resize", help="Shorter side before cropping (default image-size / 0.875)."
    ),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean R,G,B (default ImageNet)."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std R,G,B (default ImageNet)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    num_workers: int = typer.Option(2, "--num-workers", help="DataLoader worker processes decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp", help="Half-precision autocast (CUDA only)."),
    mc_dropout: int = typer.Option(0, "--mc-dropout", help="Stochastic passes with dropout on (adds bald)."),
    shard: str | None = typer.Option(
        None, "--shard", help="K/N: process the K-th (0-based) of N slices into OUT/part-K-of-N.parquet."
    ),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images", help="Leave unreadable images out and list them in OUT.skipped.csv."
    ),
    no_probs: bool = typer.Option(False, "--no-probs", help="Do not write the probs column."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
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
            class_names=_class_names(class_names),
            image_size=image_size,
            resize=resize,
            mean=_floats(mean, "--mean"),
            std=_floats(std, "--std"),
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            amp=amp,
            mc_dropout=mc_dropout,
            shard=parse_shard(shard),
            skip_bad_images=skip_bad_images,
            write_probs=not no_probs,
        )
        if amp and device == "cpu":
            warn("--amp only applies on CUDA; running in float32 on the CPU")
        with _progress(show_progress(quiet)) as update:
            result = extract_classification(cfg, progress=update)
        if result.skipped:
            warn(f"{len(result.skipped)} unreadable image(s) left out; listed in {result.skip_report}")
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
