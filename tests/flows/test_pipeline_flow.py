"""`sla_pipeline` end to end on the tiny config under Prefect's test harness, with a real sqlite MLflow store:
data -> a 2-trial search -> train -> prune -> evaluate -> log -> register; then a re-run that reuses every
stage and registers nothing new; then a tracking server that is down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import ROOT, free_port

CONFIG = str(ROOT / "configs" / "tiny.yaml")
MODEL = "sla-e2e"


@pytest.fixture(scope="module")
def harness() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("SLA_MLFLOW_ARTIFACT_ROOT", (root / "artifacts").as_uri())
        yield root


def overrides(root: Path) -> dict[str, Any]:
    return {"output_dir": str(root / "runs"), "cache_dir": str(root / "cache"), "registry.model_name": MODEL}


@pytest.fixture(scope="module")
def first_run(harness: Any, env: Path) -> Any:
    from flows.pipeline import sla_pipeline

    return sla_pipeline(CONFIG, search=True, num_samples=2, overrides=overrides(env))


def _client() -> Any:
    import os

    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])


def test_pipeline_runs_every_stage_and_registers_a_champion(first_run: Any, env: Path):
    import mlflow
    from prefect import get_client

    result = first_run
    assert set(result.accuracy["rotten_tomatoes"]) == {"clean", "noise0.1"}
    assert 0.0 < result.trainable_percent_after <= result.trainable_percent_before
    reg = result.registration
    assert (reg.version, reg.created, reg.promoted, reg.champion_version) == ("1", True, True, "1")
    assert result.search is not None and sum(result.search.counts.values()) == 2
    assert "train.steps" not in result.search.overrides  # the final training keeps its own steps
    assert result.overhead["flow_seconds"] > result.overhead["work_seconds"] > 0

    with get_client(sync_client=True) as prefect:
        names = {
            t.name.rsplit("-", 1)[0] for t in prefect.read_task_runs() if t.state and t.state.is_completed()
        }
    assert {"prepare-data", "search", "train", "prune", "evaluate", "log-to-mlflow", "register"} <= names

    client = _client()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["search.enabled"] == "true" and "sla.rank" in run.data.params
    assert {"test_accuracy_mean", "pipeline/prefect_seconds", "train/loss"} <= set(run.data.metrics)
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["rotten_tomatoes"]
    files = _artifact_files(client, result.mlflow_run_id)
    for expected in (
        "metrics.json",
        "adapters/sla_adapter_config.json",
        "figures/gate_heatmap.png",
        "figures/noise_curve.png",
        "config/experiment.yaml",
        "pipeline.json",
    ):
        assert expected in files, (expected, sorted(files))
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    trials = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert len(trials) == 2

    version = client.get_model_version(MODEL, "1")
    (output,) = run.outputs.model_outputs  # the run's logged model (mlflow.pyfunc.log_model)
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and version.source == logged.artifact_location
    model_files = Path(logged.artifact_location.removeprefix("file://"))
    for expected in ("MLmodel", "artifacts/adapters/sla_adapter_model.safetensors", "code/sla_core/io.py"):
        assert (model_files / expected).is_file(), expected
    for tag in (
        "sla.data_fingerprint",
        "sla.code_version",
        "sla.trainable_percent",
        "metric.test_accuracy_mean",
    ):
        assert version.tags.get(tag), tag
    assert version.tags["sla.registration"] == "complete"
    assert [k for k in version.tags if k.startswith("metric.")] == ["metric.test_accuracy_mean"]
    assert "test_accuracy_mean" in version.description and "adapters-" not in version.description

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert set(model.predict(["a moving, beautiful film", "flat and dull"])) <= {"rotten", "fresh"}


def _artifact_files(client: Any, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_files(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_rerun_reuses_stages_and_registers_once(first_run: Any, env: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    result_json = Path(first_run.run_dir) / "train" / "result.json"
    before = result_json.stat().st_mtime_ns
    args = ["run", "--config", CONFIG, "--num-samples", "2"]
    for key, value in overrides(env).items():
        args += ["--set", f"{key}={value}"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "already registered (re-run)" in out.output and "rotten_tomatoes" in out.output
    assert "mlflow ui --backend-store-uri" in out.output and "pipeline overhead" in out.output
    assert result_json.stat().st_mtime_ns == before  # the training was not redone
    assert [v.version for v in _client().search_model_versions(f"name = '{MODEL}'")] == [1]


def test_a_down_tracking_server_stops_the_flow_before_any_work(harness: Any, env: Path, monkeypatch):
    from flows.pipeline import sla_pipeline
    from flows.registry import TrackingServerUnavailable

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs = env / "down-runs"
    with pytest.raises(TrackingServerUnavailable, match="start_mlflow.sh"):
        sla_pipeline(CONFIG, search=False, overrides={**overrides(env), "output_dir": str(runs)})
    assert not runs.exists()


def test_the_main_job_config_is_valid():
    from sla_core.experiment import load_experiment

    cfg = load_experiment(ROOT / "configs" / "pipeline.yaml")
    assert [t.name for t in cfg.tasks] == ["rotten_tomatoes", "tweets", "bbc_news"]
    assert cfg.sla.pool_size > 1  # multi-task with a shared pool
    assert cfg.tune.num_samples <= 4 and all(len(t.eval_noise_levels) >= 3 for t in cfg.tasks)


def test_a_custom_stage_stands_between_training_and_pruning(harness: Any, env: Path):
    """The pipeline's tasks compose with a user's own: here one closes half the gates of the trained set,
    and the prune stage ships exactly what that stage left open."""
    from dataclasses import replace

    from prefect import flow, task
    from safetensors.torch import load_file

    from flows.pipeline import evaluate_adapters, prepare_data, prune_adapters, train_adapters
    from flows.stages import TrainedRun
    from sla_core import load_adapters
    from sla_core.backbones import load_backbone
    from sla_core.experiment import load_experiment
    from sla_core.tracking import NullTracker

    root = env / "custom"
    cfg = load_experiment(CONFIG, {**overrides(env), "output_dir": str(root), "train.steps": 4})

    @task
    def close_every_other_candidate(trained: TrainedRun) -> TrainedRun:
        model = load_adapters(load_backbone(cfg.backbone), trained.result.trained)
        model.sla_gates.log_alpha.data[:, ::2] = -20.0
        edited = root / "edited"
        model.save_adapters(str(edited), extra={"step": trained.result.steps})
        return replace(trained, result=replace(trained.result, trained=str(edited)))

    @flow
    def with_a_custom_stage() -> tuple[Any, Any]:
        data = prepare_data(cfg)
        trained = train_adapters(cfg, data, str(root / "train"), NullTracker())
        edited = close_every_other_candidate(trained)
        pruned = prune_adapters(edited, str(root / "adapters"))
        return pruned, evaluate_adapters(cfg, data, edited, pruned, str(root / "eval"))

    pruned, evaluation = with_a_custom_stage()
    candidates = 24  # 6 layers x 2 sites x 2 paths
    assert len(pruned.open_candidates["rotten_tomatoes"]) == candidates // 2
    saved = load_file(str(Path(pruned.path) / "sla_adapter_model.safetensors"))
    assert not any("gates" in k for k in saved)  # decided and folded
    assert pruned.counts_after["trainable"] < pruned.counts_before["trainable"]
    assert (
        evaluation.summary["rotten_tomatoes/test_accuracy_before"]
        == evaluation.summary["rotten_tomatoes/test_accuracy"]
    )  # pruning the edited set is exact
