"""`sla_pipeline`'s failure path: a NaN injected part-way through training fails the flow and marks the MLflow
run FAILED; running the same pipeline run again without the fault finds that MLflow run, resumes training
from the checkpoint the failed attempt left (each step is trained and logged once), and finishes it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import ROOT

pytestmark = pytest.mark.slow
CONFIG = str(ROOT / "configs" / "tiny.yaml")
RUN_ID = "recover-me"
STEPS, CHECKPOINT, NAN_AT = 6, 2, 3


@pytest.fixture(scope="module")
def harness() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SLA_MLFLOW_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    return tmp_path


def overrides(root: Path, **more: Any) -> dict[str, Any]:
    return {
        "output_dir": str(root / "runs"),
        "cache_dir": str(root / "cache"),
        "registry.model_name": "sla-recovery",
        "tasks.0.max_train_examples": 64,
        "tasks.0.max_eval_examples": 16,
        "tasks.0.eval_noise_levels": [0.0],
        "train.steps": STEPS,
        "train.checkpoint_every": CHECKPOINT,
        "train.log_every": 1,
        **more,
    }


def test_a_failed_run_is_marked_failed_and_a_rerun_resumes_it(harness: Any, env: Path) -> None:
    from mlflow import MlflowClient
    from prefect import get_client

    from flows.pipeline import sla_pipeline
    from sla_core.engine.checkpoint import latest_checkpoint
    from sla_core.engine.result import NonFiniteLossError

    faulty = overrides(env, **{"train.debug_nan_at_step": NAN_AT})
    with pytest.raises(NonFiniteLossError):
        sla_pipeline(CONFIG, search=False, overrides=faulty, run_id=RUN_ID)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`sla.pipeline_run_id` = '{RUN_ID}'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    failed_run = runs[0].info.run_id
    train_dir = env / "runs" / f"pipeline-{RUN_ID}" / "train"
    left = latest_checkpoint(train_dir / "checkpoints")
    assert left is not None and left.step == CHECKPOINT  # the last checkpoint before the NaN
    with get_client(sync_client=True) as prefect:
        states = [r.state.type.value for r in prefect.read_flow_runs() if r.name and r.state]
    assert "FAILED" in states

    result = sla_pipeline(CONFIG, search=False, overrides=overrides(env), run_id=RUN_ID)
    assert result.mlflow_run_id == failed_run and result.pipeline_run_id == RUN_ID
    assert client.get_run(failed_run).info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(failed_run, "train/loss")]
    # Steps 1-2 come from the failed attempt, 3-6 from the resumed one: none was trained twice.
    assert sorted(history) == list(range(1, STEPS + 1)), history
    assert (result.registration.version, result.registration.promoted) == ("1", True)
