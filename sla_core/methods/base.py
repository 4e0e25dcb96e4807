"""The `Method` interface: what the engine's one loop needs to train, save, prune and count a model.

A method builds a model whose forward takes `input_ids, attention_mask, labels, task_ids` and returns an
`SLAOutput` (loss, logits; ours adds the sparsity terms). Everything else the loop does (the schedule,
clipping, DeepSpeed, checkpoints, resume) is the same for every method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from sla_core.adapters import ADAPTER_PREFIX

if TYPE_CHECKING:
    from pathlib import Path

    from sla_core.experiment import ExperimentConfig


@runtime_checkable
class Method(Protocol):
    """A way to fine-tune a backbone. Instances are small dataclasses of the method's options.

    Attributes:
        name: the registry name (`sla`, `lora`, ...). prunable: whether `prune` can remove anything.
        lr: the method's learning rate; None uses `train.lr`.
    """

    name: ClassVar[str]
    prunable: ClassVar[bool]
    lr: float | None

    @property
    def spec(self) -> str:
        """The canonical spec string (`lora:r=4`), parsed back by `parse_method`."""
        ...

    def build(
        self, backbone: nn.Module, num_labels: dict[str, int], cfg: ExperimentConfig | None = None
    ) -> nn.Module:
        """The trainable model over a freshly loaded `backbone` for tasks `num_labels` (name -> labels)."""
        ...

    def parameter_groups(self, model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
        """Optimizer groups (each with `params`, `lr`, `weight_decay`)."""
        ...

    def counts(self, model: nn.Module) -> dict[str, int]:
        """Parameter counts: `backbone`, `trainable` (now) and `kept` (what an export after pruning ships)."""
        ...

    def prune(self, model: nn.Module) -> nn.Module:
        """The model to ship: closed adapters removed and gates folded in (identity when not prunable)."""
        ...

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the trainable state and a description that `load_trained` rebuilds the model from."""
        ...


def numel(p: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 holds only a shard of it."""
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def trainable_keys(model: nn.Module) -> list[str]:
    """State keys a checkpoint keeps: every trainable parameter plus the adapters' buffers (mix tables)."""
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    known = set(keys)
    keys += [k for k in model.state_dict() if ADAPTER_PREFIX in k and k not in known]
    return keys


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates, in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]
