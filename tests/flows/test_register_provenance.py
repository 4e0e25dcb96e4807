"""`sla register` logs what the run trained with (issue 15, item 5): the run's checkpoint, not --config, is
the source of its parameters; a --config that differs is refused; a run id with a quote is quoted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
RUN_LR = 0.25  # what the run trains with; configs/tiny.yaml says 0.001 (the default)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 2-step run trained with train.lr=RUN_LR, and the config file without that override."""
    from sla_core.engine import run_experiment
    from sla_core.experiment import load_experiment

    root = tmp_path_factory.mktemp("register")
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["train"].update(steps=2, checkpoint_every=0)
    data["tasks"][0].update(max_train_examples=32, max_eval_examples=16, eval_noise_levels=[0.0])
    data["cache_dir"] = str(root / "cache")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    run_experiment(load_experiment(config, {"train.lr": RUN_LR}), run_dir=root / "run")
    return root / "run", config


def _register(*args: str) -> Any:
    return CliRunner().invoke(app, ["register", *args])


def test_a_config_that_differs_from_the_run_is_refused(tiny_run: tuple[Path, Path]) -> None:
    run_dir, config = tiny_run
    result = _register("--run-dir", str(run_dir), "--config", str(config), "--run-id", "differs")
    assert result.exit_code == 1, result.output
    assert f"train.lr: {RUN_LR} in the run vs 0.001" in " ".join(result.output.split())


def test_the_run_s_own_parameters_are_logged(tiny_run: tuple[Path, Path]) -> None:
    from mlflow import MlflowClient

    run_dir, config = tiny_run
    result = _register("--run-dir", str(run_dir), "--run-id", "it's a run")  # a quote in the run id
    assert result.exit_code == 0, result.output
    again = _register("--run-dir", str(run_dir), "--run-id", "it's a run")
    assert again.exit_code == 0 and "was already registered" in again.stdout, again.output
    client = MlflowClient()
    version = client.get_model_version("sla-adapters", "1")
    assert float(client.get_run(version.run_id).data.params["train.lr"]) == RUN_LR
    # --config agreeing with the run (here through --set) is accepted; its registry settings apply.
    same = _register(
        "--run-dir", str(run_dir), "--config", str(config), "--set", f"train.lr={RUN_LR}", "--run-id", "same"
    )
    assert same.exit_code == 0, same.output


def test_a_run_id_with_both_quotes_is_named() -> None:
    from flows.registry import RegistryError, filter_literal

    assert filter_literal("it's", "run id") == '"it\'s"'
    assert filter_literal('say "x"', "run id") == "'say \"x\"'"
    with pytest.raises(RegistryError, match="run id .* holds both"):
        filter_literal('it\'s "x"', "run id")
