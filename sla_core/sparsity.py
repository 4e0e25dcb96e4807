"""The sparsity objective: expected open fraction of candidate parameters, λ warm-up, budget control."""

from __future__ import annotations

import torch
from torch import nn


def expected_open_fraction(probs: torch.Tensor, member_params: torch.Tensor) -> torch.Tensor:
    """Expected fraction of candidate parameters that survive pruning.

    A pool member is kept if any task opens it: P(kept) = 1 - prod_t (1 - p_t). With one task this is
    the plain expected number of open gates, weighted by each adapter's parameter count.

    Args:
        probs: (T, C, K) gate probabilities.
        member_params: (C, K) parameter count of each pool member.
    """
    kept = 1.0 - torch.prod(1.0 - probs, dim=0)  # (C, K)
    return (kept * member_params).sum() / member_params.sum()


def expected_open_gates(probs: torch.Tensor, member_params: torch.Tensor) -> torch.Tensor:
    """The λ penalty: expected open gates, weighted by parameters, averaged over tasks (0 to 1).

    Unlike the kept fraction (a union over tasks) its gradient does not vanish when other tasks hold a
    member open: with three tasks at p = 0.95 the union's gradient for one task is (1 - 0.95)^2 = 0.0025 of
    this one's, so shared-pool gates would never close. Equal to `expected_open_fraction` with one task.
    """
    return (probs * member_params).sum() / (probs.shape[0] * member_params.sum())


def warmup_lambda(lambda_sparse: float, step: int, warmup_steps: int) -> float:
    """λ ramps linearly from 0 to `lambda_sparse` over `warmup_steps` training forwards."""
    if warmup_steps <= 0:
        return lambda_sparse
    return lambda_sparse * min(1.0, step / warmup_steps)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class BudgetController(nn.Module):
    """Lagrangian control of the kept fraction toward a target (as in CoFi pruning).

    Adds `l1 * (E - t) + l2 * (E - t)^2` to the loss. The multipliers see reversed gradients, so any
    optimizer that minimises the loss runs gradient *ascent* on them: they grow while the constraint is
    violated, which pushes the gates toward the budget from either side.
    """

    def __init__(self, target: float) -> None:
        super().__init__()
        self.target = float(target)
        self.multipliers = nn.Parameter(torch.zeros(2))

    def forward(self, expected: torch.Tensor) -> torch.Tensor:
        lam = _ReverseGrad.apply(self.multipliers)
        gap = expected - self.target
        return lam[0] * gap + lam[1] * gap * gap
