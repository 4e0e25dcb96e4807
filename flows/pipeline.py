"""`sla_pipeline`: prepare -> search (optional) -> train -> prune -> evaluate -> log -> register, in Prefect.

Typed references cross each task boundary (`PreparedData` of `DatasetRef`s, `SearchOutcome`, `TrainedRun`
holding the checkpoint, `PrunedAdapterSet`, `EvaluationReport`, `Registration`), never tensors. Every task
has a timeout; the tasks that talk to the MLflow server retry. Stages cache on disk: data by fingerprint,
the search and the training under `<run_dir>/pipeline-<id>/`, where a re-run of the same pipeline run
(same config, data, code and search settings; or the same `run_id`) picks up what is done, resumes training
from its last checkpoint, and finds its registered version instead of registering a second one.
"""

from __future__ import annotations

from flows import settings as _settings

_settings.apply_embedded_defaults()  # before Prefect is imported: it reads its settings once

import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.stages import (  # noqa: E402
    Figures,
    PreparedData,
    Registration,
    SearchOutcome,
    TrainedRun,
    draw_figures,
    prepare_all,
    prune_trained,
    run_or_reuse_search,
    train_or_reuse,
)
from flows.tracking_mlflow import MLflowTracker  # noqa: E402
from sla_core.engine.result import EvaluationReport, PrunedAdapterSet, TrainResult  # noqa: E402
from sla_core.experiment import ExperimentConfig, load_experiment, with_overrides  # noqa: E402

PIPELINE_TAG = "sla.pipeline_run_id"
SERVER_RETRIES = 2
HOUR = 3600


# ----------------------------------------------------------------------------------------------- tasks
@task(name="prepare-data", timeout_seconds=2 * HOUR, cache_policy=NO_CACHE)
def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Validate, split, add noise, tokenize and cache every task, plus its noisy evaluation copies."""
    return prepare_all(cfg)


@task(name="search", timeout_seconds=6 * HOUR, cache_policy=NO_CACHE)
def search_configs(
    cfg: ExperimentConfig, data: PreparedData, out_dir: str, num_samples: int, tracker: MLflowTracker
) -> SearchOutcome:
    """A small Ray Tune search; its best overrides configure the final training."""
    return run_or_reuse_search(cfg, data, Path(out_dir), num_samples, tracker)


@task(name="train", timeout_seconds=12 * HOUR, cache_policy=NO_CACHE)
def train_adapters(
    cfg: ExperimentConfig, data: PreparedData, run_dir: str, tracker: MLflowTracker
) -> TrainedRun:
    """Train through the DeepSpeed engine (resuming from the last checkpoint of this pipeline run)."""
    return train_or_reuse(cfg, data, Path(run_dir), tracker)


@task(name="prune", timeout_seconds=HOUR, cache_policy=NO_CACHE)
def prune_adapters(trained: TrainedRun, out_dir: str) -> PrunedAdapterSet:
    """Decide the gates of the trained set, drop closed adapters, fold open gates; write the shipped set."""
    return prune_trained(trained, Path(out_dir))


@task(name="evaluate", timeout_seconds=2 * HOUR, cache_policy=NO_CACHE)
def evaluate_adapters(
    cfg: ExperimentConfig, data: PreparedData, trained: TrainedRun, pruned: PrunedAdapterSet, out_dir: str
) -> EvaluationReport:
    """Clean and noisy accuracy per task of the pruned set, beside the unpruned set's (pruning is exact)."""
    from flows.stages import AdaptiveThreads
    from sla_core.engine.stages import evaluate

    AdaptiveThreads()(0)  # the load now, not the one training started under
    return evaluate(
        cfg, data.refs, pruned.path, out_dir, before=trained.result.trained, step=trained.result.steps
    )


@task(name="figures", timeout_seconds=600, cache_policy=NO_CACHE)
def draw_run_figures(pruned: PrunedAdapterSet, evaluation: EvaluationReport, out_dir: str) -> Figures:
    """The gate heatmap and the noise curve."""
    return draw_figures(pruned, evaluation, Path(out_dir))


