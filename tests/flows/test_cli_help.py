"""Issue 16, item 7: every help page has an example, modes are choices, and `sla --version`."""

from __future__ import annotations

import importlib.metadata

import pytest
from typer.testing import CliRunner

from flows.cli import app

COMMANDS = sorted(c.name for c in app.registered_commands)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_help_page_has_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [*([command] if command else []), "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: sla " in result.output, f"sla {command} --help has no example"


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sla {importlib.metadata.version('sla')}"


@pytest.mark.parametrize(
    ("args", "choices"),
    [
        (["promote", "--version", "1", "--mode", "mid"], "'max', 'min'"),
        (["tune", "--config", "x.yaml", "--tracking", "wandb"], "'json', 'mlflow', 'none'"),
    ],
)
def test_modes_are_choices(args: list[str], choices: str) -> None:
    result = CliRunner().invoke(app, args, terminal_width=200)
    flat = " ".join(result.output.replace("\u2502", " ").split())  # the error box wraps at its own width
    assert result.exit_code == 2 and f"is not one of {choices}" in flat, result.output
    help_text = CliRunner().invoke(app, [args[0], "--help"], terminal_width=200).output
    assert "<" + choices.replace("'", "").replace(", ", "|") + ">" in help_text
