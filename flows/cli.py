"""The `sla` command line. Each subcommand is a thin shell over one function of sla_core/tuning/flows.

Heavy imports (torch, deepspeed, ray, prefect, mlflow) happen inside the commands so `sla --help` is fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sla",
    help="Structure-learnable adapters: learn where adapters go and which each task needs.",
    epilog="Example: sla train --config configs/tiny.yaml   (then: sla predict --model runs/tiny/adapters "
    "--text 'a fine film')",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"sla {version('sla')}")
        except PackageNotFoundError:
            typer.echo("sla (not installed as a package; run `make setup`)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


# Subcommands register themselves from their own modules (one per capability) to keep this file small.
from flows import commands as _commands  # noqa: E402,F401

if __name__ == "__main__":
    # Run as `python -m flows.cli`: use the imported module's app, on which the commands registered.
    from flows.cli import app as _app

    _app()
