"""The evidence grid: which cells each section of docs/RESULTS.md reads, and running the missing ones.

A cell is one training run of `bench.harness` (`Cell`, cached as one JSON file). `run_grid` runs the cells
that are not cached; several processes may share one grid, each cell claimed with a file lock.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from bench.harness import NOISE_KINDS, ROOT, Cell, read_cell, run_cell
from sla_core.engine.result import TrainingInterrupted

TASKS = ("rotten_tomatoes", "tweets", "bbc_news")
RT = ("rotten_tomatoes",)
MAIN_METHODS = ("full_ft", "lora_qv_r8", "lora_matched", "prefix", "houlsby", "sla_single")
NOISE_METHODS = ("sla_single", "lora_qv_r8", "full_ft")
LEVELS = (0.0, 0.05, 0.10, 0.15, 0.20)
# Trained at the noise level: every level for char and word noise, two for word noise only; every seed of the
# main table at NOISE_SEEDS_LEVEL (the others at the sweep seeds).
TRAIN_LEVELS = {"char+word": (0.05, 0.10, 0.15, 0.20), "word": (0.10, 0.20)}
NOISE_SEEDS_LEVEL = 0.10
LAMBDAS = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
# Sections of docs/RESULTS.md; those that train: 1 main table, 3 λ, 4 noise, 6 the decoder (2 reads
# bench/pareto.py's cells, 5 section 1's, 7 the speed and memory benchmarks, 8 concludes).
SECTIONS = (1, 3, 4, 6)
ALL_SECTIONS = (1, 2, 3, 4, 5, 6, 7, 8)
# Seconds per training step of one process with one torch thread (`--threads 1`) while a second such process
# runs on the other core (how `make results` is meant to run: two processes share the grid), at batch 16,
# max_length 64 (dynamic padding: Rotten Tomatoes batches are narrowest, BBC News ones full, hence TASK_STEP).
# MiniLM: this grid's seed-0 cells on Rotten Tomatoes (2026-12-03, docs/results/grid/cells); the multi-task
# step is a guess between the tasks'; SmolLM2 from its harness-version-1 cells (3.7-4.1 s/step), so rougher.
# Only the estimate uses them; the report quotes measured times.
EST_STEP_S = {
    "minilm": {"full_ft": 1.07, "lora_qv_r8": 0.55, "lora_matched": 0.55, "prefix": 0.56,
               "houlsby": 0.57, "sla_single": 0.64, "sla_multi": 0.75},
    "smollm2": {"full_ft": 6.0, "lora_qv_r8": 3.8, "sla_single": 4.1},  # also any other large backbone
}  # fmt: skip
TASK_STEP = {"tweets": 1.15, "bbc_news": 1.3}  # relative to Rotten Tomatoes' step (the same cells)
EST_EVAL_S = {"minilm": 13.0, "smollm2": 60.0}  # per 1,000 test rows and pass
EST_OVERHEAD_S = {"minilm": 20.0, "smollm2": 40.0}  # build, data, pruning, structure per cell
TEST_ROWS = {"rotten_tomatoes": 1000, "tweets": 1000, "bbc_news": 212}  # at the default cap of 1,000
TRAIN_ROWS = {"rotten_tomatoes": 10220, "tweets": 29724, "bbc_news": 1700}


@dataclass(frozen=True)
class Plan:
    """Budgets and where the cells, plots and report go."""

    steps: int = 640  # one epoch of Rotten Tomatoes' 10,220 training rows at batch 16, for every method
    large_steps: int = 150
    batch_size: int = 16
    max_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: tuple[int, ...] = (0,)  # the λ sweep and the noise curves; NOISE_SEEDS_LEVEL at `seeds`
    large_seeds: tuple[int, ...] = (0, 1, 2)
    large_backbones: tuple[str, ...] = ("smollm2",)
    large_methods: tuple[str, ...] = ("lora_qv_r8", "sla_single")
    out: Path = ROOT / "docs" / "results"
    report: Path = ROOT / "docs" / "RESULTS.md"
    cache_dir: Path = ROOT / "data" / "cache"
    quick: bool = False

    @property
    def cells_dir(self) -> Path:
        return self.out / "grid" / "cells"

    def cell(self, method: str, tasks: tuple[str, ...] = RT, seed: int = 0, backbone: str = "minilm",
             **knobs: Any) -> Cell:  # fmt: skip
        """The canonical cell; sections 3 and 4 change knobs, so the main table's cells are reused."""
        steps = self.steps if backbone == "minilm" else self.large_steps
        if method == "sla_multi":
            steps *= len(tasks)  # the same total compute as one single-task run per task
        noisy = backbone == "minilm" and tasks == RT and method in NOISE_METHODS
        base = {
            "method": method, "backbone": backbone, "tasks": tasks, "seed": seed, "steps": steps,
            "batch_size": self.batch_size, "max_length": self.max_length,
            "max_train_examples": self.max_train_examples, "max_eval_examples": self.max_eval_examples,
            "eval_noise": LEVELS[1:] if noisy else (), "eval_kinds": NOISE_KINDS if noisy else ("char+word",),
        }  # fmt: skip
        return Cell(**{**base, **knobs})


