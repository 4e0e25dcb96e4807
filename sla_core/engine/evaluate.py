"""Evaluation: accuracy and macro-F1 per task, split and noise level, before and after pruning.

`finalize` is the end of a training run: it evaluates the trained model, prunes it, evaluates the pruned
model, exports the pruned adapter set to `<run_dir>/adapters/` and writes `<run_dir>/metrics.json` beside
it. Nothing here imports DeepSpeed; the functions take any model whose forward returns `SLAOutput`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sla_core.data import DatasetRef, noisy_eval_ref
from sla_core.data.sampling import eval_batches
from sla_core.engine.files import atomic_write_text
from sla_core.experiment import ExperimentConfig
from sla_core.model import SLAModel
from sla_core.tracking import NullTracker, Tracker

SPLITS = ("validation", "test")
ADAPTERS_DIR = "adapters"
METRICS_FILE = "metrics.json"


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts; rows are true labels, columns predictions."""
    index = labels.long() * num_labels + preds.long()
    return torch.bincount(index, minlength=num_labels * num_labels).view(num_labels, num_labels)


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (over labels that occur as truth or prediction, as scikit-learn does)."""
    conf = confusion.double()
    n = conf.sum()
    tp = conf.diag()
    support, predicted = conf.sum(1), conf.sum(0)
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp(min=1), torch.zeros_like(tp))
    macro = f1[present].mean() if bool(present.any()) else torch.tensor(0.0)
    return {"accuracy": float(tp.sum() / n) if n > 0 else 0.0, "macro_f1": float(macro), "n": int(n)}


@torch.no_grad()
def confusion_on(
    model: Callable[..., Any],
    batches: Iterable[dict[str, torch.Tensor]],
    num_labels: int,
    loss_sum: list[float] | None = None,
) -> torch.Tensor:
    """Run `model` over `batches` and count (label, prediction) pairs; adds the summed cross-entropy to
    `loss_sum[0]` when given (the validation loss: a finer early signal than accuracy for ASHA)."""
    total = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for batch in batches:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
        )
        logits = out.logits[:, :num_labels].float().cpu()  # (B, L)
        total += confusion_matrix(logits.argmax(dim=-1), batch["labels"], num_labels)
        if loss_sum is not None:
            loss_sum[0] += float(F.cross_entropy(logits, batch["labels"].long(), reduction="sum"))
    return total


def level_key(level: float) -> str:
    return "clean" if level == 0 else f"noise{level:g}"


def evaluate_tasks(
    model: SLAModel,
    refs: Mapping[str, DatasetRef],
    tokenizer: Any,
    levels: Mapping[str, Sequence[float]],
    *,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 64,
    seeds: Mapping[str, int] | None = None,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{task: {split: {"clean" | "noise<level>": {accuracy, macro_f1, n}}}} with the model in eval mode.

    Noisy copies (char and word noise at each level > 0) come from `noisy_eval_ref`, cached beside the data.
    """
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for task, ref in refs.items():
        task_id = model.task_index(task)
        out[task] = {}
        for split in splits:
            out[task][split] = {}
            for level in sorted({0.0, *levels.get(task, ())}):
                source = (
                    ref
                    if level == 0
                    else noisy_eval_ref(ref, split, level, tokenizer, (seeds or {}).get(task, 0))
                )
                conf = confusion_on(model, eval_batches(source, split, batch_size, task_id), ref.num_labels)
                out[task][split][level_key(level)] = scores(conf)
    model.train(was_training)
    return out


def validate(
    model: Callable[..., Any], refs: Mapping[str, DatasetRef], task_ids: Mapping[str, int], batch_size: int
) -> dict[str, float]:
    """Clean validation accuracy and macro-F1 per task and their means (`val_accuracy`, `val_macro_f1`).

    `model` may be a DeepSpeed engine: under ZeRO-3 every rank must call this with the same data."""
    metrics: dict[str, float] = {}
    for task, ref in refs.items():
        loss = [0.0]
        conf = confusion_on(
            model, eval_batches(ref, "validation", batch_size, task_ids[task]), ref.num_labels, loss
        )
        s = scores(conf)
        metrics[f"{task}/val_accuracy"], metrics[f"{task}/val_macro_f1"] = s["accuracy"], s["macro_f1"]
        metrics[f"{task}/val_loss"] = loss[0] / max(s["n"], 1)
    for name in ("val_accuracy", "val_macro_f1", "val_loss"):
        metrics[name] = _mean(v for k, v in metrics.items() if k.endswith(f"/{name}"))
    return metrics


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def gate_map(model: SLAModel) -> dict[str, Any]:
    """The learned structure: per task, each candidate's P(open) and its decided gate values (before
    pruning), and the candidates each task keeps."""
    probs = model.gate_probabilities()
    out: dict[str, Any] = {"candidates": model.candidate_names(), "probability": probs}
    if model.pruned:
        out["open"] = {t: [c for c, p in row.items() if p > 0] for t, row in probs.items()}
        return out
    decided = model.decided_gates()  # (T, C, K)
    names = model.candidate_names()
    out["decided"] = {
        t: {names[c]: decided[i, c].tolist() for c in range(len(names))}
        for i, t in enumerate(model.config.task_names)
    }
    out["open"] = {
        t: [names[c] for c in range(len(names)) if bool((decided[i, c] > 0).any())]
        for i, t in enumerate(model.config.task_names)
    }
    return out


