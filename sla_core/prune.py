"""Pruning as a pure function: (adapter state, structure, decided gates) -> (pruned state, structure).

A pool member is removed when every task's gate is exactly zero. A kept member's up-projection is
scaled by its largest gate value, and a fixed per-task mix table (gate / scale, in [0, 1]) replaces the
learned gates; with one task the mix is all ones and the gates disappear entirely. Eval-mode outputs are
unchanged up to float rounding.
"""

from __future__ import annotations

import copy

import torch

from sla_core.config import SLAConfig
from sla_core.inject import POOL_ATTR, SiteSpec


def kept_members(gates: torch.Tensor) -> list[int]:
    """The members of a pool that some task keeps: columns of its decided (T, K) gate values not all zero."""
    return [k for k in range(gates.shape[1]) if bool((gates[:, k] > 0).any())]


def prune_state(
    state: dict[str, torch.Tensor], sites: list[SiteSpec], gates: torch.Tensor, config: SLAConfig
) -> tuple[list[SiteSpec], dict[str, torch.Tensor]]:
    """Return the pruned structure and tensors. `gates` is (T, C, K) of decided values."""
    r = config.unit_rank
    new_sites = copy.deepcopy(sites)
    new_state = {k: v.clone() for k, v in state.items() if k.startswith("sla_heads.")}
    for spec in new_sites:
        for path, k_size in list(spec.pools.items()):
            if k_size == 0:
                continue
            c = spec.candidates[path]
            g = gates[:, c, :k_size]  # (T, K)
            kept = kept_members(g)
            spec.pools[path] = len(kept)
            if not kept:
                continue
            prefix = f"backbone.{spec.module}.{POOL_ATTR[path]}."
            scale = g[:, kept].max(dim=0).values  # (K',)
            rows = torch.cat([torch.arange(k * r, (k + 1) * r) for k in kept])
            up_scale = scale.repeat_interleave(r)  # (K'*r,)
            new_state[prefix + "down_weight"] = state[prefix + "down_weight"][rows].clone()
            new_state[prefix + "up_weight"] = state[prefix + "up_weight"][:, rows] * up_scale[None, :]
            if prefix + "up_bias" in state:  # LoRA-type pools have no biases
                new_state[prefix + "down_bias"] = state[prefix + "down_bias"][rows].clone()
                new_state[prefix + "up_bias"] = state[prefix + "up_bias"][kept] * scale[:, None]
            new_state[prefix + "mix"] = g[:, kept] / scale[None, :]  # (T, K')
    return new_sites, new_state
