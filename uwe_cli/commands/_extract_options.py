"""Options and option parsing shared by the `uwe extract` commands.

Each alias carries an option's flags and help text; the default stays in the command's signature
(`num_workers: NumWorkers = 2`), so a command only spells out the options that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uwe_cli.commands._common import warn
from uwe_cli.errors import DataError

Data = Annotated[
    Path, typer.Option("--data", help="Image folder (recursive) or manifest CSV/Parquet (id,path).")
]
Out = Annotated[Path, typer.Option("--out", help="Pool file to write (.parquet); with --shard, a directory.")]
ClassNames = Annotated[
    str | None,
    typer.Option("--class-names", help="File with one class name per line, or a comma-separated list."),
]
NumWorkers = Annotated[
    int, typer.Option("--num-workers", help="DataLoader worker processes decoding images.")
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Shard = Annotated[
    str | None,
    typer.Option("--shard", help="K/N: process the K-th (0-based) of N slices into OUT/part-K-of-N.parquet."),
]
SkipBadImages = Annotated[
    bool,
    typer.Option("--skip-bad-images", help="Leave unreadable images out and list them in OUT.skipped.csv."),
]
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


def parse_class_names(text: str | None) -> list[str] | None:
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


def warn_amp_on_cpu(amp: bool, device: str) -> None:
    if amp and device == "cpu":
        warn("--amp only applies on CUDA; running in float32 on the CPU")


def warn_skipped(result: Any) -> None:
    """The images --skip-bad-images left out, and where they are listed."""
    if result.skipped:
        warn(f"{len(result.skipped)} unreadable image(s) left out; listed in {result.skip_report}")
