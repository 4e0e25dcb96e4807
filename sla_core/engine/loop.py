"""The training loop: one function, read top to bottom.

`train` runs in every process of a job (or alone, setting up a one-process group itself). Each step:
set the learning rate, reseed from (seed, step), run `grad_accum` micro-batches through the DeepSpeed
engine, all-reduce the step's statistics (which also carries a SIGTERM to every rank), stop on a
non-finite loss before the optimizer update, update, then log, validate, report and checkpoint when due.
At the end the adapters are gathered, the process group is closed, and rank 0 evaluates, prunes and exports.
"""

from __future__ import annotations

import gc
import json
import math
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sla_core.backbones import load_backbone, load_tokenizer
from sla_core.data import DatasetRef
from sla_core.data.sampling import MultiTaskBatches
from sla_core.engine import checkpoint, ds
from sla_core.engine.evaluate import (
    ADAPTERS_DIR,
    METRICS_FILE,
    finalize,
    projected_trainable_percent,
    validate,
)
from sla_core.engine.result import NonFiniteLossError, TrainingInterrupted, TrainResult
from sla_core.experiment import ExperimentConfig
from sla_core.model import SLAModel, attach
from sla_core.tracking import NullTracker, Tracker

Report = Callable[[int, dict[str, float]], None]


@dataclass
class StepStats:
    """One optimizer step, averaged over ranks and micro-batches."""

    loss: float
    task_loss: float
    accuracy: float
    open_fraction: float
    lambda_sparse: float
    stop: bool

    def as_metrics(self, lr: float) -> dict[str, float]:
        return {
            "train/loss": self.loss,
            "train/task_loss": self.task_loss,
            "train/accuracy": self.accuracy,
            "train/open_fraction": self.open_fraction,
            "train/lambda": self.lambda_sparse,
            "train/lr": lr,
        }


def train(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    *,
    run_dir: str | Path,
    tracker: Tracker = NullTracker(),
    resume: bool = False,
    report: Report | None = None,
) -> TrainResult:
    """Train the adapters of `cfg` on prepared `refs`, then evaluate, prune and export (rank 0).

    Args:
        refs: prepared datasets by task name, one per `cfg.tasks` entry.
        run_dir: where checkpoints/, adapters/, metrics.json and result.json go.
        tracker: receives params and metrics (rank 0 only).
        resume: continue from the last checkpoint in run_dir (a fresh start when there is none).
        report: called on rank 0 as report(step, metrics) every `cfg.tune.report_every` steps with
            validation metrics (the Ray Tune hook).
    Raises:
        NonFiniteLossError: the loss was NaN/inf at some step (the last good checkpoint is kept).
        TrainingInterrupted: SIGTERM arrived; a checkpoint of that step was written.
    """
    tc, run_dir = cfg.train, Path(run_dir)
    refs = ordered_refs(cfg, refs)
    root = run_dir / "checkpoints"
    with ds.distributed() as dist, stop_on_sigterm() as stop_requested:
        settings = ds.build_settings(tc, dist.world_size)
        model = build_model(cfg, refs).train()  # backbones load in eval mode; gates and dropout train
        engine = ds.initialize(model, settings, model.parameter_groups(tc.lr, tc.gate_lr, tc.weight_decay))
        base_lrs = [group["lr"] for group in engine.optimizer.param_groups]
        batches = train_batches(refs, cfg, settings, dist)
        last = start_or_resume(engine, model, batches, cfg, refs, settings, dist, root, resume)
        step = last.step if last else 0
        if dist.is_main:
            tracker.log_params(flat_params(cfg, settings, dist.world_size))
        with tqdm(total=tc.steps, initial=step, desc="train", disable=not dist.is_main) as bar:
            while step < tc.steps:
                lr = set_lr(engine, base_lrs, step, tc.lr_warmup_steps)
                torch.manual_seed(tc.seed + step)  # gate noise and dropout: same on every rank and on resume
                inject_nan = tc.debug_nan_at_step == step + 1 and dist.is_main
                stop = stop_requested.is_set()
                stats = forward_backward(
                    engine, batches, settings.grad_accum, dist.world_size, inject_nan, stop
                )
                step += 1
                if not math.isfinite(stats.loss):  # every rank sees the same reduced value and stops here
                    raise NonFiniteLossError(step, stats.loss, last.path if last else None)
                engine.step()  # the optimizer update, once the loss is known to be finite
                bar.update(1)
                bar.set_postfix(
                    loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.3f}", open=f"{stats.open_fraction:.3f}"
                )
                if dist.is_main and (due(step, tc.log_every) or step == tc.steps):
                    tracker.log_metrics(stats.as_metrics(lr), step=step)
                if due(step, tc.eval_every) or (report is not None and due(step, cfg.tune.report_every)):
                    validate_and_report(engine, model, refs, cfg, step, stats, dist, tracker, report)
                if stats.stop or due(step, tc.checkpoint_every) or step == tc.steps:
                    meta = checkpoint_meta(cfg, refs, batches, model, settings, dist, stats.as_metrics(lr))
                    last = checkpoint.save(engine, model, root, step, meta, dist)
                if stats.stop:
                    raise TrainingInterrupted(step, last.path)
        state = ds.gather_adapter_state(model)
    del engine, model  # free the engine before rank 0 builds its evaluation copy
    return finish(cfg, refs, state, run_dir, step, last, tracker, dist)


