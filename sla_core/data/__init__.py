"""Data preparation: task specs, built-in and user sources, validation, noise, tokenized cache, batching.

Pure Python over pyarrow/datasets/tokenizers; imports no orchestrator (deepspeed, ray, prefect, mlflow).
"""

from sla_core.data.builtin import BuiltinTask, builtin_names, builtin_task
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
from sla_core.data.spec import NoiseSpec, TaskSpec, ValidationPolicy, load_tasks_from_yaml

__all__ = [
    "BuiltinTask",
    "ConfigError",
    "DataError",
    "DataSourceError",
    "DataValidationError",
    "DatasetRef",
    "NoiseSpec",
    "TaskSpec",
    "ValidationPolicy",
    "builtin_names",
    "builtin_task",
    "load_tasks_from_yaml",
    "noisy_eval_ref",
    "noisy_eval_split",
    "prepare_eval_levels",
    "prepare_task",
    "prepare_tasks",
    "task_fingerprint",
]
