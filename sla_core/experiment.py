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
from sla_core.data.spec import BUILTIN_TASKS, TaskSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    """Optimisation and engine settings. `batch_size` is the global batch per optimizer step."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    gate_lr: float = Field(0.05, gt=0)
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


class TuneConfig(_Section):
    """Search space and scheduler for `sla tune`. Lists are choices; `lr` is a log-uniform range."""

    num_samples: int = Field(8, ge=1)
    lambda_sparse: list[float] = [0.0, 0.1, 0.5, 1.0, 2.0, 5.0]
    rank: list[int] = [4, 8, 16, 32, 64]
    lr: tuple[float, float] = (3e-4, 3e-3)
    lambda_warmup_steps: list[int] = [0, 50]
    gate_init: list[float] = [3.0]
    steps: int | None = Field(None, ge=1)  # per trial; default: train.steps
    grace_period: int = Field(50, ge=1)
    reduction_factor: int = Field(3, ge=2)
    report_every: int = Field(25, ge=1)
    budget: float = Field(0.015, gt=0, lt=1)  # max trainable fraction of the backbone after pruning
    metric: str = "val_accuracy"
    max_concurrent: int = Field(2, ge=1)


class RegistryConfig(_Section):
    """MLflow registration: the alias moves only when `metric` beats the current one by `margin`."""

    model_name: str = "sla-adapters"
    alias: str = "champion"
    metric: str = "test_accuracy_mean"
    margin: float = Field(0.0, ge=0)


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
        return BUILTIN_TASKS[task.builtin or task.name]
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
