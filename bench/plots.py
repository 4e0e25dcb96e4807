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


def noise_plot(levels: Sequence[float], series: Mapping[str, Series], path: Path, title: str) -> Path:
    """Accuracy against noise level; labels '<method>, <kind>' share a colour per method, and the kind
    'test noise only' is dashed."""
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    xs = [100 * x for x in levels]
    colours: dict[str, str] = {}
    for label, (mean, std) in series.items():
        method = label.rsplit(", ", 1)[0]
        colour = colours.setdefault(method, f"C{len(colours)}")
        bars = ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=colour, label=label)
        if "test noise only" in label:
            bars.lines[0].set_linestyle("--")
    ax.set_xlabel("noise level (% character and word operations)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def budget_plot(requested: Sequence[float], achieved: Series, accuracy: Series, path: Path) -> Path:
    """Achieved against requested trainable percentage (with y = x), and accuracy per budget."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.errorbar(requested, achieved[0], yerr=achieved[1], marker="o", capsize=3, label="achieved")
    hi = max([*requested, *achieved[0]]) * 1.15
    ax1.plot([0, hi], [0, hi], color="grey", linestyle=":", label="y = x")
    ax1.set_xlabel("requested trainable (% of backbone)")
    ax1.set_ylabel("kept after pruning (% of backbone)")
    ax1.legend(fontsize=7)
    ax2.errorbar(requested, accuracy[0], yerr=accuracy[1], marker="o", capsize=3)
    ax2.set_xlabel("requested trainable (% of backbone)")
    ax2.set_ylabel("test accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle("Budget mode (ours, single task)")
    return _save(fig, path)


def gate_heatmap(
    values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], path: Path, title: str
) -> Path:
    """A (rows x cols) map of gate values in [0, 1], annotated."""
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.28 * len(rows) + 1.5))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
    fig.colorbar(image, ax=ax, label="gate value after training (0 = pruned)")
    ax.set_title(title, fontsize=9)
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


def gate_map(structure: Mapping[str, Any], path: Path, title: str) -> Path:
    """Heatmap of a cell's decided gates (T, C, K): candidates as rows, task x member as columns."""
    decided, tasks = structure["decided_gates"], structure["tasks"]
    cols = [f"{t} m{k}" for t in tasks for k in range(len(decided[0][0]))]
    values = [[decided[t][c][k] for t in range(len(tasks)) for k in range(len(decided[t][c]))]
              for c in range(len(structure["candidates"]))]  # fmt: skip
    return gate_heatmap(values, structure["candidates"], cols, path, title)


def member_use(structure: Mapping[str, Any]) -> list[int]:
    """How many pool members are open for 0, 1, ..., T tasks."""
    decided = structure["decided_gates"]  # (T, C, K)
    counts = [0] * (len(decided) + 1)
    for c in range(len(decided[0])):
        for k in range(len(decided[0][c])):
            counts[sum(decided[t][c][k] > 0 for t in range(len(decided)))] += 1
    return counts


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


def claim_not_worse(name: str, a: Sequence[float], b: Sequence[float]) -> list[str]:
    if not a or not b:
        return [name, "—", verdict(None)]
    d, tol = compare(a, b)
    m = mean_sd
    return [name, f"{m(a)[0]:.1f} vs {m(b)[0]:.1f} (Δ {d:+.1f}, tolerance {tol:.1f})", verdict(d >= -tol)]


def accuracy_claims(facts: Mapping[str, Any], labels: Mapping[str, str]) -> list[list[str]]:
    """Ours against full fine-tuning and LoRA, and the trainable share."""
    main, rows = facts["main"], []
    for ours in ("sla_single", "sla_multi"):
        for base in ("full_ft", "lora_qv_r8", "lora_matched"):
            name = f"{labels[ours]} ≥ {labels[base]}: MiniLM, average accuracy over the three tasks"
            rows.append(claim_not_worse(name, main[ours]["avg"], main[base]["avg"]))
    for b, f in facts["large"].items():
        for base in ("full_ft", "lora_qv_r8"):
            if base not in f:  # not in this table (SmolLM2 full fine-tuning is off by default)
                rows.append(
                    [f"{labels['sla_single']} ≥ {labels[base]}: {b}", "not in the grid", "not measured"]
                )
                continue
            task = next(iter(f["sla_single"]["acc"]))
            name = f"{labels['sla_single']} ≥ {labels[base]}: {b}, {task}"
            rows.append(claim_not_worse(name, f["sla_single"]["acc"][task], f[base]["acc"][task]))
    share = main["sla_multi"]["trainable"]
    measure = f"{fmt_s(share)} % trainable, {fmt_s(main['sla_multi']['kept'])} % kept" if share else "—"
    ok = abs(mean_sd(share)[0] / 1.4 - 1) <= 0.25 if share else None
    rows.append(["about 1.4 % trainable parameters (ours, multi-task; within ±25 %)", measure, verdict(ok)])
    return rows


def lambda_claims(sweep: Mapping[float, Mapping[str, Any]]) -> list[list[str]]:
    acc = {lam: mean_sd(f["acc"])[0] for lam, f in sweep.items() if f["acc"]}
    if 1.0 not in acc or len(acc) < 2:
        return [["λ near 1 is best", "—", verdict(None)], ["λ = 5 is harmful", "—", verdict(None)]]
    best = max(acc, key=acc.__getitem__)
    d_best, tol = compare(sweep[1.0]["acc"], sweep[best]["acc"])
    table = ", ".join(f"λ={lam:g}: {a:.1f}" for lam, a in acc.items())
    rows = [["λ near 1 is best (λ = 1 within tolerance of the best λ)", table, verdict(d_best >= -tol)]]
    if 5.0 in acc:
        d5, tol5 = compare(sweep[5.0]["acc"], sweep[1.0]["acc"])
        rows.append(
            ["λ = 5 is harmful (below λ = 1 by more than the tolerance)", f"Δ {d5:+.1f}", verdict(d5 < -tol5)]
        )
    return rows


def noise_claims(noise: Mapping[str, Mapping[float, Sequence[float]]]) -> list[list[str]]:
    """'Little loss' at 10 % and 15 % train and test noise, for ours (the baselines' changes shown beside)."""
    rows = []
    for level in (0.10, 0.15):
        change = {
            m: mean_sd(v[level])[0] - mean_sd(v[0.0])[0] for m, v in noise.items() if v[0.0] and v[level]
        }
        measure = ", ".join(f"{m} {d:+.1f}" for m, d in change.items()) or "—"
        ok = None if "sla_single" not in change else change["sla_single"] >= -LITTLE_PP
        claim = f"little loss at {100 * level:g} % noise (ours loses ≤ {LITTLE_PP:g} points)"
        rows.append([claim, measure, verdict(ok)])
    return rows


def other_claims(facts: Mapping[str, Any]) -> list[list[str]]:
    ratios = [r for f in facts["budget"].values() for r in f["ratio"]]
    worst = max((abs(r - 1) for r in ratios), default=None)
    rows = [["budget mode reaches the requested fraction (within ±10 %)",
             "—" if worst is None else f"worst achieved/requested off by {100 * worst:.0f} %",
             verdict(None if worst is None else worst <= 0.10)]]  # fmt: skip
    sla = [r for f in facts["main"].values() for r in f["results"] if r.get("structure")]
    change = max((r["structure"]["prune_max_logit_change"] for r in sla), default=None)
    rows.append(["pruning is exact (max logit change ≤ 1e-4)", "—" if change is None else f"{change:.2e}",
                 verdict(None if change is None else change <= 1e-4)])  # fmt: skip
    for backbone, data in (facts.get("step_time") or {}).get("backbones", {}).items():
        r = data.get("ratios", {})
        if "sla_train_over_lora_train" in r:
            x = r["sla_train_over_lora_train"]
            rows.append([f"train step ≤ 1.25 x LoRA's ({backbone})", f"{x:.2f}", verdict(x <= 1.25)])
        for k, x in r.items():
            if k.startswith("pruned_") and k.endswith("_infer_over_backbone"):  # all open and part kept
                rows.append(
                    [f"pruned inference ≤ 1.05 x backbone ({backbone}, {k})", f"{x:.2f}", verdict(x <= 1.05)]
                )
    return rows


def conclusions(facts: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Section 7: one row per claim of the paper, with the numbers and held / not held."""
    rows = accuracy_claims(facts, labels) + lambda_claims(facts["lambda"]) + noise_claims(facts["noise"])
    rows += other_claims(facts)
    return "\n".join([
        "## 7. Conclusions (computed from the tables above)",
        f"Rules: 'A ≥ B' holds when mean(A) ≥ mean(B) − tolerance, tolerance = max({TOL_PP} points, standard "
        f"error of the difference over seeds); 'little loss' = at most {LITTLE_PP:g} points below clean. "
        "A claim is 'not measured' while its cells are missing.",
        "",
        md_table(["claim", "measured", "verdict"], rows),
    ])  # fmt: skip


def fmt_s(xs: Sequence[float]) -> str:
    return f"{mean_sd(xs)[0]:.2f}"


def series(facts: Sequence[Mapping[str, Sequence[float]]], key: str) -> Series:
    """(means, standard deviations) of `key` over a sequence of fact dicts."""
    stats = [mean_sd(f[key]) for f in facts]
    return [m for m, _ in stats], [s for _, s in stats]


# ------------------------------------------------------------------------------------ report prose
def setup_md(plan: Any, lrs: Mapping[str, float], gate_lr: float, test_rows: str) -> str:
    """The settings every method in a table shares."""
    cap = "" if plan.max_train_examples is None else f" (at most {plan.max_train_examples})"
    return "\n".join([
        "## Setup (identical for every method in a table)",
        f"- Data: the shipped Rotten Tomatoes (movie-disjoint split), tweets and BBC News tasks; all "
        f"training rows{cap}; test sets capped at {plan.max_eval_examples} rows, a seeded "
        f"subset ({test_rows}). The same split for every method.",
        f"- Training: {plan.steps} steps (MiniLM) / {plan.large_steps} steps (large backbones), batch "
        f"{plan.batch_size}, max_length {plan.max_length}, the same seeded batches for every method "
        "(`MultiTaskBatches`), AdamW without weight decay, linear warm-up over 10 % of the steps then linear "
        "decay to 0, gradient clipping at 1.0, one plain PyTorch loop (`bench/harness.py`).",
        f"- Learning rates: {', '.join(f'{m} {lr:g}' for m, lr in lrs.items())}; gates and the budget "
        f"multiplier {gate_lr:g}. No per-method search.",
        "- Ours: rank 8 adapters on both paths (sequential, parallel) at the attention and feed-forward "
        "outputs of every layer, hard-concrete gates, λ = 1 reached linearly over the first 20 % of the "
        "steps; the penalty is the expected open gates weighted by parameters (averaged over tasks). "
        "Multi-task: a pool of 2 adapters per candidate shared by the three tasks, mixed-task "
        "batches with near-uniform task sampling, three times the steps (the compute of three "
        "single-task runs).",
        "- Baselines: backbone + mean pooling (last token for decoders) + linear head; LoRA with alpha = 2r "
        "on q,v; prefix tuning with 20 virtual tokens (PEFT, FEATURE_EXTRACTION); Houlsby = our code with "
        "fixed open gates on the sequential path only and λ = 0.",
        "- Evaluation: accuracy and macro-F1 on the test split; ours is evaluated after pruning (what it "
        "ships).",
    ])  # fmt: skip


def time_md(plan: Any, rows: Sequence[tuple], step_s: Mapping[str, float], eval_s: float, epochs: str) -> str:
    """The step budgets, and estimated idle against measured minutes per section."""
    table = [[s, str(n), f"{e / 60:.0f}", f"{d}/{n}", f"{m / 60:.0f}"] for s, n, e, m, d in rows]
    total = [sum(r[i] for r in rows) for i in range(1, 5)]
    table.append(
        ["all", str(total[0]), f"{total[1] / 60:.0f}", f"{total[3]}/{total[0]}", f"{total[2] / 60:.0f}"]
    )
    return "\n".join([
        "## Step budgets and time",
        f"MiniLM: {plan.steps} steps x batch {plan.batch_size} x max_length {plan.max_length} per "
        f"single-task cell ({plan.steps * plan.batch_size} examples; epochs: {epochs}). "
        f"Large backbones: {plan.large_steps} steps. Seeds: main table "
        f"{list(plan.seeds)}, sweeps (sections 2-4) {list(plan.sweep_seeds)}, large backbones "
        f"{list(plan.large_seeds)}.",
        "",
        "Estimate per cell = overhead + steps x step time + test rows x evaluation time per noise level, in "
        "seconds of one core (one torch thread per process, two processes sharing the grid: `make results`), "
        f"with MiniLM step times (s) {', '.join(f'{m} {s:g}' for m, s in step_s.items())} (medians of "
        f"measured cells) and {eval_s:g} s per 1,000 test rows. Wall time is about half the core time with "
        "two processes. A cell shared by two sections counts once. Measured = each cell's own wall time "
        "(train, prune, evaluate) on the machine and load named under each table.",
        "",
        md_table(["section", "cells", "estimated core-min", "cells done", "measured min"], table),
    ])  # fmt: skip


def speed_md(files: Mapping[str, Path], rel: Any) -> tuple[str, dict[str, Any]]:
    """Section 5 from the benchmark JSON files (they are never run here)."""
    md, facts = ["## 5. Speed and memory"], {}
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
