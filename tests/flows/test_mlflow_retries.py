"""The retries of `sla_pipeline`'s MLflow tasks (open-mlflow-run, log-to-mlflow, register), under Prefect's
test harness with real MLflow stores.

A transient failure: each MLflow task loses its connection once, part-way through (injected in our own code,
after the task already wrote to the store); Prefect retries each and the flow succeeds with one MLflow run and
one registered version. A permanent failure: a real `mlflow server` goes down after the figures stage; the
log task fails on every attempt with an error that names the server, and nothing is registered."""

from __future__ import annotations

import inspect
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import ROOT, SCRIPTS

pytestmark = pytest.mark.slow
CONFIG = str(ROOT / "configs" / "tiny.yaml")
MLFLOW_TASKS = ("open-mlflow-run", "log-to-mlflow", "register")


@pytest.fixture(scope="module")
def harness() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-data cache for both tests."""
    return tmp_path_factory.mktemp("retries-cache")


def overrides(root: Path, cache: Path, model: str) -> dict[str, Any]:
    return {
        "output_dir": str(root / "runs"),
        "cache_dir": str(cache),
        "registry.model_name": model,
        "tasks.0.max_train_examples": 64,
        "tasks.0.max_eval_examples": 16,
        "tasks.0.eval_noise_levels": [0.0],
        "train.steps": 4,
    }


@pytest.fixture(autouse=True)
def _retry_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow tasks as the flow runs them, without the 5 s wait between tries (the flow reads the
    module's names when it runs)."""
    import flows.pipeline as pipeline

    for name in ("open_mlflow_run", "log_to_mlflow", "register_model"):
        monkeypatch.setattr(pipeline, name, getattr(pipeline, name).with_options(retry_delay_seconds=0))


def fail_first_call(owner: Any, name: str, monkeypatch: pytest.MonkeyPatch, after: bool = True) -> list[int]:
    """Make `owner.name` raise ConnectionError on its first call (after doing its work when `after`).

    Returns the list its calls are counted in."""
    real: Callable[..., Any] = getattr(owner, name)
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1 and not after:
            raise ConnectionError(f"injected: connection lost before {name}")
        value = real(*args, **kwargs)
        if len(calls) == 1:
            raise ConnectionError(f"injected: connection lost after {name}")
        return value

    bound = isinstance(inspect.getattr_static(owner, name), classmethod | staticmethod)
    wrapper: Any = staticmethod(flaky) if bound else flaky
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def task_runs(flow_run_id: Any) -> dict[str, Any]:
    """The flow run's task runs by task name (e.g. `register`)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def test_transient_mlflow_failures_are_retried_and_the_flow_succeeds(
    harness: Any, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from mlflow import MlflowClient

    from flows import registry
    from flows.pipeline import PIPELINE_TAG, sla_pipeline
    from flows.tracking_mlflow import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SLA_MLFLOW_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    # The run is created, the first upload (the config) is lost, the version is registered: the link drops.
    opened = fail_first_call(MLflowTracker, "start", monkeypatch)
    uploads = fail_first_call(MLflowTracker, "log_artifact", monkeypatch, after=False)
    promotions = fail_first_call(registry, "promote_if_better", monkeypatch)

    state = sla_pipeline(
        CONFIG, search=False, overrides=overrides(tmp_path, cache, "sla-retried"), return_state=True
    )
    assert state.is_completed(), state
    result = state.result()
    assert (len(opened), len(promotions)) == (1, 2) and len(uploads) > 1  # a retry does not start a 2nd run
    runs = task_runs(state.state_details.flow_run_id)
    for name in MLFLOW_TASKS:
        assert runs[name].state.is_completed() and runs[name].run_count == 2, (name, runs[name])
    assert runs["train"].run_count == 1  # only the failed tasks ran again

    client = MlflowClient(uri, uri)
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`{PIPELINE_TAG}` = '{result.pipeline_run_id}'",
    )
    assert [r.info.run_id for r in found] == [result.mlflow_run_id]
    assert found[0].info.status == "FINISHED"
    assert [i.dataset.name for i in found[0].inputs.dataset_inputs] == ["rotten_tomatoes"]
    versions = client.search_model_versions("name = 'sla-retried'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["sla.registration"] == "complete"
    assert str(client.get_model_version_by_alias("sla-retried", "champion").version) == "1"
    assert result.registration.champion_version == "1"


def test_a_tracking_server_down_for_good_fails_the_flow_naming_it(
    harness: Any,
    cache: Path,
    mlflow_server: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    from mlflow import MlflowClient

    import flows.pipeline as pipeline
    from flows.registry import TrackingServerUnavailable

    uri = mlflow_server["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    stop = ["bash", str(SCRIPTS / "start_mlflow.sh"), "--stop", "--port", mlflow_server["port"]]
    stop += ["--store", mlflow_server["store"]]
    real_figures = pipeline.draw_figures

    def figures_then_server_down(*args: Any) -> Any:
        figures = real_figures(*args)
        subprocess.run(stop, check=True, capture_output=True, timeout=60)
        return figures

    monkeypatch.setattr(pipeline, "draw_figures", figures_then_server_down)
    state = pipeline.sla_pipeline(
        CONFIG, search=False, overrides=overrides(tmp_path, cache, "sla-down"), return_state=True
    )
    assert state.is_failed(), state
    with pytest.raises(TrackingServerUnavailable) as raised:
        state.result()
    assert f"server at {uri} is not reachable" in str(raised.value)
    assert "start_mlflow.sh" in str(raised.value)
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["log-to-mlflow"].state.is_failed()
    assert runs["log-to-mlflow"].run_count == 1 + pipeline.SERVER_RETRIES > 1  # retried, then gave up
    assert "register" not in runs

    store = f"sqlite:///{mlflow_server['store']}/mlflow.db"  # read the stopped server's store directly
    client = MlflowClient(store, store)
    assert client.search_model_versions("name = 'sla-down'") == []
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    assert run.info.status == "RUNNING"  # left for a re-run to find once the server is back
