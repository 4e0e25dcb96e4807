"""Real servers on 127.0.0.1, started by infra/scripts: MLflow over HTTP (register, promote, load the
champion, then the server goes down) and Prefect (a deployment served by `sla deploy`, then run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import ROOT, TASKS

pytestmark = pytest.mark.slow
SLA = str(Path(sys.executable).with_name("sla"))  # the console script `pip install -e .` made


def test_mlflow_server_over_http(mlflow_server: dict[str, str], pyfunc_dir: Path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from flows import registry
    from flows.tracking_mlflow import MLflowTracker

    uri = mlflow_server["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = MLflowTracker.start("server-test", "run", {"via": "http"})
    assert tracker.artifact_uri().startswith("mlflow-artifacts:")  # artifacts go through the server
    tracker.log_metrics({"test_accuracy_mean": 0.8})
    tracker.log_artifact(pyfunc_dir, "model")
    client = registry.registry_client(uri)
    version = registry.register_adapter_set(
        client,
        "sla-http",
        tracker.artifact_uri("model"),
        pipeline_run_id="http-1",
        run_id=tracker.run_id,
        metrics={"test_accuracy_mean": 0.8},
        tags={"sla.code_version": "test"},
    )
    assert registry.promote_if_better(client, "sla-http", version.version, "test_accuracy_mean", 0.0).promoted
    tracker.end()

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/sla-http@champion")
    labels = model.predict(
        pd.DataFrame({"text": ["good", "markets rallied"], "task": ["sentiment", "topic"]})
    )
    assert labels[0] in TASKS["sentiment"]["labels"] and labels[1] in TASKS["topic"]["labels"]

    # The server goes down: a clear error before anything is created, and the store keeps one version.
    stop = [
        str(ROOT / "infra/scripts/start_mlflow.sh"),
        "--stop",
        "--port",
        mlflow_server["port"],
        "--store",
        mlflow_server["store"],
    ]
    subprocess.run(["bash", *stop], check=True, capture_output=True, timeout=60)
    with pytest.raises(registry.TrackingServerUnavailable, match="not reachable.*start_mlflow.sh"):
        client = registry.registry_client(uri)
    store = f"sqlite:///{mlflow_server['store']}/mlflow.db"
    versions = MlflowClient(store, store).search_model_versions("name = 'sla-http'")
    assert [int(v.version) for v in versions] == [1]


def test_served_deployment_runs_on_a_prefect_server(prefect_server: dict[str, str], tmp_path: Path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = prefect_server["api"]
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "serve-home")}
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [
            SLA,
            "deploy",
            "--cron",
            "0 3 * * *",
            "--name",
            "test",
            "--entrypoint",
            "tests/flows/hello_flow.py:hello",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            _wait_for_deployment("sla-hello/test", serve, tmp_path / "serve.log")
            run = run_deployment(
                "sla-hello/test", parameters={"name": "deploy"}, timeout=180, poll_interval=1
            )
            assert run.state is not None and run.state.is_completed(), run.state
            deployment = _read_deployment("sla-hello/test")
            assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"
    finally:
        _stop_serving(serve, log)


def _stop_serving(serve: subprocess.Popen, log: Any) -> None:
    """End an `sla deploy` process (TERM, not INT, and before the server stops) and close its log."""
    serve.terminate()
    try:
        serve.wait(timeout=60)
    except subprocess.TimeoutExpired:
        serve.kill()
    log.close()


def _read_deployment(name: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`sla deploy` exited with {proc.returncode}:\n{log.read_text()}")
        try:
            _read_deployment(name)
            return
        except Exception:
            time.sleep(1)
    raise AssertionError(f"deployment {name} did not appear in {timeout}s:\n{log.read_text()}")


def test_work_pool_deployment_file_deploys(prefect_server: dict[str, str], tmp_path: Path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server["api"], "PREFECT_HOME": str(tmp_path / "home")}
    prefect = str(Path(sys.executable).with_name("prefect"))

    def run(*args: str) -> str:
        proc = subprocess.run(
            [prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("work-pool", "create", "sla-process", "--type", "process")
    run("--no-prompt", "deploy", "--prefect-file", "infra/prefect/prefect.yaml", "--all")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api"]}):
        deployment = _read_deployment("sla-pipeline/sla-nightly")
    assert deployment.work_pool_name == "sla-process"
    assert deployment.entrypoint == "flows/pipeline.py:sla_pipeline"
    assert deployment.parameters["config_path"] == "configs/pipeline.yaml"


def test_deploy_without_a_server_says_how_to_start_one(monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    out = CliRunner().invoke(app, ["deploy", "--cron", "0 3 * * *"])
    assert out.exit_code == 1
    assert "PREFECT_API_URL is not set" in out.output and "start_prefect.sh" in out.output
