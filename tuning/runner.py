"""`run_search`: a Ray Tune search over the SLA hyperparameters with ASHA, under a trainable-parameter budget.

Layout of `<out_dir>/<name>/` (also Tune's experiment folder, so `--resume` restores it):

    search_spec.json   what the search was started with; a resume must match it
    trials/<id>/       each trial's run folder (checkpoints/, adapters/, metrics.json, attempts.jsonl)
    trials.csv/.json   the table of all trials        search.json   the `SearchResult`
    best/              the winner's pruned adapters, metrics.json and full config.yaml

Ray is local by default (started here with a private temp folder, shut down and removed at the end);
`address` joins an existing cluster instead, and a Ray already initialised by the caller is used as it is.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from sla_core.data import DatasetRef
from sla_core.experiment import ExperimentConfig
from sla_core.tracking import NullTracker, Tracker
from tuning.callbacks import LIVE, SearchTracking, TrackingCallback
from tuning.results import (
    RESULT_FILE,
    SearchResult,
    export_best,
    no_best_reason,
    pick_best,
    trial_row,
    write_table,
)
from tuning.space import check_search, default_samples, grid_size, param_space, trial_steps
from tuning.tracking import as_parent
from tuning.trainable import TrialJob, run_trial

SPEC_FILE = "search_spec.json"
TRIALS_DIR = "trials"
OBJECT_STORE_BYTES = 256 * 2**20
LOOPBACK = "127.0.0.1"
NO_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger(__name__)
# Passed to the workers of a cluster (a local Ray's workers inherit the driver's environment).
WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_VERBOSITY",
    "TOKENIZERS_PARALLELISM",
    "RAY_USAGE_STATS_ENABLED",
    "RAY_AUTH_MODE",
)


# ------------------------------------------------------------------------------------------- Ray session
def check_address(address: str) -> None:
    """Fail fast, naming `--address`, when nothing answers there (ray.init would wait a long time)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--address {address!r}: expected `auto`, HOST:PORT (the head's GCS port, usually 6379) "
            "or ray://HOST:PORT (the Ray client port, usually 10001)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(
            f"--address {address}: nothing answers at {host}:{port} ({err}); start the cluster with "
            "`ray up infra/ray/cluster.yaml`, or drop --address to run on a local Ray"
        ) from None
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise ValueError(
            f"--address {address}: ray:// needs the Ray client (pip install 'ray[client]==2.60.0'); "
            "or run `sla tune --address auto` on the head node (see docs/tuning.md)"
        )


def _temp_root() -> str:
    # Ray's socket paths must stay under ~107 characters: keep the session folder short.
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


