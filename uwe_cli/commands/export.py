"""`uwe export BATCH --pool POOL --to labelstudio|coco|csv --out FILE`: the batch for annotation tools."""

from __future__ import annotations

from pathlib import Path

import typer

from uwe_cli.commands import _common as ui


def export(
    batch: ui.BatchFile,
    pool: ui.BatchPool,
    to: str = typer.Option(..., "--to", help="labelstudio | coco | csv."),
    out: str = typer.Option(..., "--out", "-o", help="File to write, or '-' for stdout."),
    predictions: str = typer.Option(
        "auto",
        help="Pre-annotations: auto | choices | rectanglelabels | rectangle | none (auto: choices for "
        "classification, rectanglelabels for detection, rectangle for region pools).",
    ),
    min_score: float | None = typer.Option(None, help="Only boxes (or classes) with at least this score."),
    class_names: str | None = typer.Option(
        None,
        help="Class names in label order: a file (one per line) or 'a,b,c'; an empty name drops that "
        "class's predictions. Default: the pool's.",
    ),
    url_prefix: str | None = typer.Option(
        None, help="Image reference = this prefix + the image ID (URL-quoted), e.g. https://host/images/."
    ),
    path_map: list[str] = typer.Option(
        [], "--path-map", help="OLD=NEW: rewrite image paths starting with OLD (repeatable)."
    ),
    images: Path | None = typer.Option(
        None, help="Read images from DIR/<image ID> instead of the pool's source paths."
    ),
    from_name: str | None = typer.Option(
        None, help="Label Studio control name (default: choice, label or region by type)."
    ),
    to_name: str = typer.Option("image", help="Label Studio image tag name (its value must be $image)."),
    model_version: str = typer.Option("uwe", help="Label Studio prediction model_version."),
    json_summary: ui.JsonSummary = False,
    quiet: ui.Quiet = False,
    storage_option: ui.StorageOption = [],  # noqa: B006 - Typer reads the default, never mutated
) -> None:
    """Write the batch as Label Studio tasks, COCO or CSV, with the model's predictions as pre-annotations."""
    from uwe_cli.export import ExportOptions, ImageRefs, parse_path_map, run_export
    from uwe_cli.ids import read_class_names

    inputs = [batch, *pool, *(p for p in (images, class_names) if p is not None)]
    with ui.output_target(out, inputs, json_summary, storage_option) as target:
        opts = ExportOptions(
            to=to,
            predictions=predictions,
            min_score=min_score,
            from_name=from_name,
            to_name=to_name,
            model_version=model_version,
            refs=ImageRefs(url_prefix, parse_path_map(path_map)),
            images=images,
        )
        names, _ = read_class_names(class_names)
        with ui.progress_callback("reading image sizes", ui.show_progress(quiet)) as progress:
            result = run_export(batch, pool, target, opts, names, progress)
    s = result.summary
    if json_summary:
        ui.emit_json(s)
    if not quiet:
        ui.stderr.print(
            f"uwe export: {s['picks']} picks ({s['images']} images) → {s['to']} {s['out']}; "
            f"predictions: {s['predictions']} ({s['predicted_picks']} picks with predictions, "
            f"{s['results']} results) · {s['seconds']:.2f} s"
        )
