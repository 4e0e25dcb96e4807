"""`sla train`, `sla evaluate`, `sla prune`: thin shells over `sla_core.engine`.

`sla train` trains in this process by default; `--nproc N` starts N local processes (torchrun),
`--nnodes/--node-rank/--master-addr` one torchrun launcher per node, `--hostfile` DeepSpeed's runner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from flows.cli import app

SUMMARY_KEYS = (
    "val_accuracy",
    "val_macro_f1",
    "test_accuracy_mean",
    "test_macro_f1_mean",
    "trainable_percent_before",
    "trainable_percent_after",
)


def _fail(err: Exception, code: int = 1) -> typer.Exit:
    typer.secho(f"sla: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _load(config: Path, overrides: list[str], run_dir: Path | None = None) -> Any:
    from sla_core.experiment import load_experiment, parse_overrides

    items = list(overrides) + ([f"output_dir={run_dir}"] if run_dir is not None else [])
    return load_experiment(config, parse_overrides(items))


def _prepare(cfg: Any) -> tuple[Any, dict[str, Any]]:
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks

    tokenizer = load_tokenizer(cfg.backbone)
    return tokenizer, prepare_tasks(cfg.tasks, tokenizer, cfg.cache_dir)


def _print_summary(summary: dict[str, float], where: str) -> None:
    for key in SUMMARY_KEYS:
        if key in summary:
            typer.echo(f"  {key:26s} {summary[key]:.4f}")
    typer.echo(f"  {'results':26s} {where}")


def replay_to_mlflow(run_dir: Path, experiment: str) -> str:
    """Copy a run's `tracking.jsonl` (params, metrics, artifacts) into a new MLflow run; returns its id."""
    from flows.tracking_mlflow import MLflowTracker

    tracker = MLflowTracker.start(experiment, run_name=run_dir.name, tags={"sla.run_dir": str(run_dir)})
    with tracker:
        for line in (run_dir / "tracking.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["kind"] == "params":
                tracker.log_params(rec["params"])
            elif rec["kind"] == "metrics":
                tracker.log_metrics(rec["metrics"], step=rec.get("step"))
            elif rec["kind"] == "artifact" and Path(rec["path"]).exists():
                tracker.log_artifact(rec["path"], rec.get("artifact_path"))
            elif rec["kind"] == "tags":
                tracker.set_tags(rec["tags"])
    return tracker.run_id


@app.command("train")
def train(
    config: Path = typer.Option(..., "--config", help="Experiment YAML (see configs/)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes on this machine (torchrun; on CPU, cores)."),
    hostfile: Path | None = typer.Option(
        None, "--hostfile", help="DeepSpeed hostfile: `host slots=N` lines."
    ),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes, one torchrun launcher each (with --node-rank)."),
    node_rank: int = typer.Option(
        0, "--node-rank", help="This node's index (--nnodes, or --hostfile --no-ssh)."
    ),
    master_addr: str | None = typer.Option(None, "--master-addr", help="Address of node 0."),
    master_port: int | None = typer.Option(
        None, "--master-port", help="Rendezvous port (default: a free one)."
    ),
    no_ssh: bool = typer.Option(False, "--no-ssh", help="--hostfile: start only this node's processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Default: runs/<config name>."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override, e.g. train.steps=50."),
    mlflow: bool = typer.Option(
        False, "--mlflow", help="Also copy the run's params and metrics into MLflow."
    ),
) -> None:
    """Train the adapters on prepared data, then evaluate, prune and export them."""
    from sla_core.data import DataError
    from sla_core.engine.launch import LaunchPlan, launch
    from sla_core.engine.result import TrainResult

    try:
        cfg = _load(config, overrides, run_dir)
        plan = LaunchPlan(nproc, nnodes, node_rank, master_addr, master_port, hostfile, no_ssh)
        if plan.multi_process:  # fail here, not in every worker: batch split, DeepSpeed JSON, precision
            from sla_core.engine.ds import build_settings

            build_settings(cfg.train, plan.world_size())
        _prepare(cfg)  # here once, so every worker gets a cache hit
        if not plan.multi_process:
            from sla_core.engine.worker import run_experiment

            result = run_experiment(cfg, run_dir=cfg.run_dir, resume=resume)
        else:
            code = launch(plan, config, overrides, cfg.run_dir, resume)
            if code != 0:
                raise typer.Exit(code)
            if node_rank != 0:
                typer.echo(f"node {node_rank} finished; node 0 writes the results to {cfg.run_dir}")
                return
            result = TrainResult.read(cfg.run_dir)
    except typer.Exit:
        raise
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise _fail(err, 143 if type(err).__name__ == "TrainingInterrupted" else 1) from err
    typer.echo(f"trained {result.steps} steps; pruned adapters in {result.adapters}")
    _print_summary(result.metrics, result.metrics_path)
    if mlflow:
        typer.echo(f"mlflow run {replay_to_mlflow(Path(result.run_dir), cfg.name)}")


@app.command("evaluate")
def evaluate(
    adapters: Path = typer.Option(..., "--adapters", help="An adapter set folder (pruned or not)."),
    config: Path = typer.Option(..., "--config", help="Experiment YAML naming the tasks and noise levels."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override."),
    out: Path | None = typer.Option(None, "--out", help="Write the metrics JSON here."),
) -> None:
    """Evaluate a saved adapter set: accuracy and macro-F1 per task, split and noise level."""
    from sla_core import AdapterFileError, load_adapters
    from sla_core.backbones import load_backbone
    from sla_core.data import DataError
    from sla_core.engine.evaluate import evaluate_adapters

    try:
        cfg = _load(config, overrides)
        tokenizer, refs = _prepare(cfg)
        model = load_adapters(load_backbone(cfg.backbone), adapters)
        report = evaluate_adapters(model, refs, tokenizer, cfg)
    except (AdapterFileError, DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise _fail(err) from err
    for task, by_split in report["tasks"].items():
        for split, by_level in by_split.items():
            for level, s in by_level.items():
                typer.echo(
                    f"{task:20s} {split:10s} {level:10s} acc {s['accuracy']:.4f}  "
                    f"macro-F1 {s['macro_f1']:.4f}  (n={s['n']})"
                )
    typer.echo(f"trainable % {report['trainable_percent']:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


@app.command("prune")
def prune(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="checkpoints/step-N, checkpoints/ or a run folder."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the pruned adapter set."),
) -> None:
    """Prune a checkpoint's adapters (drop closed gates, fold open ones) and save the pruned set."""
    from sla_core import AdapterFileError, load_adapters
    from sla_core.backbones import load_backbone
    from sla_core.engine.checkpoint import ADAPTERS, CheckpointError, read_meta, resolve_checkpoint

    try:
        ref = resolve_checkpoint(checkpoint)
        backbone = read_meta(ref.path)["experiment"]["backbone"]
        model = load_adapters(load_backbone(backbone), Path(ref.path) / ADAPTERS)
        before = model.trainable_percent()
        pruned = model.prune(inplace=True)
        pruned.save_adapters(str(out), extra={"step": ref.step, "checkpoint": ref.path})
    except (AdapterFileError, CheckpointError, ValueError, RuntimeError) as err:
        raise _fail(err) from err
    typer.echo(f"step {ref.step}: trainable % {before:.4f} -> {pruned.trainable_percent():.4f}; saved {out}")
    sys.stdout.flush()
