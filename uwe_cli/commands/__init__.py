"""One module per command; each exposes a plain function that `uwe_cli.cli` registers on the Typer app."""
