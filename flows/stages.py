"""The stages of `sla_pipeline` as plain functions, and the typed references that pass between them.

Each function does one stage's work and returns a frozen dataclass of paths, fingerprints and numbers
(never tensors), so `flows.pipeline` can wrap each in a Prefect task and the CLI can call them alone.
The stages cache on disk: data by fingerprint, a finished search by its `search.json`, a finished training
by its `result.json`; an interrupted search or training resumes from its own state.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sla_core.data import DatasetRef
from sla_core.engine.result import EvaluationReport, PrunedAdapterSet, TrainResult
from sla_core.experiment import ExperimentConfig

TRIAL_ONLY = ("train.steps",)  # set by the search for its trials; the final training keeps its own
SEARCH_EVAL_ROWS = 300  # evaluation rows per task and split in a search trial (the final run uses all)


# ------------------------------------------------------------------------------------------- artefacts
@dataclass(frozen=True)
class PreparedData:
    """Prepared datasets by task, and their noisy evaluation copies: {task: {split: {level: ref}}}."""

    refs: dict[str, DatasetRef]
    noisy: dict[str, dict[str, dict[float, DatasetRef]]]
    seconds: float


@dataclass(frozen=True)
class SearchOutcome:
    """The search's best overrides (empty when no trial qualified, with `reason`) and where it lives."""

    experiment_dir: str
    overrides: dict[str, Any]
    metric: str
    value: float | None
    trials_csv: str
    counts: dict[str, int]
    reason: str
    seconds: float
    ray_overhead_seconds: float
    cached: bool


@dataclass(frozen=True)
class TrainedRun:
    """The engine's result (the last checkpoint and the unpruned set in it) and the time it took."""

    result: TrainResult
    seconds: float
    cached: bool


@dataclass(frozen=True)
class Figures:
    """The pictures of a finished run: the gate heatmap (ours) and the accuracy-against-noise curve."""

    gate_heatmap: str | None
    noise_curve: str


@dataclass(frozen=True)
class Registration:
    """The registered version and the promotion decision."""

    name: str
    version: str
    created: bool
    promoted: bool
    champion_version: str | None
    alias: str
    decision: dict[str, Any]
    model_uri: str


# ------------------------------------------------------------------------------------------ stage bodies
def prepare_all(cfg: ExperimentConfig) -> PreparedData:
    """Every task prepared and cached by fingerprint, with noisy validation/test copies at each level."""
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_eval_levels, prepare_tasks

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.backbone)
    refs = prepare_tasks(cfg.tasks, tokenizer, cfg.cache_dir, progress=sys.stderr.isatty())
    levels = {t.name: [lv for lv in t.eval_noise_levels if lv > 0] for t in cfg.tasks}
    seeds = {t.name: t.split_seed for t in cfg.tasks}  # the engine's evaluation uses the same seeds
    noisy = {}
    for name, ref in refs.items():
        print(f"data: {name} ready ({', '.join(f'{s} {n}' for s, n in ref.counts.items())} rows)", flush=True)
        if levels[name]:
            print(f"data: {name}: noisy validation/test copies at levels {levels[name]}", flush=True)
        noisy[name] = {
            split: prepare_eval_levels(ref, tokenizer, levels[name], split, seeds[name])
            for split in ("validation", "test")
        }
    return PreparedData(refs, noisy, time.perf_counter() - t0)


def run_or_reuse_search(
    cfg: ExperimentConfig, data: PreparedData, out_dir: Path, num_samples: int, tracker: Any
) -> SearchOutcome:
    """Run the search, resume an interrupted one, or reuse a finished one.

    Trials evaluate clean data only, on at most `SEARCH_EVAL_ROWS` rows per split (prepared and cached
    apart from the full sets); the final training evaluates everything.
    """
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks
    from tuning.results import RESULT_FILE, SearchResult
    from tuning.runner import SPEC_FILE, run_search

    t0 = time.perf_counter()
    quick = [
        t.model_copy(
            update={
                "eval_noise_levels": [0.0],
                "max_eval_examples": min(t.max_eval_examples or SEARCH_EVAL_ROWS, SEARCH_EVAL_ROWS),
            }
        )
        for t in cfg.tasks
    ]
    search_cfg = cfg.model_copy(update={"tasks": quick})
    exp_dir = out_dir / search_cfg.name
    done = exp_dir / RESULT_FILE
    cached = done.is_file() and SearchResult.from_json(done.read_text(encoding="utf-8")).complete
    prep_seconds = 0.0
    if cached:
        result = SearchResult.from_json(done.read_text(encoding="utf-8"))
    else:
        resume = (exp_dir / SPEC_FILE).is_file()
        t_prep = time.perf_counter()
        refs = prepare_tasks(quick, load_tokenizer(cfg.backbone), cfg.cache_dir, progress=False)
        prep_seconds = time.perf_counter() - t_prep
        result = run_search(
            search_cfg,
            refs,
            out_dir=out_dir,
            num_samples=num_samples,
            resume=resume,
            tracker=tracker,
            verbose=0,
        )
    seconds = time.perf_counter() - t0
    best = result.best
    return SearchOutcome(
        result.experiment_dir,
        {k: v for k, v in best.overrides.items() if k not in TRIAL_ONLY} if best else {},
        cfg.tune.metric,
        best.value if best else None,
        result.trials_csv,
        dict(result.counts),
        result.reason,
        seconds,
        0.0 if cached else max(seconds - prep_seconds - _trials_span(exp_dir / "trials"), 0.0),
        cached,
    )


