"""Fixtures for the engine tests: a tiny experiment on the shipped MiniLM and data, prepared once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]

# One task keeps single runs fast; two tasks (2 and 5 labels) make mixed-task batches that differ per rank.
ONE_TASK = [
    {
        "name": "rotten_tomatoes",
        "max_length": 32,
        "max_train_examples": 128,
        "max_eval_examples": 16,
        "eval_noise_levels": [0.1],
    }
]
TWO_TASKS = [
    *ONE_TASK,
    {
        "name": "bbc_news",
        "max_length": 32,
        "max_train_examples": 64,
        "max_eval_examples": 16,
        "eval_noise_levels": [],
    },
]


def experiment(
    cache_dir: Path, tasks: list[dict] = ONE_TASK, sla: dict[str, Any] | None = None, **train: Any
) -> dict[str, Any]:
    """A tiny, deterministic experiment: dropout off so runs at any process count see the same numbers."""
    return {
        "name": "engine-test",
        "backbone": "minilm",
        "tasks": tasks,
        "sla": {"rank": 4, "lambda_sparse": 1.0, "head_dropout": 0.0, **(sla or {})},
        "train": {
            "steps": 8,
            "batch_size": 8,
            "eval_batch_size": 16,
            "checkpoint_every": 0,
            "log_every": 1,
            "backbone_dropout": 0.0,
            **train,
        },
        "cache_dir": str(cache_dir),
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    """Per-step values of a logged metric (the training loss by default) from tracking.jsonl, by step."""
    rows = [json.loads(line) for line in (run_dir / "tracking.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["metrics"][key] for r in rows if r["kind"] == "metrics" and key in r["metrics"]}
    return [by_step[s] for s in sorted(by_step)]


def subprocess_env() -> dict[str, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_command(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a launcher or worker; on failure the assertion shows the tail of its output."""
    proc = subprocess.run(
        cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """A dataset cache with both tasks prepared (subprocesses then get cache hits)."""
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks
    from sla_core.experiment import ExperimentConfig

    cache = tmp_path_factory.mktemp("engine-cache")
    cfg = ExperimentConfig.model_validate(experiment(cache, TWO_TASKS))
    prepare_tasks(cfg.tasks, load_tokenizer("minilm"), cache, progress=False)
    return cache


@pytest.fixture
def tiny_config(engine_cache, tmp_path):
    """Write the tiny experiment (with `train` overrides) to a YAML file; returns its path."""

    def make(tasks: list[dict] = ONE_TASK, name: str = "tiny.yaml", **train: Any) -> Path:
        return write_config(tmp_path / name, experiment(engine_cache, tasks, **train))

    return make


@pytest.fixture(autouse=True)
def _no_stray_process_group():
    """Every in-process run must close its process group and restore the environment."""
    yield
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert "WORLD_SIZE" not in os.environ


PYTHON = sys.executable
