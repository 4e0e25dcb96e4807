"""`sla prepare`: validate, split, add noise, tokenize and cache tasks (sla_core.data.prepare_task)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from flows.cli import app


def _load_tokenizer(backbone: str) -> Any:
    from sla_core.backbones import load_tokenizer

    return load_tokenizer(backbone)


def _builtin_spec(name: str) -> Any:
    from pydantic import ValidationError

    from sla_core.data import ConfigError, TaskSpec
    from sla_core.data.spec import format_validation_error

    try:
        return TaskSpec(name=name)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"--task {name}")) from err


def _print_refs(refs: dict[str, Any], noisy: dict[str, dict[float, Any]], cache_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepared datasets in {cache_dir}")
    for col in ("task", "train", "val", "test", "labels", "skipped", "noise (measured)", "fingerprint"):
        table.add_column(col, overflow="fold")
    for name, ref in refs.items():
        measured = ref.noise.get("train", {}).get("measured", {})
        noise = " ".join(f"{k}={v:.3f}" for k, v in measured.items() if v) or "-"
        skipped = " ".join(f"{k}={n}" for k, n in ref.skipped.items()) or "-"
        table.add_row(
            name,
            *(str(ref.counts.get(s, 0)) for s in ("train", "validation", "test")),
            str(ref.num_labels),
            skipped,
            noise,
            ref.fingerprint[:10],
        )
        for level, nref in noisy.get(name, {}).items():
            split = next(iter(nref.counts))
            m = nref.noise[split]["measured"]
            table.add_row(
                f"  {split}@{level:g}",
                "",
                "",
                str(nref.counts[split]),
                "",
                "",
                f"char={m['char']:.3f} word={m['word']:.3f}",
                nref.fingerprint[:10],
            )
    Console(width=None if sys.stdout.isatty() else 140).print(table)


@app.command("prepare")
def prepare(
    config: Path | None = typer.Option(None, "--config", help="YAML with `backbone:` and a `tasks:` list."),
    task: list[str] | None = typer.Option(
        None, "--task", help="A builtin task (repeatable), instead of --config."
    ),
    backbone: str | None = typer.Option(
        None,
        "--backbone",
        help="Tokenizer: alias (minilm, smollm2), hub name "
        "or folder. Default: the config's backbone, else minilm.",
    ),
    cache_dir: Path = typer.Option(Path("data/cache"), "--cache-dir", help="Root of the dataset cache."),
    eval_levels: bool = typer.Option(
        False, "--eval-levels", help="Also build noisy test copies at each task's eval_noise_levels."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Prepare tasks into tokenized, cached, fingerprinted datasets and print their references.

    Example: sla prepare --config configs/tiny.yaml --eval-levels   (or: sla prepare --task rotten_tomatoes)
    """
    from sla_core.data import DataError, load_tasks_from_yaml, prepare_eval_levels, prepare_tasks

    if (config is None) == (not task):
        raise typer.BadParameter("give either --config FILE or one or more --task NAME")
    try:
        if config is not None:
            config_backbone, specs = load_tasks_from_yaml(config)
        else:
            config_backbone, specs = None, [_builtin_spec(name) for name in task or []]
        tokenizer = _load_tokenizer(backbone or config_backbone or "minilm")
        refs = prepare_tasks(specs, tokenizer, cache_dir, progress=progress)
        noisy = {}
        if eval_levels:
            noisy = {s.name: prepare_eval_levels(refs[s.name], tokenizer, s.eval_noise_levels) for s in specs}
    except (DataError, RuntimeError) as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    _print_refs(refs, noisy, cache_dir)
