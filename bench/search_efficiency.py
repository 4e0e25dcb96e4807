"""ASHA against a full grid over the same space, on the shipped Rotten Tomatoes data with MiniLM.

Both searches run every point of the grid λ ∈ {0, 1, 5} x rank ∈ {4, 16} x lr ∈ {3e-4, 1e-3, 3e-3} (18 trials)
through `tuning.run_search`; the grid runs each to the end, ASHA stops weak ones at its rungs. Printed side by
side: compute used (trial-steps: optimizer steps summed over trials) and the best validation accuracy found
under the parameter budget, as ratios. Target: ASHA within 0.5 points of the grid's best for at most 40% of
its compute. Writes docs/results/search_efficiency.json.

    python bench/search_efficiency.py                                   # the full version (long on 2 cores)
    python bench/search_efficiency.py --steps 90 --max-train 1500 --max-eval 400   # a reduced version
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

SPACE = {"lambda_sparse": [0.0, 1.0, 5.0], "rank": [4, 16], "lr_grid": [3e-4, 1e-3, 3e-3]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=270, help="optimizer steps of a full trial")
    p.add_argument("--grace", type=int, default=None, help="ASHA grace period in steps (default steps/9)")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--max-train", type=int, default=4000, help="training examples (a seeded subset)")
    p.add_argument("--max-eval", type=int, default=500, help="validation/test examples")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (one CPU each)")
    p.add_argument(
        "--scheduler-metric",
        default="val_loss",
        help="what ASHA ranks trials on at its rungs (min); the best is still chosen on val_accuracy",
    )
    p.add_argument(
        "--grid-from",
        type=Path,
        help="reuse the grid side of an earlier docs/results/search_efficiency.json with the same settings "
        "(the grid runs every trial to the end, so its compute is fixed; its best accuracy is read back)",
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench" / "search_efficiency")
    return p.parse_args(argv)


def bench_config(args: argparse.Namespace, scheduler: str) -> Any:
    """configs/default.yaml, cut to the bench's size, with the grid space and `scheduler`."""
    from sla_core.experiment import ExperimentConfig

    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    data["name"] = f"search_efficiency_{scheduler}"
    data["tasks"][0].update(
        max_length=args.max_length,
        max_train_examples=args.max_train,
        max_eval_examples=args.max_eval,
        eval_noise_levels=[0.0],
    )
    data["train"].update(steps=args.steps, batch_size=args.batch_size, eval_every=0, checkpoint_every=0)
    grace = args.grace or max(1, args.steps // 9)
    data["tune"] = {
        **SPACE,
        "search": "grid",
        "num_samples": 1,
        "lambda_warmup_steps": [0],
        "gate_init": [3.0],
        "steps": args.steps,
        "scheduler": "asha" if scheduler == "asha" else "none",
        "grace_period": grace,
        "reduction_factor": args.reduction_factor,
        "report_every": grace,
        "max_concurrent": args.concurrency,
        "scheduler_metric": args.scheduler_metric if scheduler == "asha" else None,
    }
    data["cache_dir"] = str(ROOT / "data" / "cache")
    return ExperimentConfig.model_validate(data)


def run(cfg: Any, refs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from tuning import run_search

    start = time.perf_counter()
    result = run_search(cfg, refs, out_dir=out_dir, verbose=0)
    if not result.complete:
        raise SystemExit(f"{cfg.name}: {result.reason}; no result written")
    rows = json.loads(Path(result.trials_json).read_text())
    return {
        "trial_steps": result.trial_steps,
        "best_val_accuracy": result.best.value if result.best else None,
        "best_overrides": result.best.overrides if result.best else None,
        "counts": result.counts,
        "wall_s": round(time.perf_counter() - start, 1),
        "trials": [
            {
                k: r[k]
                for k in (
                    "sla.lambda_sparse",
                    "sla.rank",
                    "train.lr",
                    "outcome",
                    "steps_done",
                    "val_accuracy",
                    "trainable_percent",
                    "feasible",
                )
            }
            for r in rows
        ],
    }


GRID_KEYS = ("steps", "max_train", "max_eval", "max_length", "batch_size")


def reused_grid(args: argparse.Namespace) -> dict[str, Any]:
    """The grid side of an earlier run, refused unless its settings and space match these."""
    old = json.loads(args.grid_from.read_text())
    mismatch = {k: (old["settings"].get(k), getattr(args, k)) for k in GRID_KEYS}
    mismatch = {k: v for k, v in mismatch.items() if v[0] != v[1]}
    if mismatch or old["settings"].get("space") != SPACE:
        raise SystemExit(
            f"--grid-from {args.grid_from}: settings differ (earlier, now): {mismatch or 'space'}"
        )
    grid = dict(old["grid"])
    grid["reused_from"] = {"file": str(args.grid_from), "machine": old.get("machine")}
    return grid


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sla_core.backbones import load_tokenizer
    from sla_core.data import prepare_tasks

    if args.out_dir.exists():
        shutil.rmtree(args.out_dir)  # the bench's own folder; each run starts fresh
    results = {}
    if args.grid_from:
        results["grid"] = reused_grid(args)
    for scheduler in ("grid", "asha"):
        if scheduler in results:
            continue
        cfg = bench_config(args, scheduler)
        refs = prepare_tasks(cfg.tasks, load_tokenizer(cfg.backbone), cfg.cache_dir, progress=False)
        results[scheduler] = run(cfg, refs, args.out_dir)
        print(
            f"{scheduler}: {results[scheduler]['trial_steps']} trial-steps, best val accuracy "
            f"{results[scheduler]['best_val_accuracy']}, {results[scheduler]['wall_s']} s",
            flush=True,
        )
    grid, asha = results["grid"], results["asha"]
    compute_ratio = asha["trial_steps"] / grid["trial_steps"]
    gap = None
    if grid["best_val_accuracy"] is not None and asha["best_val_accuracy"] is not None:
        gap = round(100 * (grid["best_val_accuracy"] - asha["best_val_accuracy"]), 2)
    met = gap is not None and gap <= 0.5 and compute_ratio <= 0.4
    print(f"{'':14s}{'grid':>12s}{'asha':>12s}{'asha/grid':>12s}")
    print(f"{'trial-steps':14s}{grid['trial_steps']:>12d}{asha['trial_steps']:>12d}{compute_ratio:>12.2f}")
    print(
        f"{'best val acc':14s}{grid['best_val_accuracy']!s:>12.6}{asha['best_val_accuracy']!s:>12.6}"
        f"{'gap ' + str(gap) + ' pt':>12s}"
    )
    print(f"target (gap <= 0.5 pt at <= 40% compute): {'met' if met else 'not met'}")
    path = write_result(
        "search_efficiency",
        {
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            | {"space": SPACE},
            "compute_ratio": round(compute_ratio, 4),
            "best_val_accuracy_gap_points": gap,
            "target_met": met,
            "grid": grid,
            "asha": asha,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
