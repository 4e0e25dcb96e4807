"""Accuracy against kept parameters, through the product loop: ours at exact budgets against LoRA's frontier,
fixed adapters, random structures at the same budgets, and full fine-tuning as the ceiling.

Every cell is one method at one seed on one task (`sla_core.engine.cells.run_method_cell`: train, prune,
evaluate, exactly what `sla train` does), cached as a JSON file and skipped when present, so the grid
resumes; several processes may share it (`python bench/pareto.py &` twice), each cell claimed by a file lock.
Learning rates come from a small sweep on validation (`--sweep`, one size per family on Rotten Tomatoes at
seed 0), written to `docs/results/pareto_lr.json` and read by the grid.

    python bench/pareto.py --sweep      # the learning-rate sweep (15 cells)
    python bench/pareto.py              # the grid; rerun to resume
    python bench/pareto.py --plan       # the cells, done or not, and the training time left
    python bench/pareto.py --report     # pareto.json, pareto.png and the verdicts from the cells so far
    python bench/pareto.py --only '^rotten_tomatoes (sla|random):budget=0.00[12]'   # a part of the grid
    python bench/pareto.py --extra 'sla:budget=0.002,gate=sensitivity_per_param,lr=0.003' --seeds 0 1
                                        # a variant outside the grid, on Rotten Tomatoes (reported apart)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from filelock import FileLock, Timeout  # noqa: E402

from bench.common import machine  # noqa: E402

OUT = ROOT / "docs" / "results"
ALL_LINEAR = "query+key+value+output.dense+intermediate.dense"  # every linear layer of a BERT block
LORA_RANKS = (1, 2, 4, 8, 16)
ADAPTER_RANKS = (8, 32)
BUDGETS = (0.0005, 0.001, 0.002, 0.004)  # fractions of the backbone: 0.05 % to 0.4 %
SWEEP = {  # family -> (representative method, learning rates tried)
    "lora": ("lora:r=8", (3e-4, 1e-3, 3e-3)),
    "adapters": ("adapters:rank=8", (3e-4, 1e-3, 3e-3)),
    "sla": ("sla:budget=0.002", (3e-4, 1e-3, 3e-3)),
    "random": ("random:budget=0.002", (3e-4, 1e-3, 3e-3)),
    "full_ft": ("full_ft", (3e-5, 1e-4, 3e-4)),
}
# Ours' options beyond the budget: the knapsack ranked by sensitivity in every search step, over half the
# steps, the target falling to the budget over the first 150 (the sweep's representative ran the default
# hard-concrete gates; see docs/results/method_ablation/rt_topk/ for the variants tried).
OURS = ",gate=sensitivity,search_fraction=0.5,lambda_warmup_steps=150"
DEFAULT_LR = {"lora": 1e-3, "adapters": 1e-3, "sla": 1e-3, "random": 1e-3, "full_ft": 1e-4}


@dataclass(frozen=True)
class Plan:
    """The grid's size: steps (>= one epoch of Rotten Tomatoes at batch 16), seeds per task, output."""

    steps: int = 640
    batch_size: int = 16
    max_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = 2000
    seeds: dict[str, tuple[int, ...]] | None = None
    out: Path = OUT
    cache_dir: Path = ROOT / "data" / "cache"
    quick: bool = False

    def task_seeds(self) -> dict[str, tuple[int, ...]]:
        return self.seeds or {"rotten_tomatoes": (0, 1, 2), "tweets": (0,)}

    @property
    def cells_dir(self) -> Path:
        return self.out / "pareto"


QUICK = Plan(steps=4, batch_size=8, max_length=32, max_train_examples=64, max_eval_examples=32,
             seeds={"rotten_tomatoes": (0,)}, quick=True)  # fmt: skip


def family(method: str) -> str:
    return method.split(":", 1)[0]


