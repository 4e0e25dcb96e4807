"""The evidence harness: method builders, one plain PyTorch training loop, evaluation and a cell cache.

A *cell* is one training run: (method, backbone, tasks, seed, knobs) -> a JSON file under a cells folder,
named by a hash of every knob, and skipped when present, so an interrupted grid resumes. Every method
trains in the same loop: the same deterministic batches (`MultiTaskBatches`), steps, batch, max_length,
seed, AdamW and linear warm-up/decay; only the learning rate is per method (`DEFAULT_LR`).

Methods: full_ft, lora_qv_r8, lora_matched (LoRA on q,v with the rank that matches sla_single's trainable
count), prefix (PEFT prefix tuning), houlsby (fixed sequential adapters at every site, no gates),
sla_single, sla_multi (all tasks, shared pool of 2, mixed batches).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import HeadModel, machine
from sla_core import SLAConfig, attach
from sla_core.backbones import load_backbone, load_tokenizer
from sla_core.data import DatasetRef, NoiseSpec, TaskSpec, noisy_eval_ref, prepare_tasks
from sla_core.data.builtin import builtin_names, builtin_task
from sla_core.data.sampling import MultiTaskBatches, eval_batches
from sla_core.model import is_decoder

METHODS = ("full_ft", "lora_qv_r8", "lora_matched", "prefix", "houlsby", "sla_single", "sla_multi")
# Learning rates per method (no per-method search: these are the usual defaults for each family).
DEFAULT_LR = {
    "full_ft": 1e-4,  # the short budgets favour the top of the usual 5e-5..1e-4 (RESOURCES.md: 1e-4)
    "lora_qv_r8": 1e-3,
    "lora_matched": 1e-3,
    "prefix": 5e-3,
    "houlsby": 1e-3,
    "sla_single": 1e-3,
    "sla_multi": 1e-3,
}
GATE_LR = 0.05  # gates and the budget multiplier (configs/default.yaml's train.gate_lr)
LORA_TARGETS = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}  # other names: q_proj, v_proj
PREFIX_TOKENS = 20
ROOT = Path(__file__).resolve().parent.parent
# Part of every cell key: bump it when the loop, evaluation or builders change what a cell computes, so that
# cached cells from older code are not mixed with new ones.
HARNESS_VERSION = 1
ForwardFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Cell:
    """Every knob of one training run; the same cell always gives the same file name."""

    method: str
    backbone: str = "minilm"
    tasks: tuple[str, ...] = ("rotten_tomatoes",)
    seed: int = 0
    steps: int = 300
    batch_size: int = 16
    max_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = 1000
    lr: float | None = None  # None: DEFAULT_LR[method]
    warmup_fraction: float = 0.1
    rank: int = 8
    pool_size: int | None = None  # None: 2 for sla_multi, else 1
    lambda_sparse: float = 1.0
    lambda_warmup_fraction: float = 0.2
    budget: float | None = None
    train_noise: float = 0.0  # char and word noise ratio of the training texts
    eval_noise: tuple[float, ...] = ()  # test noise levels evaluated besides the clean test set
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Cell.method={self.method!r}: choose one of {METHODS}")
        if self.method != "sla_multi" and len(self.tasks) != 1:
            raise ValueError(f"Cell.tasks={self.tasks}: {self.method} trains one task; use sla_multi")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def pool(self) -> int:
        return self.pool_size if self.pool_size is not None else (2 if self.method == "sla_multi" else 1)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"], out["eval_noise"] = list(self.tasks), list(self.eval_noise)
        return out

    def key(self) -> str:
        knobs = {**self.to_dict(), "harness_version": HARNESS_VERSION}
        digest = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:10]
        tasks = "+".join(builtin_task(t).abbreviation if t in builtin_names() else t for t in self.tasks)
        return f"{self.method}-{self.backbone}-{tasks}-s{self.seed}-{digest}"


@dataclass
class Built:
    """A model ready for the loop: optimizer groups, a (loss, logits) forward and its parameter counts."""

    model: nn.Module
    groups: list[dict[str, Any]]
    forward: ForwardFn
    trainable: int
    backbone_params: int


# ----------------------------------------------------------------------------- backbones and data
_BACKBONES: dict[str, nn.Module] = {}
_TOKENIZERS: dict[str, Any] = {}


def fresh_backbone(name: str) -> nn.Module:
    """A new copy of the pretrained backbone (loaded once per process; SmolLM2 takes 12-15 s)."""
    if name not in _BACKBONES:
        _BACKBONES[name] = load_backbone(name)
    return copy.deepcopy(_BACKBONES[name])


def tokenizer_for(name: str) -> Any:
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def task_refs(cell: Cell, cache_dir: Path) -> dict[str, DatasetRef]:
    """Prepared datasets of the cell's tasks (cached; the split depends on nothing but the data)."""
    noise = NoiseSpec(char=cell.train_noise, word=cell.train_noise, seed=0)
    specs = [
        TaskSpec(
            name=t,
            max_length=cell.max_length,
            max_train_examples=cell.max_train_examples,
            max_eval_examples=cell.max_eval_examples,
            train_noise=noise,
        )
        for t in cell.tasks
    ]
    return prepare_tasks(specs, tokenizer_for(cell.backbone), cache_dir, progress=False)


