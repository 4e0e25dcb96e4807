"""Presentation for docs/RESULTS.md: figures (matplotlib, Agg) and Markdown tables; plain data in."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = tuple[Sequence[float], Sequence[float]]  # (means, standard deviations), one per x value


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lambda_plot(lambdas: Sequence[float], accuracy: Series, kept: Series, path: Path) -> Path:
    """Accuracy and kept trainable percentage against λ (symlog x axis, since λ = 0 is included)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    panels = ((ax1, accuracy, "test accuracy (%)"), (ax2, kept, "kept after pruning (%)"))
    for ax, (mean, std), label in panels:
        ax.errorbar(lambdas, mean, yerr=std, marker="o", capsize=3)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("λ (sparsity weight)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("λ sensitivity (ours, single task)")
    return _save(fig, path)


# ----------------------------------------------------------------------------------- Markdown
def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    xs = list(xs)
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def fmt(xs: Sequence[float], digits: int = 1) -> str:
    """`mean ± sd` over seeds, the value alone for one seed, a dash for none."""
    if not xs:
        return "—"
    m, sd = mean_sd(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def _mean(xs: Sequence[float], digits: int = 3) -> str:
    return f"{mean_sd(xs)[0]:.{digits}f}" if xs else "—"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machines(results: Sequence[Mapping[str, Any]]) -> str:
    """Which machine(s) produced these cells, and the load average at their start."""
    if not results:
        return "no cells yet"
    kinds = set()
    for r in results:
        m = r["machine"]
        where = m.get("cuda") or f"{m['cpu_count']} CPU cores, {m['threads']} torch threads"
        kinds.add(f"{where}, torch {m['torch']}, commit {m['commit']}")
    loads = [r["machine"]["loadavg_at_start"][0] for r in results]
    return f"{'; '.join(sorted(kinds))}; 1-min load average at cell start {min(loads):.1f}-{max(loads):.1f}"


def main_table(
    facts: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], labels: Mapping[str, str]
) -> str:
    """Section 1: accuracy per task, average, macro-F1, trainable and kept percentages per method."""
    header = [
        "method",
        *(labels.get(t, t) for t in tasks),
        "average",
        "macro-F1 (avg)",
        "trainable %",
        "kept % after pruning",
        "s/step (measured)",
        "seeds",
    ]
    rows = []
    for method, f in facts.items():
        matched = method == "lora_matched" and f["ranks"]
        label = labels[method] + (f" (r={'/'.join(map(str, f['ranks']))})" if matched else "")
        accs = [fmt(f["acc"][t]) for t in tasks]
        n = max((len(v) for v in f["acc"].values()), default=0)
        share = [_mean(f["trainable"]), _mean(f["kept"])]  # heads differ by label count: no sd
        rows.append([label, *accs, fmt(f["avg"]), fmt(f["f1"]), *share, _mean(f["step_s"], 2), str(n)])
    return md_table(header, rows)


def sweep_table(
    first: str, sweep: Mapping[Any, Mapping[str, Any]], columns: Mapping[str, tuple[str, int]]
) -> str:
    """One row per swept value; `columns` maps a fact name to (header, decimals)."""
    rows = [
        [f"{value:g}" if isinstance(value, float) else str(value)]
        + [fmt(f.get(k, []), digits) for k, (_, digits) in columns.items()]
        for value, f in sweep.items()
    ]
    return md_table([first, *(h for h, _ in columns.values())], rows)


def ratio_lines(data: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every number under a key containing 'ratio' in a benchmark JSON, with its dotted path."""
    out: list[tuple[str, float]] = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, int | float) and "ratio" in path:
                out.append((path, float(v)))
            else:
                out.extend(ratio_lines(v, path))
    return out


def unit_use(structure: Mapping[str, Any]) -> list[int]:
    """How many rank units are kept by 0, 1, ..., T tasks (decided gates (T, C, K))."""
    decided = structure["decided_gates"]
    counts = [0] * (len(decided) + 1)
    for c in range(len(decided[0])):
        for k in range(len(decided[0][c])):
            counts[sum(decided[t][c][k] > 0 for t in range(len(decided)))] += 1
    return counts


def sharing_plot(structure: Mapping[str, Any], path: Path, title: str) -> Path:
    """Per candidate site: kept units dedicated to one task (one colour per task) and shared by 2+ tasks."""
    decided, tasks, names = structure["decided_gates"], structure["tasks"], structure["candidates"]
    T, C = len(decided), len(names)
    dedicated = [[0] * C for _ in range(T)]
    shared = [0] * C
    for c in range(C):
        for k in range(len(decided[0][c])):
            users = [t for t in range(T) if decided[t][c][k] > 0]
            if len(users) == 1:
                dedicated[users[0]][c] += 1
            elif users:
                shared[c] += 1
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * C), 3.6))
    bottom = [0] * C
    for t in range(T):
        ax.bar(range(C), dedicated[t], bottom=bottom, label=f"{tasks[t]} only")
        bottom = [b + d for b, d in zip(bottom, dedicated[t], strict=True)]
    ax.bar(range(C), shared, bottom=bottom, label="shared by 2+ tasks", color="0.3")
    ax.set_xticks(range(C))
    ax.set_xticklabels([n.removesuffix(".lora") for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("kept rank units")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def noise_panels(
    levels: Sequence[float], series: Mapping[str, Mapping[str, Series]], titles: Mapping[str, str], path: Path
) -> Path:
    """One panel per noise kind: accuracy against the level, one line per (method, training)."""
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 3.8), squeeze=False)
    x = [100 * p for p in levels]
    for ax, (kind, lines) in zip(axes[0], series.items(), strict=True):
        for name, (mean, std) in lines.items():
            style = "--" if "trained at" in name else "-"
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, linestyle=style, label=name)
        ax.set_xlabel("noise level (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(titles.get(kind, kind))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------- computed verdicts
TOL_PP = 0.5  # accuracy points within which two methods count as equal (or the seeds' standard error)
LITTLE_PP = 2.0  # "little loss" under noise: at most this many accuracy points below clean


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), tolerance = max(TOL_PP, standard error of the difference))."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return ma - mb, max(TOL_PP, se)


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**held**" if ok else "**not held**")


def series(facts: Sequence[Mapping[str, Sequence[float]]], key: str) -> Series:
    """(means, standard deviations) of `key` over a sequence of fact dicts."""
    stats = [mean_sd(f[key]) for f in facts]
    return [m for m, _ in stats], [s for _, s in stats]


# ------------------------------------------------------------------------------------ report prose
def setup_md(
    plan: Any, lrs: Mapping[str, float], large_lrs: Mapping[str, float], gate_lr: float, test_rows: str
) -> str:
    """The settings every method in a table shares."""
    cap = "" if plan.max_train_examples is None else f" (at most {plan.max_train_examples})"
    return "\n".join([
        "## Setup (identical for every method in a table)",
        f"- Data: the shipped Rotten Tomatoes (movie-disjoint split), tweets and BBC News tasks; all "
        f"training rows{cap}; test sets capped at {plan.max_eval_examples} rows, a seeded "
        f"subset ({test_rows}). The same split for every method.",
        f"- Training: {plan.steps} steps on MiniLM (the epochs per task are under 'Step budgets') / "
        f"{plan.large_steps} on "
        f"the decoder, batch {plan.batch_size}, max_length {plan.max_length}, the same seeded batches for "
        "every method, AdamW, linear warm-up over 10 % of the steps then linear decay to 0, gradient "
        "clipping at 1.0: the training engine's loop, as `sla train` runs it (`bench/harness.py` writes "
        "each cell's config).",
        f"- Learning rates on MiniLM: {', '.join(f'{m} {lr:g}' for m, lr in lrs.items())} (each family's "
        "best on validation in the Pareto sweep, `docs/results/pareto_lr.json`; prefix tuning not swept); "
        f"on the decoder: {', '.join(f'{m} {large_lrs[m]:g}' for m in plan.large_methods)}; gates "
        f"{gate_lr:g}.",
        "- Ours: the product's default recipe (`sla train` with no size named, `DEFAULT_RECIPE`): rank-1 "
        "LoRA-type units, 8 per linear layer (q, k, v, attention output, feed-forward in and out of every "
        "layer); over the first half of the steps each step runs exactly the budget's structure, a "
        "knapsack over the units ranked by sensitivity (|gradient x weight|), the target falling from all "
        "units to the budget over 150 steps; then the structure is decided and trains alone. Budget 0.2 % "
        "of the backbone per task (the multi-task model: 0.6 %, one set of units that every task gates, "
        "a unit paid once whoever uses it; mixed-task batches with near-uniform task sampling; three times "
        "the steps).",
        "- Baselines: backbone + mean pooling (last token for decoders) + linear head; LoRA with alpha = 2r "
        "on q,v (PEFT); prefix tuning with 20 virtual tokens (PEFT, FEATURE_EXTRACTION); fixed adapters = "
        "our bottleneck adapters of rank 8 at every site with no gates.",
        "- Evaluation: accuracy and macro-F1 on the test split; ours is evaluated after pruning (what it "
        "ships).",
    ])  # fmt: skip


def time_md(plan: Any, rows: Sequence[tuple], step_s: Mapping[str, float], eval_s: float, epochs: str) -> str:
    """The step budgets, and estimated idle against measured minutes per section."""
    table = [
        [s, str(n), f"{e / 60:.0f}", f"{d}/{n}", f"{m / 60:.0f}", f"{left / 60:.0f}"]
        for s, n, e, m, d, left in rows
    ]
    total = [sum(r[i] for r in rows) for i in range(1, 6)]
    table.append([
        "all", str(total[0]), f"{total[1] / 60:.0f}", f"{total[3]}/{total[0]}", f"{total[2] / 60:.0f}",
        f"{total[4] / 60:.0f}",
    ])  # fmt: skip
    return "\n".join([
        "## Step budgets and time",
        f"MiniLM: {plan.steps} steps x batch {plan.batch_size} x max_length {plan.max_length} per "
        f"single-task cell ({plan.steps * plan.batch_size} examples; epochs: {epochs}). "
        f"Decoder: {plan.large_steps} steps. Seeds: main table and noise at 10 % "
        f"{list(plan.seeds)}, the λ sweep and the other noise levels {list(plan.sweep_seeds)}, the decoder "
        f"{list(plan.large_seeds)}. `python bench/results.py --plan` prints this before anything runs.",
        "",
        "Estimate per cell = overhead + steps x step time + test rows x evaluation time per noise level, in "
        "seconds of one core (one torch thread per process, two processes sharing the grid: `make results`), "
        f"with MiniLM step times (s) {', '.join(f'{m} {s:g}' for m, s in step_s.items())} (medians of "
        f"measured cells) and {eval_s:g} s per 1,000 test rows. Wall time is about half the core time with "
        "two processes. A cell shared by two sections counts once. Measured = each cell's own wall time "
        "(train, prune, evaluate) on the machine and load named under each table.",
        "",
        md_table(
            ["section", "cells", "estimated core-min", "cells done", "measured min", "core-min left"],
            table,
        ),
    ])  # fmt: skip


def speed_md(files: Mapping[str, Path], rel: Any) -> tuple[str, dict[str, Any]]:
    """Section 5 from the benchmark JSON files (they are never run here)."""
    md, facts = ["## 5. Speed and memory", "Ratios measured side by side in one run of each benchmark."], {}
    for name, path in files.items():
        if not path.is_file():
            md += ["", f"`{name}`: not measured yet; run `python bench/{name}.py` (writes `{rel(path)}`)."]
            continue
        data = facts[name] = json.loads(path.read_text())
        m, ratios = data.get("machine", {}), ratio_lines(data)
        where = m.get("cuda") or f"{m.get('cpu_count')} CPU cores"
        md += ["", f"`{rel(path)}` (`{data.get('command', name)}`; {where}, commit {m.get('commit')}):", ""]
        md.append(
            md_table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios]) if ratios else "no ratios"
        )
    return "\n".join(md), facts
