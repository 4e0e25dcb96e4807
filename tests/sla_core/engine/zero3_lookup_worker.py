"""One rank of the ZeRO-3 memory-path check, started by torchrun:

    python -m tests.sla_core.engine.zero3_lookup_worker OUT_DIR

On every rank, under ZeRO-3 (`ds.construction`, then `ds.initialize` as the loop does), it checks:
- `ds.sharded_lookup` gives exactly `weight[ids]` of the whole weight, for an embedding whose rows are split
  between the shards and for ids that differ per rank in number and value;
- the in-place all-gather DeepSpeed's fetches go through (gloo) gives the whole parameters;
- a `random-llama:tiny` backbone wrapped by the engine gives the hidden states of the same backbone built
  whole, while its embedding is never gathered (its `.data` stays empty through the forward).
Writes OUT_DIR/rank<R>.json with what it found.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from sla_core.backbones import load_backbone
from sla_core.engine import ds
from sla_core.experiment import TrainConfig


def main() -> int:
    out = Path(sys.argv[1])
    record: dict = {}
    with ds.distributed() as dist:
        settings = ds.build_settings(TrainConfig(batch_size=2, zero_stage=3), dist.world_size, dist.device)
        rank = dist.rank
        # 37 x 10 = 370 elements: 185 per rank, so row 18 is split between the two shards.
        whole = torch.randn(37, 10, generator=torch.Generator().manual_seed(0))
        with ds.deepspeed.zero.Init(config_dict_or_path=settings.config):
            embedding = nn.Embedding(37, 10)
        ds.assign_partitioned(embedding.weight, lambda full: full.copy_(whole))
        embedding.weight.requires_grad_(False)
        ids = [torch.tensor([[18, 0, 36], [17, 19, 18]]), torch.tensor([[5, 36, 21, 18, 2]])][rank % 2]
        looked_up = ds.sharded_lookup(embedding.weight, ids)
        record["lookup_exact"] = bool(torch.equal(looked_up, whole[ids]))
        record["lookup_shape"] = list(looked_up.shape)
        record["embedding_gathered"] = embedding.weight.numel() > 0

        with ds.gathered([embedding.weight]):
            record["gather_exact"] = bool(torch.equal(embedding.weight.data, whole))

        with ds.construction(settings) as assign:
            backbone = load_backbone("random-llama:tiny", assign=assign)
        base = backbone.base_model
        for p in base.parameters():
            p.requires_grad_(False)
        root = nn.Module()  # like SLAModel: the backbone inside a model with trainable parameters
        root.backbone, root.probe = base, nn.Parameter(torch.zeros(1))
        root.forward = lambda **kw: root.backbone(**kw)
        engine = ds.initialize(root, settings, [{"params": [root.probe], "lr": 0.0}], dist.device)
        record["hooked"] = [type(m).__name__ for m in ds.shard_input_embeddings(root)]  # already hooked: []
        weight = base.get_input_embeddings().weight
        embedding = base.get_input_embeddings()
        seen: list[tuple[bool, int]] = []  # (the embedding module ran, its weight's size) per module run
        hooks = [
            m.register_forward_hook(lambda m, *_: seen.append((m is embedding, weight.numel())))
            for m in base.modules()
        ]
        input_ids = torch.tensor([[1, 500, 49150, 7, 7, 300]]) + rank
        with torch.no_grad():
            hidden = engine(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        for hook in hooks:
            hook.remove()
        record["embedding_numel_during_forward"] = max(n for _, n in seen)
        record["embedding_module_ran"] = any(ran for ran, _ in seen)
        record["embedding_numel_after"] = weight.numel()
        reference = load_backbone("random-llama:tiny").base_model
        with torch.no_grad():
            expected = reference(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        diff = (hidden.last_hidden_state - expected.last_hidden_state).abs().max()
        record["hidden_max_diff"] = float(diff)
        record["rank"] = rank
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
