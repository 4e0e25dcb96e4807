"""The sparsity objective: expected open fraction of candidate parameters, λ warm-up, the exact budget."""

from __future__ import annotations

from collections.abc import Callable

import torch

LOG_ALPHA_LIMIT = 10.0  # gate logits are clamped to ±this: beyond it a gate is decided for good
SHIFT_RANGE = 4 * LOG_ALPHA_LIMIT


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


def budget_mask(scores: torch.Tensor, member_params: torch.Tensor, target: float) -> torch.Tensor:
    """The budget's decision, a knapsack: gates in order of `scores`, highest first, each kept if its pool
    member still fits; a member costs its parameters once, whichever tasks open it.

    With several tasks, a task's gate on a member that another task already pays for costs nothing, but it is
    kept only if it ranks above the budget's boundary (the first gate that did not fit): each task opens what
    its own gates rank high, not every member that any task kept. A task left with nothing so opens the kept
    member its gates rank highest.

    Args:
        scores: (T, C, K), anything that orders the gates as their probabilities do (the logits).
        member_params: (C, K) parameter count of each member. target: kept fraction of their sum.
    Returns:
        A (T, C, K) 0/1 mask. The kept parameters never exceed the target, and the greedy pass skips only
        what no longer fits, so the budget is filled to within the smallest member.
    """
    limit = target * float(member_params.sum()) * (1 + 1e-6)
    T, C, K = scores.shape
    order = torch.argsort(scores.detach().float().cpu().flatten(), descending=True, stable=True).tolist()
    costs = member_params.detach().float().cpu()
    keep = torch.zeros(T * C * K, dtype=torch.bool)
    kept: set[tuple[int, int]] = set()
    used, past_boundary = 0.0, False
    for i in order:
        member = ((i // K) % C, i % K)
        if member in kept:
            keep[i] = not past_boundary
        elif used + float(costs[member]) <= limit:
            keep[i], used = True, used + float(costs[member])
            kept.add(member)
        else:
            past_boundary = True
    keep = keep.view(T, C, K)
    if kept:  # a task whose every gate ranks below the boundary still opens its best kept member
        flat = scores.detach().float().cpu()
        paid = torch.zeros(C, K, dtype=torch.bool)
        paid[tuple(zip(*kept, strict=True))] = True
        for t in range(T):
            if not keep[t].any():
                best = int(flat[t].masked_fill(~paid, float("-inf")).argmax())
                keep[t].view(-1)[best] = True
    return keep.to(device=scores.device, dtype=torch.float32)


def solve_shift(
    log_alpha: torch.Tensor,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    member_params: torch.Tensor,
    target: float,
    iterations: int = 40,
) -> float:
    """The scalar s for which the expected kept fraction of `probabilities(log_alpha + s)` equals `target`
    (S3Delta's shifted global sigmoid): bisection, since the expectation grows with s. No gradient flows
    through s; the gates then learn only the order of their logits, and the budget holds every step."""
    with torch.no_grad():
        lo, hi = -SHIFT_RANGE, SHIFT_RANGE
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if float(expected_open_fraction(probabilities(log_alpha + mid), member_params)) > target:
                hi = mid
            else:
                lo = mid
    return (lo + hi) / 2