def _trials_span(trials_dir: Path) -> float:
    """Seconds during which at least one trial ran (first attempt start to last file written, unioned)."""
    spans = []
    for trial in trials_dir.glob("*/"):
        attempts = trial / "attempts.jsonl"
        if not attempts.is_file():
            continue
        lines = attempts.read_text(encoding="utf-8").splitlines()
        start = json.loads(lines[0])["time"] if lines else attempts.stat().st_mtime
        end = max(f.stat().st_mtime for f in trial.rglob("*") if f.is_file())
        spans.append((start, max(end, start)))
    total, cursor = 0.0, float("-inf")
    for start, end in sorted(spans):
        start = max(start, cursor)
        if end > start:
            total, cursor = total + end - start, end
    return total


def train_or_reuse(cfg: ExperimentConfig, data: PreparedData, run_dir: Path, tracker: Any) -> TrainedRun:
    """The engine's result if this run finished before, else train (resuming from the last checkpoint)."""
    t0 = time.perf_counter()
    try:
        result = TrainResult.read(run_dir)
        if Path(result.trained).is_dir() and result.steps == cfg.train.steps:
            return TrainedRun(result, time.perf_counter() - t0, True)
    except FileNotFoundError:
        pass
    import torch

    from sla_core.engine.loop import train

    before = torch.get_num_threads()
    adapt = AdaptiveThreads()
    adapt(0)
    try:
        result = train(cfg, data.refs, run_dir=run_dir, tracker=tracker, resume=True, on_step=adapt)
    finally:
        torch.set_num_threads(before)
    return TrainedRun(result, time.perf_counter() - t0, False)


class AdaptiveThreads:
    """Re-picks torch's thread count every `every` steps from the load of the moment (`torch_threads`), so
    that a load passing at the start does not pin a long training (or evaluation) to one thread, nor a quiet
    start to two threads on cores that become busy. `SLA_TORCH_THREADS` fixes the count instead."""

    def __init__(self, every: int = 50, pick: Any = None) -> None:
        self.every, self.pick = every, pick or torch_threads

    def __call__(self, step: int) -> None:
        import torch

        if step % self.every == 0:
            threads = self.pick()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)


def torch_threads() -> int:
    """Threads for the final training: `SLA_TORCH_THREADS` if set, else every core nothing else is using.

    `make` exports OMP_NUM_THREADS=1 (the tests share the cores), but an idle machine trains ~1.7x faster on
    two threads; on busy cores, though, a second thread made steps 5x slower (6.5 s against 1.2 s), so other
    runnable threads (sampled from /proc/loadavg) each take a core away.
    """
    given = os.environ.get("SLA_TORCH_THREADS")
    if given:
        return max(1, int(given))
    cores = os.cpu_count() or 1
    try:
        samples = []
        for _ in range(5):
            running = Path("/proc/loadavg").read_text(encoding="ascii").split()[3].split("/")[0]
            samples.append(int(running) - 1)  # minus the reader
            time.sleep(0.1)
        others = sorted(samples)[len(samples) // 2]
    except (OSError, IndexError, ValueError):
        others = 0
    return max(1, cores - max(others, 0))


def prune_trained(trained: TrainedRun, out: Path) -> PrunedAdapterSet:
    """The engine's prune stage, reused when `out` already holds the pruned set of this trained set."""
    from sla_core.engine.stages import prune

    try:
        done = PrunedAdapterSet.read(out.parent)
        if done.step == trained.result.steps and Path(done.path).is_dir() and Path(done.path) == out:
            return done
    except (FileNotFoundError, TypeError, KeyError):
        pass
    return prune(trained.result, out)


def draw_figures(pruned: PrunedAdapterSet, evaluation: EvaluationReport, out_dir: Path) -> Figures:
    """The gate heatmap (ours: P(open), or the share of units kept where a candidate has several, per layer,
    site and task) and the noise curve of the pruned set."""
    from flows.plots import plot_gate_heatmap, plot_noise_curve

    heatmap = None
    if pruned.kept_share:  # several units per candidate: how much of each the decision kept
        heatmap = str(
            plot_gate_heatmap(
                pruned.kept_share,
                out_dir / "gate_heatmap.png",
                "share of each candidate's units kept, per layer, site and task",
                label="share kept",
            )
        )
    elif pruned.gate_probability:
        heatmap = str(
            plot_gate_heatmap(
                pruned.gate_probability,
                out_dir / "gate_heatmap.png",
                "P(gate open) after training, per layer, site and task",
            )
        )
    curves = {t: {_level(k): v for k, v in row.items()} for t, row in evaluation.accuracy.items()}
    curve = plot_noise_curve(curves, out_dir / "noise_curve.png")
    return Figures(heatmap, str(curve))


def _level(key: str) -> float:
    return 0.0 if key == "clean" else float(key.removeprefix("noise"))
