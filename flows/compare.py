"""`sla compare`: ours against chosen baselines on the user's own config and data, side by side.

Every cell is one method at one seed, run through the product's stages (`sla_core.engine`: train, prune,
evaluate) on the same prepared data, batches and seed; only `method` differs between cells. A finished
cell is kept as `<out>/cells/<slug>.json` and reused; an interrupted one resumes from its checkpoint. The
table (`compare.md`, `compare.json`) and the figure (`compare.png`: accuracy against kept parameters) are
written from whatever cells exist.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sla_core.experiment import ExperimentConfig, with_overrides
from sla_core.tracking import JsonTracker, Tracker

DEFAULT_METHODS = ("sla", "lora:r=8", "full_ft:lr=1e-4")
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareRow:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


class StepClock:
    """A tracker that forwards to `inner` and notes when each step's training loss was logged."""

    def __init__(self, inner: Tracker) -> None:
        self.inner, self.times = inner, []

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train/loss" in metrics:
            self.times.append(time.perf_counter())
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


def run_cell(
    cfg: ExperimentConfig, refs: dict[str, Any], method: str, seed: int, out: Path, tracker: Any = None
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
    evaluation = evaluate(cell, refs, pruned.path, run_dir, step=trained.steps, splits=("test",))
    summary = evaluation.summary
    row = CompareRow(
        method=trained.method,
        seed=seed,
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


def summarize(rows: Sequence[CompareRow]) -> list[dict[str, Any]]:
    """Mean (and spread) per method over seeds, in the order the methods were given."""
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        rs = [r for r in rows if r.method == method]

        def mean(key: str, rs: list[CompareRow] = rs) -> float:
            return statistics.fmean(getattr(r, key) for r in rs)

        acc = [100 * r.accuracy for r in rs]
        out.append(
            {
                "method": method,
                "seeds": len(rs),
                "accuracy": statistics.fmean(acc),
                "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "macro_f1": 100 * mean("macro_f1"),
                "trainable_percent": mean("trainable_percent"),
                "kept_percent": mean("kept_percent"),
                "seconds_per_step": mean("seconds_per_step"),
                "inference_ratio": mean("inference_ratio"),
            }
        )
    return out


def table(summary: list[dict[str, Any]], cfg: ExperimentConfig, steps: int) -> str:
    tasks = ", ".join(t.name for t in cfg.tasks)
    lines = [
        f"Backbone `{cfg.backbone}`, tasks {tasks}, {steps} steps at batch {cfg.train.batch_size}; "
        "test split, mean over tasks (± sd over seeds). Inference: forward time of the exported model "
        "over the bare backbone's on one batch.",
        "",
        "| method | seeds | accuracy % | macro-F1 % | trainable % | kept % | s / step "
        "| inference / backbone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        sd = f" ± {s['accuracy_sd']:.1f}" if s["seeds"] > 1 else ""
        lines.append(
            f"| `{s['method']}` | {s['seeds']} | {s['accuracy']:.1f}{sd} | {s['macro_f1']:.1f} | "
            f"{s['trainable_percent']:.3f} | {s['kept_percent']:.3f} | {s['seconds_per_step']:.3f} | "
            f"{s['inference_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy against kept parameters (log scale), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for s in summary:
        ax.errorbar(s["kept_percent"], s["accuracy"], yerr=s["accuracy_sd"] or None, fmt="o", capsize=3)
        ax.annotate(
            s["method"], (s["kept_percent"], s["accuracy"]), textcoords="offset points", xytext=(5, 4)
        )
    ax.set_xscale("log")
    ax.set_xlabel("kept parameters, % of the backbone (log)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("sla compare: accuracy against kept parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(
    cfg: ExperimentConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    tracking_uri: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (method, seed) cell not yet done, then write the table, JSON and figure to `out`."""
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks

    for method in methods:  # every spec is checked before any work
        cell_config(cfg, method, seeds[0], out)
    refs = prepare_tasks(cfg.tasks, load_tokenizer(cfg.backbone), cfg.cache_dir)
    rows = []
    for i, (method, seed) in enumerate((m, s) for m in methods for s in seeds):
        echo(f"[{i + 1}/{len(methods) * len(seeds)}] {method} seed {seed}")
        tracker = _mlflow_run(tracking_uri, cfg, method, seed) if tracking_uri else None
        try:
            rows.append(run_cell(cfg, refs, method, seed, out, tracker))
        except BaseException:
            if tracker is not None:
                tracker.end("FAILED")
            raise
        if tracker is not None:
            tracker.end("FINISHED")
    summary = summarize(rows)
    steps = rows[0].steps if rows else cfg.train.steps
    (out / "compare.md").write_text(table(summary, cfg, steps), encoding="utf-8")
    (out / "compare.json").write_text(
        json.dumps({"summary": summary, "cells": [asdict(r) for r in rows]}, indent=2) + "\n",
        encoding="utf-8",
    )
    plot(summary, out / "compare.png")
    return summary


def _mlflow_run(tracking_uri: str, cfg: ExperimentConfig, method: str, seed: int) -> Any:
    from flows.registry import check_tracking_server
    from flows.tracking_mlflow import MLflowTracker

    check_tracking_server(tracking_uri)
    tags = {"sla.compare.method": method, "sla.compare.seed": str(seed), "sla.config": cfg.name}
    tracker = MLflowTracker.start(f"{cfg.name}-compare", slug(method, seed), tags, tracking_uri)
    tracker.log_params({"method": method, "seed": seed, "backbone": cfg.backbone})
    return tracker
