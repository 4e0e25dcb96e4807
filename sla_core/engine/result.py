"""What a training run hands to the next stage, and how it can fail. No DeepSpeed import here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

RESULT_FILE = "result.json"


class _Artefact:
    """Plain-JSON artefacts: written atomically into a run folder and read back."""

    FILE: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> Any:
        return cls(**(json.loads(data) if isinstance(data, str) else data))

    def write(self, folder: str | Path) -> Path:
        from sla_core.files import atomic_write_text

        path = Path(folder) / self.FILE
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Any:
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; the stage that writes it did not finish (see its log)"
            )
        return cls.from_json(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class TrainResult(_Artefact):
    """A finished training: its last checkpoint, the unpruned trained set inside it, and the metrics of
    the last step (training, and validation when it ran). Ranks other than 0 get the same paths.

    Attributes:
        trained: the gathered, unpruned set (`sla_core.methods.load_trained` rebuilds the model).
        method: the method's spec (`sla`, `lora:r=8`, ...).
    """

    FILE: ClassVar[str] = RESULT_FILE
    run_dir: str
    checkpoint: str
    trained: str
    steps: int
    method: str
    backbone: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunedAdapterSet(_Artefact):
    """The shipped set: gates decided, closed adapters removed, open gates folded in (`prune`).

    Attributes:
        path: the folder (`load_trained` reads it). counts_before/after: backbone, trainable, kept.
        open_candidates: per task, the candidates kept (ours; empty for the baselines).
        kept_share: per task, the share of each candidate's units kept (where a candidate has several).
    """

    FILE: ClassVar[str] = "pruned.json"
    path: str
    sha256: str
    method: str
    backbone: str
    step: int
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    open_candidates: dict[str, list[str]]
    gate_probability: dict[str, dict[str, float]]
    # per task, the share of each candidate's gated units that the decision kept (ours with several units
    # per candidate: a pool, or `gate_unit: rank`); empty otherwise and in files written before it existed
    kept_share: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def trainable_percent_before(self) -> float:
        return 100.0 * self.counts_before["trainable"] / self.counts_before["backbone"]

    @property
    def trainable_percent_after(self) -> float:
        return 100.0 * self.counts_after["trainable"] / self.counts_after["backbone"]


@dataclass(frozen=True)
class EvaluationReport(_Artefact):
    """Accuracy and macro-F1 per task, split and noise level of one set (`evaluate`).

    Attributes:
        metrics_path: the full report (JSON). summary: flat metrics (`test_accuracy_mean`, ...).
        accuracy: {task: {"clean" | "noise0.1" | ...: test accuracy}}.
    """

    FILE: ClassVar[str] = "evaluation.json"
    metrics_path: str
    summary: dict[str, float]
    accuracy: dict[str, dict[str, float]]


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
