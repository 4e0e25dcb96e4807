"""The MLflow model registry step: idempotent registration and the champion promotion rule.

The only module with registry logic. A version is *complete* once it carries `sla.registration=complete`
(set last); versions without it are leftovers of an interrupted registration, are never promoted, and are
deleted by the next registration of the same pipeline run. Registration is keyed by the pipeline run id
(tag `sla.pipeline_run_id`), so re-running a pipeline run never registers a second version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from flows.settings import START_MLFLOW, probe_http

PIPELINE_TAG = "sla.pipeline_run_id"
STATE_TAG = "sla.registration"
COMPLETE = "complete"
METRIC_PREFIX = "metric."
DECISION_TAG = "sla.promotion"


class RegistryError(RuntimeError):
    """Registration or promotion failed; the message says what and where."""


class TrackingServerUnavailable(RegistryError):
    """The MLflow tracking server does not answer."""


def check_tracking_server(uri: str, timeout: float = 3.0) -> None:
    """Fail fast, with the fix, when an http(s) tracking URI does not answer `/health` within `timeout`.

    Local stores (sqlite, file) need no server and pass.
    """
    if not uri.startswith(("http://", "https://")):
        return
    reason = probe_http(uri.rstrip("/") + "/health", timeout)
    if reason is not None:
        raise TrackingServerUnavailable(
            f"MLflow tracking server at {uri} is not reachable ({reason}). Start it with `{START_MLFLOW}` "
            "(binds 127.0.0.1:5000), or unset MLFLOW_TRACKING_URI to use the embedded sqlite store "
            "under data/mlflow. Nothing was registered or changed."
        )


def registry_client(uri: str, timeout: float = 3.0) -> Any:
    """An `MlflowClient` for tracking + registry at `uri`, after checking the server answers."""
    from mlflow import MlflowClient

    check_tracking_server(uri, timeout)
    return MlflowClient(uri, uri)


@dataclass(frozen=True)
class RegisteredVersion:
    """The outcome of `register_adapter_set`: `created` is False when the run was registered before."""

    name: str
    version: str
    pipeline_run_id: str
    run_id: str | None
    source: str
    created: bool


@dataclass(frozen=True)
class PromotionDecision:
    """Why the alias moved or stayed. `champion_*` describe the alias holder before the decision."""

    name: str
    alias: str
    metric: str
    margin: float
    mode: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filter_literal(value: str, what: str) -> str:
    """`value` as a string literal of an MLflow filter: in the quote kind it does not contain.

    MLflow's filter parser has no escape inside a literal (neither '' nor \\'), so a value holding both
    kinds of quote cannot be searched for.
    Raises:
        RegistryError: naming `what` when `value` holds both ' and ".
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"{what} {value!r} holds both ' and \"; MLflow cannot search for it: choose another")


def _versions_of_run(client: Any, name: str, pipeline_run_id: str) -> list[Any]:
    query = (
        f"name = {filter_literal(name, 'model name')} "
        f"and tags.`{PIPELINE_TAG}` = {filter_literal(pipeline_run_id, 'run id')}"
    )
    try:
        found = client.search_model_versions(query)
    except Exception as err:
        if _is_missing(err):
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def find_registered(client: Any, name: str, pipeline_run_id: str) -> Any | None:
    """The complete version registered for `pipeline_run_id`, else None."""
    done = [
        mv for mv in _versions_of_run(client, name, pipeline_run_id) if mv.tags.get(STATE_TAG) == COMPLETE
    ]
    return done[0] if done else None


