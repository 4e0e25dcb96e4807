"""The stages after training, each a function with one typed artefact: `prune` and `evaluate`.

`train` (sla_core.engine.loop) ends at a checkpoint holding the unpruned trained set; `prune` turns that
set into the shipped one; `evaluate` measures any set. `run` chains the three, as `sla train` does. The
CLI verbs, the Prefect tasks and the Ray trial call these same functions, so a stage can stand between any
two of them (e.g. a check or an edit of the trained set before pruning).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sla_core.data import DatasetRef
from sla_core.engine.card import write_card
from sla_core.engine.evaluate import evaluate_tasks, gate_map, level_key, noise_measured, summarize
from sla_core.engine.result import EvaluationReport, PrunedAdapterSet, TrainResult
from sla_core.experiment import ExperimentConfig
from sla_core.files import atomic_write_text, sha256_file
from sla_core.model import SLAModel
from sla_core.tracking import NullTracker, Tracker

ADAPTERS_DIR = "adapters"  # the pruned set, in the run folder
METRICS_FILE = "metrics.json"


def _description(path: str | Path) -> dict[str, Any]:
    """The JSON description of a saved set, ours or a baseline's."""
    from sla_core.io import CONFIG_NAME
    from sla_core.methods.baselines import SET_CONFIG

    for name in (CONFIG_NAME, SET_CONFIG):
        file = Path(path) / name
        if file.is_file():
            return json.loads(file.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{path}: not a saved set (no {CONFIG_NAME} or {SET_CONFIG})")


def backbone_name(path: str | Path) -> str:
    """The backbone a saved set (ours or a baseline's) was trained on, as `load_backbone` names it."""
    from sla_core.io import backbone_source

    return backbone_source(path, _description(path))


def _load(path: str | Path, backbone: str | None) -> tuple[Any, Any]:
    from sla_core.backbones import load_backbone
    from sla_core.methods import load_trained

    return load_trained(load_backbone(backbone or backbone_name(path)), path)


def prune(
    trained: TrainResult | str | Path,
    out: str | Path,
    *,
    backbone: str | None = None,
    allow_empty: bool = False,
    merge: bool = False,
) -> PrunedAdapterSet:
    """Decide the gates of a trained set, drop the closed adapters, fold the open gates into the weights,
    and write the result to `out` (with `pruned.json` beside it). Baselines are copied: nothing to prune.

    Args:
        trained: a `TrainResult` or the folder of a trained (unpruned) set.
        backbone: the backbone to load (default: the one the set names).
        allow_empty: ship a task whose adapters were all closed (its head alone) instead of refusing.
        merge: also fold the kept LoRA-type units into the backbone's weights (`SLAModel.merge`): `out` is
            then a whole model (`sla_core.io.save_merged`) that runs at the bare backbone's cost. The
            counts still describe the structure kept (its LoRA-type parameters now live in the weights).
    Raises:
        AdapterFileError: the set is foreign, tampered with, or for another backbone.
        EmptyStructureError: the decision closed every adapter of a task (and not `allow_empty`).
    """
    source = trained.trained if isinstance(trained, TrainResult) else str(trained)
    method, model = _load(
        source, backbone or (trained.backbone if isinstance(trained, TrainResult) else None)
    )
    recorded = _description(source).get("extra", {})  # what training wrote beside the weights
    step = trained.steps if isinstance(trained, TrainResult) else int(recorded.get("step", 0))
    before = method.counts(model)
    gates = gate_map(model) if isinstance(model, SLAModel) and not model.pruned else {}
    if allow_empty and isinstance(model, SLAModel):
        model.config.allow_empty = True
    shipped = method.prune(model).eval()
    counts_after = method.counts(shipped)
    out = Path(out)
    extra = {"step": step, "source": source}
    if recorded.get("tasks"):  # label names and max lengths, for `sla predict` on the shipped set
        extra["tasks"] = recorded["tasks"]
    if merge:
        if not isinstance(shipped, SLAModel):
            raise ValueError(f"{source}: --merge folds ours' LoRA-type units; a {method.spec} set has none")
        from sla_core.io import save_merged

        save_merged(shipped.merge(), out, extra={"method": method.spec, **extra})
    else:
        method.save(shipped, out, extra=extra)
    ours = out / "sla_adapter_model.safetensors"  # a merged folder also holds the backbone's weights
    weights = ours if ours.is_file() else next(p for p in sorted(out.glob("*.safetensors")))
    result = PrunedAdapterSet(
        path=str(out),
        sha256=sha256_file(weights),
        method=method.spec,
        backbone=backbone or backbone_name(out),
        step=step,
        counts_before=before,
        counts_after=counts_after,
        open_candidates=gates.get("open", {}),
        gate_probability=gates.get("probability", {}),
        kept_share=gates.get("kept_share", {}),
    )
    result.write(out.parent)
    write_card(result)
    return result


def evaluate(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    adapters: str | Path,
    out_dir: str | Path,
    *,
    before: str | Path | None = None,
    tracker: Tracker | None = None,
    step: int | None = None,
    splits: tuple[str, ...] = ("validation", "test"),
    noisy: bool = True,
) -> EvaluationReport:
    """Accuracy and macro-F1 of the set at `adapters` per task, split and noise level (the levels of
    `cfg.tasks[*].eval_noise_levels`); writes `metrics.json` and `evaluation.json` to `out_dir`.

    Args:
        before: the unpruned trained set; its clean accuracy (and noisy, with
            `train.eval_noise_before_pruning`) is reported beside, which shows that pruning is exact.
        noisy: False evaluates clean data only (the search's light validation).
    """
    from sla_core.backbones import load_tokenizer

    tracker = tracker or NullTracker()
    tokenizer = load_tokenizer(cfg.backbone)
    levels = {t.name: list(t.eval_noise_levels) for t in cfg.tasks} if noisy else {}
    seeds = {t.name: t.split_seed for t in cfg.tasks}
    kinds = {t.name: list(t.eval_noise_kinds) for t in cfg.tasks}
    kwargs = {"batch_size": cfg.train.eval_batch_size, "seeds": seeds, "splits": splits, "kinds": kinds}
    method, model = _load(adapters, cfg.backbone)
    results = evaluate_tasks(model, refs, tokenizer, levels, desc="evaluate (pruned)", **kwargs)
    counts = method.counts(model)
    report: dict[str, Any] = {
        "run": {"name": cfg.name, "backbone": cfg.backbone, "method": method.spec, "step": step},
        "adapters": str(adapters),
        "tasks": {t: {"after": results[t]} for t in refs},
        "parameter_counts": {"after": counts},
        "trainable_percent": {"after": 100.0 * counts["trainable"] / counts["backbone"]},
        "noise_measured": noise_measured(refs, levels, tokenizer, seeds, kinds),
        "datasets": {t: {"fingerprint": r.fingerprint, "counts": r.counts} for t, r in refs.items()},
    }
    earlier = None
    if before is not None:
        del model
        unpruned_method, unpruned = _load(before, cfg.backbone)
        earlier = evaluate_tasks(
            unpruned,
            refs,
            tokenizer,
            levels if cfg.train.eval_noisy_before_pruning else {},
            desc="evaluate (unpruned)",
            **kwargs,
        )
        counts_before = unpruned_method.counts(unpruned)
        for t in refs:
            report["tasks"][t]["before"] = earlier[t]
        report["parameter_counts"]["before"] = counts_before
        report["trainable_percent"]["before"] = 100.0 * counts_before["trainable"] / counts_before["backbone"]
    summary = summarize(results, earlier)
    summary["trainable_percent_after"] = report["trainable_percent"]["after"]
    if "before" in report["trainable_percent"]:
        summary["trainable_percent_before"] = report["trainable_percent"]["before"]
    report["summary"] = summary
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    atomic_write_text(metrics_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    accuracy = {t: {lv: float(s["accuracy"]) for lv, s in results[t].get("test", {}).items()} for t in refs}
    evaluation = EvaluationReport(str(metrics_path), summary, accuracy)
    evaluation.write(out_dir)
    _complete_card(Path(adapters), out_dir, summary)
    tracker.log_metrics(summary, step=step)
    tracker.log_artifact(metrics_path)
    return evaluation


def _complete_card(adapters: Path, out_dir: Path, summary: dict[str, float]) -> None:
    """Add the metrics to the model card of a run's own pruned set (the set `prune` wrote beside `out_dir`);
    a set evaluated from elsewhere is left as it is."""
    try:
        pruned = PrunedAdapterSet.read(out_dir)
    except (FileNotFoundError, TypeError, ValueError):
        return
    if Path(pruned.path).resolve() == adapters.resolve() and adapters.parent.resolve() == out_dir.resolve():
        write_card(pruned, summary)


def run(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    run_dir: str | Path,
    *,
    tracker: Tracker | None = None,
    resume: bool = False,
    report: Callable[[int, dict[str, float]], None] | None = None,
    do_prune: bool = True,
    do_evaluate: bool = True,
) -> tuple[TrainResult, PrunedAdapterSet | None, EvaluationReport | None]:
    """Train, then prune (into `<run_dir>/adapters`), then evaluate the pruned set beside the unpruned one.

    Training returns at once when its last step is already checkpointed; pruning and evaluation run again.
    Only rank 0 prunes and evaluates."""
    from sla_core.engine import ds
    from sla_core.engine.loop import train

    tracker = tracker or NullTracker()
    run_dir = Path(run_dir)
    main = ds.dist_info().is_main
    stages = 1 + do_prune + (do_prune and do_evaluate)
    if main:
        _stage(1, stages, f"train {cfg.method} on {', '.join(refs)} ({cfg.train.steps} steps)")
    trained = train(cfg, refs, run_dir=run_dir, tracker=tracker, resume=resume, report=report)
    if not main:
        return trained, None, None
    return (trained, *finish(cfg, refs, trained, tracker=tracker, do_prune=do_prune, do_evaluate=do_evaluate))


def finish(
    cfg: ExperimentConfig,
    refs: Mapping[str, DatasetRef],
    trained: TrainResult,
    *,
    tracker: Tracker | None = None,
    do_prune: bool = True,
    do_evaluate: bool = True,
) -> tuple[PrunedAdapterSet | None, EvaluationReport | None]:
    """The stages after a training (in the run folder): prune, then evaluate beside the unpruned set."""
    tracker = tracker or NullTracker()
    run_dir = Path(trained.run_dir)
    stages = 1 + do_prune + (do_prune and do_evaluate)
    if not do_prune:
        return None, None
    _stage(2, stages, f"prune {trained.trained} -> {run_dir / ADAPTERS_DIR}")
    pruned = prune(trained, run_dir / ADAPTERS_DIR, backbone=cfg.backbone)
    tracker.log_artifact(pruned.path, ADAPTERS_DIR)
    if not do_evaluate:
        return pruned, None
    _stage(3, stages, "evaluate the pruned set and the unpruned one, clean and noisy")
    evaluation = evaluate(
        cfg, refs, pruned.path, run_dir, before=trained.trained, tracker=tracker, step=trained.steps
    )
    return pruned, evaluation


def _stage(k: int, n: int, what: str) -> None:
    """One line per stage on stderr, so the minutes after the training bar are not silent."""
    print(f"stage {k}/{n}: {what}", file=sys.stderr, flush=True)


__all__ = ["ADAPTERS_DIR", "METRICS_FILE", "evaluate", "finish", "level_key", "prune", "run"]