def projected_trainable_percent(model: SLAModel) -> float:
    """Trainable % of the backbone that pruning would leave now: open adapters plus heads (gates go)."""
    counts = model.parameter_counts()
    kept = (model.decided_gates() > 0).any(dim=0).to(model.member_params.dtype)  # (C, K)
    adapters = float((kept * model.member_params).sum())
    return 100.0 * (adapters + counts["heads"]) / counts["backbone"]


def summarize(before: dict, after: dict, percent_before: float, percent_after: float) -> dict[str, float]:
    """Flat metrics for trackers and search: means over tasks (clean, after pruning) and per-task values."""
    summary: dict[str, float] = {}
    for task, by_split in after.items():
        for split, by_level in by_split.items():
            prefix = "val" if split == "validation" else split
            for level, s in by_level.items():
                tail = "" if level == "clean" else f"_{level}"
                summary[f"{task}/{prefix}_accuracy{tail}"] = s["accuracy"]
                summary[f"{task}/{prefix}_macro_f1{tail}"] = s["macro_f1"]
            summary[f"{task}/{prefix}_accuracy_before"] = before[task][split]["clean"]["accuracy"]
    for prefix, name in (("val", "val_{}"), ("test", "test_{}_mean")):
        for metric in ("accuracy", "macro_f1"):
            summary[name.format(metric)] = _mean(summary[f"{t}/{prefix}_{metric}"] for t in after)
    summary["trainable_percent_before"] = percent_before
    summary["trainable_percent_after"] = percent_after
    return summary


def noise_measured(
    refs: Mapping[str, DatasetRef],
    levels: Mapping[str, Sequence[float]],
    tokenizer: Any,
    seeds: Mapping[str, int],
) -> dict[str, Any]:
    """The measured character/word noise ratios of every noisy evaluation copy (cached, so cheap)."""
    out: dict[str, Any] = {}
    for task, ref in refs.items():
        out[task] = {
            split: {
                level_key(lv): noisy_eval_ref(ref, split, lv, tokenizer, seeds.get(task, 0))
                .noise[split]
                .get("measured")
                for lv in levels.get(task, ())
                if lv > 0
            }
            for split in SPLITS
        }
    return out


def finalize(
    model: SLAModel,
    refs: Mapping[str, DatasetRef],
    tokenizer: Any,
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    step: int,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Evaluate, prune, evaluate again, export the pruned set and write `metrics.json` beside it.

    Args:
        model: the trained, unpruned model (it is pruned in place).
    Returns:
        the report written to `<run_dir>/metrics.json`; its `summary` holds the flat metrics.
    """
    tracker = tracker or NullTracker()
    levels = {t.name: list(t.eval_noise_levels) for t in cfg.tasks}
    seeds = {t.name: t.split_seed for t in cfg.tasks}
    kwargs = {"batch_size": cfg.train.eval_batch_size, "seeds": seeds}
    counts_before, percent_before = model.parameter_counts(), model.trainable_percent()
    noisy_before = cfg.train.eval_noisy_before_pruning
    before = evaluate_tasks(model, refs, tokenizer, levels if noisy_before else {}, **kwargs)
    gates = gate_map(model)
    pruned = model.prune(inplace=True).eval()
    after = evaluate_tasks(pruned, refs, tokenizer, levels, **kwargs)
    summary = summarize(before, after, percent_before, pruned.trainable_percent())
    report = {
        "run": {"name": cfg.name, "backbone": cfg.backbone, "step": step, "tasks": list(refs)},
        "summary": summary,
        "tasks": {t: {"before": before[t], "after": after[t]} for t in refs},
        "trainable_percent": {"before": percent_before, "after": pruned.trainable_percent()},
        "parameter_counts": {"before": counts_before, "after": pruned.parameter_counts()},
        "gates": gates,
        "noise_measured": noise_measured(refs, levels, tokenizer, seeds),
        "datasets": {t: {"fingerprint": r.fingerprint, "counts": r.counts} for t, r in refs.items()},
    }
    adapters = Path(run_dir) / ADAPTERS_DIR
    pruned.save_adapters(str(adapters), extra={"step": step, "summary": summary})
    metrics_path = Path(run_dir) / METRICS_FILE
    atomic_write_text(metrics_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    tracker.log_metrics(summary, step=step)
    tracker.log_artifact(adapters, ADAPTERS_DIR)
    tracker.log_artifact(metrics_path)
    return report


def evaluate_adapters(
    model: nn.Module, refs: Mapping[str, DatasetRef], tokenizer: Any, cfg: ExperimentConfig
) -> dict[str, Any]:
    """Evaluate a loaded adapter set (pruned or not) on every task's splits and noise levels."""
    assert isinstance(model, SLAModel)
    levels = {t.name: list(t.eval_noise_levels) for t in cfg.tasks}
    seeds = {t.name: t.split_seed for t in cfg.tasks}
    results = evaluate_tasks(
        model, refs, tokenizer, levels, batch_size=cfg.train.eval_batch_size, seeds=seeds
    )
    return {"tasks": results, "trainable_percent": model.trainable_percent(), "gates": gate_map(model)}
