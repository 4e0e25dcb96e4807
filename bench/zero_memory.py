"""Peak resident memory per rank and training throughput of the DeepSpeed engine, with gated adapters.

Runs each configuration as its own job (torchrun, gloo on CPU) through the same engine path the training
loop uses (`sla_core.engine.ds`: the backbone is built inside `ds.construction`, so under ZeRO-3 it is
partitioned from the start, then `ds.initialize`): ZeRO-0 on 1 process (the baseline), ZeRO-3 on 2
processes (optionally with `offload_param: {device: cpu}`, spelled `3x2+offload`), and ZeRO-2 on 2
processes, each with its `infra/deepspeed/zero<stage>.json`, all at the same global batch of synthetic token
ids (memory and speed do not depend on the text), one thread per process. Each rank samples its RSS every
10 ms and writes JSON.

Reported per rank: RSS after building the backbone, after `deepspeed.initialize`, the peak while building
(`build_peak`), the peak during the training steps, and the process-lifetime peak. Prints the ratios
ZeRO-3 x 2 / ZeRO-0 x 1 and writes docs/results/zero_memory.json, or the file `--result` names (runs of
other backbones already in that file are kept under `other_backbones`). `--zero3-json` replaces the shipped
`infra/deepspeed/zero3.json` for the ZeRO-3 configurations (to measure other settings).

    python bench/zero_memory.py [--steps 6] [--warmup 2] [--configs 0x1 3x2 2x2]
    python bench/zero_memory.py --backbone random-llama:1.1b --seq 16 --batch 2 --steps 3 --warmup 1 \
        --configs 0x1 3x2 3x2+offload
    python bench/zero_memory.py --backbone random-llama:3b --seq 16 --batch 2 --steps 3 --warmup 1 \
        --configs 0x1 3x2 3x2+offload --result docs/results/zero_memory_3b.json
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
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "docs" / "results" / "zero_memory.json"


class RssSampler:
    """The largest RSS seen by a background thread since `reset()`, with what was running then: `label`
    (the phase or module the worker set last) and the bytes of ZeRO-3 parameters gathered whole
    (`watch`)."""

    def __init__(self, every: float = 0.01) -> None:
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self.label, self.peak_label, self.peak_gathered = "", "", 0
        self.params: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, params: list) -> None:
        """ZeRO-3 parameters whose gathered (whole) size is recorded at each new peak."""
        self.params = [p for p in params if hasattr(p, "ds_id")]

    def gathered(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self.params)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peak:
                self.peak, self.peak_label, self.peak_gathered = rss, self.label, self.gathered()
            time.sleep(self.every)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def reset(self) -> None:
        self.peak, self.peak_label, self.peak_gathered = self.now(), self.label, self.gathered()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def backbone_bytes(model) -> int:  # noqa: ANN001
    """Bytes of the backbone's weights this rank holds: its ZeRO-3 shards, or the whole parameters."""
    total = 0
    for param in model.backbone.parameters():
        held = param.ds_tensor if hasattr(param, "ds_id") else param.data
        total += held.numel() * held.element_size()
    return total


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so RSS shows what is live (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def ds_json(stage: int, offload: bool, folder: Path, zero3: Path | None = None) -> Path:
    """The shipped `infra/deepspeed/zero<stage>.json` (or `zero3` at stage 3), with parameter offload to
    the CPU when asked."""
    path = zero3 if stage == 3 and zero3 is not None else ROOT / "infra" / "deepspeed" / f"zero{stage}.json"
    if not offload:
        return path
    config = json.loads(path.read_text())
    config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    out = folder / f"zero{stage}_offload.json"
    out.write_text(json.dumps(config))
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank: build the backbone + adapters, train `warmup + steps` steps, write this rank's numbers."""
    import torch

    from sla_core import SLAConfig, attach
    from sla_core.backbones import load_backbone
    from sla_core.engine import ds
    from sla_core.experiment import DEFAULT_RECIPE, TrainConfig

    sampler, mb = RssSampler(), 2**20
    with ds.distributed() as dist:
        config = ds_json(args.stage, args.offload, args.out, args.zero3_json)
        train = TrainConfig(batch_size=args.batch, deepspeed_config=config)
        settings = ds.build_settings(train, dist.world_size, dist.device)
        with ds.construction(settings) as assign:  # the loop's path: partitioned from the start at ZeRO-3
            backbone = load_backbone(args.backbone, assign=assign)
        release_freed_memory()
        after_load = sampler.now()
        # The adapters `sla train` builds by default (the budget recipe: rank units at every linear layer,
        # searched over the first half of the steps, then the decided structure).
        sla = SLAConfig(tasks={"bench": 2}, rank=8, head_dropout=0.0, **DEFAULT_RECIPE)
        model = attach(backbone, sla, schedule_steps=args.warmup + args.steps).train()
        counts = model.parameter_counts()  # full sizes, also of partitioned parameters
        engine = ds.initialize(model, settings, model.parameter_groups(1e-3, 0.05), dist.device)
        release_freed_memory()
        after_init, build_peak = sampler.now(), sampler.peak
        weights = backbone_bytes(model)
        g = torch.Generator().manual_seed(dist.rank)
        ids = torch.randint(1, 49000, (settings.micro_batch, args.seq), generator=g)  # (b, T)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (settings.micro_batch,), generator=g),
        }
        # Which module runs when RSS peaks: each forward names itself; backward and step are phases.
        for name, module in model.named_modules():
            module.register_forward_pre_hook(
                lambda *_, name=name: setattr(sampler, "label", f"forward {name}")
            )
        sampler.watch(list(model.parameters()))
        phases: dict[str, dict] = {}

        def phase(name: str, run):  # noqa: ANN001, ANN202
            sampler.label = name
            sampler.reset()
            result = run()
            peak = max(sampler.peak, sampler.now())
            if peak > phases.get(name, {}).get("peak_rss_mb", 0) * mb:
                phases[name] = {
                    "peak_rss_mb": peak / mb, "at": sampler.peak_label,
                    "gathered_params_mb": sampler.peak_gathered / mb,
                }  # fmt: skip
            return result

        sampler.reset()
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                ds.barrier()
                start = time.perf_counter()
            torch.manual_seed(step)
            out_ = phase("forward", lambda: engine(**batch))
            phase("backward", partial(engine.backward, out_.loss))
            phase("step", engine.step)
        ds.barrier()
        seconds = time.perf_counter() - start
        train_peak = max(sampler.stop(), *(p["peak_rss_mb"] * mb for p in phases.values()))
        breakdown = {
            "backbone_weights_mb": weights / mb,  # this rank's shards (ZeRO-3) or the whole weights
            # the interpreter and libraries, adapters, heads, optimizer state, buffers, collectives
            "rest_after_init_mb": (after_init - weights) / mb,
            "training_peak_over_init_mb": (train_peak - after_init) / mb,
            "phases": phases,
        }
        row = {
            "stage": args.stage, "offload_param": args.offload, "world_size": dist.world_size,
            "rank": dist.rank, "micro_batch": settings.micro_batch,
            "backbone_parameters": counts["backbone"], "trainable_parameters": counts["trainable"],
            "rss_after_load_mb": after_load / mb, "rss_after_init_mb": after_init / mb,
            "build_peak_rss_mb": build_peak / mb, "train_peak_rss_mb": train_peak / mb,
            "lifetime_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "examples_per_s": args.batch * args.steps / seconds,
            "loss": float(out_.loss.detach()), "breakdown": breakdown,
        }  # fmt: skip
        (args.out / f"rank{dist.rank}.json").write_text(json.dumps(row))


