"""Hyperparameter search on Ray Tune: the search space, the trial (a shim over the engine's `train`), the
runner. The only package of the project that imports ray; `run_search` is the entry point.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Before Ray is imported anywhere: no ~/.ray/auth_token, no usage reporting, no checkpoint-sync warnings.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

if TYPE_CHECKING:
    from tuning.results import BestTrial, SearchResult
    from tuning.runner import run_search

__all__ = ["BestTrial", "SearchResult", "run_search"]


def __getattr__(name: str) -> Any:  # lazy: importing ray takes seconds
    if name == "run_search":
        from tuning.runner import run_search

        return run_search
    if name in ("SearchResult", "BestTrial"):
        from tuning import results

        return getattr(results, name)
    raise AttributeError(f"module 'tuning' has no attribute {name!r}")