# ------------------------------------------------------------------------------------- builders
def _head_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"])


def _sla_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        task_ids=batch["task_ids"],
    )
    return out.loss, out.logits


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _pooling(base: nn.Module) -> str:
    return "last" if is_decoder(base) else "mean"  # as SLAModel's "auto" pooling


def lora_targets(backbone: str) -> list[str]:
    return LORA_TARGETS.get(backbone, ["q_proj", "v_proj"])


def sla_config(cell: Cell, num_labels: dict[str, int]) -> SLAConfig:
    """The SLAConfig of an sla_* or houlsby cell."""
    common = {"tasks": num_labels, "rank": cell.rank, "pool_size": cell.pool, "seed": cell.seed}
    if cell.method == "houlsby":
        return SLAConfig(**common, gate="fixed", paths=("sequential",), lambda_sparse=0.0)
    warmup = int(cell.lambda_warmup_fraction * cell.steps)
    return SLAConfig(
        **common, lambda_sparse=cell.lambda_sparse, lambda_warmup_steps=warmup, budget=cell.budget
    )


def build_sla(cell: Cell, num_labels: dict[str, int]) -> Built:
    model = attach(fresh_backbone(cell.backbone), sla_config(cell, num_labels))
    counts = model.parameter_counts()
    groups = model.parameter_groups(cell.learning_rate, GATE_LR)
    return Built(model, groups, _sla_forward, counts["trainable"], counts["backbone"])


def _head_model(cell: Cell, base: nn.Module, num_labels: int, backbone_params: int) -> Built:
    torch.manual_seed(cell.seed)  # the head's (and LoRA's / prefix's) initialisation
    model = HeadModel(base, num_labels, _pooling(base))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cell.learning_rate, "weight_decay": 0.0}]
    return Built(model, groups, _head_forward, _count(params), backbone_params)


def lora_rank_for(backbone: str, target_trainable: int, num_labels: int) -> int:
    """The LoRA rank on q,v whose trainable count (adapters + head) is closest to `target_trainable`."""
    base = fresh_backbone(backbone).base_model
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets(backbone)
    )
    head = (int(base.config.hidden_size) + 1) * num_labels
    return max(1, round((target_trainable - head) / per_rank))


def sla_single_trainable(cell: Cell, num_labels: int) -> int:
    """Trainable parameters of sla_single on this backbone and label count (what lora_matched matches)."""
    ref = dataclasses.replace(cell, method="sla_single", lr=None, pool_size=None, budget=None)
    config = sla_config(ref, {cell.tasks[0]: num_labels})
    return attach(fresh_backbone(cell.backbone), config).parameter_counts()["trainable"]


