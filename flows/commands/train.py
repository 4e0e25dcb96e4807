"""`sla train`, `sla evaluate`, `sla prune`: thin shells over the stages of `sla_core.engine`.

`sla train` trains in this process by default; `--nproc N` starts N local processes (torchrun),
`--nnodes/--node-rank/--master-addr` one torchrun launcher per node, `--hostfile` DeepSpeed's runner.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from flows.cli import app


class Tracking(StrEnum):
    """Where `train` records the run: always <run-dir>/tracking.jsonl; mlflow also copies it to MLflow."""

    json = "json"
    mlflow = "mlflow"


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
        None,
        "--master-port",
        help="Rendezvous port on node 0; required with several nodes (the same on every node), "
        "else a free one.",
    ),
    no_ssh: bool = typer.Option(False, "--no-ssh", help="--hostfile: start only this node's processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Default: runs/<config name>."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override, e.g. train.steps=50."),
    do_prune: bool = typer.Option(
        True, "--prune/--no-prune", help="Prune after training (into <run-dir>/adapters)."
    ),
    do_evaluate: bool = typer.Option(
        True, "--evaluate/--no-evaluate", help="Evaluate the pruned set (clean and noisy) after pruning."
    ),
    tracking: Tracking = typer.Option(
        Tracking.json,
        "--tracking",
        help="json (<run-dir>/tracking.jsonl) or mlflow (that, then copied into an MLflow run).",
    ),
    mlflow: bool = typer.Option(False, "--mlflow", hidden=True, help="Old name of --tracking mlflow."),
) -> None:
    """Train `method` (ours by default) on prepared data, then prune and evaluate it.

    Training ends at a checkpoint of the unpruned set (checkpoints/step-N/adapters); pruning writes the
    shipped set to <run-dir>/adapters; evaluation writes <run-dir>/metrics.json. `sla prune` and
    `sla evaluate` run the last two alone.

    Example: sla train --config configs/tiny.yaml --set train.steps=50 --set method=lora:r=8
    """
    from sla_core.data import DataError
    from sla_core.engine.launch import LaunchPlan, launch
    from sla_core.engine.result import TrainResult
    from sla_core.engine.stages import finish
    from sla_core.tracking import JsonTracker

    try:
        cfg = _load(config, overrides, run_dir)
        plan = LaunchPlan(nproc, nnodes, node_rank, master_addr, master_port, hostfile, no_ssh)
        if plan.multi_process:  # fail here, not in every worker: batch split, DeepSpeed JSON, precision
            from sla_core.engine.ds import build_settings

            build_settings(cfg.train, plan.world_size())
        _, refs = _prepare(cfg)  # here once, so every worker gets a cache hit
        if not plan.multi_process:
            from sla_core.engine.worker import run_experiment

            trained, pruned, evaluation = run_experiment(
                cfg, run_dir=cfg.run_dir, resume=resume, prune=do_prune, evaluate=do_evaluate
            )
        else:
            code = launch(plan, config, overrides, cfg.run_dir, resume)
            if code != 0:
                raise typer.Exit(code)
            if node_rank != 0:
                typer.echo(f"node {node_rank} finished; node 0 writes the results to {cfg.run_dir}")
                return
            trained = TrainResult.read(cfg.run_dir)
            pruned, evaluation = finish(
                cfg, refs, trained, tracker=JsonTracker(cfg.run_dir / "tracking.jsonl"),
                do_prune=do_prune, do_evaluate=do_evaluate,
            )  # fmt: skip
    except typer.Exit:
        raise
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise _fail(err, 143 if type(err).__name__ == "TrainingInterrupted" else 1) from err
    typer.echo(f"trained {trained.method} for {trained.steps} steps; unpruned set in {trained.trained}")
    if pruned is not None:
        typer.echo(
            f"pruned: trainable % {pruned.trainable_percent_before:.4f} -> "
            f"{pruned.trainable_percent_after:.4f}; saved {pruned.path}"
        )
        _print_kept(pruned)
    if evaluation is not None:
        _print_summary(evaluation.summary, evaluation.metrics_path)
    if mlflow or tracking is Tracking.mlflow:
        typer.echo(f"mlflow run {replay_to_mlflow(Path(trained.run_dir), cfg.name)}")


def _print_kept(pruned: Any) -> None:
    """The kept share: candidates each task keeps, and the shipped size against the backbone."""
    for task, names in pruned.open_candidates.items():
        total = len(pruned.gate_probability.get(task, {})) or len(names)
        typer.echo(f"  {task}: keeps {len(names)} of {total} adapter candidates")
    after = pruned.counts_after
    typer.echo(
        f"  shipped {after['kept']:,} parameters = {100 * after['kept'] / after['backbone']:.3f}% "
        "of the backbone"
    )


@app.command("evaluate")
def evaluate(
    adapters: Path = typer.Option(
        ...,
        "--adapters",
        help="A saved set: pruned (<run>/adapters) or trained (checkpoints/step-N/adapters).",
    ),
    config: Path = typer.Option(..., "--config", help="Experiment YAML naming the tasks and noise levels."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE config override."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for metrics.json and evaluation.json (default: beside the set)."
    ),
) -> None:
    """Evaluate a saved set (ours or a baseline's): accuracy and macro-F1 per task, split and noise level.

    Example: sla evaluate --adapters runs/tiny/adapters --config configs/tiny.yaml
    """
    from sla_core import AdapterFileError
    from sla_core.data import DataError
    from sla_core.engine.stages import evaluate as evaluate_set

    try:
        cfg = _load(config, overrides)
        _, refs = _prepare(cfg)
        folder = out if out is not None else adapters.parent
        report = evaluate_set(cfg, refs, adapters, folder)
    except (AdapterFileError, DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise _fail(err) from err
    full = json.loads(Path(report.metrics_path).read_text(encoding="utf-8"))
    for task, by in full["tasks"].items():
        for split, by_level in by["after"].items():
            for level, s in by_level.items():
                typer.echo(
                    f"{task:20s} {split:10s} {level:10s} acc {s['accuracy']:.4f}  "
                    f"macro-F1 {s['macro_f1']:.4f}  (n={s['n']})"
                )
    typer.echo(f"trainable % {report.summary['trainable_percent_after']:.4f}; report {report.metrics_path}")


@app.command("prune")
def prune(
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        help="A run folder, its checkpoints/ (the latest), a checkpoints/step-N folder, or a trained set.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the pruned set."),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="Ship a task whose adapters were all closed (its head alone)."
    ),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="Also fold the kept LoRA-type units into the backbone's weights: --out becomes a whole model "
        "(Hugging Face files plus the heads) that runs at the bare backbone's cost.",
    ),
) -> None:
    """Prune a trained set: decide the gates, drop closed adapters, fold open gates into the weights.

    Example: sla prune --checkpoint runs/tiny --out runs/tiny/adapters
    Example: sla prune --checkpoint runs/tiny --out runs/tiny/merged --merge
    """
    from sla_core import AdapterFileError
    from sla_core.engine.checkpoint import ADAPTERS, CheckpointError, resolve_checkpoint
    from sla_core.engine.stages import prune as prune_set

    try:
        source = checkpoint
        if not any((checkpoint / name).is_file() for name in ("sla_adapter_config.json", "sla_method.json")):
            source = Path(resolve_checkpoint(checkpoint).path) / ADAPTERS
        pruned = prune_set(source, out, allow_empty=allow_empty, merge=merge)
    except (AdapterFileError, CheckpointError, ValueError, RuntimeError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(
        f"step {pruned.step}: trainable % {pruned.trainable_percent_before:.4f} -> "
        f"{pruned.trainable_percent_after:.4f}; saved {out}"
    )
    _print_kept(pruned)
    sys.stdout.flush()
