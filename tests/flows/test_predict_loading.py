"""`sla predict` loads data, never code (issue 15, item 3b): a model folder's `pyfunc_model.py` is not
imported, a registered model's files are read as data, and other URIs are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

PLANTED = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def _planted_copy(pyfunc_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The model folder, with its code file replaced by one that leaves a marker when imported."""
    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    shutil.copytree(pyfunc_dir, folder)
    (folder / "pyfunc_model.py").write_text(PLANTED.format(marker=str(marker)))
    return folder, marker


def _predict(model: str, *args: str) -> tuple[int, str]:
    """(exit code, stdout on success else all output)."""
    result = CliRunner().invoke(app, ["predict", "--model", model, "--text", "a fine film", *args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def test_a_model_folder_is_read_as_data_and_its_code_never_runs(pyfunc_dir: Path, tmp_path: Path) -> None:
    folder, marker = _planted_copy(pyfunc_dir, tmp_path)
    code, out = _predict(str(folder), "--task", "sentiment")
    assert not marker.exists(), "predict imported the model folder's pyfunc_model.py"
    assert code == 0, out
    assert out.split("\t")[0] in {"rotten", "fresh"}


def test_a_registered_model_is_read_as_data(pyfunc_dir: Path, tmp_path: Path, mlflow_store: str) -> None:
    from flows.registry import register_adapter_set, registry_client
    from flows.tracking_mlflow import MLflowTracker

    folder, marker = _planted_copy(pyfunc_dir, tmp_path)
    tracker = MLflowTracker.start("predict-test", "run", tracking_uri=mlflow_store)
    tracker.log_artifact(folder, "model")
    register_adapter_set(
        registry_client(mlflow_store),
        "sla-predict-test",
        tracker.artifact_uri("model"),
        pipeline_run_id="p1",
        run_id=tracker.run_id,
        metrics={},
        tags={},
    )
    code, out = _predict("models:/sla-predict-test/1", "--task", "topic")
    assert not marker.exists() and code == 0, out
    assert out.split("\t")[0] in {"business", "sport", "tech"}


def test_an_adapter_set_folder_predicts_class_indices(adapter_set: Path, adapter_set_model) -> None:
    from tests.flows.conftest import PROBES, probe_labels

    text = PROBES[1][0]  # a topic text whose label the set's adapters decide
    args = ["predict", "--model", str(adapter_set), "--text", text, "--task", "topic"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"{probe_labels(adapter_set_model)[1]}\t{text}"


@pytest.mark.parametrize("model", ["runs:/abc/model", "s3://bucket/model", "."])
def test_other_sources_are_refused(model: str) -> None:
    code, out = _predict(model)
    assert code == 1 and "other URIs and folders are not loaded" in out, out


def test_help_says_no_code_is_loaded() -> None:
    out = CliRunner().invoke(app, ["predict", "--help"], terminal_width=200).output
    assert "never imported" in " ".join(out.split())
