"""One process of a training job: `python -m sla_core.engine.worker --config X [--set k=v] --run-dir D`.

Launchers (torchrun, the deepspeed runner) start this module in every process, which trains; `sla train`
then prunes and evaluates in its own process. Without `--nproc`/`--hostfile`, `sla train` calls
`run_experiment` in its own process instead. Exit codes: 0 done, 1 failed (the message names the step or
the bad input), 143 stopped by SIGTERM after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sla_core.backbones import load_tokenizer
from sla_core.data import DataError, prepare_tasks
from sla_core.engine.result import (
    EvaluationReport,
    NonFiniteLossError,
    PrunedAdapterSet,
    TrainingInterrupted,
    TrainResult,
)
from sla_core.experiment import ExperimentConfig, load_experiment, parse_overrides
from sla_core.tracking import JsonTracker, NullTracker, Tracker

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, as a shell reports a process ended by it
TRACKING_FILE = "tracking.jsonl"


def run_experiment(
    cfg: ExperimentConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    tracker: Tracker | None = None,
    report: Callable[[int, dict[str, float]], None] | None = None,
    prune: bool = True,
    evaluate: bool = True,
) -> tuple[TrainResult, PrunedAdapterSet | None, EvaluationReport | None]:
    """Prepare the data of `cfg` (a cache hit when done before), train on it, then prune and evaluate.

    Args:
        run_dir: defaults to `cfg.run_dir`. tracker: defaults to a `JsonTracker` writing
            `<run_dir>/tracking.jsonl` on rank 0.
        prune, evaluate: run these stages after training (rank 0).
    """
    from sla_core.engine import ds
    from sla_core.engine.stages import run

    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
    main = ds.dist_info().is_main
    if tracker is None:
        tracker = JsonTracker(run_dir / TRACKING_FILE) if main else NullTracker()
    tokenizer = load_tokenizer(cfg.backbone)
    # Every process prepares; the cache is written atomically, so all but the first get a hit.
    refs = prepare_tasks(cfg.tasks, tokenizer, cfg.cache_dir, progress=main)
    return run(
        cfg,
        refs,
        run_dir,
        tracker=tracker,
        resume=resume,
        report=report,
        do_prune=prune,
        do_evaluate=evaluate,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sla_core.engine.worker", description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # older launchers
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_experiment(args.config, parse_overrides(args.overrides))
        run_experiment(cfg, run_dir=args.run_dir, resume=args.resume, prune=False, evaluate=False)
    except TrainingInterrupted as err:
        print(f"sla: {err}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (NonFiniteLossError, DataError, ValueError, FileNotFoundError) as err:
        print(f"sla: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
