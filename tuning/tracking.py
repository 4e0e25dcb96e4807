"""Nested tracking for a search: one parent run, one child run per trial.

`sla_core.tracking.Tracker` has no nesting. A tracker that also has `child(name) -> Tracker` is a
`ParentTracker` (`flows.tracking_mlflow.MLflowTracker` is one; `JsonRunTree` is the local-file one); a child
may have `end(status)` with MLflow's FINISHED / FAILED / KILLED. `as_parent` turns any plain tracker into a
parent whose children log into it under a `<child>/` prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sla_core.tracking import JsonTracker, Tracker


@runtime_checkable
class ParentTracker(Tracker, Protocol):
    """A tracker that can open nested runs."""

    def child(self, name: str) -> Tracker: ...


def end_run(tracker: Tracker, status: str) -> None:
    """Close `tracker`'s run with `status` (FINISHED, FAILED or KILLED) if it knows how; else tag it."""
    end = getattr(tracker, "end", None)
    if callable(end):
        end(status)
    else:
        tracker.set_tags({"status": status})


class JsonRunTree:
    """Local JSON-lines files: `<root>/parent.jsonl` and `<root>/trials/<name>.jsonl` per child."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._tracker: JsonTracker | None = (
            None  # created on first use: a search that fails early writes nothing
        )

    @property
    def _parent(self) -> JsonTracker:
        if self._tracker is None:
            self._tracker = JsonTracker(self.root / "parent.jsonl")
        return self._tracker

    def log_params(self, params: dict[str, Any]) -> None:
        self._parent.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._parent.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._parent.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._parent.set_tags(tags)

    def child(self, name: str) -> Tracker:
        return _JsonChild(self.root / "trials" / f"{name}.jsonl")

    def end(self, status: str = "FINISHED") -> None:
        self._parent._write("end", {"status": status})


class _JsonChild(JsonTracker):
    def end(self, status: str = "FINISHED") -> None:
        self._write("end", {"status": status})


class _PrefixedChild:
    """A child that logs into its parent's run with every key under `<name>/`."""

    def __init__(self, parent: Tracker, name: str) -> None:
        self.parent, self.prefix = parent, f"{name}/"

    def _keys(self, mapping: dict[str, Any]) -> dict[str, Any]:
        return {self.prefix + k: v for k, v in mapping.items()}

    def log_params(self, params: dict[str, Any]) -> None:
        self.parent.log_params(self._keys(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.parent.log_metrics(self._keys(metrics), step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.parent.log_artifact(path, self.prefix + (artifact_path or ""))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.parent.set_tags(self._keys(tags))


class _FlatParent:
    """Wraps a tracker without `child`: children log into the same run under a prefix."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tracker.set_tags(tags)

    def child(self, name: str) -> Tracker:
        return _PrefixedChild(self.tracker, name)


def as_parent(tracker: Tracker) -> ParentTracker:
    """`tracker` itself if it can nest runs, else a wrapper that prefixes child keys."""
    return tracker if isinstance(tracker, ParentTracker) else _FlatParent(tracker)
