"""The training loop: one function, read top to bottom.

`train` runs in every process of a job (or alone, setting up a one-process group itself) and trains any
method (ours or a baseline, `sla_core.methods`) the same way. Each step: set the learning rate (warm-up,
then linear decay or constant), reseed from (seed, step), run `grad_accum` micro-batches through the
DeepSpeed engine, all-reduce the step's statistics (which also carries a SIGTERM to every rank), stop on a
non-finite loss before the optimizer update, update (DeepSpeed clips the gradient norm), then log,
validate, report and checkpoint when due. Training ends at the checkpoint of the last step, which holds
the gathered, unpruned trained set; pruning and evaluation are the next stages (`sla_core.engine.stages`).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sla_core.adapters import is_adapter_key
from sla_core.backbones import assign_whole, load_backbone
from sla_core.data import DatasetRef
from sla_core.data.sampling import MultiTaskBatches
from sla_core.engine import checkpoint, ds
from sla_core.engine.evaluate import validate
from sla_core.engine.placement import to_device
from sla_core.engine.result import NonFiniteLossError, TrainingInterrupted, TrainResult
from sla_core.experiment import ExperimentConfig, TrainConfig
from sla_core.methods import Method
from sla_core.model import SLAModel
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
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `cfg.method` on prepared `refs` up to `cfg.train.steps`; the last checkpoint holds the result.

    Args:
        refs: prepared datasets by task name, one per `cfg.tasks` entry.
        run_dir: where checkpoints/ and result.json go (a finished run returns at once).
        tracker: receives params and metrics (rank 0 only).
        resume: continue from the last checkpoint in run_dir (a fresh start when there is none).
        report: called on rank 0 as report(step, metrics) every `cfg.tune.report_every` steps with
            validation metrics (the Ray Tune hook).
        on_step: called after every optimizer step with the step (e.g. to adapt the thread count).
    Raises:
        NonFiniteLossError: the loss was NaN/inf at some step (the last good checkpoint is kept).
        TrainingInterrupted: SIGTERM arrived; a checkpoint of that step was written.
    """
    tc, run_dir = cfg.train, Path(run_dir)
    refs = ordered_refs(cfg, refs)
    method = cfg.training_method()
    root = run_dir / "checkpoints"
    with ds.distributed() as dist, stop_on_sigterm() as stop_requested:
        settings = ds.build_settings(tc, dist.world_size, dist.device)
        # backbones load in eval mode; gates and dropout train
        model = build_model(cfg, refs, method, settings).train()
        check_rewind(model, settings)
        compacting = compacts(model, cfg, settings)
        if compacting:
            compact_before_start(model, root, resume)
            compacting = not model.compacted  # still to do at the decision
        engine = ds.initialize(model, settings, method.parameter_groups(model, cfg), dist.device)
        base_lrs = [group["lr"] for group in engine.optimizer.param_groups]
        batches = train_batches(refs, cfg, settings, dist)
        device = dist.device.torch_device
        last = start_or_resume(engine, model, batches, cfg, refs, settings, dist, root, resume)
        step = last.step if last else 0
        metrics = dict(checkpoint.read_meta(last.path).get("train_metrics", {})) if last else {}
        warned: set[str] = set()
        watch = DivergenceWatch()
        if dist.is_main:
            tracker.log_params(flat_params(cfg, settings, dist.world_size))
        with tqdm(total=tc.steps, initial=step, desc="train", disable=not dist.is_main) as bar:
            while step < tc.steps:
                if compacting and model.phase() == "fixed":
                    engine = compact_engine(engine, model, method, cfg, settings, dist)
                    compacting = False
                lr = set_lr(engine, base_lrs, step, tc)
                torch.manual_seed(tc.seed + step)  # gate noise and dropout: same on every rank and on resume
                inject_nan = tc.debug_nan_at_step == step + 1 and dist.is_main
                stop = stop_requested.is_set()
                stats = forward_backward(
                    engine, batches, settings.grad_accum, dist.world_size, inject_nan, stop, device
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
                if due(step, tc.log_every) or step == tc.steps:
                    warned |= warn_if_collapsed(model, step, warned, dist, tracker)
                metrics.update(stats.as_metrics(lr))
                watch.see(step, stats.loss, dist, tracker)
                if on_step is not None:
                    on_step(step)
                if due(step, tc.eval_every) or (report is not None and due(step, cfg.tune.report_every)):
                    metrics.update(
                        validate_and_report(
                            engine, model, method, refs, cfg, step, stats, dist, tracker, report
                        )
                    )
                if stats.stop or due(step, tc.checkpoint_every) or step == tc.steps:
                    meta = checkpoint_meta(cfg, refs, batches, model, settings, dist, metrics)
                    last = checkpoint.save(engine, model, root, step, meta, dist, method)
                if stats.stop:
                    raise TrainingInterrupted(step, last.path)
    assert last is not None  # the last step always writes a checkpoint
    result = TrainResult(
        run_dir=str(run_dir),
        checkpoint=last.path,
        trained=str(Path(last.path) / checkpoint.ADAPTERS),
        steps=step,
        method=method.spec,
        backbone=cfg.backbone,
        metrics=metrics,
    )
    if dist.is_main:
        result.write(run_dir)
    return result


def compacts(model: nn.Module, cfg: ExperimentConfig, settings: ds.EngineSettings) -> bool:
    """Whether this run drops the closed units at the decision (`train.compact`): ours with a fixed-structure
    phase, on the ZeRO-0 fp32 engine whose optimizer state is the torch optimizer's own, per parameter."""
    return (
        cfg.train.compact
        and isinstance(model, SLAModel)
        and model.sla_gates is not None
        and model.phase_bounds()[1] < 2**62
        and settings.zero_stage == 0
        and settings.precision == "fp32"
    )


def compact_before_start(model: SLAModel, root: Path, resume: bool) -> None:
    """Compact before the engine exists where the run starts in the fixed-structure phase: a resume from a
    compacted checkpoint (its saved structure, not a new decision), or a structure decided at the first
    step (the random control)."""
    ref = checkpoint.latest_checkpoint(root) if resume else None
    if ref is not None:
        meta = checkpoint.read_meta(ref.path)
        if meta.get("decided") is not None and meta.get("compacted"):
            model.restore_decision(torch.tensor(meta["decided"], dtype=model.sla_decided.dtype))
            model.compact()
        return
    if model.phase() == "fixed":
        model.compact()


def compact_engine(
    engine: Any,
    model: SLAModel,
    method: Method,
    cfg: ExperimentConfig,
    settings: ds.EngineSettings,
    dist: ds.DistInfo,
) -> Any:
    """At the decision: drop the closed units (`SLAModel.compact`) and rebuild the engine over the kept
    parameters, carrying each kept value's AdamW state (moments and step) over, so that training goes on
    exactly as it would have with the closed units masked. Every rank does the same."""
    old = engine.optimizer
    moved = model.compact()
    engine.destroy()
    new = ds.initialize(model, settings, method.parameter_groups(model, cfg), dist.device)
    origin = {id(n): (o, cut) for o, (n, cut) in moved.items()}
    for group in new.optimizer.param_groups:
        for p in group["params"]:
            before, cut = origin.get(id(p), (p, None))
            state = old.state.get(before)
            if not state:
                continue
            new.optimizer.state[p] = {
                k: cut(v).clone() if cut is not None and torch.is_tensor(v) and v.shape == before.shape else v
                for k, v in state.items()
            }
    if dist.is_main:
        named = model.named_parameters()
        kept = sum(p.numel() for n, p in named if is_adapter_key(n) and "sla_gates" not in n)
        tqdm.write(  # above the progress bar, not inside its line
            f"sla: structure decided; training {kept:,} kept parameters on "
            "(closed units and their optimizer state dropped)",
            file=sys.stdout,
        )
    return new


def check_rewind(model: nn.Module, settings: ds.EngineSettings) -> None:
    """`sla.rewind` writes the adapters' weights in place at the decision, which only an fp32 ZeRO-0 engine
    trains from: under ZeRO 1-3 or bf16/fp16 the optimizer's own fp32 copy would overwrite the restart."""
    config = getattr(model, "config", None)
    if getattr(config, "rewind", False) and (settings.zero_stage != 0 or settings.precision != "fp32"):
        raise ValueError(
            f"sla.rewind=true needs train.zero_stage=0 and fp32 (got ZeRO-{settings.zero_stage}, "
            f"{settings.precision}): the optimizer's master copy would undo the restart; set "
            "sla.rewind=false, or train.zero_stage=0 and train.precision=fp32"
        )


def train_batches(
    refs: Mapping[str, DatasetRef], cfg: ExperimentConfig, settings: ds.EngineSettings, dist: ds.DistInfo
) -> MultiTaskBatches:
    """This rank's slice of every global micro-batch: ranks x micro == one process with ranks x micro rows."""
    tc = cfg.train
    return MultiTaskBatches(
        refs, "train", settings.micro_batch, task_order=list(refs), sampling=tc.sampling,
        temperature=tc.sampling_temperature, seed=tc.seed, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip


def lr_scale(step: int, tc: TrainConfig) -> float:
    """The learning rate's factor at (0-based) `step`: linear warm-up over `lr_warmup_steps`, then linear
    decay to zero at `steps` (`lr_schedule: linear`) or constant. A function of the step alone, so a
    resumed run continues on the same curve."""
    warmup = tc.lr_warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if tc.lr_schedule == "constant":
        return 1.0
    return max(0.0, (tc.steps - step) / max(1, tc.steps - warmup))


def set_lr(engine: Any, base_lrs: list[float], step: int, tc: TrainConfig) -> float:
    """Set every group's learning rate for `step`; returns the first group's."""
    scale = lr_scale(step, tc)
    for group, base in zip(engine.optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * scale
    return base_lrs[0] * scale


def forward_backward(
    engine: Any,
    batches: MultiTaskBatches,
    accum: int,
    world_size: int,
    inject_nan: bool,
    stop: bool,
    device: torch.device = torch.device("cpu"),
) -> StepStats:
    """Forward and backward over `accum` micro-batches on `device`; the caller makes the final
    `engine.step()`."""
    totals = torch.zeros(6, dtype=torch.float64)  # loss, task loss, correct, rows, open fraction, stop
    lam = 0.0
    for micro in range(accum):
        batch = to_device(next(iter(batches)), device)  # the sampler moves past the batch before yielding it
        out = engine(**batch)
        loss = out.loss + float("nan") if inject_nan else out.loss
        engine.backward(loss)
        if micro < accum - 1:
            engine.step()  # inside the accumulation window DeepSpeed only accumulates
        correct = (out.logits.argmax(dim=-1) == batch["labels"]).sum()
        task_loss = out.task_loss if out.task_loss is not None else out.loss
        opened = float(out.open_fraction.detach()) if out.open_fraction is not None else 1.0  # baselines
        totals += torch.tensor(
            [
                float(loss.detach()),
                float(task_loss.detach()),
                float(correct),
                len(batch["labels"]),
                opened,
                0,
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
    model: nn.Module,
    method: Method,
    refs: Mapping[str, DatasetRef],
    cfg: ExperimentConfig,
    step: int,
    stats: StepStats,
    dist: ds.DistInfo,
    tracker: Tracker,
    report: Report | None,
) -> dict[str, float]:
    """Clean validation metrics and the trainable % pruning would leave now, logged and reported on rank 0.

    Every rank runs the full validation split (ZeRO-3 needs every rank in every forward), so the numbers
    are the same on all ranks."""
    engine.eval()
    metrics = validate(engine, refs, {t: i for i, t in enumerate(refs)}, cfg.train.eval_batch_size)
    with ds.gathered(ds.adapter_params(model)):
        counts = method.counts(model)
    metrics["trainable_percent_pruned"] = 100.0 * counts["kept"] / counts["backbone"]
    engine.train()
    metrics.update({"train_loss": stats.loss, "open_fraction": stats.open_fraction})
    if dist.is_main:
        tracker.log_metrics(metrics, step=step)
        if report is not None:
            report(step, metrics)
    return metrics


class DivergenceWatch:
    """Warns once (rank 0) when a finite loss grows by orders of magnitude over the first step's: a run that
    diverges without a NaN would otherwise end normally and silently. A run that learns never comes near
    100x its starting loss (about ln of the label count at the start)."""

    FACTOR = 100.0

    def __init__(self) -> None:
        self.first: float | None = None
        self.warned = False

    def see(self, step: int, loss: float, dist: ds.DistInfo, tracker: Tracker) -> None:
        if self.first is None:
            self.first = max(loss, 0.1)
            return
        if self.warned or not loss > self.FACTOR * self.first:
            return
        self.warned = True
        if dist.is_main:
            print(
                f"sla: warning: the loss diverges: {loss:.4g} at step {step}, {loss / self.first:.0f}x the "
                f"first step's ({self.first:.4g}); lower train.lr, or keep train.max_grad_norm on",
                file=sys.stderr,
                flush=True,
            )
            tracker.set_tags({"sla.diverged_at_step": str(step)})


def warn_if_collapsed(
    model: nn.Module, step: int, warned: set[str], dist: ds.DistInfo, tracker: Tracker
) -> set[str]:
    """Say at once (rank 0, once per task) when the decision would keep no adapter for a task: left so, the
    export would be the task's head alone (pruning then refuses it). Every rank calls it (ZeRO-3 gathers).
    Returns the tasks warned about now."""
    if not hasattr(model, "empty_tasks") or getattr(model, "pruned", True):
        return set()
    with ds.gathered(ds.adapter_params(model)):
        empty = set(model.empty_tasks()) - warned
    if empty and dist.is_main:
        cfg = model.config
        how = f"budget={cfg.budget}" if cfg.budget is not None else f"lambda_sparse={cfg.lambda_sparse}"
        print(
            f"sla: warning: at step {step} every adapter of task(s) {sorted(empty)} is closed ({how}); "
            "left so, the export is the head alone. Lower sla.lambda_sparse or set sla.budget",
            file=sys.stderr,
            flush=True,
        )
        tracker.set_tags({f"sla.collapsed.{t}": str(step) for t in empty})
    return empty


def start_or_resume(
    engine: Any,
    model: nn.Module,
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
    checkpoint.check_resumable(
        meta, cfg, fingerprints, dist.world_size, settings.zero_stage, ref.path, sla_resolved(model)
    )
    checkpoint.load(engine, ref)
    batches.load_state_dict(meta["sampler"])
    if hasattr(model, "forward_count"):  # ours: the λ warm-up counter
        model.forward_count.fill_(int(meta["forward_count"]))
    return ref


def decided(model: nn.Module) -> bool:
    return isinstance(model, SLAModel) and model.sla_gates is not None and bool(model.sla_decided_flag)


def sla_resolved(model: nn.Module) -> dict[str, Any] | None:
    """Ours: the model's `SLAConfig` (the `sla:` section with every default filled), JSON-ready."""
    from sla_core.config import SLAConfig

    config = getattr(model, "config", None)
    return json.loads(json.dumps(config.to_dict(), default=str)) if isinstance(config, SLAConfig) else None


def checkpoint_meta(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    batches: MultiTaskBatches,
    model: nn.Module,
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
        "forward_count": int(getattr(model, "forward_count", 0)),
        "sla_resolved": sla_resolved(model),
        # ours: the decided structure, which a resumed compacted run rebuilds before loading its engine
        "decided": model.sla_decided.tolist() if decided(model) else None,
        "compacted": bool(getattr(model, "compacted", False)),
        "world_size": dist.world_size,
        "zero_stage": settings.zero_stage,
        "precision": settings.precision,
        "train_metrics": train_metrics,
    }


def build_model(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    method: Method,
    settings: ds.EngineSettings | None = None,
) -> nn.Module:
    """`method`'s model over a fresh backbone for the tasks of `refs` (label counts from the data). With
    `settings` at ZeRO-3 the backbone is built partitioned across ranks (`ds.construction`)."""
    with ds.construction(settings) if settings is not None else nullcontext(assign_whole) as assign:
        backbone = load_backbone(cfg.backbone, assign=assign)
    model = method.build(backbone, {t: r.num_labels for t, r in refs.items()}, cfg)
    if cfg.train.backbone_dropout is not None:
        set_backbone_dropout(model, cfg.train.backbone_dropout)
    return model


def set_backbone_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout rate of the backbone (not the adapters' nor LoRA's) to `p`."""
    for name, module in model.backbone.named_modules():
        if is_adapter_key(name) or "lora_" in name:
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
    data["sla"] = {**data["sla"], **cfg.resolved_sla()}  # the keys as the run uses them (the budget recipe's)
    params = {f"{section}.{k}": v for section in ("train", "sla") for k, v in data[section].items()}
    params.update(
        {
            "method": cfg.training_method().spec,
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
