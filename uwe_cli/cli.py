"""The `uwe` command: parse, validate, call the library. Heavy imports stay inside the commands."""

from __future__ import annotations

import typer

from uwe_cli import __version__
from uwe_cli.commands import extract_classification
from uwe_cli.commands import extract_detection as extract_detection_cmd
from uwe_cli.commands import extract_segmentation as extract_segmentation_cmd
from uwe_cli.commands import inspect as inspect_cmd
from uwe_cli.commands import select as select_cmd

app = typer.Typer(
    name="uwe",
    help="Pick the next images to label: uncertainty-weighted embeddings + exact K-Center-Greedy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
extract_app = typer.Typer(
    help="Run a model over images and write a Parquet pool of uncertainty and features.",
    no_args_is_help=True,
)
app.add_typer(extract_app, name="extract")

app.command("select")(select_cmd.select)
app.command("inspect")(inspect_cmd.inspect)
# extract commands register here: extract_app.command("classification")(...)
extract_app.command("classification")(extract_classification.classification)
extract_app.command("segmentation")(extract_segmentation_cmd.segmentation)
extract_app.command("detection")(extract_detection_cmd.detection)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uwe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """uwe: hybrid active learning with uncertainty-weighted embeddings."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
