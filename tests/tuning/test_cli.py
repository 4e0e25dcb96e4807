"""`sla tune` rejects bad input early, naming what and where, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.tuning.conftest import ray_temp_dirs, tiny_search_data


@pytest.fixture
def config_file(search_cache: Path, search_refs: dict, tmp_path: Path) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tiny_search_data(search_cache)))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers"),
        (["--set", "tune.rank=[4,0]"], "tune.rank=[4, 0]: ranks must be >= 1"),
        (["--set", "tune.grace_period=50"], "tune.grace_period=50 must be below the trial's 12 steps"),
        (["--resume"], "--resume: no search to resume"),
        (["--tracking", "wandb"], "'wandb' is not one of"),
    ],
)
def test_bad_input_fails_before_any_trial(
    config_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    before = ray_temp_dirs()
    result = CliRunner().invoke(
        app, ["tune", "--config", str(config_file), "--out-dir", str(tmp_path / "out"), "--quiet", *args]
    )
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert ray_temp_dirs() == before
    assert not (tmp_path / "out" / "tiny").exists()  # nothing written
