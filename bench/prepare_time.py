"""Cold-cache preparation time of the three builtin tasks for MiniLM (target: under a minute), the
cache-hit time, and the measured noise ratios on the full shipped training data.

    python bench/prepare_time.py [--noise 0.1] [--no-noise-check]

Writes docs/results/prepare_time.json. The tokenizer load is timed apart from preparation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import write_result  # noqa: E402
from sla_core.backbones import load_tokenizer  # noqa: E402
from sla_core.data import NoiseSpec, TaskSpec, prepare_task  # noqa: E402

TASKS = ("rotten_tomatoes", "tweets", "bbc_news")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.1, help="ratio for the noise check (all kinds)")
    parser.add_argument("--no-noise-check", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizer = load_tokenizer("minilm")
    tokenizer_s = time.perf_counter() - start
    cold, warm, counts, noise = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as cache:
        for name in TASKS:
            start = time.perf_counter()
            ref = prepare_task(TaskSpec(name=name), tokenizer, Path(cache), progress=False)
            cold[name] = time.perf_counter() - start
            counts[name] = ref.counts
        for name in TASKS:
            start = time.perf_counter()
            prepare_task(TaskSpec(name=name), tokenizer, Path(cache), progress=False)
            warm[name] = time.perf_counter() - start
        if not args.no_noise_check:
            spec = NoiseSpec(char=args.noise, word=args.noise, label=args.noise, seed=0)
            for name in TASKS:
                ref = prepare_task(
                    TaskSpec(name=name, train_noise=spec), tokenizer, Path(cache), progress=False
                )
                noise[name] = ref.noise["train"]["measured"]
    total = sum(cold.values())
    print(f"tokenizer load {tokenizer_s:.2f} s (not counted)")
    print(f"{'task':<16} {'cold s':>8} {'hit s':>8}  rows (train/validation/test)")
    for name in TASKS:
        c = counts[name]
        print(f"{name:<16} {cold[name]:8.2f} {warm[name]:8.3f}  {c['train']}/{c['validation']}/{c['test']}")
    print(f"{'all three':<16} {total:8.2f} {sum(warm.values()):8.3f}  target < 60 s cold")
    for name, measured in noise.items():
        shown = " ".join(f"{k}={v:.4f}" for k, v in measured.items())
        print(f"noise {args.noise} on {name} train: measured {shown}")
    path = write_result(
        "prepare_time",
        {
            "backbone": "minilm",
            "tokenizer_load_s": tokenizer_s,
            "cold_s": cold,
            "cold_total_s": total,
            "cache_hit_s": warm,
            "counts": counts,
            "noise_requested": args.noise,
            "noise_measured": noise,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
