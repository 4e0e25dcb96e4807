"""Learned gates: for every task, candidate and pool member, the probability that the adapter exists.

Gates are a table of logits of shape (T, C, K): tasks x candidates x pool members. Calling the module
returns both the gate values used in this forward and the probabilities that feed the penalty, so that
under ZeRO-3 the parameters are only read inside a forward (where they are gathered).

Gate kinds live in one registry, `GATE_KINDS`; `SLAConfig.gate` names one of them. A new kind is one class
that satisfies `Gates`, decorated with `@register_gate_kind("name")`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
from torch import nn

from sla_core.sparsity import LOG_ALPHA_LIMIT

# Stretch interval of the hard-concrete distribution (Louizos et al., 2018).
GAMMA, ZETA = -0.1, 1.1


class Gates(Protocol):
    """What `SLAModel` needs from a gate kind.

    A kind is an `nn.Module` class built as `cls(num_tasks, num_candidates, pool_size, init, temperature)`.
    `log_alpha` (T, C, K) is a parameter or a buffer; every other learned tensor of the module is trained
    with the gates' optimizer group (its name contains `sla_gates`).
    """

    log_alpha: torch.Tensor

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """P(gate != 0) per entry, (T, C, K), differentiable: the sparsity penalty and budget ranking."""
        ...

    def __call__(self, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(values used in this forward, probabilities), each (T, C, K), of the logits moved by `shift`
        (budget mode solves that scalar every step; kinds that cannot follow it may ignore it)."""
        ...

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Final values (T, C, K) after training: exact zeros are pruned, the rest folded into weights.

        Pruning is exact when these equal the eval-mode values of the forward.
        """
        ...


GATE_KINDS: dict[str, type[nn.Module]] = {}
Kind = TypeVar("Kind", bound=type[nn.Module])


def register_gate_kind(name: str) -> Callable[[Kind], Kind]:
    """Class decorator: make `name` a valid `SLAConfig.gate`.

    Raises:
        ValueError: the name is taken, or the class lacks a method of `Gates`.
    """

    def register(cls: Kind) -> Kind:
        if name in GATE_KINDS:
            raise ValueError(f"gate kind {name!r} is already registered ({GATE_KINDS[name].__name__})")
        missing = [m for m in ("probabilities", "forward", "decide") if not callable(getattr(cls, m, None))]
        if missing:
            raise ValueError(f"gate kind {name!r}: {cls.__name__} lacks {missing} (see sla_core.gates.Gates)")
        GATE_KINDS[name] = cls
        return cls

    return register


def build_gates(
    kind: str, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float
) -> Gates:
    """The gate module of `kind` for a (num_tasks, num_candidates, pool_size) table."""
    if kind not in GATE_KINDS:
        raise ValueError(f"unknown gate kind {kind!r}; choose one of {sorted(GATE_KINDS)}")
    return GATE_KINDS[kind](num_tasks, num_candidates, pool_size, init, temperature)


@register_gate_kind("hard_concrete")
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

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def forward(self, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (values (T, C, K), probabilities (T, C, K)) of the clamped logits moved by `shift`."""
        log_alpha = self.log_alpha.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT) + shift
        if self.training:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.temperature)
            values = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        else:
            values = self.decide(log_alpha)
        return values, self.probabilities(log_alpha)


@register_gate_kind("sigmoid")
class SigmoidGates(nn.Module):
    """The paper's plain gate: value = probability = sigmoid(logit). Pruning at 0.5 is approximate."""

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((num_tasks, num_candidates, pool_size), float(init)))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(log_alpha)

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(log_alpha)
        return torch.where(p >= 0.5, p, torch.zeros_like(p))

    def forward(self, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities(self.log_alpha.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT) + shift)
        return p, p