def methods() -> list[str]:
    """Every method of the grid, without learning rates."""
    out = [f"lora:r={r}" for r in LORA_RANKS] + [f"lora:r={r},targets={ALL_LINEAR}" for r in LORA_RANKS]
    out += [f"adapters:rank={r}" for r in ADAPTER_RANKS]
    out += [f"sla:budget={b:g}{OURS}" for b in BUDGETS] + [f"random:budget={b:g}" for b in BUDGETS]
    return out + ["full_ft"]


def with_lr(method: str, lr: float) -> str:
    return f"{method}{',' if ':' in method else ':'}lr={lr:g}"


def base_config(plan: Plan, task: str) -> Any:
    """The experiment every cell of `task` shares (configs/compare.yaml's settings for ours)."""
    from sla_core.experiment import load_experiment

    overrides = {
        "name": f"pareto-{task}",
        "tasks": [
            {
                "name": task,
                "max_length": plan.max_length,
                "max_train_examples": plan.max_train_examples,
                "max_eval_examples": plan.max_eval_examples,
                "eval_noise_levels": [0.0],
            }
        ],
        "train.steps": plan.steps,
        "train.batch_size": plan.batch_size,
        "train.lr_warmup_steps": max(1, plan.steps // 10),
        "train.checkpoint_every": max(1, plan.steps // 3),
        "cache_dir": str(plan.cache_dir),
    }
    return load_experiment(ROOT / "configs" / "compare.yaml", overrides)


def learning_rates(plan: Plan) -> dict[str, float]:
    path = plan.out / "pareto_lr.json"
    if path.is_file():
        return {**DEFAULT_LR, **json.loads(path.read_text())["best"]}
    return dict(DEFAULT_LR)


def run_cells(plan: Plan, cells: Sequence[tuple[str, str, int]], log=print) -> None:
    """Run (task, method with lr, seed) cells not yet done; a lock per cell lets processes share them."""
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks
    from sla_core.engine.cells import run_method_cell, slug

    for i, (task, method, seed) in enumerate(cells):
        folder = plan.cells_dir / task
        if (folder / "cells" / f"{slug(method, seed)}.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"_{slug(method, seed)}.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue
        try:
            cfg = base_config(plan, task)
            refs = prepare_tasks(cfg.tasks, load_tokenizer(cfg.backbone), cfg.cache_dir, progress=False)
            log(f"[{i + 1}/{len(cells)}] {task} {method} seed {seed}")
            run_method_cell(cfg, refs, method, seed, folder, splits=("validation", "test"))
        finally:
            lock.release()


def cell_status(plan: Plan, cells: Sequence[tuple[str, str, int]]) -> tuple[list[str], str]:
    """`--plan`: each cell's line with its state (done; started: a run folder without its result, which
    resumes from its checkpoint or is running now; todo), and a summary with the training still to do,
    estimated from the pace (seconds per step) of this plan's finished cells of the same family."""
    from sla_core.engine.cells import slug

    pace: dict[str, list[float]] = {}
    for path in plan.cells_dir.glob("*/cells/*.json"):
        cell = json.loads(path.read_text())
        if cell.get("seconds_per_step"):
            pace.setdefault(family(cell["method"]), []).append(float(cell["seconds_per_step"]))
    every = [x for xs in pace.values() for x in xs]
    lines, counts, seconds = [], {"done": 0, "started": 0, "todo": 0}, 0.0
    for task, method, seed in cells:
        name = slug(method, seed)
        folder = plan.cells_dir / task
        state = "done" if (folder / "cells" / f"{name}.json").is_file() else "todo"
        if state == "todo" and (folder / "runs" / name).is_dir():
            state = "started"
        counts[state] += 1
        if state != "done":
            seconds += plan.steps * statistics.median(pace.get(family(method)) or every or [0.0])
        lines.append(f"{task} {method} {seed}  {state}")
    todo = counts["started"] + counts["todo"]
    summary = f"{len(cells)} cells: {counts['done']} done, {counts['started']} started, {counts['todo']} todo"
    if todo and every:
        summary += (
            f"; about {seconds / 3600:.1f} h of training left at the finished cells' median seconds per step"
            " (per family; evaluation not counted), divided among the processes you run"
        )
    elif todo:
        summary += "; no finished cell yet to estimate the time from"
    return lines, summary


def sweep(plan: Plan) -> dict[str, float]:
    """Each family's learning rate: the best validation accuracy at its representative size."""
    from sla_core.engine.cells import CompareRow, slug

    cells = [("rotten_tomatoes", with_lr(m, lr), 0) for m, lrs in SWEEP.values() for lr in lrs]
    run_cells(plan, cells)
    best, table = {}, {}
    for fam, (m, lrs) in SWEEP.items():
        rows = {}
        for lr in lrs:
            path = plan.cells_dir / "rotten_tomatoes" / "cells" / f"{slug(with_lr(m, lr), 0)}.json"
            if path.is_file():
                rows[lr] = CompareRow.from_dict(json.loads(path.read_text())).val_accuracy or 0.0
        if rows:
            best[fam] = max(rows, key=rows.get)
            table[fam] = {f"{lr:g}": v for lr, v in rows.items()}
    (plan.out / "pareto_lr.json").write_text(
        json.dumps({"best": best, "val_accuracy": table}, indent=2) + "\n"
    )
    return best


def grid(plan: Plan) -> list[tuple[str, str, int]]:
    lrs = learning_rates(plan)
    return [
        (task, with_lr(m, lrs[family(m)]), seed)
        for task, seeds in plan.task_seeds().items()
        for seed in seeds
        for m in methods()
    ]


def collect(plan: Plan) -> list[dict[str, Any]]:
    """docs/results/pareto.json's cells: one row per finished cell; `grid` is false for the learning-rate
    sweep's cells that are not also grid cells (the means, verdicts and plot use grid cells only)."""
    from sla_core.engine.cells import CompareRow
    from sla_core.methods import parse_method

    in_grid = {(task, m, seed) for task, m, seed in grid(plan)}
    rows, commit = [], machine()["commit"]
    for path in sorted(plan.cells_dir.glob("*/cells/*.json")):
        r = CompareRow.from_dict(json.loads(path.read_text()))
        method = parse_method(r.method)
        budget = method.options.get("budget") if hasattr(method, "options") else None
        rows.append({
            "method": r.method, "family": method.name, "task": path.parent.parent.name, "seed": r.seed,
            "kept_percent": r.kept_percent, "trainable_percent": r.trainable_percent,
            "budget_percent": 100 * budget if budget else None, "accuracy": 100 * r.accuracy,
            "macro_f1": 100 * r.macro_f1,
            "val_accuracy": None if r.val_accuracy is None else 100 * r.val_accuracy,
            "steps": r.steps, "lr": method.lr, "commit": commit,
            "grid": (path.parent.parent.name, r.method, r.seed) in in_grid,
        })  # fmt: skip
    return rows


def means(rows: list[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """Per method on `task`: mean accuracy and kept % over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["task"] == task and r.get("grid", True):
            out.setdefault(r["method"], {"family": r["family"], "acc": [], "kept": [], "by_seed": {},
                                         "budget": r["budget_percent"]})  # fmt: skip
            out[r["method"]]["acc"].append(r["accuracy"])
            out[r["method"]]["kept"].append(r["kept_percent"])
            out[r["method"]]["by_seed"][r["seed"]] = r["accuracy"]
    return {m: {**v, "accuracy": statistics.fmean(v["acc"]), "kept_percent": statistics.fmean(v["kept"]),
                "seeds": len(v["acc"])} for m, v in out.items()}  # fmt: skip


def verdicts(rows: list[dict[str, Any]], task: str = "rotten_tomatoes") -> dict[str, Any]:
    """The issue's targets, computed: ours against LoRA's frontier and random structure, budget accuracy."""
    m = means(rows, task)
    lora = [v for v in m.values() if v["family"] == "lora"]
    out: dict[str, Any] = {"task": task, "budgets": {}}
    for v in m.values():
        if v["family"] != "sla" or not v["budget"]:
            continue
        b = v["budget"]
        under = [x for x in lora if x["kept_percent"] <= b]
        best = max(under, key=lambda x: x["accuracy"]) if under else None
        frontier = best["accuracy"] if best else None
        rand = [x for x in m.values() if x["family"] == "random" and x["budget"] == b]
        out["budgets"][f"{b:g}"] = {
            "ours": v["accuracy"], "seeds": v["seeds"], "lora_frontier": frontier,
            "lora_frontier_seeds": best["seeds"] if best else None,
            "margin": None if frontier is None else v["accuracy"] - frontier,
            "random": rand[0]["accuracy"] if rand else None,
            "random_seeds": rand[0]["seeds"] if rand else None,
            "kept_over_budget": v["kept_percent"] / b,
            # Paired by seed (the same seed: the same data order and head init): the spread of a difference
            # says more about seed noise than two means do.
            "vs_frontier_by_seed": _paired(v, best),
            "vs_random_by_seed": _paired(v, rand[0] if rand else None),
        }  # fmt: skip
    margins = [x["margin"] for x in out["budgets"].values() if x["margin"] is not None]
    out["above_frontier_by_0.5_at_2_budgets"] = sum(x >= 0.5 for x in margins) >= 2
    out["above_random_everywhere"] = all(
        x["random"] is not None and x["ours"] > x["random"] for x in out["budgets"].values()
    ) and bool(out["budgets"])
    out["budget_within_0.95_1.00"] = all(
        0.95 <= x["kept_over_budget"] <= 1.0 for x in out["budgets"].values()
    ) and bool(out["budgets"])
    return out


def _paired(ours: dict[str, Any], other: dict[str, Any] | None) -> dict[str, float]:
    """Ours minus `other` at each seed both have (keys are seeds as strings, as JSON keeps them)."""
    if other is None:
        return {}
    shared = sorted(set(ours["by_seed"]) & set(other["by_seed"]))
    return {str(s): ours["by_seed"][s] - other["by_seed"][s] for s in shared}


def markdown(
    payload: dict[str, Any], figure: str = "pareto.png", structure_figure: str = "pareto_structure.png"
) -> str:
    """The Pareto section: the grid's means per method, then the verdicts, from `pareto.json`'s payload."""
    rows, v = payload["cells"], payload["verdicts"]
    m = means(rows, v["task"])
    seeds = ", ".join(f"{t} {list(s)}" for t, s in payload["plan"]["seeds"].items())
    out = [
        "## Accuracy against kept parameters (`python bench/pareto.py`)",
        f"MiniLM, {payload['plan']['steps']} steps at batch {payload['plan']['batch_size']} for every "
        f"method, each family at its learning rate from the validation sweep; seeds planned: {seeds}. "
        f"Test accuracy on {v['task']}, mean ± sd over the seeds finished so far; the grid's cells only.",
        "",
    ]
    out += _means_table(m) + ["", f"![accuracy against kept parameters]({figure})", ""] + _budget_table(v)
    outside = means([{**r, "grid": True} for r in payload.get("sweep", [])], v["task"])
    if outside:
        out += [
            "",
            "Cells outside the grid (the learning-rate sweep's and `--extra` variants; not in the means, "
            "plot or verdicts):",
            "",
            "| method | seeds | kept % | accuracy % |",
            "|---|---|---|---|",
        ]
        for name, x in sorted(outside.items(), key=lambda kv: (kv[1]["family"], kv[0])):
            sd = f" ± {statistics.stdev(x['acc']):.1f}" if len(x["acc"]) > 1 else ""
            out.append(f"| `{name}` | {x['seeds']} | {x['kept_percent']:.3f} | {x['accuracy']:.1f}{sd} |")
    out += [
        "",
        "Targets, over the budgets and seeds above (a mean over fewer than 3 seeds is not yet the target's): "
        f"ours ≥ LoRA's frontier + 0.5 at two budgets: "
        f"**{'met' if v['above_frontier_by_0.5_at_2_budgets'] else 'not met'}**; ours above random at every "
        f"budget: **{'met' if v['above_random_everywhere'] else 'not met'}**; kept / budget within "
        f"0.95-1.00: **{'met' if v['budget_within_0.95_1.00'] else 'not met'}**.",
    ]
    for task, tv in payload.get("other_tasks", {}).items():
        planned = list(payload["plan"]["seeds"].get(task, []))
        out += ["", f"### {task} (the same plan; its seeds: {planned}; no target is set on it)", ""]
        out += _means_table(means(rows, task)) + [""] + _budget_table(tv)
    if payload.get("structure"):
        out += ["", "### Where the budget goes", "",
                "The kept share of each candidate's rank units by layer and projection, ours and random, "
                "mean over seeds (`pruned.json` of each run):", "",
                f"![kept structure]({structure_figure})"]  # fmt: skip
        out += _structure_lines(payload["structure"])
    return "\n".join(out) + "\n"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _means_table(m: dict[str, dict[str, Any]]) -> list[str]:
    out = ["| method | family | seeds | kept % | accuracy % |", "|---|---|---|---|---|"]
    for name, x in sorted(m.items(), key=lambda kv: (kv[1]["family"], kv[1]["kept_percent"])):
        sd = f" ± {statistics.stdev(x['acc']):.1f}" if len(x["acc"]) > 1 else ""
        out.append(
            f"| `{name}` | {x['family']} | {x['seeds']} | {x['kept_percent']:.3f} | {x['accuracy']:.1f}{sd} |"
        )
    return out


def _budget_table(v: dict[str, Any]) -> list[str]:
    out = [
        "| budget % | ours (seeds) | LoRA's frontier: best LoRA mean at ≤ the budget (seeds) | margin | "
        "ours − frontier, per seed | random (seeds) | ours − random, per seed | kept / budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, x in sorted(v["budgets"].items(), key=lambda kv: float(kv[0])):
        out.append(
            f"| {b} | {_num(x['ours'])} ({x['seeds']}) | {_num(x['lora_frontier'])} "
            f"({x.get('lora_frontier_seeds') or '–'}) | {_num(x['margin'], '+.2f')} | "
            f"{_per_seed(x.get('vs_frontier_by_seed'))} | "
            f"{_num(x['random'])} ({x.get('random_seeds') or '–'}) | "
            f"{_per_seed(x.get('vs_random_by_seed'))} | {_num(x['kept_over_budget'], '.3f')} |"
        )
    return out


def _per_seed(diffs: dict[str, float] | None) -> str:
    """'+0.9 / -0.4 / +0.6 (2 of 3 above)', seeds in order; '–' without a shared seed."""
    if not diffs:
        return "–"
    values = [diffs[s] for s in sorted(diffs, key=int)]
    return " / ".join(f"{d:+.1f}" for d in values) + f" ({sum(d > 0 for d in values)} of {len(values)} above)"


def report(plan: Plan) -> Path:
    rows = collect(plan)
    payload = {"machine": machine(), "command": "python bench/pareto.py --report", "plan": {
        "steps": plan.steps, "batch_size": plan.batch_size, "max_length": plan.max_length,
        "seeds": plan.task_seeds()}, "verdicts": verdicts(rows),
        "other_tasks": {t: verdicts(rows, t) for t in sorted({r["task"] for r in rows if r["grid"]})
                        if t != "rotten_tomatoes"},
        "cells": [r for r in rows if r["grid"]],
        "sweep": [r for r in rows if not r["grid"]]}  # fmt: skip
    payload["structure"] = kept_structure(plan, rows)
    path = plan.out / "pareto.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot(rows, plan.out / "pareto.png")
    plot_structure(payload["structure"], plan.out / "pareto_structure.png")
    (plan.out / "pareto.md").write_text(markdown(payload))
    if plan.out == OUT:
        refresh_results_section(OUT)
    return path


def refresh_results_section(out: Path, results: Path = ROOT / "docs" / "RESULTS.md") -> None:
    """Write section 2 of docs/RESULTS.md (what `bench/report.py` renders from pareto.json) in place, so that
    the report need not be regenerated whole for it: it replaces the section, or goes before section 3."""
    from bench.grid import Plan as ReportPlan
    from bench.report import section_pareto

    section, facts = section_pareto(replace(ReportPlan(), out=out, report=results))
    if not facts or not results.is_file():
        return
    text = results.read_text()
    start = text.find("\n## 2. Accuracy against kept parameters")
    if start < 0:
        start = end = text.find("\n## 3. ")
        if start < 0:
            start = end = len(text.rstrip("\n"))
    else:
        end = text.find("\n## ", start + 1)
    text = text[:start].rstrip("\n") + "\n\n" + section + "\n" + (text[end:] if end >= 0 else "")
    results.write_text(text)


def kept_structure(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where ours and random put each budget: per task, family ("sla", "random") and budget %, the kept share
    of each candidate's rank units (`pruned.json`'s `kept_share`), averaged over the grid's seeds."""
    from sla_core.engine.cells import slug

    shares: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    for r in rows:
        if not r["grid"] or r["family"] not in ("sla", "random") or not r["budget_percent"]:
            continue
        pruned = plan.cells_dir / r["task"] / "runs" / slug(r["method"], r["seed"]) / "pruned.json"
        if not pruned.is_file():
            continue
        kept = json.loads(pruned.read_text()).get("kept_share", {}).get(r["task"])
        if kept:
            by_budget = shares.setdefault(r["task"], {}).setdefault(r["family"], {})
            by_budget.setdefault(f"{r['budget_percent']:g}", []).append(kept)
    out: dict[str, Any] = {}
    for task, fams in shares.items():
        for fam in sorted(fams, key=lambda f: f != "sla"):
            for b, runs in sorted(fams[fam].items(), key=lambda kv: float(kv[0])):
                mean = {
                    site: statistics.fmean(k.get(site, 0.0) for k in runs)
                    for site in sorted(set().union(*runs))
                }
                out.setdefault(task, {}).setdefault(fam, {})[b] = {"seeds": len(runs), "kept_share": mean}
    return out


KINDS = ("q", "k", "v", "attn", "ffn_in", "ffn")  # site kinds in a transformer block's order


def _site_grid(kept: dict[str, float]) -> tuple[list[str], list[str], list[list[float]]]:
    """Sites named `layer{i}.{kind}.{type}` as a layers x kinds table of kept shares (kinds in the order of
    a transformer block where known)."""
    cells: dict[tuple[str, str], float] = {}
    for site, share in kept.items():
        layer, kind = site.split(".")[:2]
        cells[(layer, kind)] = cells.get((layer, kind), 0.0) + share
    layers = sorted({lk[0] for lk in cells}, key=lambda s: (len(s), s))
    kinds = sorted({lk[1] for lk in cells}, key=_kind_order)
    return layers, kinds, [[cells.get((layer, kind), 0.0) for kind in kinds] for layer in layers]


def plot_structure(structure: dict[str, Any], path: Path) -> None:
    """One heat map per task, family and budget: the kept share of each candidate's rank units, by layer and
    projection (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, f, b, v) for t, fams in structure.items() for f, bs in fams.items() for b, v in bs.items()]
    if not panels:
        return
    rows = [(t, f) for t, fams in structure.items() for f in fams]
    cols = sorted({b for *_, b, _ in panels}, key=float)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.6 * len(rows)), dpi=110,
                             squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for task, fam, budget, v in panels:
        ax = axes[rows.index((task, fam))][cols.index(budget)]
        layers, kinds, grid_ = _site_grid(v["kept_share"])
        image = ax.imshow(grid_, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.axis("on")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, fontsize=7)
        ax.set_yticks(range(len(layers)), [layer.removeprefix("layer") for layer in layers], fontsize=7)
        ax.set_title(f"{budget} % ({v['seeds']} seed{'s' if v['seeds'] > 1 else ''})", fontsize=8)
        if cols.index(budget) == 0:
            ax.set_ylabel(f"{task}\n{fam}: layer", fontsize=8)
    fig.subplots_adjust(hspace=0.55, wspace=0.3)
    fig.colorbar(image, ax=axes, shrink=0.6, label="kept share of the site's rank units")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def _structure_lines(structure: dict[str, Any]) -> list[str]:
    """The share of the kept rank units per projection kind, ours against random, per task and budget."""
    out: list[str] = []
    for task, fams in structure.items():
        per_kind: dict[tuple[str, str], dict[str, float]] = {}
        for fam, budgets in fams.items():
            for b, v in budgets.items():
                _, kinds, table = _site_grid(v["kept_share"])
                per_kind[(fam, b)] = {k: sum(row[i] for row in table) for i, k in enumerate(kinds)}
        kinds = sorted({k for counts in per_kind.values() for k in counts}, key=_kind_order)
        out += ["", f"{task}: share of the kept rank units by projection (all layers; mean over seeds)", ""]
        out += [
            "| family | budget % | seeds | " + " | ".join(kinds) + " |",
            "|---|---|---|" + "---|" * len(kinds),
        ]
        for (fam, b), counts in per_kind.items():
            total = sum(counts.values()) or 1.0
            shares = " | ".join(f"{100 * counts.get(k, 0.0) / total:.0f} %" for k in kinds)
            out.append(f"| {fam} | {b} | {fams[fam][b]['seeds']} | {shares} |")
    return out


STYLES = (("lora", "o-"), ("sla", "s-"), ("random", "x--"), ("adapters", "^"), ("full_ft", "*"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against kept % per method family, one panel per task (Rotten Tomatoes first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {r["task"] for r in rows if r.get("grid", True)}
    tasks = sorted(found, key=lambda t: (t != "rotten_tomatoes", t)) or ["rotten_tomatoes"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.5), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        m = means(rows, task)
        for fam, style in STYLES:
            pts = sorted((v["kept_percent"], v["accuracy"]) for v in m.values() if v["family"] == fam)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=fam)
        ax.set_xscale("log")
        ax.set_xlabel("kept parameters, % of MiniLM (log)")
        ax.set_ylabel(f"{task} test accuracy, % (mean over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="Run the learning-rate sweep first.")
    parser.add_argument(
        "--report",
        action="store_true",
        help="Only write the report from the cells: pareto.json, .md, .png and pareto_structure.png.",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="List the cells with their state (done, started, todo) and the training time left, and exit.",
    )
    parser.add_argument("--quick", action="store_true", help="A tiny grid (smoke test).")
    parser.add_argument("--out", type=Path, default=OUT, help="Output folder (default docs/results).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process.")
    parser.add_argument(
        "--extra",
        metavar="METHOD",
        action="append",
        default=[],
        help="Also run this method (its options and lr spelled out, as `sla compare` takes them) on "
        "rotten_tomatoes at --seeds: a variant outside the grid, listed apart in the report. Repeatable.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds of the --extra cells.")
    parser.add_argument(
        "--only",
        metavar="REGEX",
        help="Run only the grid cells whose 'task method seed' line (as --plan prints it) matches, e.g. "
        "'^rotten_tomatoes (sla|random):budget=0.00[12]'.",
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    plan = replace(QUICK if args.quick else Plan(), out=args.out)
    cells = grid(plan)
    if args.only:
        cells = [c for c in cells if re.search(args.only, " ".join(map(str, c)))]
    if args.extra:
        from sla_core.methods import parse_method

        for spec in args.extra:
            try:
                parse_method(spec)  # a bad method or option fails here, before any cell runs
            except ValueError as err:
                parser.error(f"--extra: {err}")
        extra = [("rotten_tomatoes", spec, s) for s in args.seeds for spec in args.extra]
        cells = extra if args.only is None and not args.sweep else cells + extra
    if args.plan:
        lines, summary = cell_status(plan, cells)
        print(*lines, summary, sep="\n")
        return 0
    if args.sweep:
        print("learning rates:", sweep(plan))
    if not args.report:
        run_cells(plan, cells)
    print(f"wrote {report(plan)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
