"""Train-step and inference time, side by side in one run, on MiniLM and SmolLM2.

Methods: full fine-tuning, PEFT LoRA (r=8 on q,v), the frozen backbone with only a head (the floor),
this method before pruning, and after pruning; and the method as `sla compare` runs it (LoRA-type rank
units, an exact budget) timed in each phase of its schedule (dense, search, fixed structure) and merged.
The same batch (16 x 128 tokens) for all; repetitions are interleaved across methods so that machine noise
hits all alike. Prints the ratios with their targets: the train step averaged over the schedule / LoRA's
(<= 1.05) and the merged model's inference / the bare backbone's (<= 1.01).

    python bench/step_time.py [--backbones minilm smollm2] [--repeats 5] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import HeadModel, median_time, min_time, write_result  # noqa: E402
from sla_core import SLAConfig, attach  # noqa: E402
from sla_core.backbones import load_backbone  # noqa: E402
from sla_core.experiment import DEFAULT_RECIPE  # noqa: E402

LORA_TARGETS = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}
# Issue 13's targets: the train step averaged over the schedule against PEFT LoRA r=8 on q,v at the same
# batch, and the merged model's inference against the bare backbone (with its head).
TARGETS = {"schedule_train_over_lora_train": 1.05, "merged_infer_over_backbone": 1.01}


def build_methods(name: str, kept: float, budget: float) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    source = load_backbone(name)
    base = source.base_model
    pooling = "last" if name == "smollm2" else "mean"
    methods = {"full_ft": HeadModel(copy.deepcopy(base), 2, pooling)}
    lora_base = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[name])
    )
    methods["peft_lora"] = HeadModel(lora_base, 2, pooling)
    floor = HeadModel(copy.deepcopy(base), 2, pooling)
    for p in floor.backbone.parameters():
        p.requires_grad_(False)
    methods["frozen_head"] = floor
    ours = attach(copy.deepcopy(source), SLAConfig(tasks={"t": 2}, rank=8, head_dropout=0.0))
    methods["sla"] = ours
    pruned_all = ours.prune()
    methods["sla_pruned_all_open"] = pruned_all
    with torch.no_grad():  # a kept fraction like a trained run's: close the rest at random (seeded)
        g = torch.Generator().manual_seed(0)
        closed = torch.rand(ours.sla_gates.log_alpha.shape, generator=g) > kept
        ours.sla_gates.log_alpha[closed] = -10.0
    methods[f"sla_pruned_kept_{kept:.2f}"] = ours.prune()
    with torch.no_grad():
        ours.sla_gates.log_alpha.fill_(3.0)
    methods.update(schedule_methods(source, budget))
    return methods


# The method as a config that names no size runs it (sla_core.experiment.DEFAULT_RECIPE, also sla compare's
# and the Pareto grid's): LoRA-type rank units at every linear layer, an exact budget, the dense and search
# phases, then the fixed structure. The train step is timed in each phase and weighted by its share.
PHASES = {
    "dense": DEFAULT_RECIPE["dense_fraction"],
    "search": DEFAULT_RECIPE["search_fraction"],
    "fixed": 1.0 - DEFAULT_RECIPE["dense_fraction"] - DEFAULT_RECIPE["search_fraction"],
}


class Pinned(torch.nn.Module):
    """An SLAModel whose every forward runs at the same point of the schedule (forward_count reset)."""

    def __init__(self, model, forward: int) -> None:
        super().__init__()
        self.model, self.forward_at = model, forward

    def forward(self, **batch):
        self.model.forward_count.fill_(self.forward_at)
        return self.model(**batch)


def schedule_methods(source, budget: float) -> dict[str, torch.nn.Module]:
    """`sla_dense`, `sla_search`, `sla_fixed` (training steps in each phase of the schedule, the fixed one
    with a random structure at the budget, spread as a learned one is, compacted to its kept units),
    `sla_fixed_masked` (the same structure with the closed units kept, masked: `train.compact: false`) and
    `sla_merged` (that structure pruned and merged into the weights: what `sla prune --merge` ships)."""
    from sla_core.sparsity import budget_mask

    steps = 100  # nominal: the phases are fractions of it
    cfg = SLAConfig(
        tasks={"t": 2}, rank=8, paths=("lora",), gate_unit="rank", gate=DEFAULT_RECIPE["gate"], budget=budget,
        head_dropout=0.0,
        dense_fraction=PHASES["dense"], search_fraction=PHASES["search"], lambda_warmup_steps=10,
    )  # fmt: skip
    out = {}
    dense_end = round(PHASES["dense"] * steps)
    for phase, at in (("dense", 0), ("search", dense_end), ("fixed", steps - 1)):
        if PHASES[phase] == 0:
            continue
        model = attach(copy.deepcopy(source), cfg, schedule_steps=steps)
        if phase == "fixed":
            g = torch.Generator().manual_seed(0)
            scores = torch.rand(tuple(model.sla_gates.log_alpha.shape), generator=g)
            with torch.no_grad():
                model.sla_decided.copy_(budget_mask(scores, model.member_params, model.budget_target))
                model.sla_decided_flag.fill_(1)
                for name, p in model.named_parameters():
                    if "up_weight" in name:
                        p.normal_(0, 0.01)  # trained-looking units, so that the merge folds something
            out["sla_fixed_masked"] = Pinned(copy.deepcopy(model), at)  # train.compact=false (ZeRO 1-3)
            model.compact()  # as the engine does at the decision (train.compact): the kept units train on
        out[f"sla_{phase}"] = Pinned(model, at)
    fixed = out["sla_fixed"].model
    out["sla_merged"] = copy.deepcopy(fixed).eval().prune().merge()
    return out


def step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model.train()
        out = model(**batch)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    @torch.no_grad()
    def infer():
        model.eval()
        model(**inputs)

    return infer


def bench_backbone(name: str, args) -> dict:
    torch.manual_seed(0)
    methods = build_methods(name, args.kept, args.budget)
    ids = torch.randint(100, 5000, (args.batch, args.seq))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (args.batch,)),
    }
    train = {
        k: step_fn(m, batch)
        for k, m in methods.items()
        if not k.startswith("sla_pruned") and k != "sla_merged"
    }
    infer = {k: infer_fn(m, batch) for k, m in methods.items()}
    for fn in [*train.values(), *infer.values()]:
        fn()  # warm-up
    train_t = {k: [] for k in train}
    infer_t = {k: [] for k in infer}
    for _ in range(args.repeats):  # interleaved: one of each per round
        for k, fn in train.items():
            train_t[k].append(median_time(fn, 1))
        for k, fn in infer.items():
            infer_t[k].append(min_time(fn, 3))  # inference is short: the best of 3 per round
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result = {
        "train_step_s": {k: med(v) for k, v in train_t.items()},
        "inference_s": {k: med(v) for k, v in infer_t.items()},
        "trainable_percent": {
            k: 100.0
            * sum(p.numel() for p in m.parameters() if p.requires_grad)
            / sum(
                p.numel()
                for n, p in m.named_parameters()
                if "sla_" not in n and "lora_" not in n and not n.startswith("head.")
            )
            for k, m in methods.items()
            if k in train
        },
    }
    pruned_key = f"sla_pruned_kept_{args.kept:.2f}"
    pairs = {
        "sla_train_over_lora_train": (train_t["sla"], train_t["peft_lora"]),
        "sla_train_over_full_ft_train": (train_t["sla"], train_t["full_ft"]),
        "pruned_all_open_infer_over_backbone": (infer_t["sla_pruned_all_open"], infer_t["frozen_head"]),
        f"pruned_kept_{args.kept:.2f}_infer_over_backbone": (infer_t[pruned_key], infer_t["frozen_head"]),
    }
    # Each ratio is the median over rounds of the ratio within a round: the two timings of a round are
    # seconds apart, so a load change between rounds cancels out instead of landing on one method.
    timed = [p for p in PHASES if PHASES[p] > 0]
    schedule = [sum(PHASES[p] * train_t[f"sla_{p}"][i] for p in timed) for i in range(args.repeats)]
    pairs["schedule_train_over_lora_train"] = (schedule, train_t["peft_lora"])
    pairs["merged_infer_over_backbone"] = (infer_t["sla_merged"], infer_t["frozen_head"])
    # what dropping the closed units at the decision saves: the fixed step compacted over it masked
    pairs["fixed_compact_over_masked_train"] = (train_t["sla_fixed"], train_t["sla_fixed_masked"])
    rounds = {k: [a / b for a, b in zip(num, den, strict=True)] for k, (num, den) in pairs.items()}
    result["ratios"] = {k: med(v) for k, v in rounds.items()}
    result["ratio_spread"] = {k: [min(v), max(v)] for k, v in rounds.items()}
    result["ratios_of_medians"] = {k: med(num) / med(den) for k, (num, den) in pairs.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--kept", type=float, default=0.5, help="kept gate fraction for the second pruned row"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=0.002,
        help="budget of the scheduled method (fraction of the backbone)",
    )
    args = parser.parse_args()
    out = {
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "budget": args.budget,
        "phases": PHASES, "targets": TARGETS, "backbones": {},
    }  # fmt: skip
    for name in args.backbones:
        res = bench_backbone(name, args)
        out["backbones"][name] = res
        print(f"\n== {name} (batch {args.batch} x {args.seq}, median of {args.repeats}) ==")
        for k, v in res["train_step_s"].items():
            print(f"  train  {k:28s} {v * 1000:9.1f} ms   trainable {res['trainable_percent'][k]:7.3f}%")
        for k, v in res["inference_s"].items():
            print(f"  infer  {k:28s} {v * 1000:9.1f} ms")
        for k, v in res["ratios"].items():
            lo, hi = res["ratio_spread"][k]
            verdict = ""
            if k in TARGETS:
                verdict = f"  target <= {TARGETS[k]}: {'met' if v <= TARGETS[k] else 'NOT met'}"
            print(f"  ratio  {k:40s} {v:6.3f}   (rounds {lo:.3f}-{hi:.3f}){verdict}")
    print("wrote", write_result("step_time", out))


if __name__ == "__main__":
    main()