QUICK = Plan(
    steps=4, large_steps=4, batch_size=4, max_length=32, max_train_examples=64, max_eval_examples=32,
    seeds=(0,), sweep_seeds=(0,), large_seeds=(0,), out=ROOT / "runs" / "results_quick",
    report=ROOT / "runs" / "results_quick" / "RESULTS.md", quick=True,
)  # fmt: skip


def section_cells(section: int, plan: Plan) -> list[Cell]:
    """The cells one section reads (sections 2, 7 and 8 read no cell of this grid; 5 reads section 1's)."""
    if section in (1, 5):
        main = [plan.cell(m, (t,), s) for m in MAIN_METHODS for t in TASKS for s in plan.seeds]
        return main + [plan.cell("sla_multi", TASKS, s) for s in plan.seeds]
    if section == 3:
        return [lambda_cell(plan, x, s) for x in LAMBDAS for s in plan.sweep_seeds]
    if section == 4:
        return [noise_cell(plan, m, k, p, s) for m, k, p, s in noise_grid(plan)]
    if section == 6:
        return [
            plan.cell(m, RT, s, backbone=b)
            for b in plan.large_backbones
            for m in plan.large_methods
            for s in plan.large_seeds
        ]
    return []


def lambda_cell(plan: Plan, lam: float, seed: int) -> Cell:
    """Ours in λ mode (clean test only)."""
    return plan.cell("sla_single", RT, seed, lambda_sparse=lam, eval_noise=(), eval_kinds=("char+word",))


def noise_grid(plan: Plan) -> list[tuple[str, str, float, int]]:
    """(method, kind, level, seed) of every trained-at-noise cell (level 0 is the main table's cell)."""
    out = []
    for kind, levels in TRAIN_LEVELS.items():
        for p in levels:
            seeds = plan.seeds if p == NOISE_SEEDS_LEVEL else plan.sweep_seeds
            out += [(m, kind, p, s) for m in NOISE_METHODS for s in seeds]
    return out


def noise_cell(plan: Plan, method: str, kind: str, level: float, seed: int) -> Cell:
    """Trained and tested at `level` of `kind` noise; level 0 is the main table's cell."""
    if level == 0:
        return plan.cell(method, RT, seed)
    return plan.cell(
        method, RT, seed, train_noise=level, noise_kind=kind, eval_noise=(level,), eval_kinds=(kind,)
    )


def unique(cells: Sequence[Cell]) -> list[Cell]:
    seen: dict[str, Cell] = {}
    for c in cells:
        seen.setdefault(c.key(), c)
    return list(seen.values())


def estimate_s(cell: Cell) -> float:
    """Seconds of one core for one cell (see EST_STEP_S)."""
    b = cell.backbone if cell.backbone in EST_STEP_S else "smollm2"
    step = EST_STEP_S[b].get(cell.method, max(EST_STEP_S[b].values()))
    step *= sum(TASK_STEP.get(t, 1.0) for t in cell.tasks) / len(cell.tasks)
    rows = sum(min(TEST_ROWS.get(t, 1000), cell.max_eval_examples or 10**9) for t in cell.tasks)
    evals = rows / 1000 * EST_EVAL_S[b] * (1 + len(cell.eval_noise) * len(cell.eval_kinds))
    scale = (cell.batch_size * cell.max_length) / (16 * 64)
    return EST_OVERHEAD_S[b] + cell.steps * step * scale + evals


