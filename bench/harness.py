"""The evidence harness: a cell is one run of the product's own stages, and a cell cache.

A *cell* is one training run: (method, backbone, tasks, seed, knobs) -> a JSON file under a cells folder,
named by a hash of every knob, and skipped when present, so an interrupted grid resumes. `cell_config`
turns a cell into an ordinary experiment config, and `run_cell` runs it through the engine exactly as
`sla train` does (`sla_core.engine.loop.train`, then the `prune` and `evaluate` stages): the same
deterministic batches, steps, AdamW, warm-up then linear decay and gradient clipping for every method; only
the learning rate is per method (`DEFAULT_LR`, from the Pareto benchmark's validation sweep). Nothing here
trains with its own loop.

Methods: full_ft, lora_qv_r8, lora_matched (LoRA on q,v with the rank whose kept size matches ours' budget),
prefix (PEFT prefix tuning), houlsby (fixed adapters of rank 8 at every site, no gates), sla_single (the
product's default recipe, `sla train` with no size named), sla_multi (all tasks in mixed batches, one shared
set of rank units that each task gates, at the three single-task budgets together).
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
from sla_core.experiment import DEFAULT_RECIPE, ExperimentConfig
from sla_core.methods import parse_method
from sla_core.methods.baselines import attention_targets
from sla_core.tracking import NullTracker

METHODS = ("full_ft", "lora_qv_r8", "lora_matched", "prefix", "houlsby", "sla_single", "sla_multi")
# Learning rates on MiniLM: each family's best validation rate of the Pareto benchmark's sweep
# (docs/results/pareto_lr.json: LoRA, adapters and ours 3e-3, full fine-tuning 3e-4, each the top of its
# range); prefix tuning was not swept and keeps the usual 5e-3.
DEFAULT_LR = {
    "full_ft": 3e-4,
    "lora_qv_r8": 3e-3,
    "lora_matched": 3e-3,
    "prefix": 5e-3,
    "houlsby": 3e-3,
    "sla_single": 3e-3,
    "sla_multi": 3e-3,
}
# Decoders (SmolLM2): the engine's default 1e-3, checked safe there (docs/results/decoder_lr.md); 1e-4 for
# full fine-tuning.
LARGE_LR = {m: 1e-4 if m == "full_ft" else 1e-3 for m in METHODS}
GATE_LR = 0.05  # the gates' learning rate (configs/default.yaml's train.gate_lr)
PREFIX_TOKENS = 20
OURS_BUDGET = DEFAULT_RECIPE["budget"]  # what `sla train` keeps by default: 0.2 % of the backbone per task
NOISE_KINDS = ("char+word", "word")
ROOT = Path(__file__).resolve().parent.parent
# Part of every cell key: bump it when the loop, evaluation or builders change what a cell computes, so that
# cached cells from older code are not mixed with new ones. 3: the product's budget recipe for ours.
HARNESS_VERSION = 3


@dataclass(frozen=True)
class Cell:
    """Every knob of one training run; the same cell always gives the same file name.

    Ours (`sla_single`, `sla_multi`) runs the product's default recipe (`DEFAULT_RECIPE`: LoRA-type rank units
    at every linear layer, the budget's knapsack ranked by sensitivity over the first half of the steps, then
    the fixed structure). Its size: `budget` (None: `OURS_BUDGET` per task on MiniLM, LoRA r=8 (q,v)'s kept
    fraction on a large backbone), or λ mode when `lambda_sparse` is set (hard-concrete gates, the same
    schedule)."""

    method: str
    backbone: str = "minilm"
    tasks: tuple[str, ...] = ("rotten_tomatoes",)
    seed: int = 0
    steps: int = 640
    batch_size: int = 16
    max_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = 1000
    lr: float | None = None  # None: DEFAULT_LR[method] (LARGE_LR on a large backbone)
    warmup_fraction: float = 0.1
    rank: int = 8
    pool_size: int = 1
    budget: float | None = None
    lambda_sparse: float | None = None
    train_noise: float = 0.0  # noise ratio of the training texts, of `noise_kind`
    noise_kind: str = "char+word"
    eval_noise: tuple[float, ...] = ()  # test noise levels evaluated besides the clean test set
    eval_kinds: tuple[str, ...] = ("char+word",)  # the noise kinds evaluated at each of those levels
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Cell.method={self.method!r}: choose one of {METHODS}")
        if self.method != "sla_multi" and len(self.tasks) != 1:
            raise ValueError(f"Cell.tasks={self.tasks}: {self.method} trains one task; use sla_multi")
        for kind in (self.noise_kind, *self.eval_kinds):
            if kind not in NOISE_KINDS:
                raise ValueError(f"Cell noise kind {kind!r}: choose one of {NOISE_KINDS}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return (DEFAULT_LR if self.backbone == "minilm" else LARGE_LR)[self.method]

    @property
    def ours(self) -> bool:
        return self.method.startswith("sla")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"], out["eval_noise"] = list(self.tasks), list(self.eval_noise)
        out["eval_kinds"] = list(self.eval_kinds)
        out["learning_rate"] = self.learning_rate
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


def ours_budget(cell: Cell) -> float:
    """The budget ours runs at (budget mode): the cell's, else the default per task, else (a large backbone)
    LoRA r=8 (q,v)'s kept fraction, so that the two compare at equal kept size."""
    if cell.budget is not None:
        return cell.budget
    if cell.backbone == "minilm":
        return OURS_BUDGET * len(cell.tasks)
    return lora_fraction(cell.backbone, 8, cell.tasks[0])


