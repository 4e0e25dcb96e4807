"""`sla compare` on tiny settings: ours and a LoRA baseline through the same loop, a table, a figure, MLflow
runs, and a second call that reuses every finished cell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from flows.cli import app
from tests.flows.conftest import ROOT

CONFIG = str(ROOT / "configs" / "tiny.yaml")


def _invoke(out: Path, tmp: Path, *extra: str) -> Any:
    args = ["compare", "--config", CONFIG, "--methods", "sla,lora:r=2,alpha=4", "--seeds", "0",
            "--out", str(out), "--set", "train.steps=3", "--set", f"cache_dir={tmp / 'cache'}",
            "--set", "tasks.0.max_train_examples=64", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_compare_writes_a_table_a_figure_and_resumes(tmp_path: Path, mlflow_store: str, monkeypatch) -> None:
    out = tmp_path / "compare"
    result = _invoke(out, tmp_path, "--tracking-uri", mlflow_store)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    methods = [row["method"] for row in data["summary"]]
    assert methods == ["sla", "lora:r=2,alpha=4"]
    for row in data["summary"]:
        assert 0 <= row["accuracy"] <= 100 and 0 < row["kept_percent"] <= row["trainable_percent"]
        assert row["seconds_per_step"] > 0 and row["inference_ratio"] > 0
    lora = data["summary"][1]
    assert lora["kept_percent"] == lora["trainable_percent"]  # nothing to prune
    table = (out / "compare.md").read_text()
    assert "| `sla` | 1 |" in table and "| `lora:r=2,alpha=4` | 1 |" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert all(not (Path(c["run_dir"]) / "checkpoints").exists() for c in data["cells"])

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("tiny-compare").experiment_id])
    assert {r.data.tags["sla.compare.method"] for r in runs} == {"sla", "lora:r=2,alpha=4"}
    assert all("accuracy" in r.data.metrics and r.info.status == "FINISHED" for r in runs)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr("sla_core.engine.loop.train", boom)
    again = _invoke(out, tmp_path)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "compare.json").read_text())["summary"] == data["summary"]

    # --report-only trains nothing, even for a cell not run yet: it says which, and tabulates the rest
    only = _invoke(out, tmp_path, "--report-only", "--seeds", "0,1")
    assert only.exit_code == 0, only.output
    assert "not run yet: sla seed 1" in only.output and "not run yet: lora:r=2,alpha=4 seed 1" in only.output
    assert json.loads((out / "compare.json").read_text())["summary"] == data["summary"]


def test_a_bad_method_is_refused_before_any_work(tmp_path: Path) -> None:
    result = _invoke(tmp_path / "c", tmp_path, "--methods", "sla,lora:rank=4")
    assert result.exit_code == 2
    assert "unknown option(s) ['rank']" in result.output and not (tmp_path / "cache").exists()
