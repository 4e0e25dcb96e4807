"""`sla run` (the main job), `register`, `promote`, `predict` and `deploy`: the pipeline and the registry."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from flows.cli import app


class Mode(StrEnum):
    """How `promote` compares the metric."""

    max = "max"
    min = "min"


DEFAULT_CONFIG = Path("configs/pipeline.yaml")
RESUME_HINT = (
    "Fix the cause and run the same command again: finished stages are reused, training resumes from its "
    "last checkpoint, and nothing is registered twice."
)


def _fail(err: BaseException, command: str) -> typer.Exit:
    typer.secho(f"sla {command}: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _overrides(items: list[str]) -> dict[str, Any]:
    from sla_core.experiment import parse_overrides

    try:
        return parse_overrides(items)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def _process_seconds() -> float:
    """Seconds since this process started (imports and set-up included)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil missing or no /proc: count from the command's start
        return 0.0


# ------------------------------------------------------------------------------------------------- run
@app.command("run")
def run(
    config: Path = typer.Option(
        DEFAULT_CONFIG, "--config", help="Experiment YAML (all three tasks by default)."
    ),
    search: bool = typer.Option(True, "--search/--no-search", help="Run the Ray Tune search first."),
    num_samples: int | None = typer.Option(
        None, "--num-samples", min=1, help="Search trials (tune.num_samples)."
    ),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override, e.g. train.steps=100."),
    run_id: str | None = typer.Option(
        None,
        "--run-id",
        help="Name of this pipeline run. The same name (or, by default, the same config, "
        "data and code) resumes it and never registers twice.",
    ),
) -> None:
    """The main job: prepare -> search -> train -> prune -> evaluate -> register, on the embedded default
    (sqlite MLflow under data/mlflow, ephemeral Prefect, local Ray), then a summary table.

    Example: sla run --config configs/pipeline.yaml --num-samples 2 --set train.steps=300
    """
    t_start = time.perf_counter() - _process_seconds()
    from flows.settings import apply_embedded_defaults

    settings = apply_embedded_defaults()
    sets = _overrides(overrides)
    if not config.is_file():
        raise _fail(FileNotFoundError(f"config {config} not found; see configs/pipeline.yaml"), "run")
    from sla_core.experiment import load_experiment

    try:
        load_experiment(config, sets)  # a bad key or value fails here, before Prefect and MLflow start
    except ValueError as err:
        raise _fail(err, "run") from err
    from flows.pipeline import sla_pipeline

    t_call = time.time()
    try:
        result = sla_pipeline(
            str(config), search=search, num_samples=num_samples, overrides=sets, run_id=run_id
        )
    except Exception as err:
        raise _fail(err, "run") from err
    total = time.perf_counter() - t_start
    print_summary(result, settings, total, result.overhead["flow_started_at"] - t_call)


def print_summary(result: Any, settings: Any, total_seconds: float, startup_seconds: float) -> None:
    """The per-task accuracy table, trainable %, the registry outcome, timings and how to open the UI."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"sla_pipeline {result.pipeline_run_id}: test set")
    headers, rows = summary_rows(result)
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    reg = result.registration
    verb = "registered" if reg.created else "already registered (re-run)"
    move = "promoted to" if reg.promoted else "kept out of"
    lines = [
        f"trainable parameters: {result.trainable_percent_before:.3f}% of the backbone before pruning, "
        f"{result.trainable_percent_after:.3f}% after",
        f"model: {reg.name} v{reg.version} {verb}; {move} @{reg.alias} ({reg.decision['reason']})",
        f"champion: {reg.name} v{reg.champion_version}; load it with "
        f"mlflow.pyfunc.load_model('{reg.model_uri}') or `sla predict --text ...`",
    ]
    if result.search is not None:
        s = result.search
        best = ", ".join(f"{k}={v}" for k, v in s.overrides.items()) or f"none ({s.reason})"
        lines.append(f"search: {sum(s.counts.values())} trials, best {best}; table {s.trials_csv}")
    o = result.overhead
    own = startup_seconds + o["prefect_seconds"] + o["mlflow_seconds"] + o["ray_seconds"]
    lines += [
        f"time: {total_seconds:.0f} s in all; work (data, search trials, training, evaluation) "
        f"{o['work_seconds']:.0f} s",
        f"pipeline overhead: {own:.1f} s = {100 * own / max(total_seconds, 1e-9):.1f}% of the run "
        f"(Prefect start-up {startup_seconds:.1f} s + engine {o['prefect_seconds']:.1f} s, "
        f"MLflow {o['mlflow_seconds']:.1f} s, Ray {o['ray_seconds']:.1f} s)",
        f"run folder: {result.run_dir}   MLflow run: {result.mlflow_run_id}",
        f"MLflow UI: {settings.mlflow_ui_command()}",
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def summary_rows(result: Any) -> tuple[list[str], list[list[str]]]:
    """(headers, one row per task) of the final table: test accuracy before and after pruning, macro-F1
    after, then the accuracy after pruning at each noise level. `-` where a value was not measured."""
    metrics = getattr(result, "metrics", None) or {}
    noisy = sorted({k for row in result.accuracy.values() for k in row if k != "clean"}, key=_level_order)
    headers = ["task", "accuracy before pruning", "accuracy after pruning", "macro-F1", *noisy]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = [
        [
            task,
            cell(metrics.get(f"{task}/test_accuracy_before")),
            cell(row.get("clean", metrics.get(f"{task}/test_accuracy"))),
            cell(metrics.get(f"{task}/test_macro_f1")),
            *(cell(row.get(level)) for level in noisy),
        ]
        for task, row in result.accuracy.items()
    ]
    return headers, rows


def _level_order(key: str) -> float:
    return -1.0 if key == "clean" else float(key.removeprefix("noise"))


# -------------------------------------------------------------------------------------------- register
# What a run trained with; a --config must agree on these. The rest (name, registry, tune, folders) only
# says where and how to register, and is taken from --config.
TRAINED_WITH = ("backbone", "method", "tasks", "sla", "train")


def _run_experiment(run_dir: Path) -> dict[str, Any]:
    """The experiment config a run trained with, from its last checkpoint's `meta.json`."""
    from sla_core.engine.checkpoint import read_meta
    from sla_core.engine.result import TrainResult

    result = TrainResult.read(run_dir)
    experiment = read_meta(result.checkpoint).get("experiment")
    if not isinstance(experiment, dict):
        raise ValueError(f"{result.checkpoint}/meta.json has no `experiment`: what the run used is unknown")
    return experiment


