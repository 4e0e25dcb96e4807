"""Method cells: one method at one seed on an experiment's data, through the product's stages.

A cell is `train`, then `prune`, then `evaluate` of the experiment config with only `method`, `train.seed`
and the run folder changed, so every cell of a comparison sees the same prepared data and batches. A
finished cell is a JSON file and is read back instead of rerun; an interrupted one resumes from its last
checkpoint. `sla compare` (flows/compare.py) and the Pareto benchmark (bench/pareto.py) are grids of these.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sla_core.experiment import ExperimentConfig, with_overrides
from sla_core.tracking import JsonTracker, Tracker

TIMING_ROWS = 16  # rows of the fixed batch on which inference is timed
TIMING_REPEATS = 5


@dataclass(frozen=True)
class CompareRow:
    """One cell of the comparison: a method at a seed, measured on the test split."""

    method: str
    seed: int
    accuracy: float  # test accuracy, mean over tasks (clean)
    macro_f1: float
    trainable_percent: float  # of the backbone, while training
    kept_percent: float  # of the backbone, in the exported set
    seconds_per_step: float
    inference_ratio: float  # forward time of the exported model / the bare backbone's, same batch
    steps: int
    run_dir: str
    val_accuracy: float | None = None  # when the validation split was evaluated too

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareRow:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class StepClock:
    """A tracker that forwards to `inner` and keeps each step's training loss and when it was logged."""

    def __init__(self, inner: Tracker) -> None:
        self.inner, self.times, self.losses = inner, [], []

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train/loss" in metrics:
            self.times.append(time.perf_counter())
            self.losses.append(float(metrics["train/loss"]))
        self.inner.log_metrics(metrics, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.inner.set_tags(tags)

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(gaps) if gaps else float("nan")


def slug(method: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", method.replace(":", "-")) + f"-s{seed}"


def cell_config(cfg: ExperimentConfig, method: str, seed: int, run_dir: Path) -> ExperimentConfig:
    """The user's config with only the method, the seed and the run folder changed."""
    overrides = {"method": method, "train.seed": seed, "train.log_every": 1, "output_dir": str(run_dir)}
    return with_overrides(cfg, overrides, origin="--methods")


def inference_ratio(adapters: str, cfg: ExperimentConfig, refs: dict[str, Any]) -> float:
    """Forward time of the exported model over the bare backbone's on one fixed test batch (best of N)."""
    import torch

    from sla_core.backbones import load_backbone
    from sla_core.data.sampling import eval_batches
    from sla_core.methods import load_trained

    task = cfg.tasks[0].name
    batch = next(eval_batches(refs[task], "test", TIMING_ROWS, 0))
    _, model = load_trained(load_backbone(cfg.backbone), adapters)
    bare = load_backbone(cfg.backbone)
    bare = bare.base_model if hasattr(bare, "base_model") else bare
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def best(fn: Callable[[], Any]) -> float:
        times = []
        with torch.no_grad():
            fn()  # warm-up
            for _ in range(TIMING_REPEATS):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: model.eval()(**inputs, task_ids=batch["task_ids"])) / best(
        lambda: bare.eval()(**inputs)
    )


def run_method_cell(
    cfg: ExperimentConfig,
    refs: dict[str, Any],
    method: str,
    seed: int,
    out: Path,
    tracker: Any = None,
    splits: tuple[str, ...] = ("test",),
) -> CompareRow:
    """Train, prune and evaluate one method at one seed (or read the finished cell back)."""
    from sla_core.engine.loop import train
    from sla_core.engine.stages import ADAPTERS_DIR, evaluate, prune

    done = out / "cells" / f"{slug(method, seed)}.json"
    if done.is_file():
        return CompareRow.from_dict(json.loads(done.read_text(encoding="utf-8")))
    run_dir = out / "runs" / slug(method, seed)
    cell = cell_config(cfg, method, seed, run_dir)
    clock = StepClock(tracker if tracker is not None else JsonTracker(run_dir / "tracking.jsonl"))
    resume = (run_dir / "checkpoints" / "latest").is_file()
    trained = train(cell, refs, run_dir=run_dir, tracker=clock, resume=resume)
    pruned = prune(trained, run_dir / ADAPTERS_DIR, backbone=cell.backbone)
    evaluation = evaluate(cell, refs, pruned.path, run_dir, step=trained.steps, splits=splits)
    summary = evaluation.summary
    row = CompareRow(
        method=trained.method,
        seed=seed,
        val_accuracy=summary.get("val_accuracy"),
        accuracy=summary["test_accuracy_mean"],
        macro_f1=summary["test_macro_f1_mean"],
        trainable_percent=pruned.trainable_percent_before,
        kept_percent=100.0 * pruned.counts_after["kept"] / pruned.counts_after["backbone"],
        seconds_per_step=clock.seconds_per_step(),
        inference_ratio=inference_ratio(pruned.path, cell, refs),
        steps=trained.steps,
        run_dir=str(run_dir),
    )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the cell is done; the sets stay
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(asdict(row), indent=2) + "\n", encoding="utf-8")
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in asdict(row).items() if isinstance(v, float)})
    return row
