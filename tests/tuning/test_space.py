"""The search space, config checks, result selection and bad input: no Ray cluster needed."""

from __future__ import annotations

import math

import pytest
from ray import tune

from sla_core.experiment import ExperimentConfig
from tuning.results import pick_best
from tuning.runner import check_address
from tuning.space import apply_overrides, check_search, dimensions, grid_size, param_space
from tuning.trainable import TrialDiverged, TrialJob, TrialReporter, check_metrics


def test_random_space_has_every_dimension(search_config: ExperimentConfig) -> None:
    cfg = apply_overrides(search_config, {"tune.lambda_sparse": [0.0, 1.0], "tune.rank": [4, 64]})
    space = param_space(cfg)
    assert set(space) == {
        "sla.lambda_sparse",
        "sla.rank",
        "sla.lambda_warmup_steps",
        "sla.gate_init",
        "train.lr",
        "train.steps",
    }
    assert isinstance(space["sla.rank"], tune.search.sample.Categorical)
    assert space["sla.rank"].categories == [4, 64]
    assert 0.0 in space["sla.lambda_sparse"].categories  # λ = 0 is searched too
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert space["sla.gate_init"] == 3.0  # one choice: a constant, not a dimension
    assert space["train.steps"] == 12


def test_grid_space_crosses_choices_and_lr_grid(search_config: ExperimentConfig) -> None:
    cfg = apply_overrides(
        search_config,
        {
            "tune.search": "grid",
            "tune.lambda_sparse": [0.0, 1.0, 5.0],
            "tune.rank": [4, 16],
            "tune.lr": [3e-4, 3e-3],
            "tune.lambda_warmup_steps": [0],
            "tune.extra_space": {"train.gate_lr": [0.01, 0.05]},
        },
    )
    space = param_space(cfg)
    assert space["train.lr"] == {"grid_search": pytest.approx([3e-4, math.sqrt(3e-4 * 3e-3), 3e-3])}
    assert space["train.gate_lr"] == {"grid_search": [0.01, 0.05]}
    assert grid_size(cfg) == 3 * 2 * 3 * 2
    assert dimensions(cfg)["sla.lambda_sparse"] == [0.0, 1.0, 5.0]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"tune.grace_period": 12}, "tune.grace_period=12"),
        ({"tune.report_every": 20}, "tune.report_every=20"),
        ({"tune.extra_space": {"train.no_such_key": [1]}}, "train.no_such_key"),
        ({"tune.extra_space": {"sla.activation": ["relu", "swish"]}}, "sla.activation='swish'"),
        ({"tune.rank": [4, 0]}, "tune.rank"),
        ({"tune.lr": [1e-2, 1e-3]}, "tune.lr"),
    ],
)
def test_bad_search_settings_fail_early_naming_the_key(
    search_config: ExperimentConfig, overrides: dict, named: str
) -> None:
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(".", r"\.")):
        check_search(apply_overrides(search_config, overrides))


def test_unreachable_address_fails_fast_with_a_clear_message() -> None:
    with pytest.raises(ConnectionError, match=r"--address 127\.0\.0\.1:1: nothing answers.*ray up"):
        check_address("127.0.0.1:1")
    with pytest.raises(ValueError, match="expected `auto`, HOST:PORT"):
        check_address("no-port-here")


def _row(trial: str, outcome: str, value: float | None, feasible: bool | None) -> dict:
    return {"trial_id": trial, "outcome": outcome, "val_accuracy": value, "feasible": feasible}


def test_only_completed_trials_within_budget_can_win() -> None:
    rows = [
        _row("a", "completed", 0.90, False),  # the best value, but over the budget
        _row("b", "early_stopped", 0.95, None),
        _row("c", "failed", None, None),
        _row("d", "completed", 0.80, True),
        _row("e", "completed", 0.85, True),
        _row("f", "completed", 0.85, True),  # a tie: the earlier trial wins
    ]
    assert pick_best(rows, "val_accuracy", "max")["trial_id"] == "e"
    assert pick_best(rows, "val_accuracy", "min")["trial_id"] == "d"
    assert pick_best(rows[:3], "val_accuracy", "max") is None


def test_reporter_holds_back_the_last_step_and_stops_on_nan(search_config: ExperimentConfig) -> None:
    job = TrialJob.build(search_config, {}, search_config.cache_dir, steps=12)
    sent: list[dict] = []
    reporter = TrialReporter(job, sent.append)
    reporter(2, {"val_accuracy": 0.5, "train_loss": 0.7})
    reporter(12, {"val_accuracy": 0.6, "train_loss": 0.6, "val_loss": 0.5})  # the final report replaces it
    assert [r["step"] for r in sent] == [2]
    assert reporter.last["val_loss"] == 0.5  # carried into the final report (ASHA may rank on it)
    with pytest.raises(TrialDiverged, match="train_loss=nan"):
        reporter(4, {"val_accuracy": 0.5, "train_loss": float("nan")})
    with pytest.raises(KeyError, match="tune.metric='val_accuracy' is not among"):
        check_metrics({"accuracy": 1.0}, "val_accuracy", "step 2")


def test_final_report_carries_metrics_only_the_validation_reports_have(
    search_config: ExperimentConfig,
) -> None:
    from sla_core.engine.result import TrainResult
    from tuning.trainable import final_metrics

    job = TrialJob.build(search_config, {}, search_config.cache_dir, steps=12)
    pruned = {"val_accuracy": 0.7, "trainable_percent_after": 0.1}
    result = TrainResult("r", "c", "a", 12, "sla", "minilm", pruned)
    final = final_metrics(result, job, {"val_loss": 0.4, "val_accuracy": 0.65})
    assert final["val_loss"] == 0.4  # Ray's ASHA refuses a result without its rung metric
    assert final["val_accuracy"] == 0.7  # the pruned model's own values win
    assert final["final"] is True and final["step"] == 12
