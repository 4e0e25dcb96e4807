"""Data preparation: task specs, built-in and user sources, validation, noise, tokenized cache, batching.

Pure Python over pyarrow/datasets/tokenizers; imports no orchestrator (deepspeed, ray, prefect, mlflow).
"""

from sla_core.data.errors import ConfigError, DataError, DataSourceError, DataValidationError
from sla_core.data.prepare import (
    noisy_eval_ref,
    noisy_eval_split,
    prepare_eval_levels,
    prepare_task,
    prepare_tasks,
    task_fingerprint,
)
from sla_core.data.ref import DatasetRef
from sla_core.data.spec import BUILTIN_TASKS, NoiseSpec, TaskSpec, ValidationPolicy, load_tasks_from_yaml

__all__ = [
    "BUILTIN_TASKS",
    "ConfigError",
    "DataError",
    "DataSourceError",
    "DataValidationError",
    "DatasetRef",
    "NoiseSpec",
    "TaskSpec",
    "ValidationPolicy",
    "load_tasks_from_yaml",
    "noisy_eval_ref",
    "noisy_eval_split",
    "prepare_eval_levels",
    "prepare_task",
    "prepare_tasks",
    "task_fingerprint",
]
