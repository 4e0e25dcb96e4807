"""The evidence harness: a cell is one run of the product's own stages, and a cell cache.

A *cell* is one training run: (method, backbone, tasks, seed, knobs) -> a JSON file under a cells folder,
named by a hash of every knob, and skipped when present, so an interrupted grid resumes. `cell_config`
turns a cell into an ordinary experiment config, and `run_cell` runs it through the engine exactly as
`sla train` does (`sla_core.engine.loop.train`, then the `prune` and `evaluate` stages): the same
deterministic batches, steps, AdamW, warm-up then linear decay and gradient clipping for every method; only
the learning rate is per method (`DEFAULT_LR`). Nothing here trains with its own loop.

Methods: full_ft, lora_qv_r8, lora_matched (LoRA on q,v with the rank that matches sla_single's trainable
count), prefix (PEFT prefix tuning), houlsby (fixed sequential adapters at every site, no gates),
sla_single, sla_multi (all tasks, shared pool of 2, mixed batches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import machine
from sla_core.backbones import load_backbone
from sla_core.data import DatasetRef, NoiseSpec, TaskSpec, prepare_tasks
from sla_core.data.builtin import builtin_names, builtin_task
from sla_core.engine.cells import StepClock
from sla_core.experiment import ExperimentConfig
from sla_core.methods import parse_method
from sla_core.methods.baselines import attention_targets
from sla_core.tracking import NullTracker

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
GATE_LR = 0.05  # the gates' learning rate (configs/default.yaml's train.gate_lr)
PREFIX_TOKENS = 20
ROOT = Path(__file__).resolve().parent.parent
# Part of every cell key: bump it when the loop, evaluation or builders change what a cell computes, so that
# cached cells from older code are not mixed with new ones.
HARNESS_VERSION = 2


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


# ----------------------------------------------------------------------------- a cell as a config
def method_spec(cell: Cell) -> str:
    """The engine method of a cell (the learning rate goes to `train.lr`)."""
    if cell.method == "full_ft":
        return "full_ft"
    if cell.method == "lora_qv_r8":
        return "lora:r=8"
    if cell.method == "lora_matched":
        return f"lora:r={lora_rank_for(cell)}"
    if cell.method == "prefix":
        return f"prefix:tokens={PREFIX_TOKENS}"
    if cell.method == "houlsby":
        return "adapters"
    return "sla"


def cell_config(cell: Cell, cache_dir: Path, run_dir: Path) -> ExperimentConfig:
    """The experiment config that trains this cell: what `sla train --config` would be given."""
    noise = NoiseSpec(char=cell.train_noise, word=cell.train_noise, seed=0)
    tasks = [
        TaskSpec(
            name=t,
            max_length=cell.max_length,
            max_train_examples=cell.max_train_examples,
            max_eval_examples=cell.max_eval_examples,
            train_noise=noise,
            eval_noise_levels=[0.0, *cell.eval_noise],
        ).model_dump(mode="json", exclude_unset=True)
        for t in cell.tasks
    ]
    sla = {"rank": cell.rank, "pool_size": cell.pool, "seed": cell.seed}
    if cell.method.startswith("sla"):
        warmup = int(cell.lambda_warmup_fraction * cell.steps)
        mode = {"budget": cell.budget} if cell.budget is not None else {"lambda_sparse": cell.lambda_sparse}
        sla.update(lambda_warmup_steps=warmup, **mode)
    data = {
        "name": cell.key().replace("+", "_"),
        "backbone": cell.backbone,
        "method": method_spec(cell),
        "tasks": tasks,
        "sla": sla,
        "train": {
            "steps": cell.steps,
            "batch_size": cell.batch_size,
            "lr": cell.learning_rate,
            "gate_lr": GATE_LR,
            "lr_warmup_steps": max(1, int(cell.warmup_fraction * cell.steps)),
            "lr_schedule": "linear",
            "max_grad_norm": 1.0,
            "seed": cell.seed,
            # Near-uniform over tasks: a multi-task cell sees each task about as often as a single-task
            # run of a third of its steps; with one task it changes nothing.
            "sampling": "temperature",
            "sampling_temperature": 1e6,
            "eval_batch_size": cell.eval_batch_size,
            "checkpoint_every": 0,
            "log_every": 1,
        },
        "output_dir": str(run_dir),
        "cache_dir": str(cache_dir),
    }
    return ExperimentConfig.model_validate(data)


_BACKBONES: dict[str, torch.nn.Module] = {}


def lora_rank_for(cell: Cell) -> int:
    """The LoRA rank on q,v whose trainable count (adapters + head) is closest to sla_single's."""
    import copy

    if cell.backbone not in _BACKBONES:
        _BACKBONES[cell.backbone] = load_backbone(cell.backbone)
    base = _BACKBONES[cell.backbone].base_model
    targets = attention_targets(base)
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    labels = {t: len(builtin_task(t).labels) if t in builtin_names() else 2 for t in cell.tasks}
    sla = parse_method(f"sla:rank={cell.rank},pool_size=1,seed={cell.seed}")
    target = sla.counts(sla.build(copy.deepcopy(_BACKBONES[cell.backbone]), labels))["trainable"]
    head = (int(base.config.hidden_size) + 1) * labels[cell.tasks[0]]
    return max(1, round((target - head) / per_rank))


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


