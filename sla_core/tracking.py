"""A small tracking interface: the training loop logs through it, never through MLflow directly.

`flows/tracking_mlflow.py` implements it over MLflow; `JsonTracker` writes a local JSON-lines file;
`NullTracker` drops everything. The engine and tuning code accept any `Tracker`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """What the training and evaluation code needs from an experiment tracker."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Drops everything; the default when no tracker is given."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class JsonTracker:
    """Appends every call as one JSON line to `path` (useful for runs without a server)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, kind: str, payload: dict[str, Any]) -> None:
        record = {"time": time.time(), "kind": kind, **payload}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write("params", {"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write("metrics", {"metrics": metrics, "step": step})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write("artifact", {"path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write("tags", {"tags": tags})
