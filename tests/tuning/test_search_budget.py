"""The search's budget and its `--resume` guard, on one real two-trial grid search: a trial whose pruned set
is over `tune.budget` is reported infeasible (objective NaN) and never chosen, even when its metric is the
best; resuming that search is refused once the config, the data or `--num-samples` changed."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from sla_core.experiment import ExperimentConfig
from tests.tuning.conftest import read_rows
from tuning.runner import plan_search, run_search
from tuning.space import apply_overrides
from tuning.tracking import JsonRunTree

pytestmark = pytest.mark.slow
BUDGET = 0.008  # rank 4 keeps about 0.37 % of MiniLM, rank 16 about four times that


@pytest.fixture(scope="module")
def budget_search(search_config: ExperimentConfig, search_refs: dict, tmp_path_factory: Any) -> tuple:
    """A grid over rank 4 and 16, ranked on the share kept (higher is better), so only the budget stops the
    larger trial from winning. 4 steps a trial, no early stopping."""
    tune = {
        "search": "grid",
        "num_samples": None,
        "rank": [4, 16],
        "lambda_sparse": [0.0],
        "lr_grid": [1e-3],
        "lambda_warmup_steps": [0],
        "scheduler": "none",
        "steps": 4,
        "report_every": 2,
        "budget": BUDGET,
        "metric": "trainable_percent_pruned",
        "mode": "max",
    }
    cfg = apply_overrides(search_config, {f"tune.{k}": v for k, v in tune.items()})
    out = tmp_path_factory.mktemp("budget")
    result = run_search(cfg, search_refs, out_dir=out, tracker=JsonRunTree(out / "tracking"), verbose=0)
    return cfg, out, result


def test_a_trial_over_the_budget_is_infeasible_and_never_best(budget_search: tuple) -> None:
    _, _, result = budget_search
    rows = {r["sla.rank"]: r for r in read_rows(result.trials_json)}
    assert set(rows) == {4, 16} and all(r["outcome"] == "completed" for r in rows.values())
    small, large = rows[4], rows[16]
    assert large["trainable_percent_pruned"] > small["trainable_percent_pruned"]  # the metric prefers it
    assert large["trainable_percent"] / 100 > BUDGET >= small["trainable_percent"] / 100, (large, small)
    assert (small["feasible"], large["feasible"]) == (True, False)
    assert result.best is not None and result.best.overrides["sla.rank"] == 4
    assert result.best.trial_id == small["trial_id"] and result.best.trainable_fraction <= BUDGET
    # What each trial reported to Tune: the objective is NaN over the budget, so no searcher can prefer it.
    from ray import tune

    trials = tune.ExperimentAnalysis(result.experiment_dir).trials
    last = {t.config["sla.rank"]: t.last_result for t in trials}
    assert math.isnan(last[16]["objective"]) and last[16]["feasible"] is False
    assert last[4]["objective"] == last[4]["trainable_percent_pruned"] and last[4]["feasible"] is True


def test_no_trial_within_the_budget_means_no_best_and_says_why(budget_search: tuple) -> None:
    from tuning.results import no_best_reason, pick_best

    rows = read_rows(budget_search[2].trials_json)
    for row in rows:
        row["feasible"] = False  # as if the budget were below both trials
    assert pick_best(rows, "trainable_percent_pruned", "max") is None
    assert "2 completed (2 over budget)" in no_best_reason(rows, BUDGET)


def test_resume_is_refused_after_the_config_data_or_samples_changed(
    budget_search: tuple, search_refs: dict
) -> None:
    cfg, out, _ = budget_search
    plan = plan_search(cfg, search_refs, out_dir=out, resume=True)  # unchanged: allowed
    assert plan.resume and plan.num_samples == 1

    changed = apply_overrides(cfg, {"train.lr": 0.5})
    with pytest.raises(ValueError, match=r"--resume: `train:` differ"):
        plan_search(changed, search_refs, out_dir=out, resume=True)
    other_data = {t: dataclasses.replace(r, fingerprint="0" * 16) for t, r in search_refs.items()}
    with pytest.raises(ValueError, match=r"--resume: the prepared data \(fingerprints\) differ"):
        plan_search(cfg, other_data, out_dir=out, resume=True)
    with pytest.raises(ValueError, match=r"--resume: --num-samples 2 differs from the saved search's 1"):
        plan_search(cfg, search_refs, out_dir=out, num_samples=2, resume=True)
    saved = json.loads((Path(out) / cfg.name / "search_spec.json").read_text())
    assert saved["num_samples"] == 1  # the refusals wrote nothing
