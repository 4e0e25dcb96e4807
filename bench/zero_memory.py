"""Peak resident memory per rank and training throughput of the DeepSpeed engine on SmolLM2-135M.

Runs each configuration as its own job (torchrun, gloo on CPU) through the same engine wrapper the
training loop uses (`sla_core.engine.ds`): ZeRO-0 on 1 process (the baseline), ZeRO-3 on 2 processes,
and ZeRO-2 on 2 processes, each with its `infra/deepspeed/zero<stage>.json`, all at the same global batch
(4 sequences x 64 tokens, synthetic token ids; memory and speed do not depend on the text), one thread per
process. Each rank samples its RSS every 10 ms and writes JSON.

Reported per rank: RSS after loading the backbone, after `deepspeed.initialize` (ZeRO-3 has partitioned
the frozen weights by then), the peak RSS during the training steps, and the process-lifetime peak
(which includes the full fp32 model every process loads before partitioning). Prints the ratios
ZeRO-3 x 2 / ZeRO-0 x 1 and writes docs/results/zero_memory.json.

    python bench/zero_memory.py [--steps 6] [--warmup 2] [--configs 0x1 3x2 2x2]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, SEQ = 4, 64


class RssSampler:
    """The largest RSS seen by a background thread since `reset()`."""

    def __init__(self, every: float = 0.01) -> None:
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def reset(self) -> None:
        self.peak = self.now()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so RSS shows what is live (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker(stage: int, steps: int, warmup: int, out: Path) -> None:
    """One rank: build SmolLM2 + adapters, train `warmup + steps` steps, write this rank's numbers."""
    import torch

    from sla_core import SLAConfig, attach
    from sla_core.backbones import load_backbone
    from sla_core.engine import ds
    from sla_core.experiment import TrainConfig

    sampler, mb = RssSampler(), 2**20
    with ds.distributed() as dist:
        model = attach(
            load_backbone("smollm2"), SLAConfig(tasks={"bench": 2}, rank=8, head_dropout=0.0)
        ).train()
        after_load = sampler.now()
        ds_json = ROOT / "infra" / "deepspeed" / f"zero{stage}.json"
        settings = ds.build_settings(
            TrainConfig(batch_size=GLOBAL_BATCH, deepspeed_config=ds_json), dist.world_size
        )
        engine = ds.initialize(model, settings, model.parameter_groups(1e-3, 0.05))
        release_freed_memory()
        after_init = sampler.now()
        g = torch.Generator().manual_seed(dist.rank)
        ids = torch.randint(1, 49000, (settings.micro_batch, SEQ), generator=g)  # (b, T)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (settings.micro_batch,), generator=g),
        }
        sampler.reset()
        for step in range(warmup + steps):
            if step == warmup:
                ds.barrier()
                start = time.perf_counter()
            torch.manual_seed(step)
            out_ = engine(**batch)
            engine.backward(out_.loss)
            engine.step()
        ds.barrier()
        seconds = time.perf_counter() - start
        train_peak = sampler.stop()
        row = {
            "stage": stage, "world_size": dist.world_size, "rank": dist.rank,
            "micro_batch": settings.micro_batch,
            "rss_after_load_mb": after_load / mb, "rss_after_init_mb": after_init / mb,
            "train_peak_rss_mb": train_peak / mb,
            "lifetime_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "examples_per_s": GLOBAL_BATCH * steps / seconds,
            "loss": float(out_.loss.detach()),
        }  # fmt: skip
        (out / f"rank{dist.rank}.json").write_text(json.dumps(row))


def run_config(stage: int, nproc: int, steps: int, warmup: int) -> list[dict]:
    """Launch one configuration with torchrun and collect every rank's row."""
    from sla_core.engine.launch import LaunchPlan, build_command, launch_env

    with tempfile.TemporaryDirectory(prefix=f"zero{stage}x{nproc}-") as tmp:
        plan = LaunchPlan(nproc=nproc)
        cmd = build_command(plan, [])
        cmd = cmd[: cmd.index("--module")] + [
            str(Path(__file__).resolve()),
            "--worker",
            "--stage",
            str(stage),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--out",
            tmp,
        ]
        env = launch_env(plan)
        env["OMP_NUM_THREADS"] = "1"  # one core per process: 1 vs 2 processes is 1 vs 2 cores
        # Freed buffers go back to the OS at once, so RSS shows live memory rather than what glibc's heap
        # retains (ZeRO-3 gathers and frees whole layers every step). Same setting for every configuration.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        started = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, check=True)
        print(f"zero{stage} x {nproc}: job {time.perf_counter() - started:.0f} s", flush=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per configuration: max over ranks of each RSS figure and the job's throughput; then the ratios."""
    table = {}
    for name, rows in results.items():
        table[name] = {
            key: max(r[key] for r in rows)
            for key in ("rss_after_init_mb", "train_peak_rss_mb", "lifetime_peak_rss_mb")
        }
        table[name]["examples_per_s"] = min(r["examples_per_s"] for r in rows)  # the slowest rank sets pace
    ratios = {}
    if "zero0x1" in table and "zero3x2" in table:
        base, z3 = table["zero0x1"], table["zero3x2"]
        ratios = {
            f"{key}_per_rank_zero3x2_over_zero0x1": z3[f"{key}_mb"] / base[f"{key}_mb"]
            for key in ("train_peak_rss", "rss_after_init", "lifetime_peak_rss")
        }
        ratios["throughput_zero3x2_over_zero0x1"] = z3["examples_per_s"] / base["examples_per_s"]
        if "zero2x2" in table:
            ratios["throughput_zero2x2_over_zero0x1"] = (
                table["zero2x2"]["examples_per_s"] / base["examples_per_s"]
            )
    return {"table": table, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["0x1", "3x2", "2x2"], help="STAGExPROCESSES")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.stage, args.steps, args.warmup, args.out)
        return
    from bench.common import write_result

    results = {}
    for spec in args.configs:
        stage, nproc = (int(x) for x in spec.split("x"))
        results[f"zero{stage}x{nproc}"] = run_config(stage, nproc, args.steps, args.warmup)
    summary = summarize(results)
    print(
        f"{'config':10s} {'after init MB':>14s} {'train peak MB':>14s} {'lifetime peak MB':>17s} {'ex/s':>7s}"
    )
    for name, row in summary["table"].items():
        print(
            f"{name:10s} {row['rss_after_init_mb']:14.0f} {row['train_peak_rss_mb']:14.0f} "
            f"{row['lifetime_peak_rss_mb']:17.0f} {row['examples_per_s']:7.2f}"
        )
    for key, value in summary["ratios"].items():
        print(f"{key:52s} {value:.3f}")
    path = write_result("zero_memory", {
        "setup": {"backbone": "smollm2", "global_batch": GLOBAL_BATCH, "seq_len": SEQ, "steps": args.steps,
                  "warmup": args.warmup, "adapters": "rank 8, default sites, both paths",
                  "precision": "fp32"},
        **summary, "ranks": results,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
