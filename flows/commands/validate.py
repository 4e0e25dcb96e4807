"""`sla validate`: check an experiment config (and its DeepSpeed JSON) without running anything."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli import app

EXIT_INVALID = 2  # as for a bad command line: the input is wrong, nothing ran


@app.command(
    "validate",
    epilog="Example: sla validate configs/pipeline.yaml --set sla.rank=16 --set tasks.0.max_length=64",
)
def validate(
    config: Path = typer.Argument(..., help="The experiment YAML, e.g. configs/pipeline.yaml."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config key (repeatable), e.g. --set train.steps=100."
    ),
) -> None:
    """Validate CONFIG with its overrides, and its DeepSpeed JSON if `train.deepspeed_config` is set.

    Prints one OK line and exits 0, or names every bad key and exits 2. Loads no model and no data.
    """
    from sla_core.experiment import ExperimentConfigError, load_experiment, parse_overrides

    try:
        cfg = load_experiment(config, parse_overrides(overrides))
    except ExperimentConfigError as err:
        raise _invalid(config, err.problems) from None
    except (ValueError, FileNotFoundError) as err:  # a malformed --set, a missing file
        typer.secho(f"sla: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_INVALID) from None
    if cfg.train.deepspeed_config is not None:
        from sla_core.engine import ds

        try:
            ds.build_settings(cfg.train, 1)
        except (ValueError, FileNotFoundError) as err:
            raise _invalid(config, [str(err)]) from None  # names the JSON file and its key
    parts = [f"name {cfg.name}", f"backbone {cfg.backbone}", f"tasks {','.join(t.name for t in cfg.tasks)}"]
    method = getattr(cfg, "method", None)
    if method is not None:
        parts.append(f"method {method}")
    typer.echo(f"sla: {config}: OK ({'; '.join(parts)})")


def _invalid(config: Path, problems: list[str]) -> typer.Exit:
    typer.secho(f"sla: {config}: invalid config", fg=typer.colors.RED, err=True)
    for line in problems:
        typer.secho(f"  {line}", err=True)
    return typer.Exit(EXIT_INVALID)
