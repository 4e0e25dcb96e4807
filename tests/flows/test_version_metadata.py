"""A registered version carries the promotion metric, a few tags and a description; the run carries the
prepared datasets as inputs with their fingerprints."""

from __future__ import annotations

from pathlib import Path

from sla_core.data import DatasetRef
from tests.flows.conftest import ROOT


def test_a_version_carries_the_promotion_metric_a_few_tags_and_a_description():
    from flows.pipeline import version_metadata
    from sla_core.experiment import load_experiment

    cfg = load_experiment(ROOT / "configs" / "tiny.yaml")
    metrics = {"test_accuracy_mean": 0.75, "val_accuracy": 0.5, "rotten_tomatoes/test_accuracy": 0.75}
    tags = {
        "sla.data_fingerprint": "abc",
        "sla.data_fingerprint.rotten_tomatoes": "abc",
        "sla.code_version": "v1",
        "sla.trainable_percent": "0.1234",
        "sla.search": "false",
    }
    kept, few, description = version_metadata(cfg, metrics, tags, "p1")
    assert kept == {cfg.registry.metric: 0.75}
    assert few == {"sla.data_fingerprint": "abc", "sla.code_version": "v1", "sla.trainable_percent": "0.1234"}
    assert description.startswith(f"{cfg.name}: sla adapters on {cfg.backbone} for ")
    assert "test_accuracy_mean 0.7500; ships 0.1234% of the backbone (pipeline run p1)" in description
    assert version_metadata(cfg, {}, {}, "p2")[0] == {}  # promotion then reads the run's metric


def test_the_prepared_datasets_are_run_inputs_with_their_fingerprints(tmp_path: Path):
    from flows.tracking_mlflow import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker.start("inputs", "run", tracking_uri=uri, artifact_root=tmp_path.as_uri())
    refs = {
        t: DatasetRef(t, str(tmp_path / t), f"{i}" * 64, ["a", "b"], {"train": 8, "test": 2})
        for i, t in enumerate(("sst2", "news"))
    }
    tracker.log_datasets(refs)
    tracker.log_datasets(refs)  # a re-run adds nothing
    inputs = tracker.client.get_run(tracker.run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}) for i in inputs}
    assert got == {
        "sst2": ("0" * 36, {"mlflow.data.context": "train", "sla.fingerprint": "0" * 64}),
        "news": ("1" * 36, {"mlflow.data.context": "train", "sla.fingerprint": "1" * 64}),
    }
    assert '"train": 8' in inputs[0].dataset.profile
