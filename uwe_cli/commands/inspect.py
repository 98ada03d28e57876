"""`uwe inspect POOL`: schema, row count, feature dimension, uncertainty statistics, metadata."""

from __future__ import annotations

import json

import typer

from uwe_cli.commands import _common as ui


def inspect(
    pool: str = typer.Argument(..., help="Parquet pool file or directory (URL prefix) of parts."),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    storage_option: ui.StorageOption = [],  # noqa: B006 - Typer reads the default, never mutated
) -> None:
    """Describe a pool: rows, feature dimension, task, uncertainty columns (min/mean/max), metadata."""
    from uwe_cli.describe import describe_pool

    with ui.cli_errors():
        ui.apply_storage_options(storage_option)
        info = describe_pool(pool)
    if json_out:
        ui.emit_json(info)
        return
    with ui.stdout_reader_gone():
        _print(info)


def _print(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, markup=False)
    console.on_broken_pipe = _broken_pipe  # type: ignore[method-assign]  # rich would exit 1 itself
    console.print(f"{info['path']}  ({info['files']} file{'s' if info['files'] != 1 else ''})")
    console.print(f"rows: {info['rows']:,}" + (f"   images: {info['images']:,}" if "images" in info else ""))
    console.print(f"task: {info['task']}   feature dim: {info['feature_dim']}")
    table = Table("column", "min", "mean", "max", "nulls", title="float columns", title_justify="left")
    for name, s in info["uncertainty"].items():
        values = [("-" if s[k] is None else f"{s[k]:.6g}") for k in ("min", "mean", "max")]
        table.add_row(name, *values, str(s["nulls"]))
    console.print(table)
    console.print("columns: " + ", ".join(f"{k} ({v})" for k, v in info["columns"].items()))
    if info["metadata"]:
        console.print("metadata: " + json.dumps(info["metadata"], sort_keys=True))


def _broken_pipe() -> None:
    raise BrokenPipeError
