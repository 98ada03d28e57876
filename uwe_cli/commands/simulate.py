"""`uwe simulate`: parse and validate options, call `uwe_cli.simulate.run_simulation`, write DIR."""

from __future__ import annotations

import typer

from uwe_cli.commands import _common as ui


def simulate(
    pools: list[str] = typer.Argument(
        ..., help="Parquet pool file(s) or directories of parts (a unit pool; paths or URLs)."
    ),
    budgets: str = typer.Option(
        ...,
        "--budgets",
        help="Cumulative labeled counts, e.g. 100,200,400,800: the first is a seeded random start shared by "
        "every strategy, each later one adds a selected batch.",
    ),
    out: str = typer.Option(
        ..., "--out", "-o", help="Folder for results.json, results.csv and curves.png (created if needed)."
    ),
    labels: str | None = typer.Option(
        None, "--labels", help="Ground truth: a CSV with 'id' and 'label' columns (path or URL)."
    ),
    label_column: str | None = typer.Option(
        None, "--label-column", help="Ground truth from this pool column instead (integers or strings)."
    ),
    strategies: str = typer.Option(
        "uwe,coreset,uncertainty,random,badge", "--strategies", help="Strategies to compare, comma-separated."
    ),
    tau: str = typer.Option(
        "1", "--tau", help="Values of tau for uwe and kmeanspp, comma-separated (one curve each)."
    ),
    seeds: int = typer.Option(
        3, "--seeds", help="Runs with seeds 0..N-1 (random start, draws of random/badge)."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Stratified held-out share, never selected; measures accuracy."
    ),
    uncertainty: str = typer.Option(
        "entropy", help="The probe's uncertainty: entropy | bvsb | least_confidence."
    ),
    normalize: str = typer.Option("minmax", help="minmax (over labeled + candidates) | none."),
    probe_c: float = typer.Option(
        1.0, "--probe-c", help="Inverse L2 strength of the logistic-regression probe (scikit-learn's C)."
    ),
    plot: bool = typer.Option(
        True, "--plot/--no-plot", help="Write curves.png (needs matplotlib: pip install uwe-cli\\[plot])."
    ),
    device: str = typer.Option("auto", help="Selection engine device: auto | cpu | cuda."),
    max_memory: ui.MaxMemory = None,
    json_summary: ui.JsonSummary = False,
    quiet: ui.Quiet = False,
    storage_option: ui.StorageOption = [],  # noqa: B006 - Typer reads the default, never mutated
) -> None:
    """Which strategy and tau work on your data: replay active learning on labeled features with a probe."""
    from uwe_cli.selection.request import parse_memory
    from uwe_cli.simulate import (
        output_files,
        parse_float_list,
        parse_int_list,
        plot_available,
        run_simulation,
        write_results,
    )

    inputs = [*pools, *([labels] if labels is not None else [])]
    with ui.output_target(
        out, inputs, storage_option=storage_option, directory=True, allow_stdout=False
    ) as target:
        files = output_files(target, inputs)
        budget_list = parse_int_list(budgets, "--budgets")
        taus = parse_float_list(tau, "--tau")
        strategy_list = [s.strip() for s in strategies.split(",") if s.strip()]
        limit = parse_memory(max_memory) if max_memory else None
        if plot and not plot_available():
            ui.warn(
                "matplotlib is not installed, so no curves.png (pip install 'uwe-cli[plot]', or --no-plot)"
            )
            plot = False
        with ui.progress_callback("simulating", ui.show_progress(quiet)) as progress:
            result = run_simulation(
                pools,
                budget_list,
                strategies=strategy_list,
                taus=taus,
                seeds=seeds,
                labels=labels,
                label_column=label_column,
                test_fraction=test_fraction,
                uncertainty=uncertainty,
                normalize=normalize,
                probe_c=probe_c,
                device=device,
                max_memory=limit,
                progress=progress,
            )
        for message in result.warnings:
            ui.warn(message)
        written = write_results(result, files, plot=plot)
        recommendation = result.recommendation()
        if not quiet:
            _print_table(result)
            ui.stderr.print(f"recommendation: {recommendation['text']}", soft_wrap=True, highlight=False)
        if json_summary:
            ui.emit_json(
                {
                    "out": str(target),
                    "files": written,
                    "units": result.pool["units"],
                    "held_out": result.pool["held_out"],
                    "budgets": result.budgets,
                    "seeds": len(result.seeds),
                    "curves": [
                        {
                            "curve": c.name,
                            "strategy": c.strategy,
                            "tau": c.tau,
                            "auc_mean": auc,
                            "auc_std": std,
                        }
                        for c, auc, std in result.ranking()
                    ],
                    "recommendation": recommendation,
                    "seconds": result.timing,
                }
            )


def _print_table(result) -> None:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from uwe_cli.simulate import _std

    held = result.pool["held_out"]
    table = Table(
        title=f"uwe simulate: probe accuracy on {held:,} held-out units, mean ± std over "
        f"{len(result.seeds)} seed(s), best first",
        title_justify="left",
    )
    table.add_column("strategy", no_wrap=True)
    for b in result.budgets:
        table.add_column(f"{b:,}", justify="right", no_wrap=True)
    table.add_column("AUC", justify="right", no_wrap=True)
    for curve, auc, std in result.ranking():
        acc = np.array([r.accuracy for r in result.runs[curve]])
        cells = [f"{acc[:, i].mean():.3f}±{_std(acc[:, i]):.3f}" for i in range(acc.shape[1])]
        table.add_row(curve.name, *cells, f"{auc:.4f}±{std:.4f}")
    # Not a terminal (a log file, CI): print the table at its natural width instead of folding it to 80.
    console = ui.stderr if ui.stderr.is_terminal else Console(stderr=True, highlight=False, width=400)
    console.print(table)
    t = result.timing
    ui.stderr.print(
        f"pool {result.pool['units']:,} units · {result.pool['selectable']:,} selectable · "
        f"{len(result.pool['classes'])} classes · {t.get('total', 0):.1f} s"
    )
