"""Learned gates: for every task, candidate and pool member, the probability that the adapter exists.

Gates are a table of logits of shape (T, C, K): tasks x candidates x pool members. Calling the module
returns both the gate values used in this forward and the probabilities that feed the penalty, so that
under ZeRO-3 the parameters are only read inside a forward (where they are gathered).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Stretch interval of the hard-concrete distribution (Louizos et al., 2018).
GAMMA, ZETA = -0.1, 1.1


class HardConcreteGates(nn.Module):
    """L0 gates. Training samples a stretched, clipped concrete variable; eval is deterministic.

    The eval value `clamp(sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)` reaches exact zeros and
    ones, so removing zero gates and folding the others into the weights changes no output.
    """

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.log_alpha = nn.Parameter(torch.full((num_tasks, num_candidates, pool_size), float(init)))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """P(gate != 0) per entry, differentiable; the expected L0 norm is its sum."""
        shift = self.temperature * math.log(-GAMMA / ZETA)
        return torch.sigmoid(log_alpha - shift)

    def eval_values(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (values (T, C, K), probabilities (T, C, K))."""
        log_alpha = self.log_alpha
        if self.training:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.temperature)
            values = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        else:
            values = self.eval_values(log_alpha)
        return values, self.probabilities(log_alpha)


class SigmoidGates(nn.Module):
    """The paper's plain gate: value = probability = sigmoid(logit). Pruning at 0.5 is approximate."""

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((num_tasks, num_candidates, pool_size), float(init)))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(log_alpha)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities(self.log_alpha)
        return p, p


class FixedGates(nn.Module):
    """Every gate open, nothing learned: fixed adapters at every candidate (the classic baseline)."""

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.register_buffer("log_alpha", torch.full((num_tasks, num_candidates, pool_size), 10.0))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_alpha)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ones = self.probabilities(self.log_alpha)
        return ones, ones


def decide_gates(kind: str, log_alpha: torch.Tensor, temperature: float) -> torch.Tensor:
    """Final gate values after training, (T, C, K): exact zeros mark adapters to remove."""
    if kind == "fixed":
        return torch.ones_like(log_alpha)
    if kind == "hard_concrete":
        return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
    p = torch.sigmoid(log_alpha)
    return torch.where(p >= 0.5, p, torch.zeros_like(p))


def build_gates(
    kind: str, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float
):
    cls = {"hard_concrete": HardConcreteGates, "sigmoid": SigmoidGates, "fixed": FixedGates}[kind]
    return cls(num_tasks, num_candidates, pool_size, init, temperature)
