"""The CLI's one output layer: error lines, warnings, the progress factory, summaries as text or JSON.

Machine output (`--json`, a batch on stdout) goes to stdout; everything for people (progress,
tables, warnings, errors) goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from uwe_cli import config
from uwe_cli.errors import StdoutClosed, UweError

stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    first_line = escape(" ".join(str(message).split()))  # IDs and hints may hold [brackets]
    stderr.print(f"[bold red]error:[/] {first_line}", soft_wrap=True, markup=True)
    return typer.Exit(code)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn library errors into exit code 2 with one line, anything unexpected into exit 1."""
    try:
        with stdout_reader_gone():
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


@contextlib.contextmanager
def stdout_reader_gone() -> Iterator[None]:
    """The reader of stdout closed it (`| head`): end quietly with 141, as a program ended by SIGPIPE."""
    try:
        yield
    except (StdoutClosed, BrokenPipeError):
        from uwe_cli.outputs import silence_stdout

        with contextlib.suppress(OSError):
            silence_stdout()
        raise typer.Exit(141) from None


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, markup=True)


def show_progress(quiet: bool = False) -> bool:
    return not quiet and not config.NO_PROGRESS and stderr.is_terminal


@contextlib.contextmanager
def progress_callback(
    description: str, enabled: bool, rate_unit: str | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """A `(done, total)` callback drawing a progress bar on stderr (with items/s when `rate_unit` is
    given, measured from the first call so resumed work does not count), or None when disabled."""
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

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate_unit:
        columns.append(TextColumn(f"{{task.fields[rate]}} {rate_unit}/s"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=None, rate="-")
        first: list[float] = []

        def update(done: int, total: int) -> None:
            now = time.perf_counter()
            if not first:
                first.extend((now, done))
            elapsed = now - first[0]
            rate = f"{(done - first[1]) / elapsed:.1f}" if elapsed > 0 else "-"
            progress.update(task, completed=done, total=total, rate=rate)

        yield update


def emit_json(summary: dict[str, Any]) -> None:
    """The one-line JSON summary of `--json`, on stdout."""
    with stdout_reader_gone():
        typer.echo(json.dumps(summary, sort_keys=True, default=str))


def refuse_ray_options_without_ray(ray: bool, **given: Any) -> None:
    """`--workers` and friends only mean something with `--ray`; silently ignoring them misleads."""
    if not ray:
        for name, value in given.items():
            if value is not None:
                raise fail(f"--{name.replace('_', '-')} applies with --ray only; add --ray or drop it")


def refuse_two_stdout_outputs(out: object, json_summary: bool) -> None:
    """`--json` beside an output that is stdout: `-`, or a path to stdout's own file (/dev/stdout)."""
    from uwe_cli.outputs import is_stdout

    if json_summary and (str(out) == "-" or is_stdout(out)):
        raise fail(f"--json and --out {out} both write to stdout; write the output to a file with --out FILE")


StorageOption = Annotated[
    list[str],
    typer.Option(
        "--storage-option",
        help="KEY=VALUE passed to the remote filesystem (fsspec), e.g. anon=true, endpoint_url=...; repeatable.",
    ),
]


def apply_storage_options(pairs: list[str]) -> None:
    """Configure remote filesystems for this run (credentials come from the environment otherwise)."""
    from uwe_cli import storage

    storage.configure(storage.parse_storage_options(pairs))


# Options several commands take, declared (flag, help) once.
JsonSummary = Annotated[bool, typer.Option("--json", help="Print a one-line JSON summary on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
MaxMemory = Annotated[
    str | None, typer.Option("--max-memory", help="Refuse pools needing more memory than this (e.g. 8G).")
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="Ray cluster HOST:PORT (default: RAY_ADDRESS, else a local instance)."
    ),
]
BatchFile = Annotated[str, typer.Argument(help="Batch CSV written by `uwe select` (path or URL).")]
BatchPool = Annotated[
    list[str], typer.Option("--pool", "-p", help="The pool the batch was selected from (path or URL).")
]


@contextlib.contextmanager
def output_target(
    out: str,
    inputs: list[Any],
    json_summary: bool = False,
    storage_option: list[str] | None = None,
    **kw: Any,
) -> Iterator[Any]:
    """The body of a command that writes `out`, inside `cli_errors`: `--json` beside `--out -` refused,
    remote filesystems configured, and `out` resolved (never one of `inputs`; `kw` to `resolve_output`)."""
    from uwe_cli.outputs import resolve_output

    refuse_two_stdout_outputs(out, json_summary)
    with cli_errors():
        apply_storage_options(storage_option or [])
        yield resolve_output(out, "--out", inputs=inputs, **kw)
