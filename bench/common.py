"""Helpers shared by the benchmarks: timing, JSON output, baseline models."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def machine() -> dict[str, Any]:
    """Which machine produced a result (reports say so next to each table)."""
    return {
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": CODE_COMMIT,
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The commit whose code this process runs: read once, when the benchmark starts, so that a long grid that
# outlives later commits still records the code it loaded.
CODE_COMMIT = _commit()


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), "command": f"python bench/{name}.py", **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def call_times(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(call_times(fn, repeats))


def min_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` calls: machine noise only ever adds time."""
    return min(call_times(fn, repeats))


class HeadModel(nn.Module):
    """A backbone + mean/last pooling + linear head: the baselines' classifier (full FT, LoRA, floor)."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            last = (attention_mask.long() * torch.arange(attention_mask.shape[1])).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return loss, logits
