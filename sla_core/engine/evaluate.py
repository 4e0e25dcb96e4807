"""Evaluation: accuracy and macro-F1 per task, split and noise level; validation during training.

Nothing here imports DeepSpeed; the functions take any model whose forward returns `SLAOutput` (ours and
the baselines' `HeadModel`) and has a `task_index(task)`. The evaluate stage (`sla_core.engine.stages`)
composes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sla_core.data import DatasetRef, noisy_eval_ref
from sla_core.data.sampling import eval_batches
from sla_core.engine.placement import model_device, to_device
from sla_core.model import SLAModel

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
    bar: Any | None = None,
) -> torch.Tensor:
    """Run `model` over `batches` and count (label, prediction) pairs; adds the summed cross-entropy to
    `loss_sum[0]` when given (the validation loss: a finer early signal than accuracy for ASHA). Batches
    move to the model's device; counting happens on the CPU. `bar` (a tqdm bar) advances once a batch."""
    total = torch.zeros(num_labels, num_labels, dtype=torch.long)
    device = model_device(model)
    for cpu_batch in batches:
        batch = to_device(cpu_batch, device)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]
        )
        logits = out.logits[:, :num_labels].float().cpu()  # (B, L)
        total += confusion_matrix(logits.argmax(dim=-1), cpu_batch["labels"], num_labels)
        if loss_sum is not None:
            loss_sum[0] += float(F.cross_entropy(logits, cpu_batch["labels"].long(), reduction="sum"))
        if bar is not None:
            bar.update(1)
    return total


def level_key(level: float, kind: str = "char+word") -> str:
    """The result's key: `clean`, `noise<level>` (char and word noise), `word<level>` or `char<level>`."""
    return "clean" if level == 0 else f"noise{level:g}" if kind == "char+word" else f"{kind}{level:g}"


def evaluate_tasks(
    model: nn.Module,
    refs: Mapping[str, DatasetRef],
    tokenizer: Any,
    levels: Mapping[str, Sequence[float]],
    *,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 64,
    seeds: Mapping[str, int] | None = None,
    progress: bool | None = None,
    desc: str = "evaluate",
    kinds: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{task: {split: {"clean" | "noise<level>" | ...: {accuracy, macro_f1, n}}}} with the model in eval mode.

    Noisy copies (at each level > 0, of each of the task's `kinds`: char and word noise by default, keyed
    `level_key`) come from `noisy_eval_ref`, cached beside the data. `progress` shows a bar over all
    evaluation batches (None: only on a terminal).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    passes = [
        (task, split, level, kind)
        for task in refs
        for split in splits
        for level in sorted({0.0, *levels.get(task, ())})
        for kind in (("char+word",) if level == 0 else (kinds or {}).get(task, ("char+word",)))
    ]
    total = sum(math.ceil(refs[t].counts.get(s, 0) / batch_size) for t, s, _, _ in passes)
    disable = None if progress is None else not progress
    with tqdm(total=total, desc=desc, unit="batch", disable=disable, dynamic_ncols=True) as bar:
        for task, split, level, kind in passes:
            ref = refs[task]
            key = level_key(level, kind)
            bar.set_postfix_str(f"{task} {split} {key}", refresh=False)
            seed = (seeds or {}).get(task, 0)
            source = ref if level == 0 else noisy_eval_ref(ref, split, level, tokenizer, seed, kind=kind)
            batches = eval_batches(source, split, batch_size, model.task_index(task))
            conf = confusion_on(model, batches, ref.num_labels, bar=bar)
            out.setdefault(task, {}).setdefault(split, {})[key] = scores(conf)
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
    pruning), the candidates each task keeps and, where a candidate has several units, the share kept."""
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
    if decided.shape[-1] > 1:  # several units per candidate: P(any open) says little, the kept share more
        share = (decided > 0).float().mean(dim=-1)  # (T, C)
        out["kept_share"] = {
            t: {names[c]: float(share[i, c]) for c in range(len(names))}
            for i, t in enumerate(model.config.task_names)
        }
    return out


def summarize(results: dict, before: dict | None = None) -> dict[str, float]:
    """Flat metrics for trackers and search: per-task values and means over tasks (clean); with `before`
    (the unpruned model's results), each task's clean accuracy before pruning too."""
    summary: dict[str, float] = {}
    for task, by_split in results.items():
        for split, by_level in by_split.items():
            prefix = "val" if split == "validation" else split
            for level, s in by_level.items():
                tail = "" if level == "clean" else f"_{level}"
                summary[f"{task}/{prefix}_accuracy{tail}"] = s["accuracy"]
                summary[f"{task}/{prefix}_macro_f1{tail}"] = s["macro_f1"]
            if before is not None:
                summary[f"{task}/{prefix}_accuracy_before"] = before[task][split]["clean"]["accuracy"]
    for prefix, name in (("val", "val_{}"), ("test", "test_{}_mean")):
        for metric in ("accuracy", "macro_f1"):
            values = [
                summary[f"{t}/{prefix}_{metric}"] for t in results if f"{t}/{prefix}_{metric}" in summary
            ]
            if values:
                summary[name.format(metric)] = _mean(values)
    return summary


def noise_measured(
    refs: Mapping[str, DatasetRef],
    levels: Mapping[str, Sequence[float]],
    tokenizer: Any,
    seeds: Mapping[str, int],
    kinds: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The measured character/word noise ratios of every noisy evaluation copy (cached, so cheap)."""
    out: dict[str, Any] = {}
    for task, ref in refs.items():
        out[task] = {
            split: {
                level_key(lv, kind): noisy_eval_ref(ref, split, lv, tokenizer, seeds.get(task, 0), kind=kind)
                .noise[split]
                .get("measured")
                for lv in levels.get(task, ())
                if lv > 0
                for kind in (kinds or {}).get(task, ("char+word",))
            }
            for split in SPLITS
        }
    return out
