"""What a training run hands to the next stage, and how it can fail. No DeepSpeed import here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class TrainResult:
    """A finished run: where its last checkpoint, pruned adapter set and `metrics.json` are, and the flat
    summary metrics (`val_accuracy`, `test_accuracy_mean`, `trainable_percent_after`, ...).

    Paths are strings so the result is plain JSON (`to_json`); ranks other than 0 get empty `metrics`.
    """

    run_dir: str
    checkpoint: str
    adapters: str
    metrics_path: str
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> TrainResult:
        return cls(**(json.loads(data) if isinstance(data, str) else data))

    def write(self, run_dir: str | Path) -> Path:
        from sla_core.engine.files import atomic_write_text

        path = Path(run_dir) / RESULT_FILE
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> TrainResult:
        path = Path(run_dir) / RESULT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no result; the run did not finish (see its log)")
        return cls.from_json(path.read_text(encoding="utf-8"))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the optimizer step."""

    def __init__(self, step: int, loss: float, checkpoint: str | None) -> None:
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite loss {loss} at step {step}; training stopped and {kept}")
        self.step, self.loss, self.checkpoint = step, loss, checkpoint

    def __reduce__(self):  # pickles (Ray sends a failed trial's exception to the driver) keep the fields
        return type(self), (self.step, self.loss, self.checkpoint)


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived; a checkpoint of the current step was written and `--resume` continues from it."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by SIGTERM after step {step}; checkpoint {checkpoint}; resume with --resume"
        )
        self.step, self.checkpoint = step, checkpoint

    def __reduce__(self):
        return type(self), (self.step, self.checkpoint)