@contextmanager
def loopback_only() -> Iterator[None]:
    """Within the block, a Ray started here listens on 127.0.0.1 only (GCS, raylet, workers, agents).

    Ray binds its servers to all interfaces unless the node's IP is the loopback address, and it turns a
    requested loopback `_node_ip_address` into the machine's reachable IP, unless clusters are disabled
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read at import: set for the child processes and in the driver).
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(NO_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[NO_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(NO_CLUSTER_ENV, None)
        else:
            os.environ[NO_CLUSTER_ENV] = saved_env


def _start_local_ray(temp_dir: str) -> None:
    ray.init(
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        _temp_dir=temp_dir,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        raise RuntimeError(
            f"the local Ray took node IP {node_ip}, not {LOOPBACK}, so it would listen beyond this machine; "
            "fix: run on a cluster started with token auth and pass --address (README, Security)"
        )


def _warn_unauthenticated(address: str) -> None:
    if os.environ.get("RAY_AUTH_MODE", "disabled") != "token":
        log.warning(
            "--address %s: RAY_AUTH_MODE is not `token`; a Ray cluster without token auth runs code for "
            "anyone who reaches its ports. Start the cluster and sla with RAY_AUTH_MODE=token "
            "(README, Security)",
            address,
        )


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Start a local Ray (or join `address`) for the block; shut it down and remove its temp folder after.

    The local Ray listens on 127.0.0.1 only; `address` is the explicit opt-in to other machines.
    A Ray the caller already initialised is used and left running.
    """
    if ray.is_initialized():
        yield
        return
    temp_dir = None
    try:
        if address is None:
            temp_dir = tempfile.mkdtemp(prefix="sla-ray-", dir=_temp_root())
            with loopback_only():
                _start_local_ray(temp_dir)
                yield
        else:
            check_address(address)
            _warn_unauthenticated(address)
            env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
            try:
                ray.init(
                    address=address,
                    log_to_driver=False,
                    runtime_env={"env_vars": env},
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConnectionError(f"--address {address}: cannot join the Ray cluster: {err}") from None
            yield
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def sigterm_stops_search() -> Iterator[None]:
    """SIGTERM ends the search like Ctrl-C: Tune saves its state, trials stop, Ray shuts down cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        tune_handler = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop, installed by fit()
        if callable(tune_handler):
            tune_handler(signum, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------- the search
def search_spec(
    cfg: ExperimentConfig, refs: dict[str, DatasetRef], num_samples: int, exp_dir: Path
) -> dict[str, Any]:
    """What identifies a search, stored at its start and compared on `--resume`."""
    expected = num_samples * (grid_size(cfg) if cfg.tune.search == "grid" else 1)
    return {
        "config": cfg.model_dump(mode="json", exclude={"output_dir"}),
        "num_samples": num_samples,
        "expected_trials": expected,
        "fingerprints": {t: r.fingerprint for t, r in refs.items()},
        "tracking_key": str(exp_dir),
    }


@dataclass(frozen=True)
class SearchPlan:
    """A checked search: where it goes, what identifies it, how many samples."""

    exp_dir: Path
    spec: dict[str, Any]
    num_samples: int
    resume: bool


def check_experiment_dir(exp_dir: Path, spec: dict[str, Any], resume: bool, num_given: bool) -> None:
    """A new search must not overwrite an old one; a resumed one must be the same search."""
    spec_file = exp_dir / SPEC_FILE
    if not resume:
        if (exp_dir / "tuner.pkl").exists():  # a spec alone is a start that failed before Tune began
            raise FileExistsError(
                f"{exp_dir} already holds a search; pass --resume to continue it, or choose "
                "another --out or experiment name"
            )
        return
    if not spec_file.is_file() or not tune.Tuner.can_restore(str(exp_dir)):
        raise FileNotFoundError(
            f"--resume: no search to resume at {exp_dir}; run without --resume to start one"
        )
    saved = json.loads(spec_file.read_text(encoding="utf-8"))
    changed = [k for k in spec["config"] if spec["config"][k] != saved["config"].get(k)]
    if changed or saved["fingerprints"] != spec["fingerprints"]:
        what = ", ".join(f"`{k}:`" for k in changed) or "the prepared data (fingerprints)"
        raise ValueError(
            f"--resume: {what} differ(s) from the search saved in {spec_file}; resume with the "
            "same config and data"
        )
    if num_given and saved["num_samples"] != spec["num_samples"]:
        raise ValueError(
            f"--resume: --num-samples {spec['num_samples']} differs from the saved search's "
            f"{saved['num_samples']}; drop --num-samples"
        )


def plan_search(
    cfg: ExperimentConfig,
    refs: dict[str, DatasetRef],
    *,
    out_dir: str | Path,
    num_samples: int | None = None,
    address: str | None = None,
    resume: bool = False,
) -> SearchPlan:
    """Every check `run_search` makes on its input, without writing anything or starting Ray.

    Raises:
        ValueError, FileExistsError, FileNotFoundError, ConnectionError: naming the key, file or address.
    """
    check_search(cfg)
    if address is not None:
        check_address(address)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"--num-samples {num_samples}: must be >= 1")
    samples = num_samples if num_samples is not None else default_samples(cfg)
    exp_dir = Path(out_dir).resolve() / cfg.name
    spec = search_spec(cfg, refs, samples, exp_dir)
    check_experiment_dir(exp_dir, spec, resume, num_samples is not None)
    if resume:  # the saved search decides
        spec = json.loads((exp_dir / SPEC_FILE).read_text(encoding="utf-8"))
    return SearchPlan(exp_dir, spec, spec["num_samples"], resume)


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def make_tuner(
    cfg: ExperimentConfig,
    job: TrialJob,
    exp_dir: Path,
    num_samples: int,
    key: str,
    resume: bool,
    verbose: int,
) -> tune.Tuner:
    """A new `tune.Tuner`, or the saved one restored (finished trials stay finished, errored ones too)."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=job), {"cpu": cfg.tune.cpus_per_trial}
    )
    if resume:
        return tune.Tuner.restore(
            str(exp_dir), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
    t = cfg.tune
    # Ray refuses a metric on both the scheduler and TuneConfig; the winner is picked by `pick_best` on
    # `t.metric` either way, so a separate rung metric lives on the scheduler alone.
    own = t.scheduler == "asha" and t.scheduler_metric not in (None, t.metric)
    rung = {"metric": t.scheduler_metric, "mode": t.scheduler_mode} if own else {}
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            max_t=job.steps,
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            **rung,
        )
        if t.scheduler == "asha"
        else FIFOScheduler()
    )
    tune_config = tune.TuneConfig(
        metric=None if own else t.metric,
        mode=None if own else t.mode,
        num_samples=num_samples,
        scheduler=scheduler,
        search_alg=BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent),
        reuse_actors=False,  # one process per trial: the engine owns its process group and port
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=exp_dir.name,
        storage_path=str(exp_dir.parent),
        failure_config=tune.FailureConfig(max_failures=0),
        callbacks=[TrackingCallback(key)],
        log_to_file=False,
        verbose=verbose,
    )
    return tune.Tuner(trainable, param_space=param_space(cfg), tune_config=tune_config, run_config=run_config)