@register_gate_kind("topk")
class TopKGates(SigmoidGates):
    """The budget's structure in every forward (movement pruning's straight-through top-k).

    In budget mode the model opens, each search step, exactly the members that the budget's knapsack keeps
    at the scheduled target, ranked by these logits; the forward is that hard 0/1 structure and the logits
    learn through it as if it were the identity (a straight-through gradient: a logit rises when its member
    lowers the loss). The network that trains is thus always the one the decision would keep, and the
    decision, the same knapsack at the budget, removes nothing the last search steps used. Closed members
    still compute their outputs during the search, so that their logits can rise again. Needs a budget.
    """

    straight_through = True  # logits and `probabilities` (a monotone score for reporting) as SigmoidGates

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return (log_alpha > 0).to(log_alpha.dtype)

    def straight_through_values(
        self, mask: torch.Tensor, task_counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` (T, C, K) in the forward, the identity to the (clamped) logits in the backward (the
        optimizer weighs tasks; `task_counts` is not used)."""
        log_alpha = self.log_alpha.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
        return mask.to(log_alpha.dtype) + log_alpha - log_alpha.detach()

    def forward(self, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probabilities(self.log_alpha.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT) + shift)
        return (probs > 0.5).to(probs.dtype) + probs - probs.detach(), probs


@register_gate_kind("sensitivity")
class SensitivityGates(nn.Module):
    """The budget's structure in every forward, ranked by sensitivity (AdaLoRA's importance score).

    Like "topk", each search step opens exactly the budget's knapsack, but nothing is learned by the
    optimizer: `log_alpha` is a buffer holding, per gate, an exponential moving average (β = 0.85, AdaLoRA's)
    of |∂loss/∂gate|, the first-order change of the loss if the member were removed (open) or added
    (closed). Adam's normalized steps move a learned logit by the sign of its gradient, not its size; this
    score ranks by size. Each task's score is the gradient of its own mean loss over the batch's rows of
    that task (a task absent from a batch keeps its score), summed over processes first, so every process
    decides alike. Needs a budget.
    """

    straight_through = True
    BETA = 0.85

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.register_buffer("log_alpha", torch.zeros(num_tasks, num_candidates, pool_size))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The score over the largest one (reporting); the kept set is the knapsack's."""
        return log_alpha / log_alpha.amax().clamp(min=1e-12)

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return (log_alpha > 0).to(log_alpha.dtype)

    def straight_through_values(
        self, mask: torch.Tensor, task_counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` (T, C, K), whose gradient updates the score when the backward reaches it. `task_counts`
        (T,): the batch's rows per task (None: every task present, weighed by the batch's mean loss)."""
        values = mask.to(self.log_alpha.dtype).detach().requires_grad_(True)
        values.register_hook(lambda grad: self._update(grad, task_counts))
        return values

    @torch.no_grad()
    def _update(self, grad: torch.Tensor, task_counts: torch.Tensor | None) -> None:
        """Each task's score is the gradient of that task's own mean loss (the batch's mean-loss gradient
        times the batch's rows over the task's rows, summed over processes), so that tasks rank alike
        whatever their share of the mixture; a task absent from every process's batch keeps its score (no
        information, no decay). Without counts, every task counts as present: the mean over processes."""
        import torch.distributed as dist

        T, n = grad.shape[0], grad.numel()
        counts = (
            torch.ones(T, device=grad.device) if task_counts is None else task_counts.to(grad.device).float()
        )
        rows = 1.0 if task_counts is None else float(counts.sum())
        together = torch.cat([(grad.detach().float() * rows).flatten(), counts])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(together)
        summed, counts = together[:n].view(grad.shape), together[n:]
        score = (summed / counts.clamp(min=1).view(T, 1, 1)).abs().to(self.log_alpha.dtype)
        present = counts > 0
        self.log_alpha[present] = self.BETA * self.log_alpha[present] + (1 - self.BETA) * score[present]

    def forward(self, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probabilities(self.log_alpha)
        return (probs > 0).to(probs.dtype), probs


@register_gate_kind("sensitivity_per_param")
class SensitivityPerParamGates(SensitivityGates):
    """ "sensitivity" with the knapsack ranked by score per parameter: |∂loss/∂gate| over the member's size,
    the greedy knapsack's value density (a feed-forward unit costs 2.5x an attention unit). Needs a budget."""

    per_param = True


@register_gate_kind("fixed")
class FixedGates(nn.Module):
    """Every gate open, nothing learned: fixed adapters at every candidate (the classic baseline)."""

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.register_buffer("log_alpha", torch.full((num_tasks, num_candidates, pool_size), 10.0))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_alpha)

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_alpha)

    def forward(self, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        ones = self.probabilities(self.log_alpha)
        return ones, ones
