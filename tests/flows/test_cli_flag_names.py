"""Issue 16, item 7: one documented name per idea (--out, --tracking); old spellings work, hidden."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app


def _help(command: str) -> str:
    return CliRunner().invoke(app, [command, "--help"], terminal_width=200).output


@pytest.mark.parametrize(
    ("command", "shown", "hidden"), [("tune", "--out ", "--out-dir"), ("train", "--tracking", "--mlflow")]
)
def test_help_shows_one_name_per_idea(command: str, shown: str, hidden: str) -> None:
    text = _help(command)
    assert shown in text and hidden not in text


def test_master_port_help_says_it_is_required_on_several_nodes() -> None:
    flat = " ".join(_help("train").replace("\u2502", " ").split())
    assert "required with several nodes" in flat and "default: a free one" not in flat


def test_old_spellings_still_parse(monkeypatch, tmp_path) -> None:
    import sla_core.backbones
    import sla_core.data
    import tuning.runner

    seen = {}

    def plan(cfg, refs, **where):
        seen.update(where)
        raise ValueError("stop here")

    monkeypatch.setattr(sla_core.backbones, "load_tokenizer", lambda name: None)
    monkeypatch.setattr(sla_core.data, "prepare_tasks", lambda *a, **k: {})
    monkeypatch.setattr(tuning.runner, "plan_search", plan)
    args = ["tune", "--config", "configs/tiny.yaml", "--quiet"]
    CliRunner().invoke(app, [*args, "--out-dir", str(tmp_path / "old")])
    assert seen["out_dir"] == tmp_path / "old"
    CliRunner().invoke(app, [*args, "--out", str(tmp_path / "new")])
    assert seen["out_dir"] == tmp_path / "new"
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "missing.yaml"), "--mlflow"])
    assert result.exit_code == 1 and "missing.yaml" in result.output  # parsed; failed on the file
