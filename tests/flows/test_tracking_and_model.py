"""`MLflowTracker` on a real sqlite store, the pyfunc model over a real MiniLM adapter set, the plots."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tests.flows.conftest import TASKS


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


def test_tracker_logs_a_run_with_nested_children(store_uri: str, tmp_path: Path):
    from flows.tracking_mlflow import PARENT_TAG, MLflowTracker
    from sla_core.tracking import Tracker

    tracker = MLflowTracker.start("exp", "parent", {"team": "sla"}, store_uri, (tmp_path / "art").as_uri())
    assert isinstance(tracker, Tracker)
    tracker.log_params({"lr": 0.001, "sla": {"rank": 8, "paths": ["sequential"]}})
    tracker.log_params({"lr": 0.001})  # a re-run logging the same value is fine
    tracker.log_params({"lr": 0.002})  # params are immutable in MLflow: the change is kept as a tag
    tracker.log_metrics({"rotten_tomatoes/test_accuracy_noise0.1": 0.8, "bad": float("nan")}, step=3)
    (tmp_path / "metrics.json").write_text("{}")
    tracker.log_artifact(tmp_path / "metrics.json")
    child = tracker.child("trial-0")
    child.log_metrics({"val_accuracy": 0.7})
    child.end()
    tracker.end()
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params["sla.rank"] == "8" and run.data.params["lr"] == "0.001"
    assert run.data.tags["param_changed.lr"] == "0.002" and run.data.tags["team"] == "sla"
    assert run.data.metrics == {"rotten_tomatoes/test_accuracy_noise0.1": 0.8}
    assert run.info.status == "FINISHED"
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id)] == ["metrics.json"]
    assert run.info.artifact_uri.startswith((tmp_path / "art").as_uri())
    child_run = tracker.client.get_run(child.run_id)
    assert child_run.data.tags[PARENT_TAG] == tracker.run_id
    assert tracker.seconds > 0 and tracker.seconds >= child.seconds
    # It crosses process boundaries as (URI, run id) and reconnects.
    clone = pickle.loads(pickle.dumps(tracker))
    assert clone.run_id == tracker.run_id and clone.client.get_run(clone.run_id).info.run_id == tracker.run_id


def test_pyfunc_model_predicts_labels_like_the_adapters(pyfunc_dir: Path, adapter_set_model):
    import mlflow
    import pandas as pd
    import torch

    from sla_core.backbones import load_tokenizer

    assert not list(pyfunc_dir.rglob("*.pkl")), "the model folder must hold no pickles"
    assert (pyfunc_dir / "artifacts" / "adapters" / "sla_adapter_model.safetensors").is_file()
    model = mlflow.pyfunc.load_model(str(pyfunc_dir))
    texts = ["a gripping, beautiful film", "stocks fell sharply on monday", "the striker scored twice"]
    frame = pd.DataFrame({"text": texts, "task": ["sentiment", "topic", "topic"]})
    labels = model.predict(frame)
    direct = adapter_set_model  # the set before saving: its random up-projections decide the labels
    tok = load_tokenizer("minilm")
    expected = []
    for text, task in zip(texts, frame["task"], strict=True):
        enc = tok([text], return_tensors="pt", truncation=True, max_length=32)
        with torch.no_grad():
            logits = direct(enc["input_ids"], attention_mask=enc["attention_mask"], task=task).logits
        expected.append(TASKS[task]["labels"][int(logits[0, : len(TASKS[task]["labels"])].argmax())])
    assert labels == expected
    assert model.predict(texts[1:], params={"task": "topic"}) == expected[1:]
    with pytest.raises(ValueError, match="several.*add a `task` column"):
        model.predict(texts)
    with pytest.raises(ValueError, match="unknown task"):
        model.predict(pd.DataFrame({"text": ["x"], "task": ["nope"]}))


def test_plots_write_pngs(tmp_path: Path):
    from flows.plots import gate_grid, plot_gate_heatmap, plot_noise_curve

    gates = {
        "a": {"layer0.attn.seq": 0.9, "layer0.ffn.par": 0.1, "layer1.attn.seq": 0.5},
        "b": {"layer0.attn.seq": 0.2, "layer1.ffn.par": 1.0},
    }
    layers, columns, grid = gate_grid(gates["a"])
    assert layers == [0, 1] and columns == ["attn.seq", "ffn.par"]
    assert grid[0] == [0.9, 0.1] and grid[1][0] == 0.5 and grid[1][1] != grid[1][1]  # nan where missing
    heat = plot_gate_heatmap(gates, tmp_path / "gates.png")
    curve = plot_noise_curve({"a": {0.0: 0.9, 0.1: 0.8}, "b": {0.0: 0.7, 0.1: 0.6}}, tmp_path / "noise.png")
    for png in (heat, curve):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
