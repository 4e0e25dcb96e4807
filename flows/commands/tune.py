"""`sla tune`: a Ray Tune search with ASHA over the SLA hyperparameters (tuning.run_search)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from flows.cli import app


class Tracking(StrEnum):
    """Where `tune` records the search."""

    json = "json"
    mlflow = "mlflow"
    none = "none"


EXIT_INTERRUPTED = 130  # as a shell reports Ctrl-C
SHORT = {"sla.lambda_sparse": "λ", "sla.lambda_warmup_steps": "λ warm-up", "sla.gate_init": "gate init"}


def _print_table(result: Any, metric: str) -> None:
    """Trials: outcome, steps run, the sampled values that vary, metric, pruned size; errors below it."""
    import json

    from rich.console import Console
    from rich.table import Table

    rows = json.loads(Path(result.trials_json).read_text(encoding="utf-8"))
    params = [k for k in (rows[0] if rows else {}) if "." in k and len({str(r.get(k)) for r in rows}) > 1]
    columns = {"trial_id": "trial", "outcome": "outcome", "steps_done": "steps"}
    columns |= {k: SHORT.get(k, k.split(".", 1)[1]) for k in params}
    columns |= {metric: metric, "trainable_percent": "trainable %", "feasible": "in budget"}
    table = Table(title=f"trials of {result.name} ({result.trials_csv})")
    for title in columns.values():
        table.add_column(title, no_wrap=True)
    best = result.best.trial_id if result.best else None
    for row in rows:
        table.add_row(
            *(_cell(row.get(c)) for c in columns), style="bold green" if row["trial_id"] == best else None
        )
    console = Console() if Console().is_terminal else Console(width=120)
    console.print(table)
    for row in rows:
        if row.get("error"):
            console.print(f"[red]{row['trial_id']} failed:[/red] {row['error']}", soft_wrap=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.4g}"
    return str(value)


def _print_best(result: Any) -> None:
    if result.best is None:
        return
    b = result.best
    typer.secho(
        f"best: {b.trial_id} {b.metric}={b.value:.4f}, trainable {b.trainable_fraction:.3%} of the backbone",
        fg=typer.colors.GREEN,
    )
    for key, value in sorted(b.overrides.items()):
        typer.echo(f"  {key} = {value}")
    typer.echo(f"  config: {b.config_path}\n  adapters: {b.adapters}")


def _tracker(kind: str, name: str, exp_dir: Path, resume: bool) -> Any:
    """The search's parent run: JSON lines under the experiment, an MLflow run (experiment = config name,
    one nested run per trial), or none."""
    if kind == "none":
        return None
    if kind == "json":
        from tuning.tracking import JsonRunTree

        return JsonRunTree(exp_dir / "tracking")
    if kind == "mlflow":
        from flows.tracking_mlflow import MLflowTracker

        tags = {"sla.search_dir": str(exp_dir), "sla.resumed": str(resume).lower(), "role": "search"}
        return MLflowTracker.start(name, run_name=f"search-{name}", tags=tags)
    raise typer.BadParameter(f"--tracking {kind!r}: choose json, mlflow or none")


@app.command("tune")
def tune_command(
    config: Path = typer.Option(..., "--config", help="Experiment YAML; its `tune:` section is the search."),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        min=1,
        help="Trials (grid: repeats of the grid). Default: tune.num_samples, else 8 (random) or 1 (grid).",
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Join a Ray cluster: auto (on a cluster node), "
        "HOST:PORT or ray://HOST:PORT. Default: a local Ray, started and stopped.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted search in --out."),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="The search goes to OUT/<name>/."),
    out_dir: Path | None = typer.Option(None, "--out-dir", hidden=True, help="Old name of --out."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a config key (repeatable), e.g. --set tune.rank=[4,8] --set train.steps=100.",
    ),
    tracking: Tracking = typer.Option(
        Tracking.json,
        "--tracking",
        help="json (OUT/<name>/tracking/), mlflow (a parent run with one nested run per trial) or none.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No Ray Tune progress output."),
) -> None:
    """Search λ, adapter rank, learning rate, λ warm-up and gate init with ASHA under the parameter budget.

    Prints the table of all trials and the best config; the best pruned adapters go to OUT/<name>/best/.

    Example: sla tune --config configs/tiny.yaml --num-samples 4 --set tune.rank=[4,8] --tracking mlflow
    """
    from sla_core.backbones import load_tokenizer
    from sla_core.data import DataError, prepare_tasks
    from sla_core.experiment import load_experiment, parse_overrides
    from tuning.runner import plan_search, run_search

    try:
        cfg = load_experiment(config, parse_overrides(overrides))
        refs = prepare_tasks(cfg.tasks, load_tokenizer(cfg.backbone), cfg.cache_dir, progress=not quiet)
        where = {"out_dir": out_dir or out, "num_samples": num_samples, "address": address, "resume": resume}
        plan = plan_search(cfg, refs, **where)  # bad input fails here, before a tracking run exists
        tracker = _tracker(tracking.value, cfg.name, plan.exp_dir, resume)
        status = "FAILED"
        try:
            result = run_search(cfg, refs, **where, tracker=tracker, verbose=0 if quiet else 1)
            status = "FINISHED" if result.complete else "KILLED"
        finally:
            if tracker is not None and hasattr(tracker, "end"):
                tracker.end(status)
    except (DataError, ValueError, FileExistsError, FileNotFoundError, ConnectionError) as err:
        typer.secho(f"sla tune: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    _print_table(result, cfg.tune.metric)
    _print_best(result)
    if result.reason:
        typer.secho(result.reason, fg=typer.colors.YELLOW, err=True)
    if not result.complete:
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.best is None:
        raise typer.Exit(1)
