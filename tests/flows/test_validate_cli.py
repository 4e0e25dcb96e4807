"""`sla validate`: every shipped config is valid; a bad one exits non-zero and names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.yml"))
DEEPSPEED = sorted((ROOT / "infra" / "deepspeed").glob("*.json"))


def test_there_are_shipped_configs() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_is_valid(config: Path) -> None:
    out = CliRunner().invoke(app, ["validate", str(config)])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"sla: {config}: OK (name ") and "backbone " in out.output


@pytest.mark.parametrize("ds_json", DEEPSPEED, ids=lambda p: p.name)
def test_every_shipped_deepspeed_json_is_valid_with_the_default_config(ds_json: Path) -> None:
    config = ROOT / "configs" / "default.yaml"
    out = CliRunner().invoke(app, ["validate", str(config), "--set", f"train.deepspeed_config={ds_json}"])
    assert out.exit_code == 0, out.output


def test_a_bad_config_exits_2_naming_every_bad_key(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["sla"]["rnk"] = 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["validate", str(bad), "--set", "sla.lambda_sparse=abc"])
    assert out.exit_code == 2
    assert f"sla: {bad}: invalid config" in out.output
    assert (
        "sla.rnk: unknown key" in out.output
        and "sla.lambda_sparse: Input should be a valid number" in out.output
    )
    out = CliRunner().invoke(
        app, ["validate", str(ROOT / "configs" / "tiny.yaml"), "--set", "tasks.1.labels=[a]"]
    )
    assert out.exit_code == 2 and "--set tasks.1.labels: the config has 1 tasks (0..0)" in out.output


def test_a_bad_deepspeed_json_and_a_missing_file_exit_2(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text("{not json")
    config = str(ROOT / "configs" / "tiny.yaml")
    out = CliRunner().invoke(app, ["validate", config, "--set", f"train.deepspeed_config={tmp_path}/ds.json"])
    assert out.exit_code == 2 and "ds.json" in out.output and "invalid config" in out.output
    out = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert out.exit_code == 2 and "nope.yaml not found" in out.output
    out = CliRunner().invoke(app, ["validate", config, "--set", "train.steps"])
    assert out.exit_code == 2 and "expected KEY=VALUE" in out.output


def test_help_shows_an_example() -> None:
    out = CliRunner().invoke(app, ["validate", "--help"])
    assert out.exit_code == 0 and "Example: sla validate configs/" in out.output