def budget_rows(plan: Plan, sections: Sequence[int]) -> list[tuple[str, int, float, float, int, float]]:
    """(section, new cells, estimated core-s, measured s of cached cells, cached cells, estimated core-s of
    the cells left), each section's cells counted once: a cell shared with an earlier section belongs to
    that one."""
    seen: set[str] = set()
    rows = []
    for section in sections:
        cells = [c for c in unique(section_cells(section, plan)) if c.key() not in seen]
        seen |= {c.key() for c in cells}
        results = [read_cell(c, plan.cells_dir) for c in cells]
        done = [r for r in results if r is not None]
        measured = sum(r["total_s"] for r in done)
        left = sum(estimate_s(c) for c, r in zip(cells, results, strict=True) if r is None)
        rows.append((str(section), len(cells), sum(map(estimate_s, cells)), measured, len(done), left))
    return rows


def claim(cell: Cell, cells_dir: Path) -> FileLock | None:
    """The held lock of `cell`, or None when another process holds it (each cell runs once).

    Several `results.py` processes may share one grid. The operating system releases the lock of a process
    that dies, so a crashed run never blocks a cell."""
    cells_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(cells_dir / f"_{cell.key()}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def run_grid(plan: Plan, sections: Sequence[int], log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the missing cells of `sections`; returns {cell key: error} for those that failed.

    Several processes may run this at once (e.g. two with `--threads 1` on two cores): each claims a cell
    with a lock file before running it."""
    errors = read_errors(plan)
    cells = unique([c for s in sections for c in section_cells(s, plan)])
    todo = [c for c in cells if read_cell(c, plan.cells_dir) is None]
    # Seed-major, so an interrupted grid still has every table at one seed; within a seed ours' single-task
    # cells first (the noise mechanism's seed-to-seed overlap needs them), the slow large backbones (and
    # their full fine-tuning above all) last.
    todo.sort(
        key=lambda c: (
            c.seed,
            c.backbone != "minilm",
            c.backbone != "minilm" and c.method == "full_ft",
            c.method != "sla_single",
        )
    )
    left = sum(map(estimate_s, todo))
    log(
        f"{len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run (~{left / 60:.0f} core-min)"
    )
    start = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        t0 = time.perf_counter()
        left -= estimate_s(cell)
        lock = claim(cell, plan.cells_dir)
        if lock is None:
            log(f"[{i}/{len(todo)}] {cell.key()} run by another process")
            continue
        try:
            if read_cell(cell, plan.cells_dir) is not None:  # finished by another process meanwhile
                log(f"[{i}/{len(todo)}] {cell.key()} run by another process")
                continue
            run_cell(cell, plan.cells_dir, plan.cache_dir)
            errors.pop(cell.key(), None)
        except TrainingInterrupted as err:  # SIGTERM: stop here; the next run resumes the cell from it
            log(f"[{i}/{len(todo)}] {cell.key()} stopped: {err}. Rerun to continue.")
            raise
        except Exception as err:  # one failing method must not stop the grid; the report lists it
            errors[cell.key()] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            lock.release()
        log(
            f"[{i}/{len(todo)}] {cell.key()} {time.perf_counter() - t0:.0f} s "
            f"(elapsed {(time.perf_counter() - start) / 60:.1f} min, ~{left / 60:.0f} core-min left)"
        )
        errors = write_errors(plan, errors)
    return errors


def write_errors(plan: Plan, errors: dict[str, str]) -> dict[str, str]:
    """Merge `errors` with the other processes' recorded failures into `_errors.json`; returns the merge."""
    with FileLock(plan.cells_dir / "_errors.json.lock"):
        merged = {**read_errors(plan), **errors}
        path = plan.cells_dir / "_errors.json"
        path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return merged


def read_errors(plan: Plan) -> dict[str, str]:
    """Failures recorded by the last run (every shard's file), less the cells that have since finished."""
    errors: dict[str, str] = {}
    for path in sorted(plan.cells_dir.glob("_errors*.json")):
        errors.update(json.loads(path.read_text()))
    done = {p.stem for p in plan.cells_dir.glob("*.json") if not p.name.startswith("_")}
    return {k: v for k, v in errors.items() if k not in done}
