"""Searches on a real local Ray: ASHA stops trials early, a failing trial does not stop the search, and an
interrupted search resumes without re-running finished trials. Each search starts and stops its own Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sla_core.experiment import ExperimentConfig
from tests.tuning.conftest import (
    STEPS,
    assert_ray_gone,
    attempts,
    ray_descendants,
    ray_temp_dirs,
    read_rows,
    tiny_search_data,
)
from tuning.runner import run_search
from tuning.space import apply_overrides
from tuning.tracking import JsonRunTree

pytestmark = pytest.mark.slow


def grid(cfg: ExperimentConfig, **tune: Any) -> ExperimentConfig:
    """`cfg` with a grid search over the given `tune.*` settings (one value for unnamed dimensions)."""
    base = {
        "search": "grid",
        "num_samples": None,
        "lambda_sparse": [1.0],
        "rank": [4],
        "lr_grid": [1e-3],
        "lambda_warmup_steps": [0],
    }
    return apply_overrides(cfg, {f"tune.{k}": v for k, v in {**base, **tune}.items()})


def test_asha_stops_trials_early_and_ray_shuts_down_cleanly(
    search_config: ExperimentConfig, search_refs: dict, tmp_path: Path
) -> None:
    # Ranked by the parameter share pruning would keep (smaller is better), ASHA's decisions do not depend on
    # how fast 12 steps happen to learn: ranks 16 and 32 start after 4 and 8 have set the rung at step 2,
    # and are stopped there whichever of the first two arrived first.
    # The rung metric is ASHA's own (`scheduler_metric`); the winner is still picked on `metric`.
    cfg = grid(
        search_config,
        rank=[4, 8, 16, 32],
        metric="val_accuracy",
        mode="max",
        scheduler_metric="trainable_percent_pruned",
        scheduler_mode="min",
    )
    temp_before = ray_temp_dirs()
    result = run_search(
        cfg, search_refs, out_dir=tmp_path, tracker=JsonRunTree(tmp_path / "tracking"), verbose=0
    )

    rows = read_rows(result.trials_json)
    assert len(rows) == 4 and result.complete
    stopped = [r for r in rows if r["outcome"] == "early_stopped"]
    assert stopped, f"ASHA stopped no trial: {[(r['sla.rank'], r['steps_done']) for r in rows]}"
    assert all(r["steps_done"] < STEPS for r in stopped)
    assert {r["sla.rank"] for r in stopped} >= {16, 32}
    assert result.trial_steps == sum(r["steps_done"] for r in rows) < 4 * STEPS
    assert result.best is not None and result.best.overrides["sla.rank"] in {4, 8}  # a finished trial
    assert result.best.metric == "val_accuracy"
    assert (Path(result.best.adapters) / "sla_adapter_config.json").is_file()
    assert Path(result.trials_csv).read_text().startswith("trial_id,outcome,status,")
    # Parent run plus one child per trial, each closed.
    children = sorted((tmp_path / "tracking" / "trials").glob("*.jsonl"))
    assert len(children) == 4
    assert all('"kind": "end"' in c.read_text().splitlines()[-1] for c in children)
    assert '"best_trial"' in (tmp_path / "tracking" / "parent.jsonl").read_text()
    assert_ray_gone(ray_descendants(), temp_before)


def test_failing_trial_is_recorded_and_the_best_is_still_chosen(
    search_config: ExperimentConfig, search_refs: dict, tmp_path: Path
) -> None:
    # The engine's debug hook makes the loss NaN at step 3: a real divergence inside a real trial.
    cfg = grid(
        search_config, rank=[4, 8], extra_space={"train.debug_nan_at_step": [None, 3]}, scheduler="none"
    )
    result = run_search(
        cfg, search_refs, out_dir=tmp_path, tracker=JsonRunTree(tmp_path / "tracking"), verbose=0
    )

    rows = read_rows(result.trials_json)
    failed = [r for r in rows if r["outcome"] == "failed"]
    finished = [r for r in rows if r["outcome"] == "completed"]
    assert len(failed) == 2 and len(finished) == 2, rows
    assert all(r["status"] == "ERROR" and r["train.debug_nan_at_step"] == 3 for r in failed)
    assert all("non-finite loss" in r["error"] for r in failed), [r["error"] for r in failed]
    assert result.complete and result.counts["failed"] == 2
    assert result.best is not None
    assert result.best.trial_id in {r["trial_id"] for r in finished}
    assert result.best.value == max(r["val_accuracy"] for r in finished)
    best_config = yaml.safe_load(Path(result.best.config_path).read_text())
    assert best_config["train"]["debug_nan_at_step"] is None and best_config["sla"]["rank"] in (4, 8)
    for row in failed:
        log = (tmp_path / "tracking" / "trials" / f"{row['trial_id']}.jsonl").read_text()
        assert '"status": "FAILED"' in log


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the search exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the search")
        time.sleep(0.5)


def test_interrupted_search_resumes_without_rerunning_finished_trials(
    search_config: ExperimentConfig, search_refs: dict, search_cache: Path, tmp_path: Path
) -> None:
    config_file = tmp_path / "search.yaml"
    data = tiny_search_data(search_cache)
    data["tune"].update(num_samples=3, rank=[4, 8], lambda_sparse=[0.0, 1.0], lambda_warmup_steps=[0])
    config_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    exp = out / search_config.name
    cmd = [
        sys.executable,
        "-c",
        "from flows.cli import app; app()",
        "tune",
        "--config",
        str(config_file),
        "--out-dir",
        str(out),
        "--quiet",
    ]
    temp_before = ray_temp_dirs()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        # A trial has ended when the driver closed its child run (its final report was processed).
        _wait_for(
            lambda: any('"kind": "end"' in f.read_text() for f in (exp / "tracking").glob("trials/*")),
            240,
            proc,
        )
        ray_procs = ray_descendants(proc.pid)
        assert ray_procs, "no Ray processes under the search"
        proc.send_signal(signal.SIGTERM)  # like Ctrl-C: Tune saves its state and the search stops
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert_ray_gone(ray_procs, temp_before)
    interrupted = json.loads((exp / "search.json").read_text())
    assert not interrupted["complete"] and "--resume" in interrupted["reason"]
    done_before = {r["trial_id"] for r in read_rows(exp / "trials.json") if r["outcome"] != "unfinished"}
    assert done_before, "no trial had finished before the interruption"

    cfg = ExperimentConfig.model_validate(data)
    result = run_search(
        cfg, search_refs, out_dir=out, resume=True, tracker=JsonRunTree(exp / "tracking"), verbose=0
    )
    rows = read_rows(result.trials_json)
    assert result.complete and len(rows) == 3 and not result.counts["unfinished"]
    runs = {r["trial_id"]: attempts(Path(r["run_dir"])) for r in rows}
    assert all(runs[t] == 1 for t in done_before), runs  # finished trials were not run again
    assert result.best is not None and Path(result.best.adapters).is_dir()
    with pytest.raises(FileExistsError, match="--resume"):
        run_search(cfg, search_refs, out_dir=out, verbose=0)  # a new search must not overwrite it