def register_adapter_set(
    client: Any,
    name: str,
    source: str,
    *,
    pipeline_run_id: str,
    run_id: str | None,
    metrics: dict[str, float],
    tags: dict[str, str],
    description: str | None = None,
) -> RegisteredVersion:
    """Register the pyfunc model at `source` as a version of `name`, once per `pipeline_run_id`.

    `source` is a logged model's `models:/<model_id>` URI (`flows.pyfunc_model.log_pyfunc_model`; the
    version points at that model's artifacts) or an artifact folder URI.
    `metrics` become `metric.<key>` tags: pass the few the promotion rule reads (the others belong to the run,
    which `version_metric` falls back to); `tags` should carry the data fingerprint, code version and
    trainable %. On any failure the half-created version is deleted.

    Raises:
        RegistryError: naming the model, the pipeline run and the cause.
    """
    existing = find_registered(client, name, pipeline_run_id)
    if existing is not None:
        return RegisteredVersion(
            name, str(existing.version), pipeline_run_id, existing.run_id, existing.source, False
        )
    for stale in _versions_of_run(client, name, pipeline_run_id):  # left by an interrupted registration
        client.delete_model_version(name, stale.version)
    _ensure_registered_model(client, name)
    version = None
    try:
        mv = client.create_model_version(
            name,
            _logged_model_source(client, source),
            run_id=run_id,
            tags={PIPELINE_TAG: pipeline_run_id},
            description=description,
        )
        version = str(mv.version)
        _wait_ready(client, name, version)
        all_tags = {**tags, **{f"{METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}}
        for key, value in all_tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        client.set_model_version_tag(name, version, STATE_TAG, COMPLETE)
    except Exception as err:
        cleanup = _delete_quietly(client, name, version)
        raise RegistryError(
            f"registering {name!r} for pipeline run {pipeline_run_id} failed: {err}. {cleanup}"
        ) from err
    return RegisteredVersion(name, version, pipeline_run_id, run_id, source, True)


def _logged_model_source(client: Any, source: str) -> str:
    """The artifact location of a `models:/<model_id>` logged model; other sources unchanged.

    Given the URI (or a `model_id`), MLflow's registry store looks the model up through the process-wide
    tracking URI, not `client`'s (and its sqlite registry does not keep the model id anyway).
    """
    model_id = source.removeprefix("models:/")
    if not source.startswith("models:/m-") or "/" in model_id:
        return source
    return str(client.get_logged_model(model_id).artifact_location)


def _ensure_registered_model(client: Any, name: str) -> None:
    try:
        client.get_registered_model(name)
    except Exception as err:
        if not _is_missing(err):
            raise RegistryError(f"cannot read registered model {name!r}: {err}") from err
        try:
            client.create_registered_model(name, description="Pruned SLA adapter sets (sla_pipeline).")
        except Exception as create_err:
            if "ALREADY_EXISTS" not in str(create_err):
                raise


def _is_missing(err: Exception) -> bool:
    code = str(getattr(err, "error_code", ""))
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(err).lower()


def _wait_ready(client: Any, name: str, version: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(f"version {version} of {name!r} is {mv.status}: {mv.status_message}")
        time.sleep(0.5)


def _delete_quietly(client: Any, name: str, version: str | None) -> str:
    if version is None:
        return "No version was created."
    try:
        client.delete_model_version(name, version)
        return f"The half-created version {version} was deleted."
    except Exception as err:  # the server may be gone; the next registration removes it
        return (
            f"Version {version} could not be deleted ({err}); it lacks the {STATE_TAG}={COMPLETE} tag, "
            "is never promoted, and the next registration of this pipeline run deletes it."
        )


def version_metric(client: Any, mv: Any, metric: str) -> float | None:
    """A version's `metric`: its `metric.<name>` tag, else its run's metric, else None."""
    tag = mv.tags.get(METRIC_PREFIX + metric)
    if tag is not None:
        return float(tag)
    if mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
        except Exception:
            return None
        return None if value is None else float(value)
    return None


def current_champion(client: Any, name: str, alias: str) -> Any | None:
    """The version holding `alias`, else None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as err:
        if _is_missing(err):
            return None
        raise


def promote_if_better(
    client: Any,
    name: str,
    version: str,
    metric: str,
    margin: float,
    alias: str = "champion",
    mode: Literal["max", "min"] = "max",
) -> PromotionDecision:
    """Move `alias` to `version` only if it beats the current holder on `metric` by more than `margin`.

    With `mode="max"` the candidate must exceed champion + margin; with "min", be below champion - margin.
    No holder: the candidate is promoted. The decision is stored as a JSON tag on the candidate version.

    Raises:
        RegistryError: the candidate is incomplete or lacks the metric.
    """
    mv = client.get_model_version(name, version)
    if mv.tags.get(STATE_TAG) != COMPLETE:
        raise RegistryError(f"{name} v{version} is not a complete registration; it cannot be promoted")
    value = version_metric(client, mv, metric)
    if value is None:
        have = sorted(k.removeprefix(METRIC_PREFIX) for k in mv.tags if k.startswith(METRIC_PREFIX))
        raise RegistryError(
            f"{name} v{version} has no metric {metric!r} (it has {have}); check registry.metric"
        )
    champ = current_champion(client, name, alias)
    champ_value = None if champ is None else version_metric(client, champ, metric)
    decision = _decide(value, champ, champ_value, version, margin, mode)
    promoted, reason = decision
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    result = PromotionDecision(
        name,
        alias,
        metric,
        margin,
        mode,
        str(version),
        value,
        None if champ is None else str(champ.version),
        champ_value,
        promoted,
        reason,
    )
    client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(result.to_dict()))
    return result


def _decide(
    value: float, champ: Any, champ_value: float | None, version: str, margin: float, mode: str
) -> tuple[bool, str]:
    if champ is None:
        return True, "no current champion"
    if str(champ.version) == str(version):
        return False, f"v{version} already holds the alias"
    if champ_value is None:
        return True, f"the champion v{champ.version} has no value for the metric"
    better = value > champ_value + margin if mode == "max" else value < champ_value - margin
    sign = "+" if mode == "max" else "-"
    op = (">" if better else "<=") if mode == "max" else ("<" if better else ">=")
    return better, f"{value:.4f} {op} {champ_value:.4f} {sign} {margin:g} (v{champ.version})"


def set_alias(client: Any, name: str, version: str, alias: str = "champion") -> None:
    """Move `alias` to `version` unconditionally (`sla promote --force`); the version must be complete."""
    mv = client.get_model_version(name, version)
    if mv.tags.get(STATE_TAG) != COMPLETE:
        raise RegistryError(f"{name} v{version} is not a complete registration; refusing to alias it")
    client.set_registered_model_alias(name, alias, version)
