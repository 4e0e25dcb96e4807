"""`AdapterPool`: K bottleneck adapters (down to rank r, activation, up) evaluated together.

The K down-projections are one (K*r, in) matrix and the K up-projections one (out, K*r) matrix, so a
pool costs two matmuls whatever K is. Per-example gate values weight each member's hidden units before
the up-projection, which equals weighting each member's output because the up-projection is linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Every trainable tensor of ours lives under a module or parameter name containing this prefix, so
# freezing, saving and counting find them by name.
ADAPTER_PREFIX = "sla_"


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state key belongs to the adapters, gates, budget or heads."""
    return ADAPTER_PREFIX in name


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `module`'s state dict (parameters and buffers), by name."""
    return {k: v for k, v in module.state_dict().items() if is_adapter_key(k)}


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda x: x}


class AdapterPool(nn.Module):
    """K adapters mapping `in_dim` -> `out_dim` through rank `rank`; up-projections start at zero.

    After pruning a pool may carry a fixed `mix` table (T, K) of per-task weights instead of reading
    learned gates; a pool whose mix is all ones skips gating entirely.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        pool_size: int,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.rank, self.pool_size = in_dim, out_dim, rank, pool_size
        self.activation = activation
        self.down_weight = nn.Parameter(torch.empty(pool_size * rank, in_dim))
        self.up_weight = nn.Parameter(torch.zeros(out_dim, pool_size * rank))
        # LoRA-type pools (identity activation) carry no biases: a low-rank linear delta, mergeable.
        self.down_bias = nn.Parameter(torch.zeros(pool_size * rank)) if bias else None
        self.up_bias = nn.Parameter(torch.zeros(pool_size, out_dim)) if bias else None
        self.reset_parameters()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("mix", None)  # (T, K) after pruning
        self.unit_mix = False

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The initialization (at construction, and again for `SLAConfig.rewind`): down-projections
        kaiming-uniform with a=sqrt(5) (PyTorch's and PEFT's), up-projections and biases zero, so the pool
        adds nothing. A (CPU) `generator` draws on the CPU and copies to wherever the weights live."""
        if generator is None:
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        else:
            fresh = torch.empty(self.down_weight.shape, dtype=self.down_weight.dtype)
            self.down_weight.copy_(nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator))
        for p in (self.up_weight, self.down_bias, self.up_bias):
            if p is not None:
                p.zero_()

    def set_mix(self, mix: torch.Tensor) -> None:
        """Freeze per-task member weights (T, K) after pruning."""
        self.register_buffer("mix", mix.detach().clone(), persistent=True)
        self.unit_mix = bool(torch.all(mix == 1.0))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def member_norms(self) -> torch.Tensor:
        """(K,) how far each member moves its output: the Frobenius norm of its up-projection times its
        down-projection's (exact for a rank-1 linear unit, a bound otherwise). Needs the full weights
        (gather them first under ZeRO-3)."""
        K, r = self.pool_size, self.rank
        down = self.down_weight.detach().float().view(K, r, self.in_dim).flatten(1).norm(dim=1)
        up = self.up_weight.detach().float().view(self.out_dim, K, r).transpose(0, 1).flatten(1).norm(dim=1)
        return down * up

    def forward(
        self, x: torch.Tensor, gates: torch.Tensor | None, task_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated hidden units and the matching up-projection, to be applied by one fused matmul.

        Args:
            x: (B, T, in). gates: (B, K) learned gate values, or None to use the fixed mix table.
        Returns:
            (h, U): h is (B, T, K*r + K) = [gated hidden units, gate values]; U is (out, K*r + K) =
            [up weights, up biases], so `h @ U.T` = sum_k g_k * up_k(act(down_k(x))). Folding the biases
            into the matmul lets the site add everything to its output in a single addmm.
        """
        act = _ACTIVATIONS[self.activation]
        h = act(F.linear(self.dropout(x), self.down_weight, self.down_bias))  # (B, T, K*r)
        if self.up_bias is None:
            return self._no_bias(h, gates, task_ids)
        B, T, _ = h.shape
        if gates is None:
            if self.mix is None or task_ids is None:
                raise RuntimeError(
                    "adapter sites run inside SLAModel.forward (which sets gates and task ids); "
                    "call the SLAModel, not its backbone"
                )
            gates = None if self.unit_mix else self.mix[task_ids]  # (B, K)
        if gates is None:
            g = h.new_ones(B, T, self.pool_size)  # (B, T, K)
        else:
            gates = gates.to(h.dtype)
            h = (h.view(B, T, self.pool_size, self.rank) * gates[:, None, :, None]).view(B, T, -1)
            g = gates[:, None, :].expand(B, T, self.pool_size)  # (B, T, K)
        up = torch.cat([self.up_weight, self.up_bias.t()], dim=1)  # (out, K*r + K)
        return torch.cat([h, g], dim=-1), up

    def _no_bias(
        self, h: torch.Tensor, gates: torch.Tensor | None, task_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated hidden units and the up-projection of a bias-free pool: `h @ U.T` is the delta."""
        B, T, _ = h.shape
        if gates is None:
            if self.mix is None or task_ids is None:
                raise RuntimeError("adapter sites run inside SLAModel.forward; call the SLAModel")
            gates = None if self.unit_mix else self.mix[task_ids]  # (B, K)
        if gates is not None:
            gates = gates.to(h.dtype)
            h = (h.view(B, T, self.pool_size, self.rank) * gates[:, None, :, None]).view(B, T, -1)
        return h, self.up_weight
