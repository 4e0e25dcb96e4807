"""The model card: a `README.md` beside the shipped adapters, written by `prune` and completed by `evaluate`.

`model_card` is pure (artefact and metrics in, Markdown out). Adapter sets are sealed by the digest of their
description file only, so a README in the set's folder does not disturb loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sla_core.engine.result import PrunedAdapterSet

CARD_FILE = "README.md"
TOP_GATES = 5  # candidates shown per task in the gate map
COLUMNS = (  # (summary suffix, column title)
    ("val_accuracy", "val accuracy"),
    ("test_accuracy", "test accuracy"),
    ("test_macro_f1", "test macro-F1"),
    ("test_accuracy_before", "test accuracy before pruning"),
)


def model_card(pruned: PrunedAdapterSet, metrics: dict[str, float] | None = None) -> str:
    """Markdown describing a pruned set: backbone, method, tasks, parameter counts, the kept structure and
    the gate map, and (when given) the evaluation's metrics (`EvaluationReport.summary`)."""
    tasks = _tasks(pruned, metrics or {})
    lines = [*_front_matter(pruned.backbone), f"# {pruned.method} adapters for `{pruned.backbone}`", ""]
    lines += [
        f"Structure-learnable gated adapters (`sla`), method `{pruned.method}`, trained for {pruned.step} "
        f"steps on the frozen backbone `{pruned.backbone}`; tasks: {', '.join(tasks) or 'not recorded'}.",
        "",
        "```python",
        "from sla_core.backbones import load_backbone",
        "from sla_core.methods import load_trained",
        "",
        f'method, model = load_trained(load_backbone("{pruned.backbone}"), "<this folder>")',
        "```",
        "",
        *_counts(pruned),
    ]
    if pruned.open_candidates:
        lines += _structure(pruned)
    if metrics:
        lines += _metrics(tasks, metrics)
    return "\n".join(lines).rstrip() + "\n"


def write_card(pruned: PrunedAdapterSet, metrics: dict[str, float] | None = None) -> Path:
    """Write the card into the set's folder (atomically) and return its path."""
    from sla_core.files import atomic_write_text

    path = Path(pruned.path) / CARD_FILE
    atomic_write_text(path, model_card(pruned, metrics))
    return path


def _front_matter(backbone: str) -> list[str]:
    base = backbone.count("/") == 1 and not backbone.startswith((".", "/", "~"))  # a hub id, not a path
    return ["---", "library_name: sla", *([f"base_model: {backbone}"] if base else []), "---", ""]


def _tasks(pruned: PrunedAdapterSet, metrics: dict[str, Any]) -> list[str]:
    names = list(pruned.open_candidates) or list(pruned.gate_probability)
    for key in metrics:
        task = key.partition("/")[0]
        if "/" in key and task not in names:
            names.append(task)
    return names


def _counts(pruned: PrunedAdapterSet) -> list[str]:
    rows = ["## Parameters", "", "| | before pruning | shipped |", "|---|---:|---:|"]
    for key in ("backbone", "trainable", "kept"):
        if key in pruned.counts_before or key in pruned.counts_after:
            before, after = pruned.counts_before.get(key), pruned.counts_after.get(key)
            rows.append(f"| {key} | {_int(before)} | {_int(after)} |")
    rows.append(
        f"| trainable % of the backbone | {pruned.trainable_percent_before:.4f} | "
        f"{pruned.trainable_percent_after:.4f} |"
    )
    return [*rows, ""]


def _structure(pruned: PrunedAdapterSet) -> list[str]:
    rows = ["## Kept structure", "", "| task | open candidates | of |", "|---|---:|---:|"]
    for task, kept in pruned.open_candidates.items():
        rows.append(f"| {task} | {len(kept)} | {len(pruned.gate_probability.get(task, {})) or '?'} |")
    # several units per candidate: P(any unit open) is near 1 for every kept one; the share kept tells more
    share = bool(pruned.kept_share)
    by = "share of its units kept" if share else "P(open)"
    rows += ["", f"## Gate map (top {TOP_GATES} open candidates per task, by {by})", ""]
    for task, kept in pruned.open_candidates.items():
        probs = (pruned.kept_share if share else pruned.gate_probability).get(task, {})
        top = sorted(kept, key=lambda c: -probs.get(c, 0.0))[:TOP_GATES]
        shown = ", ".join(f"`{c}` {probs.get(c, float('nan')):.3f}" for c in top) or "none (the head alone)"
        rows.append(f"- {task}: {shown}")
    return [*rows, ""]


def _metrics(tasks: list[str], metrics: dict[str, float]) -> list[str]:
    cols = [(k, title) for k, title in COLUMNS if any(f"{t}/{k}" in metrics for t in tasks)]
    if not cols:
        return []
    rows = ["## Metrics", "", "| task | " + " | ".join(t for _, t in cols) + " |"]
    rows.append("|---|" + "---:|" * len(cols))
    for task in tasks:
        rows.append(f"| {task} | " + " | ".join(_num(metrics.get(f"{task}/{k}")) for k, _ in cols) + " |")
    return [*rows, ""]


def _int(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


__all__ = ["CARD_FILE", "model_card", "write_card"]