def train_batches(
    refs: Mapping[str, DatasetRef], cfg: ExperimentConfig, settings: ds.EngineSettings, dist: ds.DistInfo
) -> MultiTaskBatches:
    """This rank's slice of every global micro-batch: ranks x micro == one process with ranks x micro rows."""
    tc = cfg.train
    return MultiTaskBatches(
        refs, "train", settings.micro_batch, task_order=list(refs), sampling=tc.sampling,
        temperature=tc.sampling_temperature, seed=tc.seed, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip


def set_lr(engine: Any, base_lrs: list[float], step: int, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant; returns the first group's learning rate."""
    scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    for group, base in zip(engine.optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * scale
    return base_lrs[0] * scale


def forward_backward(
    engine: Any, batches: MultiTaskBatches, accum: int, world_size: int, inject_nan: bool, stop: bool
) -> StepStats:
    """Forward and backward over `accum` micro-batches; the caller makes the final `engine.step()`."""
    totals = torch.zeros(6, dtype=torch.float64)  # loss, task loss, correct, rows, open fraction, stop
    lam = 0.0
    for micro in range(accum):
        batch = next(iter(batches))  # the sampler moves past the batch before yielding it
        out = engine(**batch)
        loss = out.loss + float("nan") if inject_nan else out.loss
        engine.backward(loss)
        if micro < accum - 1:
            engine.step()  # inside the accumulation window DeepSpeed only accumulates
        correct = (out.logits.argmax(dim=-1) == batch["labels"]).sum()
        totals += torch.tensor(
            [
                float(loss.detach()),
                float(out.task_loss.detach()),
                float(correct),
                len(batch["labels"]),
                float(out.open_fraction.detach()),
                0.0,
            ],
            dtype=torch.float64,
        )
        lam = out.lambda_sparse
    totals[5] = float(stop)
    totals = ds.all_reduce_sum(totals)
    micro_batches = accum * world_size
    return StepStats(
        loss=float(totals[0] / micro_batches),
        task_loss=float(totals[1] / micro_batches),
        accuracy=float(totals[2] / totals[3]),
        open_fraction=float(totals[4] / micro_batches),
        lambda_sparse=float(lam),
        stop=bool(totals[5] > 0),
    )


def validate_and_report(
    engine: Any,
    model: SLAModel,
    refs: Mapping[str, DatasetRef],
    cfg: ExperimentConfig,
    step: int,
    stats: StepStats,
    dist: ds.DistInfo,
    tracker: Tracker,
    report: Report | None,
) -> None:
    """Clean validation metrics and the trainable % pruning would leave now, logged and reported on rank 0.

    Every rank runs the full validation split (ZeRO-3 needs every rank in every forward), so the numbers
    are the same on all ranks."""
    engine.eval()
    metrics = validate(engine, refs, {t: model.task_index(t) for t in refs}, cfg.train.eval_batch_size)
    with ds.gathered(ds.adapter_params(model)):
        metrics["trainable_percent_pruned"] = projected_trainable_percent(model)
    engine.train()
    metrics.update({"train_loss": stats.loss, "open_fraction": stats.open_fraction})
    if dist.is_main:
        tracker.log_metrics(metrics, step=step)
        if report is not None:
            report(step, metrics)


def start_or_resume(
    engine: Any,
    model: SLAModel,
    batches: MultiTaskBatches,
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    settings: ds.EngineSettings,
    dist: ds.DistInfo,
    root: Path,
    resume: bool,
) -> checkpoint.CheckpointRef | None:
    """Restore engine, sampler and λ warm-up counter from the last checkpoint, or check that a fresh start
    will not mix with an earlier run's checkpoints. Returns the checkpoint resumed from, if any."""
    ref = checkpoint.latest_checkpoint(root)
    if ref is not None and not resume:
        raise checkpoint.CheckpointError(
            f"{root} already holds checkpoints (last: step {ref.step}); pass --resume to continue that run "
            "or choose another run directory"
        )
    if dist.is_main:
        checkpoint.clean_stale(root)
    if ref is None:
        if resume and dist.is_main:
            print(f"sla: no checkpoint under {root}; starting from step 0", flush=True)
        return None
    meta = checkpoint.read_meta(ref.path)
    fingerprints = {t: r.fingerprint for t, r in refs.items()}
    checkpoint.check_resumable(meta, cfg, fingerprints, dist.world_size, settings.zero_stage, ref.path)
    checkpoint.load(engine, ref)
    batches.load_state_dict(meta["sampler"])
    model.forward_count.fill_(int(meta["forward_count"]))
    return ref


def checkpoint_meta(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    batches: MultiTaskBatches,
    model: SLAModel,
    settings: ds.EngineSettings,
    dist: ds.DistInfo,
    train_metrics: dict[str, float],
) -> dict[str, Any]:
    """What a checkpoint needs besides tensors to rebuild and resume the run."""
    return {
        "experiment": cfg.model_dump(mode="json"),
        "datasets": {t: json.loads(r.to_json()) for t, r in refs.items()},
        "fingerprints": {t: r.fingerprint for t, r in refs.items()},
        "sampler": batches.state_dict(),
        "forward_count": int(model.forward_count),
        "world_size": dist.world_size,
        "zero_stage": settings.zero_stage,
        "precision": settings.precision,
        "train_metrics": train_metrics,
    }


def finish(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    state: dict[str, torch.Tensor],
    run_dir: Path,
    step: int,
    last: checkpoint.CheckpointRef | None,
    tracker: Tracker,
    dist: ds.DistInfo,
) -> TrainResult:
    """Rank 0: rebuild a plain model from the gathered adapters, then evaluate, prune, export."""
    paths = {
        "run_dir": str(run_dir),
        "checkpoint": last.path if last else "",
        "steps": step,
        "adapters": str(run_dir / ADAPTERS_DIR),
        "metrics_path": str(run_dir / METRICS_FILE),
    }
    if not dist.is_main:
        return TrainResult(**paths)
    gc.collect()  # the engine and its partitions are unreferenced now; make room for the evaluation copy
    model = build_model(cfg, refs)
    model.load_sla_state(state)
    tokenizer = load_tokenizer(cfg.backbone)
    report = finalize(model, refs, tokenizer, cfg, run_dir, step=step, tracker=tracker)
    result = TrainResult(**paths, metrics=report["summary"])
    result.write(run_dir)
    return result


def build_model(cfg: ExperimentConfig, refs: Mapping[str, DatasetRef]) -> SLAModel:
    """A fresh backbone with adapters for the tasks of `refs` (label counts from the prepared data)."""
    model = attach(load_backbone(cfg.backbone), cfg.sla_config({t: r.num_labels for t, r in refs.items()}))
    if cfg.train.backbone_dropout is not None:
        set_backbone_dropout(model, cfg.train.backbone_dropout)
    return model


def set_backbone_dropout(model: SLAModel, p: float) -> None:
    """Set every dropout rate of the frozen backbone (not the adapters') to `p`."""
    for name, module in model.backbone.named_modules():
        if "sla_" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention
            module.attention_dropout = p


def ordered_refs(cfg: ExperimentConfig, refs: Mapping[str, DatasetRef]) -> dict[str, DatasetRef]:
    """`refs` in the config's task order; every configured task must be present."""
    missing = [t.name for t in cfg.tasks if t.name not in refs]
    if missing:
        raise ValueError(
            f"no prepared data for task(s) {missing}; run `sla prepare` or pass their DatasetRefs"
        )
    return {t.name: refs[t.name] for t in cfg.tasks}


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def flat_params(cfg: ExperimentConfig, settings: ds.EngineSettings, world_size: int) -> dict[str, Any]:
    """The config as flat `section.key` params for trackers, plus the effective engine settings."""
    data = cfg.model_dump(mode="json")
    params = {f"{section}.{k}": v for section in ("train", "sla") for k, v in data[section].items()}
    params.update(
        {
            "backbone": cfg.backbone,
            "tasks": ",".join(t.name for t in cfg.tasks),
            "world_size": world_size,
            "micro_batch": settings.micro_batch,
            "zero_stage": settings.zero_stage,
            "precision": settings.precision,
        }
    )
    return params


@contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM (main thread only; elsewhere, e.g. in a Ray Tune thread, it stays unset)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)
