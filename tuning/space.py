"""The search space: `TuneConfig` ranges -> Ray Tune domains over dotted config keys.

A trial's sampled values are config overrides (`{"sla.rank": 8, "train.lr": 1e-3, ...}`), applied to the
experiment config with `sla_core.experiment.with_overrides` (the one override path, also behind `--set`),
so a trial is an ordinary experiment and the best one can be re-run with
`sla train --config best/config.yaml`.
"""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from sla_core.experiment import ExperimentConfig, with_overrides

# The core dimensions: dotted config key -> TuneConfig field holding its choices.
CHOICES = {
    "sla.lambda_sparse": "lambda_sparse",
    "sla.rank": "rank",
    "sla.lambda_warmup_steps": "lambda_warmup_steps",
    "sla.gate_init": "gate_init",
}
LR_KEY = "train.lr"


def trial_steps(cfg: ExperimentConfig) -> int:
    """Optimizer steps of one full trial: `tune.steps`, else `train.steps`."""
    return cfg.tune.steps or cfg.train.steps


def default_samples(cfg: ExperimentConfig) -> int:
    """`tune.num_samples`, else 8 trials for a random search and one pass for a grid."""
    if cfg.tune.num_samples is not None:
        return cfg.tune.num_samples
    return 1 if cfg.tune.search == "grid" else 8


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """`with_overrides` under its old name: a copy of `cfg` with dotted keys set, validated again."""
    return with_overrides(cfg, overrides, origin="override")


def lr_grid(cfg: ExperimentConfig) -> list[float]:
    """Grid values of the learning rate: `tune.lr_grid`, else the range's ends and their geometric mean."""
    if cfg.tune.lr_grid:
        return list(cfg.tune.lr_grid)
    lo, hi = cfg.tune.lr
    return sorted({lo, math.sqrt(lo * hi), hi})


def dimensions(cfg: ExperimentConfig) -> dict[str, list[Any]]:
    """Every discrete dimension (the lr as its grid values) as dotted key -> choices.

    In budget mode λ is unused, so it is searched only when `tune.lambda_sparse` is set in the config (its
    trials then run in λ mode: setting λ drops the budget)."""
    dims = {key: list(getattr(cfg.tune, field)) for key, field in CHOICES.items()}
    if cfg.sla.budget_mode and "lambda_sparse" not in cfg.tune.model_fields_set:
        del dims["sla.lambda_sparse"]
    dims[LR_KEY] = lr_grid(cfg)
    dims.update({key: list(values) for key, values in cfg.tune.extra_space.items()})
    return dims


def check_search(cfg: ExperimentConfig) -> None:
    """Fail early, naming the key, on a search that cannot run as configured.

    Every choice of every dimension is applied alone to the config and validated (so a bad rank or an unknown
    `extra_space` key fails here, not in a trial), and the step counts must fit one trial.
    """
    t, steps = cfg.tune, trial_steps(cfg)
    if t.scheduler == "asha" and t.grace_period >= steps:
        raise ValueError(
            f"tune.grace_period={t.grace_period} must be below the trial's {steps} steps "
            "(tune.steps or train.steps), else ASHA can never stop a trial early"
        )
    if t.report_every > steps:
        raise ValueError(
            f"tune.report_every={t.report_every} exceeds the trial's {steps} steps; trials would "
            "report only their final result"
        )
    for key, values in dimensions(cfg).items():
        for value in values:
            try:
                with_overrides(cfg, {key: value}, origin="search")
            except (ValueError, TypeError) as err:
                raise ValueError(f"tune: the choice {key}={value!r} is invalid: {err}") from None


def param_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """Ray Tune's `param_space`: choices (random) or grid axes (grid); one-value dimensions are constants."""
    grid = cfg.tune.search == "grid"
    space: dict[str, Any] = {}
    for key, values in dimensions(cfg).items():
        if key == LR_KEY and not grid:
            lo, hi = cfg.tune.lr
            space[key] = tune.loguniform(lo, hi) if lo < hi else lo
        elif len(values) == 1:
            space[key] = values[0]
        else:
            space[key] = tune.grid_search(values) if grid else tune.choice(values)
    space["train.steps"] = trial_steps(cfg)
    return space


def grid_size(cfg: ExperimentConfig) -> int:
    """Trials of one pass over the grid (grid search)."""
    return math.prod(len(v) for v in dimensions(cfg).values())
