"""Fixtures for the search tests: a tiny search config on the shipped data, prepared once, and Ray checks."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from sla_core.experiment import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12  # per trial; ASHA rungs at steps 2 and 6 (grace 2, reduction factor 3)


def tiny_search_data(cache_dir: Path) -> dict[str, Any]:
    """configs/tiny.yaml, made cheaper for searches: 12 steps, reports every 2, no noisy evaluation copies."""
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["tasks"][0]["eval_noise_levels"] = [0.0]
    data["train"].update(steps=STEPS, checkpoint_every=4)
    data["tune"].update(steps=STEPS, report_every=2, grace_period=2, reduction_factor=3, max_concurrent=2)
    data["cache_dir"] = str(cache_dir)
    return data


@pytest.fixture(scope="session")
def search_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search-cache")


@pytest.fixture(scope="session")
def search_config(search_cache: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate(tiny_search_data(search_cache))


@pytest.fixture(scope="session")
def search_refs(search_config: ExperimentConfig, minilm_tokenizer: Any) -> dict[str, Any]:
    from sla_core.data import prepare_tasks

    return prepare_tasks(search_config.tasks, minilm_tokenizer, search_config.cache_dir, progress=False)


def ray_temp_dirs() -> set[str]:
    return set(glob.glob("/tmp/sla-ray-*"))


def ray_descendants(pid: int | None = None) -> list[psutil.Process]:
    """Ray processes (GCS, raylet, workers, ...) below `pid` (default: this process)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in children:
        try:
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ray" in cmd or proc.name().startswith(("raylet", "gcs_server", "ray::")):
            out.append(proc)
    return out


def assert_ray_gone(procs: list[psutil.Process], temp_before: set[str]) -> None:
    """Every Ray process in `procs` has exited and no new Ray temp folder is left."""
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, f"Ray processes left behind: {[(p.pid, p.name()) for p in alive]}"
    assert ray_temp_dirs() <= temp_before, f"Ray temp folders left: {ray_temp_dirs() - temp_before}"


def attempts(run_dir: Path) -> int:
    """How many times a trial started (lines of its attempts.jsonl)."""
    file = run_dir / "attempts.jsonl"
    return len(file.read_text().splitlines()) if file.is_file() else 0


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())
