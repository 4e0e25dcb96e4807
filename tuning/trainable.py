"""The trial: a thin shim over `sla_core.engine.loop.train`, the same function `sla train` runs.

A trial applies its sampled overrides to the experiment config, trains in its own run folder
(`<experiment>/trials/<trial_id>/`: checkpoints/, adapters/, metrics.json, stdout of the engine), forwards the
engine's validation reports to Ray Tune (ASHA decides on them), then runs the engine's prune stage and a
light evaluation (clean validation split only), and ends with one final report of the pruned model's metrics
plus `feasible` (pruned trainable fraction within the budget) and `objective` (the metric when feasible,
else NaN, so an over-budget trial cannot win).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sla_core.data import DatasetRef
from sla_core.engine.result import TrainResult
from sla_core.experiment import ExperimentConfig, with_overrides
from sla_core.tracking import JsonTracker

ATTEMPTS_FILE = "attempts.jsonl"  # one line per start of a trial (a resumed trial adds one)
TRACKING_FILE = "tracking.jsonl"
LOG_FILE = "trial.log"  # the engine's output (progress bar, messages)
PRUNED_PERCENT = "trainable_percent_after"  # in the engine's final summary
PROJECTED_PERCENT = "trainable_percent_pruned"  # in the engine's reports during training


class TrialDiverged(RuntimeError):
    """A reported metric is NaN or infinite."""


class TrialFailed(RuntimeError):
    """A trial's training raised; the message names the original error."""


@dataclass(frozen=True)
class TrialJob:
    """Everything a trial needs besides its sampled values: plain JSON, so it ships to any Ray worker.

    Attributes:
        config: the experiment config (`model_dump(mode="json", exclude_unset=True)`).
        refs: prepared datasets, `DatasetRef.to_json()` by task. runs_dir: where trial folders go.
        steps: optimizer steps of a full trial. metric/mode/budget: from `TuneConfig`.
    """

    config: dict[str, Any]
    refs: dict[str, str]
    runs_dir: str
    steps: int
    metric: str
    mode: str
    budget: float

    @classmethod
    def build(
        cls, cfg: ExperimentConfig, refs: dict[str, DatasetRef], runs_dir: Path, steps: int
    ) -> TrialJob:
        return cls(
            config=cfg.model_dump(mode="json", exclude_unset=True),
            refs={name: ref.to_json() for name, ref in refs.items()},
            runs_dir=str(Path(runs_dir).resolve()),
            steps=steps,
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            budget=cfg.tune.budget,
        )


class TrialReporter:
    """The engine's `report(step, metrics)` hook: checks the values and forwards them to `sink`.

    The report at the last step is held back: the final report (after pruning) takes its place, so ASHA's
    `max_t` is reached only once the trial's artefacts are written.
    """

    def __init__(self, job: TrialJob, sink: Callable[[dict[str, Any]], None]) -> None:
        self.job, self.sink = job, sink
        self.last: dict[str, float] = {}  # the latest report, held-back one included

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        check_metrics(metrics, self.job.metric, f"step {step}")
        self.last = dict(metrics)
        if step < self.job.steps:
            self.sink({**metrics, "step": step, "final": False})


def check_metrics(metrics: dict[str, Any], metric: str, where: str) -> None:
    """Raise if `metric` is missing, or if it or any loss is not finite."""
    if metric not in metrics:
        raise KeyError(
            f"tune.metric={metric!r} is not among the reported metrics at {where}: "
            f"{sorted(metrics)}; set tune.metric to one of them"
        )
    for key, value in metrics.items():
        watched = key == metric or key.endswith("loss")
        if watched and isinstance(value, int | float) and not math.isfinite(value):
            raise TrialDiverged(f"{key}={value} at {where}: the trial diverged")


