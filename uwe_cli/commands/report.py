"""`uwe report BATCH --pool POOL --out report.html`: one self-contained page showing the batch and why."""

from __future__ import annotations

from pathlib import Path

import typer

from uwe_cli.commands import _common as ui


def report(
    batch: ui.BatchFile,
    pool: ui.BatchPool,
    out: str = typer.Option(..., "--out", "-o", help="HTML file to write ('-' for stdout)."),
    labeled: str | None = typer.Option(None, help="Labeled IDs (as given to `uwe select --labeled`)."),
    settings: Path | None = typer.Option(
        None, help="The JSON line of `uwe select --json`: shown, and its tau/uncertainty/... used."
    ),
    uncertainty: str | None = typer.Option(None, help="Uncertainty column (default: as select: auto)."),
    tau: float | None = typer.Option(None, help="Power on the uncertainty for the map (default 1)."),
    normalize: str | None = typer.Option(None, help="minmax | none (default minmax)."),
    aggregate: str | None = typer.Option(None, help="Detection pools: max | mean (default max)."),
    heatmaps: Path | None = typer.Option(
        None, help="Folder of `uwe extract segmentation --heatmaps`: drawn over the thumbnails."
    ),
    images: Path | None = typer.Option(
        None, help="Read images from DIR/<image ID> instead of the pool's source paths."
    ),
    class_names: str | None = typer.Option(
        None, help="Class names in label order: a file (one per line) or 'a,b,c'. Default: the pool's."
    ),
    map_method: str = typer.Option(
        "pca", "--map", help="pca | umap (UMAP needs umap-learn: pip install 'uwe-cli[umap]')."
    ),
    max_points: int = typer.Option(20_000, help="Points on the map (every picked and labeled unit is kept)."),
    thumb_size: int = typer.Option(224, help="Longest side of the embedded thumbnails, in pixels."),
    quality: int = typer.Option(80, min=10, max=95, help="JPEG quality of the thumbnails."),
    title: str | None = typer.Option(None, help="Page title (default: the batch file name)."),
    seed: int = typer.Option(0, help="Seed of the map subsample and projection."),
    json_summary: ui.JsonSummary = False,
    quiet: ui.Quiet = False,
    storage_option: ui.StorageOption = [],  # noqa: B006 - Typer reads the default, never mutated
) -> None:
    """Write a self-contained HTML report: thumbnails in pick order, map, histograms, settings."""
    from uwe_cli.ids import read_class_names
    from uwe_cli.report import ReportOptions, run_report

    inputs = [batch, *pool, *(p for p in (labeled, settings, heatmaps, images, class_names) if p is not None)]
    with ui.output_target(out, inputs, json_summary, storage_option) as target:
        opts = ReportOptions(
            labeled=labeled,
            heatmaps=heatmaps,
            images=images,
            settings=settings,
            uncertainty=uncertainty,
            tau=tau,
            normalize=normalize,
            aggregate=aggregate,
            map=map_method,
            max_points=max_points,
            thumb_size=thumb_size,
            quality=quality,
            seed=seed,
            title=title,
            class_names=read_class_names(class_names)[0],
        )
        with ui.progress_callback("thumbnails", ui.show_progress(quiet), rate_unit="images") as progress:
            summary = run_report(batch, pool, target, opts, progress)
    notes = summary.pop("notes")
    if not quiet:
        for note in notes:
            ui.stderr.print(f"note: {note}", soft_wrap=True, markup=False)
    if json_summary:
        ui.emit_json(summary)
    if not quiet:
        ui.stderr.print(
            f"uwe report: {summary['picks']} picks, map of {summary['map_points']:,} of {summary['pool_size']:,} "
            f"units → {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB) · {summary['seconds']:.2f} s"
        )
