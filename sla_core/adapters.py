"""`AdapterPool`: K bottleneck adapters (down to rank r, activation, up) evaluated together.

The K down-projections are one (K*r, in) matrix and the K up-projections one (out, K*r) matrix, so a
pool costs two matmuls whatever K is. Per-example gate values weight each member's hidden units before
the up-projection, which equals weighting each member's output because the up-projection is linear.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

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
        # After `compact`: the members still trained (ids into the K), their decided per-task values (T, K'),
        # how many parameters the dropped members held, and their values at the decision (a CPU record, not
        # trained): the state dict keeps the full K-member shapes and values.
        self.record: dict[str, torch.Tensor] = {}
        self.register_buffer("kept", None, persistent=False)
        self.register_buffer("kept_mix", None, persistent=False)
        self.kept_unit = False
        self.dropped_numel = 0
        self._register_state_dict_hook(_expand_compacted)
        self._register_load_state_dict_pre_hook(_compact_incoming, with_module=True)

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
        """Parameters of all K members (also of those `compact` dropped)."""
        return sum(p.numel() for p in self.parameters()) + self.dropped_numel

    @property
    def members(self) -> int:
        """Members the weights hold now: K, or the K' that `compact` kept."""
        return self.pool_size if self.kept is None else int(self.kept.numel())

    def _rows(self, members: torch.Tensor) -> torch.Tensor:
        r = self.rank
        return (members[:, None] * r + torch.arange(r, device=members.device)).flatten()

    @torch.no_grad()
    def compact(self, kept: list[int], values: torch.Tensor) -> dict[nn.Parameter, tuple[nn.Parameter, Any]]:
        """Keep only the members `kept` (the fixed-structure phase): their weights become new, smaller
        parameters; the others are no longer parameters (no gradient, no optimizer state, no compute), their
        values kept as a CPU record for the state dict. `values` (T, K') are the kept members' decided gate
        values per task, applied from here on instead of the gates the forward passes.

        Returns:
            {old parameter: (new parameter, index function)}: the index function cuts a tensor of the old
            parameter's shape (its optimizer state) down to the new one's.
        """
        if self.kept is not None or self.mix is not None:
            raise RuntimeError("this pool is already compacted or pruned")
        device = self.down_weight.device
        before = sum(p.numel() for p in self.parameters())
        self.kept = torch.tensor(sorted(kept), dtype=torch.long, device=device)
        moved = {}
        for name in ("down_weight", "up_weight", "down_bias", "up_bias"):
            old = getattr(self, name)
            if old is None:
                continue
            dim, index = _member_index(self, name)
            cut = partial(torch.index_select, dim=dim, index=index)
            new = nn.Parameter(cut(old.detach()), requires_grad=old.requires_grad)
            self.record[name] = old.detach().cpu().clone()
            setattr(self, name, new)
            moved[old] = (new, cut)
        self.kept_mix = values.detach().to(device=device, dtype=torch.float32).clone()
        self.kept_unit = bool(torch.all(self.kept_mix == 1.0))
        self.dropped_numel = before - sum(p.numel() for p in self.parameters())
        return moved

    @torch.no_grad()
    def member_norms(self) -> torch.Tensor:
        """(K,) how far each member moves its output: the Frobenius norm of its up-projection times its
        down-projection's (exact for a rank-1 linear unit, a bound otherwise). Needs the full weights
        (gather them first under ZeRO-3)."""
        K, r = self.members, self.rank
        down = self.down_weight.detach().float().view(K, r, self.in_dim).flatten(1).norm(dim=1)
        up = self.up_weight.detach().float().view(self.out_dim, K, r).transpose(0, 1).flatten(1).norm(dim=1)
        out = down * up
        if self.kept is not None:  # compacted: the dropped members moved nothing any more
            full = torch.zeros(self.pool_size)
            full[self.kept.cpu()] = out
            return full
        return out

    def _member_gates(self, gates: torch.Tensor | None, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        """(B, K') weights of the members held now, or None where they are all one. Raises when a pool
        that needs gates runs outside `SLAModel.forward`."""
        if self.kept is not None:  # compacted: its decided values, whatever the forward passes
            if self.kept_unit:
                return None
            if task_ids is None:
                raise RuntimeError("adapter sites run inside SLAModel.forward; call the SLAModel")
            return self.kept_mix[task_ids]
        if gates is None:
            if self.mix is None or task_ids is None:
                raise RuntimeError(
                    "adapter sites run inside SLAModel.forward (which sets gates and task ids); "
                    "call the SLAModel, not its backbone"
                )
            return None if self.unit_mix else self.mix[task_ids]  # (B, K)
        return gates

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
        K = self.members
        gates = self._member_gates(gates, task_ids)
        if gates is None:
            g = h.new_ones(B, T, K)  # (B, T, K)
        else:
            gates = gates.to(h.dtype)
            h = (h.view(B, T, K, self.rank) * gates[:, None, :, None]).view(B, T, -1)
            g = gates[:, None, :].expand(B, T, K)  # (B, T, K)
        up = torch.cat([self.up_weight, self.up_bias.t()], dim=1)  # (out, K*r + K)
        return torch.cat([h, g], dim=-1), up

    def _no_bias(
        self, h: torch.Tensor, gates: torch.Tensor | None, task_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated hidden units and the up-projection of a bias-free pool: `h @ U.T` is the delta."""
        B, T, _ = h.shape
        gates = self._member_gates(gates, task_ids)
        if gates is not None:
            gates = gates.to(h.dtype)
            h = (h.view(B, T, self.members, self.rank) * gates[:, None, :, None]).view(B, T, -1)
        return h, self.up_weight


def _member_index(pool: AdapterPool, name: str) -> tuple[int, torch.Tensor]:
    """(dimension, indices) of the kept members' slices in the full tensor `name`."""
    members = pool.kept
    return (1 if name == "up_weight" else 0), (members if name == "up_bias" else pool._rows(members))


def _expand_compacted(pool: AdapterPool, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: a compacted pool saves its full K-member tensors, the dropped members at their values
    of the decision (closed, they add nothing), so files and checkpoints are those of a run that kept them."""
    if pool.kept is None:
        return
    for name, record in pool.record.items():
        key = prefix + name
        if key not in state:
            continue
        value = state[key]
        dim, index = _member_index(pool, name)
        full = record.to(device=value.device, dtype=value.dtype).clone()
        state[key] = full.index_copy_(dim, index.to(value.device), value.detach())


def _compact_incoming(pool: AdapterPool, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: full K-member tensors loaded into a compacted pool: the kept members' slices go to its
    parameters, the whole tensor to its record of the dropped ones."""
    if pool.kept is None:
        return
    for name in list(pool.record):
        key = prefix + name
        if key not in state or tuple(state[key].shape) != tuple(pool.record[name].shape):
            continue
        dim, index = _member_index(pool, name)
        pool.record[name] = state[key].detach().cpu().clone()
        state[key] = state[key].index_select(dim, index.to(state[key].device))