def final_metrics(result: TrainResult, job: TrialJob, last: dict[str, float] | None = None) -> dict[str, Any]:
    """The final report: the pruned set's light evaluation (`result.metrics`) plus step, feasibility and
    the objective.

    Metrics only the validation reports carry (`val_loss`, which ASHA may rank on: Ray refuses a result
    without the scheduler's metric) come from `last`, the held-back report of the last step; pruning is
    exact, so they hold for the pruned model too."""
    metrics = dict(result.metrics)
    for key, value in (last or {}).items():
        metrics.setdefault(key, value)
    if PRUNED_PERCENT not in metrics:
        raise KeyError(f"the engine's summary has no {PRUNED_PERCENT!r}; got {sorted(metrics)}")
    metrics.setdefault(PROJECTED_PERCENT, metrics[PRUNED_PERCENT])  # after pruning: measured, not projected
    check_metrics(metrics, job.metric, f"the end (step {result.steps})")
    fraction = metrics[PRUNED_PERCENT] / 100.0
    feasible = fraction <= job.budget
    return {
        **metrics,
        "step": result.steps,
        "final": True,
        "trainable_fraction": fraction,
        "feasible": feasible,
        "objective": float(metrics[job.metric]) if feasible else float("nan"),
    }


def validate_pruned(
    cfg: ExperimentConfig, refs: dict[str, DatasetRef], trained: TrainResult, run_dir: Path
) -> TrainResult:
    """Prune the trial's trained set into `run_dir/adapters` and measure it on the clean validation
    split; returns `trained` with those metrics (`val_accuracy`, `trainable_percent_after`, ...)."""
    from dataclasses import replace

    from sla_core.engine.stages import ADAPTERS_DIR, evaluate, prune

    # A trial whose gates all closed is a result (the head alone: small and usually weak), not a failure.
    pruned = prune(trained, run_dir / ADAPTERS_DIR, backbone=cfg.backbone, allow_empty=True)
    report = evaluate(
        cfg, refs, pruned.path, run_dir, step=trained.steps, splits=("validation",), noisy=False
    )
    return replace(
        trained, metrics={**report.summary, "trainable_percent_before": pruned.trainable_percent_before}
    )


def record_attempt(run_dir: Path, params: dict[str, Any]) -> None:
    """Append one line per start of this trial (the resume test counts them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "pid": os.getpid(), "params": params}, default=str)
    with (run_dir / ATTEMPTS_FILE).open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def trial_config(job: TrialJob, params: dict[str, Any], run_dir: Path) -> ExperimentConfig:
    """The experiment config of one trial: the search's config with the sampled overrides."""
    return with_overrides(job.config, {**params, "output_dir": str(run_dir)}, origin="trial")


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """Ray Tune function trainable: train one sampled config and report to Tune.

    A trial restarted after an interrupted search continues from its own last engine checkpoint.
    Raises whatever the engine raises (e.g. `NonFiniteLossError`), so Tune records the trial as ERROR.
    """
    from ray import tune

    from sla_core.engine.loop import train

    run_dir = Path(job.runs_dir) / tune.get_context().get_trial_id()
    record_attempt(run_dir, params)
    cfg = trial_config(job, params, run_dir)
    refs = {name: DatasetRef.from_json(ref) for name, ref in job.refs.items()}
    resume = (run_dir / "checkpoints" / "latest").is_file()
    # One trial per worker process (reuse_actors=False), so redirecting this process's output is safe.
    with (run_dir / LOG_FILE).open("a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            reporter = TrialReporter(job, tune.report)
            tracker = JsonTracker(run_dir / TRACKING_FILE)
            trained = train(cfg, refs, run_dir=run_dir, tracker=tracker, resume=resume, report=reporter)
            result = validate_pruned(cfg, refs, trained, run_dir)
        except Exception as err:
            # Tune copies the error and its causes; exceptions with their own __init__ signature (the
            # engine's NonFiniteLossError) do not survive that. Keep the traceback in the log, raise plain.
            traceback.print_exc(file=log)
            raise TrialFailed(f"{type(err).__name__}: {err} (traceback in {run_dir / LOG_FILE})") from None
    tune.report(final_metrics(result, job, reporter.last))
