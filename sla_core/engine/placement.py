"""Where tensors go: batches come from the samplers as CPU tensors and move to the model's device here.

Nothing here imports DeepSpeed; the device is chosen once at start (`sla_core.engine.ds.choose_device`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """`batch` with its tensors on `device` (non-blocking from pinned memory on a GPU); on the CPU the
    tensors are returned as they are."""
    device = torch.device(device)
    if device.type == "cpu":
        return dict(batch)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model: Any) -> torch.device:
    """The device `model` computes on: a DeepSpeed engine's `device`, else its first parameter's or
    buffer's (a ZeRO-3 shard lives on the compute device too), else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")