def sla_section(cell: Cell) -> dict[str, Any]:
    """The `sla:` section of an ours cell: the budget (`DEFAULT_RECIPE` fills the rest), or λ mode with the
    recipe's candidates and schedule and the default gates."""
    out: dict[str, Any] = {"rank": cell.rank, "pool_size": cell.pool_size, "seed": cell.seed}
    if cell.lambda_sparse is None:
        return {**out, "budget": ours_budget(cell)}
    recipe = {k: v for k, v in DEFAULT_RECIPE.items() if k not in ("budget", "gate")}
    return {**out, **recipe, "paths": list(recipe["paths"]), "lambda_sparse": cell.lambda_sparse}


def cell_config(cell: Cell, cache_dir: Path, run_dir: Path) -> ExperimentConfig:
    """The experiment config that trains this cell: what `sla train --config` would be given."""
    noise = NoiseSpec.of_kind(cell.noise_kind, cell.train_noise)
    tasks = [
        TaskSpec(
            name=t,
            max_length=cell.max_length,
            max_train_examples=cell.max_train_examples,
            max_eval_examples=cell.max_eval_examples,
            train_noise=noise,
            eval_noise_levels=[0.0, *cell.eval_noise],
            eval_noise_kinds=list(cell.eval_kinds),
        ).model_dump(mode="json", exclude_unset=True)
        for t in cell.tasks
    ]
    data = {
        "name": cell.key().replace("+", "_"),
        "backbone": cell.backbone,
        "method": method_spec(cell),
        "tasks": tasks,
        "sla": sla_section(cell) if cell.ours else {"rank": cell.rank, "seed": cell.seed},
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


def _lora_sizes(backbone: str) -> tuple[int, int, int]:
    """(parameters of one LoRA rank on q,v, the backbone's parameters, its hidden size)."""
    if backbone not in _BACKBONES:
        _BACKBONES[backbone] = load_backbone(backbone)
    base = _BACKBONES[backbone].base_model
    targets = attention_targets(base)
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return per_rank, sum(p.numel() for p in base.parameters()), int(base.config.hidden_size)


def _head(task: str, hidden: int) -> int:
    return (hidden + 1) * (len(builtin_task(task).labels) if task in builtin_names() else 2)


def lora_rank_for(cell: Cell) -> int:
    """The LoRA rank on q,v whose kept count (adapters + head) is closest to ours' budget."""
    per_rank, backbone, hidden = _lora_sizes(cell.backbone)
    target = ours_budget(dataclasses.replace(cell, method="sla_single", budget=cell.budget)) * backbone
    return max(1, round((target - _head(cell.tasks[0], hidden)) / per_rank))


def lora_fraction(backbone: str, rank: int, task: str) -> float:
    """The kept fraction of LoRA at `rank` on q,v with its head (what `lora:r=<rank>` exports)."""
    per_rank, total, hidden = _lora_sizes(backbone)
    return (rank * per_rank + _head(task, hidden)) / total


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
    resumed = resumable_step(run_dir)
    if resumed is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a half-written attempt without a checkpoint starts over
    cfg = cell_config(cell, Path(cache_dir), run_dir)
    refs = prepare_tasks(cfg.tasks, _tokenizer(cell.backbone), cfg.cache_dir, progress=False)
    losses = StepClock(NullTracker())
    t0 = time.perf_counter()
    # A stopped grid (SIGTERM: the engine checkpoints the step it reached) continues the cell from there.
    trained = train(cfg, refs, run_dir=run_dir, tracker=losses, resume=resumed is not None)
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
        "engine": {"method": trained.method, "run_dir": str(run_dir), "config": cfg.resolved_dump()},
        "lr": cell.learning_rate,
        "gate_lr": GATE_LR if cell.method.startswith("sla") else None,
        "machine": {
            **machine(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "loadavg_at_start": list(load),
        },
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
            "train_s": seconds,  # of this attempt: the steps after `resumed_from_step`
            "resumed_from_step": resumed,
            "step_s": seconds / max(1, cell.steps - (resumed or 0)),
            "loss_first": losses.losses[0] if losses.losses else None,
            "loss_last10pct": sum(tail) / len(tail) if tail else None,
            "loss_curve": losses.losses[:: max(1, len(losses.losses) // 50)],
        },
        "eval_s": eval_s,
        "total_s": time.perf_counter() - start,
        "results": results,
        "structure": structure,
        # Ours: per task, the share of each candidate's rank units kept (where the budget went).
        "kept_share": pruned.kept_share or None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if cell.method == "full_ft":
        shutil.rmtree(run_dir / "adapters", ignore_errors=True)
    atomic_write_text(cell_path(cell, cells_dir), json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return payload


def resumable_step(run_dir: Path) -> int | None:
    """The step of the checkpoint an interrupted attempt of the cell left in `run_dir`, or None."""
    from sla_core.engine.checkpoint import CheckpointError, latest_checkpoint

    try:
        ref = latest_checkpoint(run_dir / "checkpoints")
    except CheckpointError:
        return None
    return None if ref is None else ref.step


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(name: str) -> Any:
    from sla_core.backbones import load_tokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]