@task(
    name="open-mlflow-run",
    retries=SERVER_RETRIES,
    retry_delay_seconds=5,
    timeout_seconds=300,
    cache_policy=NO_CACHE,
)
def open_mlflow_run(experiment: str, pipeline_run_id: str, tags: dict[str, str]) -> MLflowTracker:
    """This pipeline run's MLflow run: found by its id tag on a re-run, else created."""
    from flows.registry import check_tracking_server
    from flows.tracking_mlflow import find_run

    s = _settings.current()
    check_tracking_server(s.tracking_uri)
    tracker = MLflowTracker(run_id="", tracking_uri=s.tracking_uri)
    existing = find_run(tracker.client, experiment, PIPELINE_TAG, pipeline_run_id)
    if existing is not None:
        tracker.run_id = existing
        tracker.client.update_run(existing, status="RUNNING")
        return tracker
    return MLflowTracker.start(
        experiment,
        f"pipeline-{pipeline_run_id}",
        {PIPELINE_TAG: pipeline_run_id, **tags},
        s.tracking_uri,
        s.artifact_root,
    )


@task(
    name="log-to-mlflow",
    retries=SERVER_RETRIES,
    retry_delay_seconds=5,
    timeout_seconds=HOUR,
    cache_policy=NO_CACHE,
)
def log_to_mlflow(
    tracker: MLflowTracker,
    cfg: ExperimentConfig,
    run_dir: str,
    params: dict[str, Any],
    tags: dict[str, str],
    trained: TrainedRun,
    pruned: PrunedAdapterSet,
    evaluation: EvaluationReport,
    figures: Figures,
    data: PreparedData,
) -> str:
    """Params, metrics, config, `metrics.json`, adapters, figures, and the pyfunc model as the run's logged
    model (`mlflow.pyfunc.log_model`); returns its `models:/<model_id>` URI."""
    from flows.pyfunc_model import log_pyfunc_model
    from flows.registry import check_tracking_server

    check_tracking_server(tracker.tracking_uri)  # a down server: a clear error now, not MLflow's long retries
    root = Path(run_dir)
    config_file = root / "experiment.yaml"
    config_file.write_text(_yaml(cfg), encoding="utf-8")
    tracker.log_params(params)
    tracker.set_tags(tags)
    tracker.log_metrics(evaluation.summary, step=trained.result.steps)
    tracker.log_datasets(data.refs)
    tracker.log_artifact(config_file, "config")
    tracker.log_artifact(evaluation.metrics_path)
    tracker.log_artifact(pruned.path, "adapters")
    for figure in (figures.gate_heatmap, figures.noise_curve):
        if figure:
            tracker.log_artifact(figure, "figures")
    tasks = {n: {"labels": list(r.labels), "max_length": r.max_length} for n, r in data.refs.items()}
    return log_pyfunc_model(
        tracker,
        Path(pruned.path),
        pruned.backbone,
        tasks,
        tags["sla.code_version"],
        metrics=evaluation.summary,
        step=trained.result.steps,
    )


@task(
    name="register", retries=SERVER_RETRIES, retry_delay_seconds=5, timeout_seconds=900, cache_policy=NO_CACHE
)
def register_model(
    cfg: ExperimentConfig,
    source: str,
    pipeline_run_id: str,
    mlflow_run_id: str,
    metrics: dict[str, float],
    tags: dict[str, str],
) -> Registration:
    """Register the model version once per pipeline run, then move the alias only if it is better."""
    from flows.registry import promote_if_better, register_adapter_set, registry_client

    reg = cfg.registry
    client = registry_client(_settings.current().tracking_uri)
    kept, few, description = version_metadata(cfg, metrics, tags, pipeline_run_id)
    version = register_adapter_set(
        client,
        reg.model_name,
        source,
        pipeline_run_id=pipeline_run_id,
        run_id=mlflow_run_id,
        metrics=kept,
        tags=few,
        description=description,
    )
    decision = promote_if_better(
        client, reg.model_name, version.version, reg.metric, reg.margin, reg.alias, reg.mode
    )
    champion = version.version if decision.promoted else decision.champion_version
    return Registration(
        reg.model_name,
        version.version,
        version.created,
        decision.promoted,
        champion,
        reg.alias,
        decision.to_dict(),
        f"models:/{reg.model_name}@{reg.alias}",
    )