def run_search(
    cfg: ExperimentConfig,
    refs: dict[str, DatasetRef],
    *,
    out_dir: str | Path,
    num_samples: int | None = None,
    address: str | None = None,
    resume: bool = False,
    tracker: Tracker | None = None,
    verbose: int = 1,
) -> SearchResult:
    """Search `cfg.tune`'s space with Ray Tune and ASHA; return the best trial under `cfg.tune.budget`.

    Args:
        refs: prepared datasets by task (`sla_core.data.prepare_tasks`); trials get their JSON, not tensors.
        out_dir: the experiment goes to `<out_dir>/<cfg.name>/`.
        num_samples: random search: trials; grid: repeats of the grid. Default: `tune.num_samples`,
            else 8 (random) or 1 (grid).
        address: None for a local Ray; `auto`, HOST:PORT or ray://HOST:PORT to join a cluster.
        resume: continue the interrupted search in that folder without re-running finished trials.
        tracker: the parent run; each trial gets a child (`child(name)` if it has one, else key prefixes).
    Raises:
        ValueError, FileExistsError, FileNotFoundError, ConnectionError: bad input, named, before any trial.
    """
    plan = plan_search(cfg, refs, out_dir=out_dir, num_samples=num_samples, address=address, resume=resume)
    exp_dir, num_samples = plan.exp_dir, plan.num_samples
    if not resume:
        exp_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(plan.spec, indent=2, sort_keys=True) + "\n"
        (exp_dir / SPEC_FILE).write_text(text, encoding="utf-8")
    job = TrialJob.build(cfg, refs, exp_dir / TRIALS_DIR, trial_steps(cfg))
    parent = as_parent(tracker or NullTracker())
    live = SearchTracking(parent)
    key = plan.spec.get("tracking_key", str(exp_dir))  # what the callback saved in Tune's state knows
    if not resume:
        live.guard(
            "parent params",
            parent.log_params,
            {"search": cfg.tune.model_dump(mode="json"), "num_samples": num_samples},
        )
    LIVE[key] = live
    try:
        # The handler goes in after ray.init, which installs a C++ one that aborts the driver on SIGTERM.
        with ray_session(address), sigterm_stops_search():
            make_tuner(cfg, job, exp_dir, num_samples, key, resume, verbose).fit()
    finally:
        LIVE.pop(key, None)
        live.close_open("KILLED")
    return summarize(exp_dir, job, plan.spec["expected_trials"], live)


def summarize(exp_dir: Path, job: TrialJob, expected: int, live: SearchTracking) -> SearchResult:
    """Build the trials table, pick and export the best, log the parent run, write `search.json`."""
    trials = tune.ExperimentAnalysis(str(exp_dir)).trials
    trials = sorted(trials, key=lambda t: t.trial_id)  # creation order
    rows = [trial_row(t, job) for t in trials]
    csv_path, json_path = write_table(rows, exp_dir)
    counts = {
        o: sum(r["outcome"] == o for r in rows)
        for o in ("completed", "early_stopped", "failed", "unfinished")
    }
    complete = counts["unfinished"] == 0 and len(rows) >= expected
    winner = pick_best(rows, job.metric, job.mode)
    best = None
    if winner is not None:
        params = next(t.config for t in trials if t.trial_id == winner["trial_id"])
        best = export_best(winner, job, exp_dir, dict(params))
    reason = "" if best else no_best_reason(rows, job.budget)
    if not complete:
        reason = (reason + "; " if reason else "") + "the search was interrupted: resume it with --resume"
    result = SearchResult(
        name=exp_dir.name,
        experiment_dir=str(exp_dir),
        complete=complete,
        best=best,
        reason=reason,
        trials_csv=str(csv_path),
        trials_json=str(json_path),
        counts=counts,
        trial_steps=sum(r["steps_done"] for r in rows),
    )
    (exp_dir / RESULT_FILE).write_text(result.to_json() + "\n", encoding="utf-8")
    log_parent(live, result)
    return result


def log_parent(live: SearchTracking, result: SearchResult) -> None:
    """The search's parent run: counts, compute, the best value and trial, the table and the best adapters."""
    parent = live.parent
    metrics = {f"trials_{k}": float(v) for k, v in result.counts.items()}
    metrics["trial_steps"] = float(result.trial_steps)
    tags = {"complete": str(result.complete).lower()}
    if result.best is not None:
        metrics[f"best_{result.best.metric}"] = result.best.value
        metrics["best_trainable_fraction"] = result.best.trainable_fraction
        tags["best_trial"] = result.best.trial_id
    live.guard("parent metrics", parent.log_metrics, metrics, None)
    live.guard("parent tags", parent.set_tags, tags)
    live.guard("trials table", parent.log_artifact, result.trials_csv, None)
    live.guard("trials table", parent.log_artifact, result.trials_json, None)
    if result.best is not None:
        live.guard("best adapters", parent.log_artifact, result.best.adapters, "best/adapters")
        live.guard("best config", parent.log_artifact, result.best.config_path, "best")
