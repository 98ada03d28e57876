"""`uwe select`: parse and validate options, call `uwe_cli.select.run_select`, write the batch."""

from __future__ import annotations

import typer

from uwe_cli.commands import _common as ui
from uwe_cli.selection.strategies import strategy_help


def select(
    pools: list[str] = typer.Argument(
        ..., help="Parquet pool file(s) or directories (URL prefixes) of parts."
    ),
    budget: int = typer.Option(..., "--budget", "-b", help="How many units to select."),
    out: str = typer.Option(..., "--out", "-o", help="Batch CSV to write, or '-' for stdout."),
    labeled: str | None = typer.Option(
        None, help="Already labeled IDs: CSV with an 'id' column or one ID per line (path or URL)."
    ),
    exclude: str | None = typer.Option(None, help="IDs never to select (same formats as --labeled)."),
    strategy: str = typer.Option("uwe", help=f"{strategy_help()}."),
    uncertainty: str = typer.Option(
        "auto",
        help="Uncertainty column: entropy | bvsb | least_confidence | any float column (auto: entropy, "
        "then bvsb, then least_confidence; bvsb for detection pools).",
    ),
    tau: float = typer.Option(1.0, help="Power on the uncertainty: uwe = u^tau · f (0 = CoreSet)."),
    normalize: str = typer.Option("minmax", help="minmax (over labeled + candidates) | none."),
    aggregate: str = typer.Option(
        "max", help="Detection pools: per class the max-uncertainty box, or the mean."
    ),
    seed: int = typer.Option(0, help="Seed for random, kmeanspp and badge."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    max_memory: ui.MaxMemory = None,
    json_summary: ui.JsonSummary = False,
    quiet: ui.Quiet = False,
    storage_option: ui.StorageOption = [],  # noqa: B006 - Typer reads the default, never mutated
    ray: bool = typer.Option(
        False, "--ray", help="Run on a Ray cluster: the pool spread over --workers actors."
    ),
    ray_address: ui.RayAddress = None,
    workers: int | None = typer.Option(
        None, "--workers", help="With --ray: actors holding a share of the pool each (default 2)."
    ),
) -> None:
    """Choose the next batch to label from a pool of per-sample uncertainty and features."""
    from uwe_cli.batch import write_batch
    from uwe_cli.select import run_select
    from uwe_cli.selection.request import RayOptions, parse_memory

    ui.refuse_ray_options_without_ray(ray, workers=workers, ray_address=ray_address)
    inputs = [*pools, *(p for p in (labeled, exclude) if p is not None)]
    with ui.output_target(out, inputs, json_summary, storage_option) as target:
        limit = parse_memory(max_memory) if max_memory else None
        with ui.progress_callback("selecting", ui.show_progress(quiet)) as progress:
            result = run_select(
                pools, budget, strategy=strategy, uncertainty=uncertainty, tau=tau, normalize=normalize,
                labeled=labeled, exclude=exclude, aggregate=aggregate, seed=seed, device=device,
                max_memory=limit, progress=progress,
                ray=RayOptions(workers=2 if workers is None else workers, address=ray_address) if ray else None,
            )  # fmt: skip
        for message in result.warnings:
            ui.warn(message)
        write_batch(result.batch, target)
        result.summary["out"] = out
        if json_summary:
            ui.emit_json(result.summary)
        if not quiet:
            _print_summary(result)


def _print_summary(result) -> None:
    from rich.table import Table
    from rich.text import Text

    s = result.summary
    table = Table(
        title=f"uwe select: {s['strategy']}, {len(result.batch)} of {s['candidates']:,} candidates",
        title_justify="left",
    )
    for col in ("rank", "id", "uncertainty", "distance"):
        table.add_column(col, overflow="fold")
    batch = result.batch
    shown = list(range(min(10, len(batch))))
    for i in shown:
        u, d = batch.uncertainty[i], batch.distance[i]
        table.add_row(
            str(i + 1), Text(batch.ids[i]), "" if u is None else f"{u:.4f}", "" if d is None else f"{d:.4f}"
        )
    if len(batch) > len(shown):
        table.add_row("…", Text(f"{len(batch) - len(shown)} more in {s['out']}"), "", "")
    ui.stderr.print(table)
    ui.stderr.print(
        f"pool {s['pool_size']:,} · labeled {s['labeled']:,} · excluded {s['excluded']:,} · {s['seconds']:.2f} s"
    )
