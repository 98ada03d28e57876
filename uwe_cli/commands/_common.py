"""Shared CLI plumbing: error reporting, stderr console, progress bars."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator

import typer
from rich.console import Console

from uwe_cli import config
from uwe_cli.errors import UweError

stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    first_line = " ".join(str(message).split())
    stderr.print(f"[bold red]error:[/] {first_line}", soft_wrap=True, markup=True)
    return typer.Exit(code)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn library errors into exit code 2 with one line, anything unexpected into exit 1."""
    try:
        yield
    except UweError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except MemoryError:
        raise fail("out of memory; try a smaller pool, --max-memory, or float16 features", 1) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if config.DEBUG:
            traceback.print_exc(file=sys.stderr)
        raise fail(
            f"unexpected {type(exc).__name__}: {exc} (set UWE_DEBUG=1 for the full traceback)", 1
        ) from None


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def show_progress(quiet: bool = False) -> bool:
    return not quiet and not config.NO_PROGRESS and stderr.is_terminal


@contextlib.contextmanager
def progress_callback(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A `(done, total)` callback drawing a rich progress bar on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
