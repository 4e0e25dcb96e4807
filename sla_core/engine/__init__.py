"""The training engine: one loop over a DeepSpeed engine (ZeRO 0-3), checkpoints, evaluation, launching.

`train` and `run_experiment` import DeepSpeed (through `sla_core.engine.ds`, the only module that does);
`TrainResult`, the evaluation helpers and the checkpoint readers do not, so they load lazily here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sla_core.engine.result import NonFiniteLossError, TrainingInterrupted, TrainResult

if TYPE_CHECKING:
    from sla_core.engine.loop import train
    from sla_core.engine.worker import run_experiment

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingInterrupted", "run_experiment", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from sla_core.engine.loop import train

        return train
    if name == "run_experiment":
        from sla_core.engine.worker import run_experiment

        return run_experiment
    raise AttributeError(f"module 'sla_core.engine' has no attribute {name!r}")
