"""`HeadModel`: a backbone (frozen, LoRA- or prefix-wrapped, or fully trainable) with one linear head per
task, pooled as `SLAModel` pools (mean for encoders, the last token for decoders). The baselines' model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sla_core.model import PAD_LOGIT, SLAOutput, is_decoder


class HeadModel(nn.Module):
    """`backbone` + pooling + per-task heads (`sla_heads`, so they share the adapters' prefix).

    Args:
        backbone: a base model whose forward returns `last_hidden_state` (possibly PEFT-wrapped).
        tasks: task name -> number of labels; the order gives task ids.
        backbone_params: the size of the bare backbone (LoRA and prefix weights are not backbone).
    """

    accepts_loss_kwargs = False

    def __init__(self, backbone: nn.Module, tasks: dict[str, int], pooling: str, backbone_params: int):
        super().__init__()
        self.backbone = backbone
        self.tasks = dict(tasks)
        self.pooling = pooling
        self.backbone_params = backbone_params
        hidden = int(backbone.config.hidden_size)
        self.sla_heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in tasks.items()})

    def task_index(self, task: str) -> int:
        names = list(self.tasks)
        if task not in names:
            raise ValueError(f"unknown task {task!r}; this model has tasks {names}")
        return names.index(task)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> SLAOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if task_ids is None:
            task_ids = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)  # (B, H)
        names = list(self.tasks)
        width = max(self.tasks.values())
        logits = pooled.new_full((pooled.shape[0], width), PAD_LOGIT)  # (B, max_labels)
        # Every head runs in training (on zero rows if need be): data-parallel ranks must touch the same
        # parameters whatever tasks their batch holds.
        present = range(len(names)) if self.training else torch.unique(task_ids).tolist()
        for t in present:
            rows = task_ids == t
            out = self.sla_heads[names[t]](pooled[rows])
            logits[rows, : out.shape[1]] = out
        if len(set(self.tasks.values())) == 1:
            logits = logits[:, : self.tasks[names[0]]]
        if labels is None:
            return SLAOutput(loss=None, logits=logits)
        loss = F.cross_entropy(logits.float(), labels.long())
        return SLAOutput(loss=loss, logits=logits, task_loss=loss)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the first token, the masked mean, or the last non-pad token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(dim=1)  # (B,) left or right padding
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def default_pooling(base: nn.Module) -> str:
    return "last" if is_decoder(base) else "mean"
