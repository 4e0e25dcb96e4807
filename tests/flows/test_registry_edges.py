"""Registry edge cases on a real sqlite MLflow store: a champion without the metric, a version that already
holds the alias, a non-default alias, lower-is-better rejecting a worse version, and a version that the
registry reports as FAILED_REGISTRATION while registration waits for it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

METRIC = "test_accuracy_mean"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """One sqlite store for the module (a new one costs seconds), with one logged run holding a small
    `model` folder and the metric: (tracking URI, model source, run id)."""
    from flows.tracking_mlflow import MLflowTracker

    root = tmp_path_factory.mktemp("edges")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    folder = root / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    tracker = MLflowTracker.start("edges", "run", tracking_uri=uri, artifact_root=root.as_uri())
    tracker.log_artifact(folder, "model")
    tracker.log_metrics({METRIC: 0.7})
    tracker.end("FINISHED")
    return uri, tracker.artifact_uri("model"), tracker.run_id


@pytest.fixture
def client(store: tuple[str, str, str], request: pytest.FixtureRequest) -> Any:
    """A registry client on the module's store; each test registers its own model name (`client.name`)."""
    from flows.registry import registry_client

    c = registry_client(store[0])
    c.source, c.run_id = store[1], store[2]
    c.name = f"sla-{request.node.name.removeprefix('test_')[:40]}"
    return c


def register(client: Any, key: str, metrics: dict[str, float], run_id: str | None = None) -> str:
    from flows.registry import register_adapter_set

    return register_adapter_set(
        client, client.name, client.source, pipeline_run_id=key, run_id=run_id, metrics=metrics, tags={}
    ).version


def promote(client: Any, version: str, metric: str = METRIC, margin: float = 0.0, **kw: Any) -> Any:
    from flows.registry import promote_if_better

    return promote_if_better(client, client.name, version, metric, margin, **kw)


def holder(client: Any, alias: str = "champion") -> str | None:
    from flows.registry import current_champion

    mv = current_champion(client, client.name, alias)
    return None if mv is None else str(mv.version)


def test_a_champion_without_the_metric_is_replaced_and_the_run_metric_is_a_fallback(client: Any) -> None:
    from flows.registry import set_alias, version_metric

    bare = register(client, "bare", {})  # no metric tag and no run: nothing to compare with
    set_alias(client, client.name, bare)
    candidate = register(client, "candidate", {METRIC: 0.1})
    decision = promote(client, candidate)
    assert decision.promoted and decision.champion_value is None and "has no value" in decision.reason
    assert holder(client) == candidate
    # Without a tag, a version's metric is its run's: 0.7 here, which the next candidate must beat.
    from_run = register(client, "from-run", {}, run_id=client.run_id)
    from_run_version = client.get_model_version(client.name, from_run)
    assert version_metric(client, from_run_version, METRIC) == pytest.approx(0.7)
    assert promote(client, from_run).promoted
    worse = register(client, "worse", {METRIC: 0.69})
    assert not promote(client, worse).promoted and holder(client) == from_run


def test_the_holder_is_not_promoted_again_and_other_aliases_move_alone(client: Any) -> None:
    v1, v2 = register(client, "a", {METRIC: 0.8}), register(client, "b", {METRIC: 0.9})
    assert promote(client, v1).promoted
    again = promote(client, v1)
    assert not again.promoted and again.reason == f"v{v1} already holds the alias"
    staging = promote(client, v2, alias="staging")
    assert staging.promoted and staging.reason == "no current champion"  # "staging" had no holder
    assert (holder(client), holder(client, "staging")) == (v1, v2)  # champion untouched
    worse = register(client, "c", {METRIC: 0.85})
    assert not promote(client, worse, alias="staging").promoted
    assert holder(client, "staging") == v2


def test_min_mode_rejects_a_worse_version_and_respects_the_margin(client: Any) -> None:
    loss = "val_loss"
    v1 = register(client, "m1", {loss: 0.40})
    assert promote(client, v1, loss, mode="min").promoted
    worse = promote(client, register(client, "m2", {loss: 0.45}), loss, mode="min")
    assert not worse.promoted and worse.reason == f"0.4500 >= 0.4000 - 0 (v{v1})"
    small = promote(client, register(client, "m3", {loss: 0.39}), loss, margin=0.05, mode="min")
    assert not small.promoted  # lower, but not by the margin
    assert holder(client) == v1
    better = register(client, "m4", {loss: 0.30})
    assert promote(client, better, loss, margin=0.05, mode="min").promoted
    assert holder(client) == better


class FailedRegistration:
    """The real client, except that the registry reports every version as FAILED_REGISTRATION, as a server
    does when copying the model's files failed."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)  # source, name and every other call: the real client

    def get_model_version(self, name: str, version: str) -> Any:
        mv = self._client.get_model_version(name, version)
        return SimpleNamespace(
            version=mv.version, tags=mv.tags, status="FAILED_REGISTRATION", status_message="copy failed"
        )


def test_failed_registration_while_waiting_is_an_error_and_leaves_no_version(client: Any) -> None:
    from flows.registry import RegistryError, find_registered

    register(client, "first", {METRIC: 0.5})
    with pytest.raises(RegistryError, match=r"version 2 of '.*' is FAILED_REGISTRATION: copy failed"):
        register(FailedRegistration(client), "broken", {METRIC: 0.9})
    assert [str(v.version) for v in client.search_model_versions(f"name = '{client.name}'")] == ["1"]
    assert find_registered(client, client.name, "broken") is None
    assert holder(client) is None  # nothing was promoted
