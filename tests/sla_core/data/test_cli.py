"""`sla prepare` on a YAML config and on builtin names."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows import cli
from tests.sla_core.data.helpers import write_csv


def test_prepare_from_config(tmp_path: Path, rt_rows: list) -> None:
    rows = [{"review": r["text"], "verdict": r["label"]} for r in rt_rows[:50]]
    write_csv(tmp_path / "mine.csv", rows, ["review", "verdict"])
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "backbone: minilm\n"
        "tasks:\n"
        "  - name: tweets\n"
        "    max_train_examples: 50\n"
        "    max_eval_examples: 10\n"
        "    max_length: 16\n"
        "    eval_noise_levels: [0.1]\n"
        "  - name: mine\n"
        f"    files: {{train: {tmp_path / 'mine.csv'}}}\n"
        "    text_column: review\n"
        "    label_column: verdict\n"
        "    eval_noise_levels: [0.0]\n",
        encoding="utf-8",
    )
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        cli.app,
        ["prepare", "--config", str(cfg), "--cache-dir", str(cache), "--eval-levels", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "tweets" in result.output and "mine" in result.output and "test@0.1" in result.output
    refs = {
        json.loads(p.read_text())["task"]: json.loads(p.read_text())
        for p in cache.glob("*/ref.json")
        if "noise" not in p.parent.name
    }
    assert refs["tweets"]["counts"] == {"train": 50, "validation": 10, "test": 10}
    assert sum(refs["mine"]["counts"].values()) == 50


def test_prepare_errors_are_one_clear_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli.app, ["prepare", "--task", "nope", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "--task nope: unknown builtin task 'nope'" in result.output
    result = runner.invoke(cli.app, ["prepare", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--config" in result.output
