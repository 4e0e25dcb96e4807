"""The `sla` command line. Each subcommand is a thin shell over one function of sla_core/tuning/flows.

Heavy imports (torch, deepspeed, ray, prefect, mlflow) happen inside the commands so `sla --help` is fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sla",
    help="Structure-learnable adapters: learn where adapters go and which each task needs.",
    no_args_is_help=True,
    add_completion=False,
)

# Subcommands register themselves from their own modules (one per capability) to keep this file small.
from flows import commands as _commands  # noqa: E402,F401

if __name__ == "__main__":
    # Run as `python -m flows.cli`: use the imported module's app, on which the commands registered.
    from flows.cli import app as _app

    _app()