def build_baseline(cell: Cell, num_labels: int) -> tuple[Built, dict[str, Any]]:
    """full_ft, lora_qv_r8, lora_matched or prefix on HeadModel (mean/last pooling + linear head)."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    base = fresh_backbone(cell.backbone).base_model
    backbone_params = _count(base.parameters())
    info: dict[str, Any] = {}
    torch.manual_seed(cell.seed)
    if cell.method == "full_ft":
        for p in base.parameters():
            p.requires_grad_(True)
    elif cell.method in ("lora_qv_r8", "lora_matched"):
        rank = 8
        if cell.method == "lora_matched":
            rank = lora_rank_for(cell.backbone, sla_single_trainable(cell, num_labels), num_labels)
        info["lora_rank"] = rank
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets(cell.backbone))
        base = get_peft_model(base, config)
    elif cell.method == "prefix":
        info["prefix_tokens"] = PREFIX_TOKENS
        config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=PREFIX_TOKENS)
        base = get_peft_model(base, config)
    return _head_model(cell, base, num_labels, backbone_params), info


def build(cell: Cell, refs: dict[str, DatasetRef]) -> tuple[Built, dict[str, Any]]:
    """The model of any method, for the cell's tasks."""
    num_labels = {t: refs[t].num_labels for t in cell.tasks}
    if cell.method in ("houlsby", "sla_single", "sla_multi"):
        return build_sla(cell, num_labels), {}
    return build_baseline(cell, num_labels[cell.tasks[0]])


# ----------------------------------------------------------------------------------- the loop
def _forever(batches: MultiTaskBatches) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from batches


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def warmup_decay(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then linear decay to zero at `steps`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def train(built: Built, batches: MultiTaskBatches, cell: Cell, device: torch.device) -> dict[str, Any]:
    """`cell.steps` optimizer steps of AdamW with warm-up/decay and gradient clipping at 1.0."""
    model = built.model.to(device)
    params = [p for g in built.groups for p in g["params"]]
    opt = torch.optim.AdamW(built.groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_decay(cell.steps, max(1, int(cell.warmup_fraction * cell.steps)))
    )
    model.train()
    stream, losses = _forever(batches), []
    start = time.perf_counter()
    for _ in range(cell.steps):
        loss, _ = built.forward(model, _to(next(stream), device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_s": seconds,
        "step_s": seconds / max(1, cell.steps),
        "loss_first": losses[0] if losses else None,
        "loss_last10pct": sum(tail) / len(tail) if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 50)],
    }


# ------------------------------------------------------------------------------------- evaluation
def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels that occur as truth or prediction; rows are true labels."""
    conf = confusion.double()
    tp, support, predicted = conf.diag(), conf.sum(1), conf.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    n = float(conf.sum())
    return {
        "accuracy": float(tp.sum()) / n if n else 0.0,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "n": int(n),
    }


@torch.no_grad()
def evaluate_split(
    built: Built, model: nn.Module, ref: DatasetRef, task_id: int, cell: Cell, device: torch.device
) -> dict[str, float]:
    """Scores of `model` on the test split of `ref`, in eval mode."""
    model.eval()
    n = ref.num_labels
    confusion = torch.zeros(n * n, dtype=torch.long)
    for batch in eval_batches(ref, "test", cell.eval_batch_size, task_id):
        _, logits = built.forward(model, _to(batch, device))
        preds = logits[:, :n].argmax(dim=-1).cpu()  # (B,)
        confusion += torch.bincount(batch["labels"] * n + preds, minlength=n * n)
    return scores(confusion.view(n, n))


def evaluate(
    built: Built, model: nn.Module, cell: Cell, refs: dict[str, DatasetRef], device: torch.device
) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {"clean" | "noise<level>": {accuracy, macro_f1, n}}} on the test splits."""
    tokenizer = tokenizer_for(cell.backbone)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task_id, task in enumerate(cell.tasks):
        levels = {"clean": refs[task]}
        for level in cell.eval_noise:
            levels[f"noise{level:g}"] = noisy_eval_ref(refs[task], "test", level, tokenizer)
        out[task] = {
            name: evaluate_split(built, model, ref, task_id, cell, device) for name, ref in levels.items()
        }
    return out


