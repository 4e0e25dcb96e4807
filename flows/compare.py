"""`sla compare`: ours against chosen baselines on the user's own config and data, side by side.

Every cell is one method at one seed, run through the product's stages (`sla_core.engine`: train, prune,
evaluate) on the same prepared data, batches and seed; only `method` differs between cells. A finished
cell is kept as `<out>/cells/<slug>.json` and reused; an interrupted one resumes from its checkpoint. The
table (`compare.md`, `compare.json`) and the figure (`compare.png`: accuracy against kept parameters) are
written from whatever cells exist.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sla_core.engine.cells import CompareRow, cell_config, run_method_cell, slug
from sla_core.experiment import ExperimentConfig

DEFAULT_METHODS = ("sla", "lora:r=8", "full_ft:lr=1e-4")


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
    report_only: bool = False,
) -> list[dict[str, Any]]:
    """Run every (method, seed) cell not yet done, then write the table, JSON and figure to `out`.
    `report_only`: run nothing; the table covers the finished cells only (the missing ones are named)."""
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks

    for method in methods:  # every spec is checked before any work
        cell_config(cfg, method, seeds[0], out)
    rows = []
    if report_only:
        for method, seed in ((m, s) for m in methods for s in seeds):
            done = out / "cells" / f"{slug(method, seed)}.json"
            if done.is_file():
                rows.append(CompareRow.from_dict(json.loads(done.read_text(encoding="utf-8"))))
            else:
                echo(f"not run yet: {method} seed {seed}")
        methods, seeds = [], []
    else:
        refs = prepare_tasks(cfg.tasks, load_tokenizer(cfg.backbone), cfg.cache_dir)
    for i, (method, seed) in enumerate((m, s) for m in methods for s in seeds):
        echo(f"[{i + 1}/{len(methods) * len(seeds)}] {method} seed {seed}")
        tracker = _mlflow_run(tracking_uri, cfg, method, seed) if tracking_uri else None
        try:
            rows.append(run_method_cell(cfg, refs, method, seed, out, tracker))
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