def parse_spec(spec: str) -> tuple[int, int, bool]:
    """`STAGExPROCESSES[+offload]` -> (stage, processes, offload)."""
    body, _, extra = spec.partition("+")
    if extra not in ("", "offload"):
        raise SystemExit(f"--configs {spec!r}: expected STAGExPROCESSES or STAGExPROCESSES+offload")
    stage, nproc = (int(x) for x in body.split("x"))
    return stage, nproc, extra == "offload"


def run_config(spec: str, args: argparse.Namespace) -> list[dict]:
    """Launch one configuration with torchrun and collect every rank's row."""
    from sla_core.engine.launch import LaunchPlan, build_command, launch_env

    stage, nproc, offload = parse_spec(spec)
    with tempfile.TemporaryDirectory(prefix=f"zero{stage}x{nproc}-") as tmp:
        plan = LaunchPlan(nproc=nproc)
        cmd = build_command(plan, [])
        cmd = cmd[: cmd.index("--module")] + [
            str(Path(__file__).resolve()),
            "--worker", "--stage", str(stage), "--backbone", args.backbone, "--seq", str(args.seq),
            "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--out", tmp,
        ] + (["--offload"] if offload else []) + (
            ["--zero3-json", str(args.zero3_json.resolve())] if args.zero3_json else []
        )  # fmt: skip
        env = launch_env(plan)
        env["OMP_NUM_THREADS"] = "1"  # one core per process: 1 vs 2 processes is 1 vs 2 cores
        # Freed buffers go back to the OS at once, so RSS shows live memory rather than what glibc's heap
        # retains (ZeRO-3 gathers and frees whole layers every step). Same setting for every configuration.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        started = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, check=True)
        print(f"{spec}: job {time.perf_counter() - started:.0f} s", flush=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def config_name(spec: str) -> str:
    stage, nproc, offload = parse_spec(spec)
    return f"zero{stage}x{nproc}" + ("_offload" if offload else "")


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per configuration: max over ranks of each RSS figure and the job's throughput; then the ratios."""
    table = {}
    for name, rows in results.items():
        table[name] = {
            key: max(r[key] for r in rows)
            for key in ("rss_after_init_mb", "build_peak_rss_mb", "train_peak_rss_mb", "lifetime_peak_rss_mb")
            if all(key in r for r in rows)
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
    if "zero0x1" in table:
        base = table["zero0x1"]
        for other in ("zero3x2_offload", "zero2x2"):
            if other in table:
                ratios[f"train_peak_rss_per_rank_{other}_over_zero0x1"] = (
                    table[other]["train_peak_rss_mb"] / base["train_peak_rss_mb"]
                )
                ratios[f"throughput_{other}_over_zero0x1"] = (
                    table[other]["examples_per_s"] / base["examples_per_s"]
                )
    return {"table": table, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="smollm2", help="smollm2, random-llama:1.1b, ...")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--configs", nargs="+", default=["0x1", "3x2", "2x2"], help="STAGExPROCESSES[+offload]"
    )
    parser.add_argument(
        "--result", type=Path, default=RESULT, help="JSON file to write (default: %(default)s)"
    )
    parser.add_argument(
        "--zero3-json", type=Path, help="DeepSpeed JSON for ZeRO-3 instead of the shipped one"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from bench.common import machine

    results = {config_name(spec): run_config(spec, args) for spec in args.configs}
    summary = summarize(results)
    print(
        f"{'config':16s} {'after init MB':>14s} {'build peak MB':>14s} {'train peak MB':>14s} "
        f"{'lifetime peak MB':>17s} {'ex/s':>7s}"
    )
    for name, row in summary["table"].items():
        print(
            f"{name:16s} {row['rss_after_init_mb']:14.0f} {row.get('build_peak_rss_mb', 0):14.0f} "
            f"{row['train_peak_rss_mb']:14.0f} {row['lifetime_peak_rss_mb']:17.0f} "
            f"{row['examples_per_s']:7.3f}"
        )
    for key, value in summary["ratios"].items():
        print(f"{key:60s} {value:.3f}")
    first = next(iter(results.values()))[0]
    setup = {
        "backbone": args.backbone, "backbone_parameters": first["backbone_parameters"],
        "trainable_parameters": first["trainable_parameters"], "global_batch": args.batch,
        "seq_len": args.seq, "steps": args.steps, "warmup": args.warmup,
        "adapters": "the default recipe (sla_core.experiment.DEFAULT_RECIPE), rank 8", "precision": "fp32",
        "configs": {name: spec for name, spec in zip(results, args.configs, strict=True)},
        "zero3_json": str(args.zero3_json or "infra/deepspeed/zero3.json"),
    }  # fmt: skip
    command = " ".join(["python", "bench/zero_memory.py", *sys.argv[1:]])
    payload = {
        "machine": machine(), "command": command, "setup": setup, **summary, "ranks": results,
        "other_backbones": earlier_runs(args.result, args.backbone),
    }  # fmt: skip
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.result}")


def earlier_runs(result: Path, backbone: str) -> dict[str, dict]:
    """The runs of other backbones in the current result file, by backbone (kept when this one is written)."""
    if not result.is_file():
        return {}
    data = json.loads(result.read_text())
    runs = dict(data.pop("other_backbones", {}))
    runs[data.get("setup", {}).get("backbone", "smollm2")] = data
    runs.pop(backbone, None)
    return runs


if __name__ == "__main__":
    main()
