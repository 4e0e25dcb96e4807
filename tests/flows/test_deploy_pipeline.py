"""`sla deploy` of the real `sla_pipeline` on a real `prefect server` on 127.0.0.1: the served deployment
is run once through `run_deployment` on tiny settings (no search, a few steps), and the run's real effect is
checked: the flow run COMPLETED, a non-empty adapter set was exported and the MLflow version registered."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.flows.conftest import ROOT
from tests.flows.test_servers import SLA, _read_deployment, _stop_serving, _wait_for_deployment

pytestmark = pytest.mark.slow
MODEL = "sla-deployed"
DEPLOYMENT = "sla-pipeline/tiny"


def test_deployed_pipeline_runs_through_run_deployment(prefect_server: dict[str, str], tmp_path: Path):
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, store = prefect_server["api"], f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "serve-home"),
        "MLFLOW_TRACKING_URI": store,
        "SLA_MLFLOW_ARTIFACT_ROOT": (tmp_path / "mlflow" / "artifacts").as_uri(),
    }
    sets = {
        "output_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
        "registry.model_name": MODEL,
        "tasks.0.max_train_examples": 64,
        "tasks.0.max_eval_examples": 16,
        "tasks.0.eval_noise_levels": "[0.0]",
        "train.steps": 4,
    }
    args = [SLA, "deploy", "--cron", "0 3 * * *", "--name", "tiny", "--config", "configs/tiny.yaml"]
    args += ["--no-search", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    serve = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            _wait_for_deployment(DEPLOYMENT, serve, log_path)
            deployment = _read_deployment(DEPLOYMENT)
            assert deployment.parameters["search"] is False
            assert deployment.parameters["overrides"]["train.steps"] == 4
            run = run_deployment(DEPLOYMENT, timeout=600, poll_interval=2)
            assert run.state is not None and run.state.is_completed(), (run.state, log_path.read_text())
    finally:
        _stop_serving(serve, log)

    (done,) = (tmp_path / "runs").glob("pipeline-*/pipeline.json")
    result = json.loads(done.read_text(encoding="utf-8"))
    weights = done.parent / "adapters" / "sla_adapter_model.safetensors"
    assert weights.is_file() and weights.stat().st_size > 0
    assert result["search"] is None and set(result["accuracy"]) == {"rotten_tomatoes"}
    assert json.loads((done.parent / "train" / "result.json").read_text())["steps"] == 4
    client = MlflowClient(store, store)
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert str(version.version) == result["registration"]["version"] == "1"
    assert version.tags["sla.registration"] == "complete"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
