"""The experiment YAML, validated once at the entry point into typed sections.

One file drives every stage: `backbone` and `tasks` (data), `sla` (the adapter structure and sparsity),
`train` (the engine), `tune` (the search), `registry` (MLflow promotion). Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sla_core.config import SLAConfig
from sla_core.data.builtin import builtin_task
from sla_core.data.spec import TaskSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    """Optimisation and engine settings. `batch_size` is the global batch per optimizer step."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    gate_lr: float = Field(0.05, gt=0)
    # The noisy evaluations also on the model before pruning (clean is always evaluated: it shows that
    # pruning is exact). Off saves a third of the final evaluation.
    eval_noisy_before_pruning: bool = True
    weight_decay: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deepspeed_config: Path | None = None
    eval_every: int = Field(0, ge=0)
    eval_batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(100, ge=0)
    log_every: int = Field(10, ge=1)
    sampling: Literal["proportional", "temperature"] = "proportional"
    sampling_temperature: float = Field(2.0, gt=0)
    seed: int = 0
    # Dropout inside the frozen backbone while training; None keeps the pretrained config's rates.
    backbone_dropout: float | None = Field(None, ge=0, lt=1)
    # Debug hook: make the loss NaN at this (1-based) step on rank 0, to exercise the non-finite-loss stop.
    debug_nan_at_step: int | None = Field(None, ge=1)


class TuneConfig(_Section):
    """Search space and scheduler for `sla tune` (see docs/tuning.md).

    Lists are choices (random search samples them, grid search crosses them); `lr` is a log-uniform range
    for random search, and `lr_grid` (default: its two ends and their geometric mean) its grid values.
    `extra_space` adds dimensions over any dotted config key, e.g. `{"train.gate_lr": [0.01, 0.05]}`.
    Steps, `grace_period` and `report_every` count optimizer steps of one trial.
    """

    search: Literal["random", "grid"] = "random"
    num_samples: int | None = Field(None, ge=1)  # random: trials (default 8); grid: repeats (default 1)
    seed: int = 0  # of the random search's sampler
    lambda_sparse: list[float] = Field([0.0, 0.1, 0.5, 1.0, 2.0, 5.0], min_length=1)
    rank: list[int] = Field([4, 8, 16, 32, 64], min_length=1)
    lr: tuple[float, float] = (3e-4, 3e-3)
    lr_grid: list[float] | None = Field(None, min_length=1)
    lambda_warmup_steps: list[int] = Field([0, 50], min_length=1)
    gate_init: list[float] = Field([3.0], min_length=1)
    extra_space: dict[str, list[Any]] = {}
    steps: int | None = Field(None, ge=1)  # per trial; default: train.steps
    scheduler: Literal["asha", "none"] = "asha"  # none: every trial runs all steps (the grid baseline)
    grace_period: int = Field(50, ge=1)
    reduction_factor: int = Field(3, ge=2)
    report_every: int = Field(25, ge=1)
    budget: float = Field(0.015, gt=0, lt=1)  # max trainable fraction of the backbone after pruning
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    # What ASHA ranks trials on at its rungs (default: `metric`). The validation loss separates trials
    # early, when most still sit at the same accuracy; the winner is still chosen on `metric`.
    scheduler_metric: str | None = None
    scheduler_mode: Literal["max", "min"] = "min"
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        lo, hi = self.lr
        if not 0 < lo <= hi:
            raise ValueError(f"tune.lr={list(self.lr)}: give [low, high] with 0 < low <= high")
        if any(v <= 0 for v in self.lr_grid or []):
            raise ValueError(f"tune.lr_grid={self.lr_grid}: learning rates must be > 0")
        if any(v < 0 for v in self.lambda_sparse):
            raise ValueError(
                f"tune.lambda_sparse={self.lambda_sparse}: values must be >= 0 (0 = no sparsity)"
            )
        if any(r < 1 for r in self.rank):
            raise ValueError(f"tune.rank={self.rank}: ranks must be >= 1 (the issue's range is 4 to 64)")
        if any(w < 0 for w in self.lambda_warmup_steps):
            raise ValueError(f"tune.lambda_warmup_steps={self.lambda_warmup_steps}: values must be >= 0")
        for key, values in self.extra_space.items():
            if "." not in key or not isinstance(values, list) or not values:
                raise ValueError(
                    f"tune.extra_space.{key}: give a dotted config key (e.g. train.gate_lr) "
                    "mapped to a non-empty list of choices"
                )
        return self


class RegistryConfig(_Section):
    """MLflow registration: the alias moves only when `metric` beats the current one by more than `margin`
    (higher is better with `mode: max`, lower with `min`). `experiment` defaults to the config's `name`."""

    model_name: str = Field("sla-adapters", pattern=r"^[A-Za-z0-9_.-]+$")
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    metric: str = Field("test_accuracy_mean", min_length=1)
    margin: float = Field(0.0, ge=0)
    mode: Literal["max", "min"] = "max"
    experiment: str | None = Field(None, min_length=1)


class ExperimentConfig(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    backbone: str = "minilm"
    tasks: list[TaskSpec] = Field(min_length=1)
    sla: dict[str, Any] = {}
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    registry: RegistryConfig = RegistryConfig()
    output_dir: Path | None = None
    cache_dir: Path = Path("data/cache")

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if "tasks" in self.sla:
            raise ValueError("sla.tasks is derived from `tasks:`; remove it")
        self.sla_config({t.name: 2 for t in self.tasks})  # validate the sla section early
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir or Path("runs") / self.name

    def sla_config(self, num_labels: dict[str, int] | None = None, **overrides: Any) -> SLAConfig:
        """The SLAConfig for these tasks; `num_labels` defaults to the declared label sets."""
        if num_labels is None:
            num_labels = {t.name: len(task_labels(t)) for t in self.tasks}
        return SLAConfig(tasks=num_labels, **{**self.sla, **overrides})


def task_labels(task: TaskSpec) -> list[str]:
    """Declared labels of a task (builtins know theirs)."""
    if task.labels is not None:
        return list(task.labels)
    if task.source == "builtin":
        return list(builtin_task(task.builtin or task.name).labels)
    raise ValueError(f"task {task.name!r}: declare `labels:` or prepare the data first to learn them")


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML. Errors name the file and the offending key path."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config {file} not found; see configs/ for examples")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{file}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ValueError(f"{file}: invalid config\n" + "\n".join(lines)) from None
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
