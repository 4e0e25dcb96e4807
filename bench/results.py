"""Regenerate docs/RESULTS.md: run the missing cells of the evidence grid, then plot, tabulate, conclude.

    python bench/results.py                        # whole grid (cached cells are skipped), then the report
    python bench/results.py --quick                # tiny budgets, all under runs/results_quick/ (never mixed)
    python bench/results.py --sections 1 2 --plan  # list the cells and the estimated time, run nothing
    python bench/results.py --report-only          # re-render from the cells that exist

Sections: 1 main tables, 2 λ sensitivity, 3 noise robustness, 4 budget mode, 5 speed and memory (read from
docs/results/step_time.json and zero_memory.json), 6 learned structure, 7 conclusions (computed). On a GPU
machine the same command runs larger budgets and backbones: --steps, --large-steps, --large-backbones.

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
from bench.grid import FOLLOW_UP, QUICK, SECTIONS, Plan, budget_rows, read_errors, run_grid  # noqa: E402
from bench.report import write_report  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets; output under runs/results_quick/")
    p.add_argument(
        "--sections",
        type=int,
        nargs="+",
        default=list(SECTIONS),
        choices=(*SECTIONS, FOLLOW_UP),
        help=f"default {' '.join(map(str, SECTIONS))}; {FOLLOW_UP} = the optional follow-ups",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="main-table seeds (default 0 1 2)")
    p.add_argument("--sweep-seeds", type=int, nargs="+", help="seeds of sections 2-4 (default 0)")
    p.add_argument("--large-seeds", type=int, nargs="+", help="seeds of the large-backbone table")
    p.add_argument("--steps", type=int, help="MiniLM steps per single-task cell (default 300)")
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
        rows = budget_rows(plan, args.sections)
        for section, n, est, measured, done in rows:
            print(
                f"section {section}: {n} cells, ~{est / 60:.0f} core-min; "
                f"{done} cached ({measured / 60:.0f} min)"
            )
        hours = sum(r[2] for r in rows) / 3600
        print(f"total ~{hours:.2f} core-hours: ~{hours / 2:.1f} h with two processes (--threads 1 each)")
        return 0
    errors = read_errors(plan)
    if not args.report_only:
        errors = run_grid(plan, [s for s in args.sections if s != 5])
    if args.no_report:
        return 0
    path = write_report(plan, errors)
    print(f"wrote {path}" + (f"; {len(errors)} cells failed (listed in the report)" if errors else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
