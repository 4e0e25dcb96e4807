"""Regenerate docs/RESULTS.md: run the missing cells of the evidence grid, then plot, tabulate, conclude.

    python bench/results.py                        # whole grid (cached cells are skipped), then the report
    python bench/results.py --quick                # tiny budgets, all under runs/results_quick/ (never mixed)
    python bench/results.py --sections 1 2 --plan  # list the cells and the estimated time, run nothing
    python bench/results.py --report-only          # re-render from the cells that exist

Sections of the report: 1 main table, 2 accuracy against kept parameters (bench/pareto.py's cells), 3 λ and
budget, 4 noise (word-only and char+word; clean-trained and noise-trained; which gates noise changes), 5
multi-task sharing, 6 a decoder (SmolLM2), 7 speed and memory (docs/results/step_time.json and
zero_memory.json), 8 conclusions (computed, beside the verdicts of the archived report docs/results/v1).
Sections 1, 3, 4 and 6 train cells; every cell runs through the training engine (`bench/harness.py`). On a
GPU machine the same command runs (and larger budgets: --steps, --large-steps, --large-backbones).

This file is the command line only: `bench/grid.py` lists and runs the cells, `bench/report.py` renders.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.grid import QUICK, SECTIONS, Plan, budget_rows, read_errors, run_grid  # noqa: E402
from sla_core.engine.result import TrainingInterrupted  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets; output under runs/results_quick/")
    p.add_argument(
        "--sections",
        type=int,
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        help=f"the sections whose cells run (default {' '.join(map(str, SECTIONS))}); the report renders all",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="main-table seeds (default 0 1 2)")
    p.add_argument(
        "--sweep-seeds", type=int, nargs="+", help="seeds of the λ sweep and the noise curves (default 0)"
    )
    p.add_argument("--large-seeds", type=int, nargs="+", help="seeds of the large-backbone table")
    p.add_argument("--steps", type=int, help="MiniLM steps per single-task cell (default 640: an RT epoch)")
    p.add_argument("--large-steps", type=int, help="steps of the large-backbone cells (default 150)")
    p.add_argument("--large-backbones", nargs="+", help="backbones of the second table (default smollm2)")
    p.add_argument(
        "--large-methods", nargs="+", help="methods of the second table (default lora_qv_r8 sla_single)"
    )
    p.add_argument("--plan", action="store_true", help="print the cells and the estimate; run nothing")
    p.add_argument("--report-only", action="store_true", help="render the report from existing cells")
    p.add_argument("--no-report", action="store_true", help="run the cells only (several processes at once)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: every core). Two processes with --threads 1 share one grid (lock "
        "files) and use two cores better than one process with two threads",
    )
    args = p.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    overrides = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "sweep_seeds": tuple(args.sweep_seeds) if args.sweep_seeds else None,
        "large_seeds": tuple(args.large_seeds) if args.large_seeds else None,
        "steps": args.steps,
        "large_steps": args.large_steps,
        "large_backbones": tuple(args.large_backbones) if args.large_backbones else None,
        "large_methods": tuple(args.large_methods) if args.large_methods else None,
    }
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None}), args


def print_plan(plan: Plan, sections: Sequence[int]) -> None:
    """Each section's cells, done and left, and the compute left (estimated from per-method step times)."""
    rows = budget_rows(plan, sections)
    print(f"cells in {plan.cells_dir}")
    for section, n, _, measured, done, left in rows:
        print(
            f"section {section}: {n} cells, {done} done ({measured / 60:.0f} min measured), "
            f"{n - done} to run: ~{left / 60:.0f} core-min"
        )
    left_h = sum(r[5] for r in rows) / 3600
    total_h = sum(r[2] for r in rows) / 3600
    print(
        f"left: ~{left_h:.1f} core-hours = ~{left_h / 2:.1f} h on two cores with two processes "
        f"(make results); the whole grid ~{total_h:.1f} core-hours. Interrupt at any time: finished cells "
        "are kept and a rerun resumes."
    )


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    plan, args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.plan:
        print_plan(plan, args.sections)
        return 0
    errors = read_errors(plan)
    if not args.report_only:
        print_plan(plan, args.sections)
        try:
            errors = run_grid(plan, args.sections)
        except TrainingInterrupted:
            return 143  # stopped by SIGTERM: finished cells are kept, the interrupted one resumes
        except KeyboardInterrupt:
            print("interrupted: finished cells are kept; rerun to continue (a cell in training starts over)")
            return 130
    if args.no_report:
        return 0
    from bench.report import write_report

    path = write_report(plan, errors)
    print(f"wrote {path}" + (f"; {len(errors)} cells failed (listed in the report)" if errors else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