@torch.no_grad()
def prune_and_describe(built: Built, refs: dict[str, DatasetRef], cell: Cell) -> tuple[Built, dict]:
    """Prune an SLA model; its structure, kept parameters and the largest logit change pruning caused."""
    model = built.model.eval()
    pruned = model.prune().eval()
    batch = _to(next(eval_batches(refs[cell.tasks[0]], "test", cell.eval_batch_size, 0)), _device(model))
    diff = (built.forward(model, batch)[1] - built.forward(pruned, batch)[1]).abs().max()
    decided = model.decided_gates()  # (T, C, K)
    counts = pruned.parameter_counts()
    info = {
        "candidates": model.candidate_names(),
        "tasks": list(cell.tasks),
        "gate_probabilities": model.gate_probabilities(),
        "decided_gates": decided.cpu().tolist(),
        "open_gate_fraction": float((decided > 0).float().mean()),
        "kept_counts": counts,
        "prune_max_logit_change": float(diff),
    }
    return dataclasses.replace(built, model=pruned), info


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------- the cache
def cell_path(cell: Cell, cells_dir: Path) -> Path:
    return Path(cells_dir) / f"{cell.key()}.json"


def read_cell(cell: Cell, cells_dir: Path) -> dict[str, Any] | None:
    """The cached result of `cell`, or None if it was never completed."""
    path = cell_path(cell, cells_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def _data_info(refs: dict[str, DatasetRef]) -> dict[str, Any]:
    return {
        t: {
            "counts": r.counts,
            "fingerprint": r.fingerprint[:16],
            "train_noise_measured": r.noise.get("train", {}).get("measured"),
        }
        for t, r in refs.items()
    }


def run_cell(
    cell: Cell, cells_dir: Path, cache_dir: Path, device: torch.device | None = None
) -> dict[str, Any]:
    """Train and evaluate one cell, or return its cached result. The file is written atomically."""
    cached = read_cell(cell, cells_dir)
    if cached is not None:
        return cached
    device = device or default_device()
    start, load = time.perf_counter(), os.getloadavg()
    refs = task_refs(cell, cache_dir)
    # Temperature sampling with a huge temperature is near-uniform over tasks, so sla_multi sees each task
    # about as often as a single-task run of a third of its steps; with one task it changes nothing.
    batches = MultiTaskBatches(
        refs,
        "train",
        cell.batch_size,
        task_order=list(cell.tasks),
        sampling="temperature",
        temperature=1e6,
        seed=cell.seed,
    )
    torch.manual_seed(cell.seed)
    built, info = build(cell, refs)
    trained = train(built, batches, cell, device)
    eval_start = time.perf_counter()
    structure = None
    if cell.method.startswith("sla") or cell.method == "houlsby":
        built, structure = prune_and_describe(built, refs, cell)
        kept = structure["kept_counts"]["trainable"]
    else:
        kept = built.trainable  # nothing to prune: what trains is what ships
    results = evaluate(built, built.model, cell, refs, device)
    payload = {
        "key": cell.key(),
        "cell": cell.to_dict(),
        "lr": cell.learning_rate,
        "gate_lr": GATE_LR if cell.method.startswith("sla") else None,
        "machine": {**machine(), "device": str(device), "loadavg_at_start": list(load)},
        "data": _data_info(refs),
        "params": {
            "backbone": built.backbone_params,
            "trainable": built.trainable,
            "trainable_percent": 100.0 * built.trainable / built.backbone_params,
            "kept": kept,
            "kept_percent": 100.0 * kept / built.backbone_params,
        },
        "info": info,
        "train": trained,
        "eval_s": time.perf_counter() - eval_start,
        "total_s": time.perf_counter() - start,
        "results": results,
        "structure": structure,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = cell_path(cell, cells_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return payload
