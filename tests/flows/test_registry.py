"""The registry step against a real sqlite MLflow store: registration once per pipeline run, the promotion
rule, clean-up of half-created versions, and a clear error when the server is down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import free_port

METRIC = "test_accuracy_mean"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, pyfunc_dir: Path) -> tuple[Any, str, str]:
    """One sqlite store for the module (a new one costs seconds): (client, model source URI, run id)."""
    from flows.registry import registry_client
    from flows.tracking_mlflow import MLflowTracker

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = MLflowTracker.start("registry-test", "run", tracking_uri=uri, artifact_root=root.as_uri())
    tracker.log_artifact(pyfunc_dir, "model")
    return registry_client(uri), tracker.artifact_uri("model"), tracker.run_id


@dataclass
class Registry:
    """A registered model name of its own per test, over the module's store."""

    client: Any
    source: str
    run_id: str
    name: str

    def register(self, pipeline_run_id: str, value: float, tags: dict[str, str] | None = None) -> str:
        from flows.registry import register_adapter_set

        return register_adapter_set(
            self.client,
            self.name,
            self.source,
            pipeline_run_id=pipeline_run_id,
            run_id=self.run_id,
            metrics={METRIC: value},
            tags={"sla.code_version": "test", **(tags or {})},
        )

    def promote(self, version: str, margin: float = 0.0, mode: str = "max") -> Any:
        from flows.registry import promote_if_better

        return promote_if_better(self.client, self.name, version, METRIC, margin, mode=mode)

    def versions(self) -> list[int]:
        return sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{self.name}'"))


@pytest.fixture
def reg(store: tuple[Any, str, str], request: pytest.FixtureRequest) -> Registry:
    return Registry(*store, name=f"sla-{request.node.name.removeprefix('test_')[:40]}")


def test_better_version_moves_the_alias_and_a_worse_one_does_not(reg: Registry):
    steps = [  # (pipeline run, metric, margin, expected champion after)
        ("p1", 0.80, 0.0, "1"),  # no champion yet
        ("p2", 0.85, 0.0, "2"),  # better
        ("p3", 0.84, 0.0, "2"),  # worse
        ("p4", 0.855, 0.01, "2"),  # better, but not by the margin
        ("p5", 0.87, 0.01, "5"),  # better by more than the margin
    ]
    for pipeline_run, value, margin, expected in steps:
        version = reg.register(pipeline_run, value).version
        decision = reg.promote(version, margin)
        assert decision.promoted == (expected == version), decision
        assert str(reg.client.get_model_version_by_alias(reg.name, "champion").version) == expected
    tag = reg.client.get_model_version(reg.name, "3").tags["sla.promotion"]
    assert '"promoted": false' in tag and "0.8400 <= 0.8500" in tag


def test_lower_is_better_mode(reg: Registry):
    v1, v2 = reg.register("m1", 0.50).version, reg.register("m2", 0.40).version
    assert reg.promote(v1, mode="min").promoted
    assert reg.promote(v2, mode="min").promoted


def test_the_same_pipeline_run_registers_once(reg: Registry):
    first, second = reg.register("same-run", 0.8), reg.register("same-run", 0.8)
    assert first.created and not second.created
    assert first.version == second.version
    assert reg.versions() == [1]


def test_a_failed_registration_leaves_no_version(reg: Registry):
    from flows.registry import RegistryError

    reg.register("good", 0.8)
    # MLflow rejects a 300-character tag key: the failure comes after the version was created.
    with pytest.raises(RegistryError, match="half-created version 2 was deleted"):
        reg.register("bad", 0.9, tags={"k" * 300: "x"})
    assert reg.versions() == [1]


def test_an_interrupted_registration_is_replaced_and_never_promoted(reg: Registry):
    from flows.registry import PIPELINE_TAG, RegistryError

    reg.register("other", 0.5)
    # What a crash between creating the version and its final tag leaves behind.
    stale = reg.client.create_model_version(
        reg.name, reg.source, run_id=reg.run_id, tags={PIPELINE_TAG: "crashed"}
    )
    with pytest.raises(RegistryError, match="not a complete registration"):
        reg.promote(str(stale.version))
    again = reg.register("crashed", 0.9)
    assert again.created and again.version != str(stale.version)
    assert reg.versions() == [1, int(again.version)]


def test_a_missing_metric_is_named(reg: Registry):
    from flows.registry import RegistryError, promote_if_better

    version = reg.register("p", 0.8).version
    with pytest.raises(RegistryError, match="no metric 'val_loss'.*test_accuracy_mean"):
        promote_if_better(reg.client, reg.name, version, "val_loss", 0.0)


def test_a_down_server_fails_fast_with_the_fix(monkeypatch: pytest.MonkeyPatch):
    import mlflow

    from flows import registry
    from flows.registry import TrackingServerUnavailable, registry_client

    # "Fast" as behaviour: one bounded /health probe, then the error; no MLflow client (whose calls retry
    # for minutes) is ever made.
    probes, real_probe = [], registry.probe_http

    def probe(url: str, timeout: float) -> str | None:
        probes.append((url, timeout))
        return real_probe(url, timeout)

    monkeypatch.setattr(registry, "probe_http", probe)
    monkeypatch.setattr(mlflow, "MlflowClient", lambda *a, **k: pytest.fail("an MlflowClient was created"))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingServerUnavailable) as err:
        registry_client(uri)
    assert probes == [(f"{uri}/health", 3.0)]
    assert uri in str(err.value) and "infra/scripts/start_mlflow.sh" in str(err.value)


def test_a_run_id_with_a_quote_registers_once(reg: Registry):
    """Issue 15, item 5: the quote used to break MLflow's filter string."""
    first, second = reg.register("it's", 0.8), reg.register("it's", 0.8)
    assert first.created and not second.created and reg.versions() == [1]