def _differences(run: Any, given: Any, key: str = "") -> list[str]:
    """`key: run value vs given value` for every leaf that differs."""
    if isinstance(run, dict) and isinstance(given, dict):
        keys = sorted(set(run) | set(given))
        return [d for k in keys for d in _differences(run.get(k), given.get(k), f"{key}.{k}".lstrip("."))]
    if isinstance(run, list) and isinstance(given, list) and len(run) == len(given):
        pairs = enumerate(zip(run, given, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{key}.{i}")]
    return [] if run == given else [f"{key}: {run!r} in the run vs {given!r}"]


def register_config(run_dir: Path, config: Path | None, overrides: dict[str, Any], out: Path) -> Path:
    """Write to `out` the config to register `run_dir` with: its own training parameters (checkpoint meta),
    plus the name, registry and folders of `config` (default: the run's own) with `overrides`.

    Raises:
        ValueError: when `config`/`overrides` differ from the run on what it trained with, naming each key.
    """
    import yaml

    from sla_core.experiment import load_experiment, with_overrides

    run = _run_experiment(run_dir)
    given = (load_experiment(config, overrides) if config else with_overrides(run, overrides)).model_dump(
        mode="json"
    )
    diffs = [d for k in TRAINED_WITH for d in _differences(run.get(k), given.get(k), k)]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ValueError(
            f"{config or '--set'} differs from what {run_dir} trained with: {shown}. Registering would log "
            "parameters the run did not use; fix: drop --config (the run's own parameters are used) or pass "
            "the config the run trained with"
        )
    effective = {**given, **{k: run[k] for k in TRAINED_WITH if k in run}}
    out.write_text(yaml.safe_dump(effective, sort_keys=False))
    return out


@app.command("register")
def register(
    run_dir: Path = typer.Option(..., "--run-dir", help="A finished training run (result.json, adapters/)."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Experiment YAML for the name and registry settings (default: the run's own). Its training "
        "parameters must match what the run trained with, which are read from the run's checkpoint.",
    ),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override."),
    run_id: str | None = typer.Option(
        None,
        "--run-id",
        help="Registration key; default from the adapters' digest (registering twice is a no-op).",
    ),
) -> None:
    """Log a finished training run to MLflow as a pyfunc model, register it, and promote it if better.

    The logged parameters are the run's own (its checkpoint's meta.json); a --config that differs is refused.

    Example: sla register --run-dir runs/tiny
    """
    import tempfile

    from flows.settings import apply_embedded_defaults

    apply_embedded_defaults()
    from flows.pipeline import register_run

    try:
        with tempfile.TemporaryDirectory(prefix="sla-register-") as tmp:
            effective = register_config(run_dir, config, _overrides(overrides), Path(tmp) / "experiment.yaml")
            reg = register_run(effective, run_dir, None, run_id)
    except Exception as err:
        raise _fail(err, "register") from err
    typer.echo(
        f"{reg.name} v{reg.version} {'registered' if reg.created else 'was already registered'}; "
        f"{'promoted to' if reg.promoted else 'not promoted to'} @{reg.alias}: {reg.decision['reason']}"
    )


# --------------------------------------------------------------------------------------------- promote
@app.command("promote")
def promote(
    version: str = typer.Option(..., "--version", help="The model version to consider."),
    model: str = typer.Option("sla-adapters", "--model", help="Registered model name."),
    alias: str = typer.Option("champion", "--alias"),
    metric: str = typer.Option("test_accuracy_mean", "--metric", help="Compared with the alias holder's."),
    margin: float = typer.Option(0.0, "--margin", min=0.0, help="Required improvement."),
    mode: Mode = typer.Option(Mode.max, "--mode", help="max: higher is better; min: lower is better."),
    force: bool = typer.Option(False, "--force", help="Move the alias without comparing."),
) -> None:
    """Move the alias to VERSION if it beats the current holder on METRIC by more than MARGIN.

    Example: sla promote --version 3 --metric test_macro_f1_mean --margin 0.005
    """
    from flows.registry import promote_if_better, registry_client, set_alias
    from flows.settings import apply_embedded_defaults

    uri = apply_embedded_defaults().tracking_uri
    try:
        client = registry_client(uri)
        if force:
            set_alias(client, model, version, alias)
            typer.echo(f"{model}@{alias} -> v{version} (forced)")
            return
        d = promote_if_better(client, model, version, metric, margin, alias, mode.value)  # type: ignore[arg-type]
    except Exception as err:
        raise _fail(err, "promote") from err
    typer.echo(f"{model} v{version}: {'promoted' if d.promoted else 'not promoted'} to @{alias} ({d.reason})")


# --------------------------------------------------------------------------------------------- predict
@app.command("predict")
def predict(
    text: list[str] = typer.Option([], "--text", help="A text to label (repeatable)."),
    file: Path | None = typer.Option(None, "--file", help="A file with one text per line."),
    model: str = typer.Option(
        "models:/sla-adapters@champion",
        "--model",
        help="A registered model (models:/NAME@ALIAS or models:/NAME/VERSION), an sla model folder, or an "
        "sla adapter set folder. Only their data files are read (JSON, safetensors): code stored with a "
        "model (pyfunc_model.py) is never imported, and other URIs (runs:/, s3://, ...) are refused.",
    ),
    task: str | None = typer.Option(None, "--task", help="Which task's labels (needed with several tasks)."),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Override the backbone (alias, name or path)."
    ),
) -> None:
    """Label texts with a registered adapter set or an sla model/adapter folder (safetensors, no pickles).

    No code is loaded from the model: a registered model's files are downloaded and read as data.

    Example: sla predict --model runs/tiny/adapters --text "a gripping, beautiful film"
    """
    from flows.registry import check_tracking_server
    from flows.settings import apply_embedded_defaults

    texts = list(text)
    if file is not None:
        if not file.is_file():
            raise typer.BadParameter(f"--file {file}: no such file")
        texts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise typer.BadParameter("give --text TEXT (repeatable) or --file FILE")
    uri = apply_embedded_defaults().tracking_uri
    try:
        from flows.pyfunc_model import load_sla_model

        if model.startswith("models:/"):
            check_tracking_server(uri)  # MLflow reads the store from MLFLOW_TRACKING_URI (set above)
        loaded = load_sla_model(model, backbone)
        labels = loaded.predict(None, texts, params={"task": task} if task else None)
    except Exception as err:
        raise _fail(err, "predict") from err
    for label, t in zip(labels, texts, strict=True):
        typer.echo(f"{label}\t{t}")


# ---------------------------------------------------------------------------------------------- deploy
@app.command("deploy")
def deploy(
    cron: str = typer.Option(..., "--cron", help='Schedule, e.g. "0 3 * * *" (03:00 every day).'),
    name: str = typer.Option("sla-scheduled", "--name", help="Deployment name."),
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of the cron schedule."),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="Experiment YAML for each scheduled run."),
    search: bool = typer.Option(True, "--search/--no-search"),
    num_samples: int | None = typer.Option(None, "--num-samples", min=1),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override."),
    entrypoint: str = typer.Option(
        "flows/pipeline.py:sla_pipeline",
        "--entrypoint",
        help="FILE.py:FLOW to serve (another flow: no parameters).",
    ),
) -> None:
    """Serve a scheduled deployment of the pipeline on the Prefect server at PREFECT_API_URL.

    Blocks until Ctrl-C or TERM. Start a server first with infra/scripts/start_prefect.sh.

    Example: sla deploy --cron "0 3 * * *" --config configs/pipeline.yaml --no-search
    """
    from flows.settings import apply_embedded_defaults, check_prefect_api

    settings = apply_embedded_defaults()
    from prefect.schedules import Cron

    try:
        schedule = Cron(cron, timezone=timezone)
    except Exception as err:
        raise typer.BadParameter(f"--cron {cron!r} / --timezone {timezone!r}: {err}") from err
    try:
        check_prefect_api(settings.prefect_api_url)
        from prefect.flows import load_flow_from_entrypoint

        flow = load_flow_from_entrypoint(entrypoint)
    except Exception as err:
        raise _fail(err, "deploy") from err
    params: dict[str, Any] = {}
    if entrypoint.endswith(":sla_pipeline"):
        params = {
            "config_path": str(config),
            "search": search,
            "num_samples": num_samples,
            "overrides": _overrides(overrides),
        }
    typer.echo(
        f"serving deployment '{flow.name}/{name}' on {settings.prefect_api_url} (cron {cron!r} {timezone})"
    )
    flow.serve(name=name, schedules=[schedule], parameters=params, print_starting_message=False)