@torch.no_grad()
def describe_structure(
    trained: str, pruned_path: str, refs: dict[str, DatasetRef], cfg: ExperimentConfig
) -> dict:
    """Ours and fixed adapters: the decided structure and the largest logit change pruning caused."""
    from sla_core.data.sampling import eval_batches
    from sla_core.methods import load_trained

    _, model = load_trained(load_backbone(cfg.backbone), trained)
    _, pruned = load_trained(load_backbone(cfg.backbone), pruned_path)
    task = cfg.tasks[0].name
    batch = next(eval_batches(refs[task], "test", cfg.train.eval_batch_size, 0))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "task_ids")}
    diff = (model.eval()(**inputs).logits - pruned.eval()(**inputs).logits).abs().max()
    decided = model.decided_gates()  # (T, C, K)
    return {
        "candidates": model.candidate_names(),
        "tasks": [t.name for t in cfg.tasks],
        "gate_probabilities": model.gate_probabilities(),
        "decided_gates": decided.tolist(),
        "open_gate_fraction": float((decided > 0).float().mean()),
        "kept_counts": pruned.parameter_counts(),
        "prune_max_logit_change": float(diff),
    }


def run_cell(cell: Cell, cells_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Train, prune and evaluate one cell through the engine, or return its cached result.

    The run folder (`<cells_dir>/../runs/<key>/`) keeps the pruned set (not for full fine-tuning, whose
    set is the whole backbone); checkpoints are removed once the cell is written. The file is atomic."""
    from sla_core.engine.loop import train
    from sla_core.engine.stages import evaluate, prune
    from sla_core.files import atomic_write_text

    cached = read_cell(cell, cells_dir)
    if cached is not None:
        return cached
    start, load = time.perf_counter(), os.getloadavg()
    run_dir = Path(cells_dir).parent / "runs" / cell.key()
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt starts over
    cfg = cell_config(cell, Path(cache_dir), run_dir)
    refs = prepare_tasks(cfg.tasks, _tokenizer(cell.backbone), cfg.cache_dir, progress=False)
    losses = StepClock(NullTracker())
    t0 = time.perf_counter()
    trained = train(cfg, refs, run_dir=run_dir, tracker=losses)
    seconds = time.perf_counter() - t0
    eval_start = time.perf_counter()
    # A cell whose gates all closed is a data point of the λ sweep (the head alone), not a failure.
    pruned = prune(trained, run_dir / "adapters", backbone=cell.backbone, allow_empty=True)
    report = evaluate(cfg, refs, pruned.path, run_dir, step=trained.steps, splits=("test",))
    full = json.loads(Path(report.metrics_path).read_text(encoding="utf-8"))
    results = {t: full["tasks"][t]["after"]["test"] for t in cell.tasks}
    eval_s = time.perf_counter() - eval_start
    structure = None
    if cell.method.startswith("sla") or cell.method == "houlsby":
        structure = describe_structure(trained.trained, pruned.path, refs, cfg)
    method = parse_method(trained.method)
    before, after = pruned.counts_before, pruned.counts_after
    tail = losses.losses[-max(1, len(losses.losses) // 10) :]
    payload = {
        "key": cell.key(),
        "cell": cell.to_dict(),
        "engine": {"method": trained.method, "run_dir": str(run_dir), "config": cfg.model_dump(mode="json")},
        "lr": cell.learning_rate,
        "gate_lr": GATE_LR if cell.method.startswith("sla") else None,
        "machine": {**machine(), "device": "cpu", "loadavg_at_start": list(load)},
        "data": _data_info(refs),
        "params": {
            "backbone": before["backbone"],
            "trainable": before["trainable"],
            "trainable_percent": 100.0 * before["trainable"] / before["backbone"],
            "kept": after["kept"],
            "kept_percent": 100.0 * after["kept"] / after["backbone"],
        },
        "info": {"lora_rank": method.r} if cell.method.startswith("lora") else {},
        "train": {
            "train_s": seconds,
            "step_s": seconds / max(1, cell.steps),
            "loss_first": losses.losses[0] if losses.losses else None,
            "loss_last10pct": sum(tail) / len(tail) if tail else None,
            "loss_curve": losses.losses[:: max(1, len(losses.losses) // 50)],
        },
        "eval_s": eval_s,
        "total_s": time.perf_counter() - start,
        "results": results,
        "structure": structure,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if cell.method == "full_ft":
        shutil.rmtree(run_dir / "adapters", ignore_errors=True)
    atomic_write_text(cell_path(cell, cells_dir), json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return payload


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(name: str) -> Any:
    from sla_core.backbones import load_tokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]
