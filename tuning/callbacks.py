"""Driver-side tracking of a search: a Ray Tune callback that logs one child run per trial.

The callback holds only a key; the live trackers sit in `LIVE` in the driver, so the callback pickles into
Tune's experiment state and finds the new trackers again after `--resume`. A tracker that fails is logged
and then ignored: a broken tracking server must not end a long search.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from sla_core.tracking import Tracker
from tuning.tracking import ParentTracker, end_run

log = logging.getLogger(__name__)
SKIP_KEYS = {
    *AUTO_RESULT_KEYS,
    "trial_id",
    "step",  # the x axis of every metric, not a metric
    "done",
    "final",
    "feasible",
    "experiment_tag",
    "should_checkpoint",
}


class SearchTracking:
    """The parent run and one child per trial, opened on start and closed with the trial's status."""

    def __init__(self, parent: ParentTracker) -> None:
        self.parent = parent
        self.children: dict[str, Tracker] = {}
        self.failed = False

    def guard(self, what: str, fn: Any, *args: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as err:  # tracking must never stop the search
            self.failed = True
            log.warning("tracking disabled for the rest of the search: %s failed: %s", what, err)

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        def open_child() -> None:
            child = self.parent.child(trial_id)
            self.children[trial_id] = child
            child.log_params(dict(config))
            child.set_tags({"trial_id": trial_id, "role": "trial"})

        self.guard(f"child run for trial {trial_id}", open_child)

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        child = self.children.get(trial_id)
        if child is None:
            return
        metrics = {k: float(v) for k, v in result.items() if k not in SKIP_KEYS and _is_number(v)}
        self.guard(f"metrics of trial {trial_id}", child.log_metrics, metrics, result.get("step"))

    def end(self, trial_id: str, status: str, outcome: str) -> None:
        child = self.children.pop(trial_id, None)
        if child is None:
            return

        def close() -> None:
            child.set_tags({"outcome": outcome})
            end_run(child, status)

        self.guard(f"closing trial {trial_id}", close)

    def close_open(self, status: str = "KILLED") -> None:
        """End the child runs of trials that never finished (an interrupted search)."""
        for trial_id in list(self.children):
            self.end(trial_id, status, "unfinished")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


LIVE: dict[str, SearchTracking] = {}


class TrackingCallback(tune.Callback):
    """Forwards trial events to `LIVE[key]` (nothing happens when no tracking is registered)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _live(self) -> SearchTracking | None:
        return LIVE.get(self.key)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (live := self._live()) is not None:
            live.start(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if (live := self._live()) is not None:
            live.result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = bool((trial.last_result or {}).get("final"))
        say_trial(trial, "completed" if final else "stopped early", trials)
        if (live := self._live()) is not None:
            live.end(trial.trial_id, "FINISHED", "completed" if final else "early_stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        say_trial(trial, "failed", trials)
        if (live := self._live()) is not None:
            live.end(trial.trial_id, "FAILED", "failed")


def say_trial(trial: Any, how: str, trials: list) -> None:
    """One line as a trial ends (the Prefect flow logs printed lines): which, how far, its score."""
    result = trial.last_result or {}
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1
    score = result.get("val_accuracy")
    shown = f", val_accuracy {score:.4f}" if isinstance(score, (int, float)) else ""
    print(
        f"search: trial {trial.trial_id} {how} after {result.get('training_iteration', 0)} reports{shown} "
        f"({done}/{len(trials)} trials done)",
        flush=True,
    )
