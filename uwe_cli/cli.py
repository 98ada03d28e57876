"""The `uwe` command: parse, validate, call the library. Heavy imports stay inside the commands."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from uwe_cli import __version__
from uwe_cli.commands import export as export_cmd
from uwe_cli.commands import extract as extract_cmd
from uwe_cli.commands import inspect as inspect_cmd
from uwe_cli.commands import report as report_cmd
from uwe_cli.commands import select as select_cmd
from uwe_cli.commands import simulate as simulate_cmd
from uwe_cli.commands._common import fail


class OneLineErrors(TyperGroup):
    """Usage errors (a bad value, an unknown option or command, a missing argument) on one stderr line.

    Typer's default is a multi-line box; the contract is one line naming the culprit, exit code 2.
    """

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            typer.echo(exc.format_message(), err=True)
            code = exc.exit_code
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            code = fail(f"{exc.format_message()}{hint}", exc.exit_code).exit_code
        except typer.Abort:
            code = fail("aborted", 1).exit_code
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="uwe",
    cls=OneLineErrors,
    help="Pick the next images to label: uncertainty-weighted embeddings + exact K-Center-Greedy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
extract_app = typer.Typer(
    cls=TyperGroup,
    help="Run a model over images and write a Parquet pool of uncertainty and features.",
    no_args_is_help=True,
)
app.add_typer(extract_app, name="extract")

app.command("select")(select_cmd.select)
app.command("inspect")(inspect_cmd.inspect)
app.command("export")(export_cmd.export)
app.command("report")(report_cmd.report)
app.command("simulate")(simulate_cmd.simulate)
extract_app.command("classification")(extract_cmd.classification)
extract_app.command("segmentation")(extract_cmd.segmentation)
extract_app.command("detection")(extract_cmd.detection)


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
    """Run the command, then end the process without the interpreter's teardown.

    Tearing down numba's compiled modules and OpenMP (or torch) takes 0.3–0.5 s after the work is
    done, a sixth of a small `uwe select`. By then every output is written and closed (atomic writes in
    with-blocks), so once the exit handlers have run (Ray's shutdown among them) and stdout/stderr are
    flushed, the process ends at once. While another non-daemon thread still runs, Python exits as usual.
    """
    try:
        app()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`): nothing to deliver
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
