"""`MLflowTracker`: the `sla_core.tracking.Tracker` protocol over one MLflow run, through `MlflowClient`.

It never touches MLflow's global "active run" state, so Prefect task threads and Ray Tune callbacks can log
to the same run. It pickles as (tracking URI, run id) and reconnects lazily, so it can cross process
boundaries. `child(name)` opens a nested run (one per search trial).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows import settings

PARENT_TAG = "mlflow.parentRunId"
_BAD_KEY = re.compile(r"[^/\w.\- :]")
_MAX_VALUE = 6000  # MLflow's param value limit
_BATCH = 100  # MLflow's params/tags per batch limit
_DIGEST = 36  # MLflow's dataset digest column


def metric_key(name: str) -> str:
    """A name MLflow accepts: keeps letters, digits, `_ - . / : space`; anything else becomes `_`."""
    return _BAD_KEY.sub("_", str(name))[:250] or "_"


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; values become strings cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[metric_key(name)] = text[:_MAX_VALUE]
    return out


class MLflowTracker:
    """Logs params, metrics, artifacts and tags to one MLflow run."""

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri or settings.current().tracking_uri
        self._client: Any = None
        self._parent: MLflowTracker | None = None
        self.seconds = 0.0  # time spent in MLflow calls (children add theirs), for the overhead report

    # ------------------------------------------------------------------ set-up
    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        tracking_uri: str | None = None,
        artifact_root: str | None = None,
    ) -> MLflowTracker:
        """Create a run in `experiment` (created if missing, with artifacts under `artifact_root`)."""
        from mlflow import MlflowClient

        s = settings.current()
        uri = tracking_uri or s.tracking_uri
        settings.ensure_store_dir(uri)
        client = MlflowClient(uri, uri)
        exp_id = ensure_experiment(client, experiment, artifact_root, embedded=not uri.startswith("http"))
        run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
        tracker = cls(run.info.run_id, uri)
        tracker._client = client
        return tracker

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri, self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "_client": None,
            "_parent": None,
            "seconds": 0.0,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed, node = time.perf_counter() - t0, self
            while node is not None:
                node.seconds += elapsed
                node = node._parent

    # ------------------------------------------------------------ the protocol
    def log_params(self, params: dict[str, Any]) -> None:
        """Log (flattened) params; a param already logged with the same value is fine (re-runs)."""
        from mlflow.entities import Param

        flat = flatten(params)
        logged = self._timed(self.client.get_run, self.run_id).data.params
        fresh = {k: v for k, v in flat.items() if k not in logged}
        changed = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
        if changed:
            # MLflow params are immutable: record the new values as tags rather than failing a re-run.
            self.set_tags({f"param_changed.{k}": v for k, (_, v) in changed.items()})
        items = [Param(k, v) for k, v in fresh.items()]
        for i in range(0, len(items), _BATCH):
            self._timed(self.client.log_batch, self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics at `step` (non-finite values are skipped, not errors)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(metric_key(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self._timed(self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under `artifact_path`."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"artifact {p} does not exist")
        if p.is_dir():
            self._timed(self.client.log_artifacts, self.run_id, str(p), artifact_path)
        else:
            self._timed(self.client.log_artifact, self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(metric_key(k), str(v)[:_MAX_VALUE]) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self._timed(self.client.log_batch, self.run_id, tags=items[i : i + _BATCH])

    # --------------------------------------------------------------- extras
    def log_datasets(self, refs: Mapping[str, Any], context: str = "train") -> None:
        """Each prepared dataset (`DatasetRef`) as a run input, shown under the run's Datasets: named by its
        task, its digest the start of its fingerprint (MLflow keeps 36 characters), its profile the rows per
        split, and the whole fingerprint as the input tag `sla.fingerprint`. A re-run adds nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=task,
                    digest=ref.fingerprint[:_DIGEST],
                    source_type="local",
                    source=json.dumps({"uri": str(ref.path)}),
                    profile=json.dumps({"rows": ref.counts}),
                ),
                [InputTag("mlflow.data.context", context), InputTag("sla.fingerprint", ref.fingerprint)],
            )
            for task, ref in refs.items()
        ]
        if inputs:
            self._timed(self.client.log_inputs, self.run_id, datasets=inputs)

    def child(self, name: str) -> MLflowTracker:
        """A nested run under this one (e.g. one search trial)."""
        parent = self._timed(self.client.get_run, self.run_id)
        run = self._timed(
            self.client.create_run, parent.info.experiment_id, run_name=name, tags={PARENT_TAG: self.run_id}
        )
        child = MLflowTracker(run.info.run_id, self.tracking_uri)
        child._client, child._parent = self._client, self
        return child

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self._timed(self.client.set_terminated, self.run_id, status)

    def artifact_uri(self, artifact_path: str = "") -> str:
        base = self._timed(self.client.get_run, self.run_id).info.artifact_uri
        return f"{base}/{artifact_path}" if artifact_path else base

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")


def ensure_experiment(client: Any, name: str, artifact_root: str | None, embedded: bool) -> str:
    """The id of experiment `name`, created if missing. On the embedded store its artifacts go under
    `artifact_root` (default: the settings' `data/mlflow/artifacts`), not MLflow's `./mlruns`."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if embedded:
        root = artifact_root or settings.current().artifact_root
        location = f"{root.rstrip('/')}/{metric_key(name).replace(' ', '_')}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(client: Any, experiment: str, tag: str, value: str) -> str | None:
    """The id of the newest run in `experiment` with tag `tag` == `value`, else None."""
    from flows.registry import filter_literal

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{tag}` = {filter_literal(value, tag)}",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None