VERSION_TAGS = (
    "sla.data_fingerprint",
    "sla.code_version",
    "sla.trainable_percent",
    "sla.backbone",
    "sla.config",
)


def version_metadata(
    cfg: ExperimentConfig, metrics: dict[str, float], tags: dict[str, str], pipeline_run_id: str
) -> tuple[dict[str, float], dict[str, str], str]:
    """What a registered version carries: the promotion metric alone (the others belong to the run), a few
    tags (`VERSION_TAGS`) and a one-line description. Returns (metrics, tags, description)."""
    name = cfg.registry.metric
    kept = {name: float(metrics[name])} if name in metrics else {}
    value = f"{name} {kept[name]:.4f}" if kept else f"no {name}"
    percent = tags.get("sla.trainable_percent")
    share = f"; ships {percent}% of the backbone" if percent else ""
    description = (
        f"{cfg.name}: {cfg.method} adapters on {cfg.backbone} for {', '.join(t.name for t in cfg.tasks)}; "
        f"{value}{share} (pipeline run {pipeline_run_id})"
    )
    return kept, {k: tags[k] for k in VERSION_TAGS if k in tags}, description


# ------------------------------------------------------------------------------------------------ flow
@dataclass
class PipelineResult:
    """What `sla_pipeline` returns (and writes to `<run_dir>/pipeline.json`)."""

    pipeline_run_id: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    accuracy: dict[str, dict[str, float]]
    trainable_percent_before: float
    trainable_percent_after: float
    registration: Registration
    search: SearchOutcome | None
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)
    # The evaluation's summary: per task `<task>/test_accuracy`, `_before` (unpruned), `_macro_f1`, ...
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@flow(name="sla-pipeline", log_prints=True)
def sla_pipeline(
    config_path: str = "configs/pipeline.yaml",
    search: bool = True,
    num_samples: int | None = None,
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> PipelineResult:
    """The whole job on one experiment config; see the module docstring.

    Args:
        search: run the Ray Tune search first (its best overrides configure the final training).
        num_samples: search trials (default: the config's `tune.num_samples`).
        overrides: dotted config keys, e.g. {"train.steps": 100}.
        run_id: names this pipeline run; default: a hash of config, data, code and search settings.
    """
    from flows.registry import check_tracking_server

    started_at, t_flow = time.time(), time.perf_counter()
    log = get_run_logger()
    cfg = load_experiment(config_path, overrides)
    check_tracking_server(_settings.current().tracking_uri)  # fail before any work when it is down
    clock = _Clock(total=9 if search else 8, say=log.info)
    data = clock.run("prepare", prepare_data, cfg)
    samples = num_samples or cfg.tune.num_samples
    code = _settings.code_version()
    key = run_id or pipeline_key(cfg, data, search, samples, code)
    root = (cfg.run_dir / f"pipeline-{key}").resolve()
    root.mkdir(parents=True, exist_ok=True)
    log.info("pipeline run %s in %s", key, root)
    tags = _tags(cfg, data, code, key, search)
    tracker = clock.run("open-run", open_mlflow_run, cfg.registry.experiment or cfg.name, key, tags)
    try:
        outcome = None
        if search:
            outcome = clock.run(
                "search", search_configs, cfg, data, str(root / "search"), samples, tracker, tracker=tracker
            )
            cfg = with_overrides(cfg, outcome.overrides, origin="search")  # the best trial's overrides
        trained = clock.run("train", train_adapters, cfg, data, str(root / "train"), tracker, tracker=tracker)
        pruned = clock.run("prune", prune_adapters, trained, str(root / "adapters"))
        evaluation = clock.run("evaluate", evaluate_adapters, cfg, data, trained, pruned, str(root / "eval"))
        figures = clock.run("figures", draw_run_figures, pruned, evaluation, str(root / "figures"))
        tags = {**tags, "sla.trainable_percent": f"{pruned.trainable_percent_after:.4f}"}
        params = _params(cfg, search, samples, outcome)
        source = clock.run(
            "log",
            log_to_mlflow,
            tracker,
            cfg,
            str(root),
            params,
            tags,
            trained,
            pruned,
            evaluation,
            figures,
            data,
        )
        registration = clock.run(
            "register", register_model, cfg, source, key, tracker.run_id, evaluation.summary, tags
        )
    except BaseException:
        _end_quietly(tracker, "FAILED")
        raise
    result = PipelineResult(
        key,
        str(root),
        tracker.run_id,
        tracker.tracking_uri,
        evaluation.accuracy,
        pruned.trainable_percent_before,
        pruned.trainable_percent_after,
        registration,
        outcome,
    )
    result.stages, result.overhead = clock.report(time.perf_counter() - t_flow, started_at)
    result.metrics = dict(evaluation.summary)
    _finish(result, root, tracker)
    return result


def _finish(result: PipelineResult, root: Path, tracker: MLflowTracker) -> None:
    """Write `pipeline.json`, log it and the timings, and close the MLflow run."""
    (root / "pipeline.json").write_text(json.dumps(result.to_dict(), indent=2, default=str), encoding="utf-8")
    tracker.log_metrics({f"pipeline/{k}": v for k, v in result.overhead.items()})
    tracker.log_artifact(root / "pipeline.json")
    tracker.end("FINISHED")


# ---------------------------------------------------------------------------------------------- helpers
class _Clock:
    """Per stage: wall seconds seen from the flow, seconds of work inside, seconds spent in MLflow calls."""

    MLFLOW_STAGES = ("open-run", "log", "register")

    def __init__(self, total: int = 0, say: Any = None) -> None:
        self.wall: dict[str, float] = {}
        self.work: dict[str, float] = {}
        self.mlflow: dict[str, float] = {}
        self.ray = 0.0
        self.total = total
        self.say = say or (lambda *a: None)

    def run(self, name: str, fn: Any, *args: Any, tracker: MLflowTracker | None = None) -> Any:
        logged_before = tracker.seconds if tracker is not None else 0.0
        k = len(self.wall) + 1
        self.say("stage %d/%d: %s", k, max(self.total, k), name)
        t0 = time.perf_counter()
        value = fn(*args)
        wall = time.perf_counter() - t0
        self.say("stage %d/%d: %s done in %.1f s", k, max(self.total, k), name, wall)
        logged = (tracker.seconds - logged_before) if tracker is not None else 0.0
        inner = getattr(value, "seconds", None)  # compute artefacts time their own work
        ray = getattr(value, "ray_overhead_seconds", 0.0)
        self.ray += ray
        self.wall[name] = wall
        self.mlflow[name] = wall if name in self.MLFLOW_STAGES else logged
        self.work[name] = 0.0 if name in self.MLFLOW_STAGES else max((inner or wall) - logged - ray, 0.0)
        return value

    def report(
        self, flow_seconds: float, started_at: float
    ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Per-stage seconds and the pipeline's own overhead: Prefect (flow and task engine), MLflow, Ray."""
        stages = {
            n: {"wall_s": round(w, 3), "work_s": round(self.work[n], 3), "mlflow_s": round(self.mlflow[n], 3)}
            for n, w in self.wall.items()
        }
        work, mlflow_s = sum(self.work.values()), sum(self.mlflow.values())
        prefect_s = max(flow_seconds - work - mlflow_s - self.ray, 0.0)
        overhead = {
            "flow_started_at": started_at,
            "flow_seconds": round(flow_seconds, 3),
            "work_seconds": round(work, 3),
            "prefect_seconds": round(prefect_s, 3),
            "mlflow_seconds": round(mlflow_s, 3),
            "ray_seconds": round(self.ray, 3),
        }
        return stages, overhead


def pipeline_key(cfg: ExperimentConfig, data: PreparedData, search: bool, num_samples: int, code: str) -> str:
    """The default pipeline run id: a hash of the config, the data fingerprints, the search and the code."""
    payload = {
        "config": cfg.model_dump(mode="json", exclude={"output_dir", "cache_dir"}),
        "data": {t: r.fingerprint for t, r in data.refs.items()},
        "search": search,
        "num_samples": num_samples if search else 0,
        "code": code,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tags(cfg: ExperimentConfig, data: PreparedData, code: str, key: str, search: bool) -> dict[str, str]:
    tags = {f"sla.data_fingerprint.{t}": r.fingerprint for t, r in data.refs.items()}
    combined = hashlib.sha256("".join(sorted(tags.values())).encode()).hexdigest()
    return {
        **tags,
        "sla.data_fingerprint": combined,
        "sla.code_version": code,
        PIPELINE_TAG: key,
        "sla.config": cfg.name,
        "sla.backbone": cfg.backbone,
        "sla.search": str(search).lower(),
    }


def _params(
    cfg: ExperimentConfig, search: bool, num_samples: int, outcome: SearchOutcome | None
) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    params: dict[str, Any] = {"backbone": cfg.backbone, "tasks": ",".join(t.name for t in cfg.tasks)}
    params.update({f"sla.{k}": v for k, v in {**dumped["sla"], **cfg.resolved_sla()}.items()})
    params.update({f"train.{k}": v for k, v in dumped["train"].items()})
    params.update({"search.enabled": search, "search.num_samples": num_samples if search else 0})
    if outcome is not None:
        params.update({f"search.best.{k}": v for k, v in outcome.overrides.items()})
    return params


def _yaml(cfg: ExperimentConfig) -> str:
    import yaml

    data = {**cfg.model_dump(mode="json", exclude_none=True), "sla": cfg.resolved_sla()}
    return yaml.safe_dump(data, sort_keys=False)


def _end_quietly(tracker: MLflowTracker, status: str) -> None:
    from flows.registry import check_tracking_server

    try:
        check_tracking_server(tracker.tracking_uri)  # else MLflow's own retries wait minutes on a down server
        tracker.end(status)
    except Exception:  # the server may be what failed; the run stays RUNNING and a re-run reuses it
        pass


def register_run(
    config_path: str | Path,
    run_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Registration:
    """Log and register a finished training run (e.g. of `sla train`) with the same tasks as the pipeline's
    last stages, without a flow. `run_id` defaults to one derived from the adapter set's digest."""
    cfg = load_experiment(config_path, overrides)
    trained = TrainedRun(TrainResult.read(run_dir), 0.0, True)
    data = prepare_all(cfg)  # a cache hit when the run's data was prepared here
    pruned = prune_trained(trained, Path(run_dir) / "adapters")
    evaluation = _evaluation_of(cfg, data, trained, pruned, Path(run_dir))
    figures = draw_figures(pruned, evaluation, Path(run_dir) / "figures")
    key = run_id or f"adapters-{pruned.sha256[:12]}"
    tags = {
        **_tags(cfg, data, _settings.code_version(), key, False),
        "sla.trainable_percent": f"{pruned.trainable_percent_after:.4f}",
    }
    tracker = open_mlflow_run.fn(cfg.registry.experiment or cfg.name, key, tags)
    try:
        params = _params(cfg, False, 0, None)
        source = log_to_mlflow.fn(
            tracker, cfg, str(run_dir), params, tags, trained, pruned, evaluation, figures, data
        )
        registration = register_model.fn(cfg, source, key, tracker.run_id, evaluation.summary, tags)
    except BaseException:
        _end_quietly(tracker, "FAILED")
        raise
    tracker.end("FINISHED")
    return registration


def _evaluation_of(
    cfg: ExperimentConfig, data: PreparedData, trained: TrainedRun, pruned: PrunedAdapterSet, run_dir: Path
) -> EvaluationReport:
    """The run's evaluation of this pruned set (as `sla train` wrote it), else a new one."""
    try:
        done = EvaluationReport.read(run_dir)
        report = json.loads(Path(done.metrics_path).read_text(encoding="utf-8"))
        if Path(report.get("adapters", "")).resolve() == Path(pruned.path).resolve():
            return done
    except (FileNotFoundError, TypeError, ValueError):
        pass
    return evaluate_adapters.fn(cfg, data, trained, pruned, str(run_dir))
