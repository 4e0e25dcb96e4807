"""A gate kind is one class and one registry line: a toy kind trains, decides and prunes like the builtins."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from sla_core import SLAConfig, attach
from sla_core.gates import GATE_KINDS, register_gate_kind
from tests.sla_core.tiny import batch, tiny_backbone


class ScaledOpenGates(nn.Module):
    """Every gate open, each with a learned non-negative scale (a toy kind for the registry test)."""

    def __init__(self, num_tasks: int, num_candidates: int, pool_size: int, init: float, temperature: float):
        super().__init__()
        self.register_buffer("log_alpha", torch.full((num_tasks, num_candidates, pool_size), 10.0))
        self.scale = nn.Parameter(torch.full((num_tasks, num_candidates, pool_size), 0.5))

    def probabilities(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_alpha)

    def decide(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return self.scale.detach().clamp(min=0.0)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.clamp(min=0.0), self.probabilities(self.log_alpha)


@pytest.fixture
def toy() -> Iterator[str]:
    register_gate_kind("toy")(ScaledOpenGates)
    yield "toy"
    GATE_KINDS.pop("toy")


def test_a_registered_kind_trains_decides_and_prunes_exactly(toy: str) -> None:
    model = attach(tiny_backbone("bert"), SLAConfig(tasks={"a": 2}, rank=4, gate=toy, lambda_sparse=0.0))
    assert isinstance(model.sla_gates, ScaledOpenGates)
    ids, mask = batch()
    opt = torch.optim.AdamW(model.parameter_groups(3e-2, gate_lr=0.05))
    model.train()
    for _ in range(4):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    scale = model.sla_gates.scale.detach()
    assert not torch.allclose(scale, torch.full_like(scale, 0.5))  # the scale is learned (gates' group)
    assert torch.equal(model.decided_gates(), scale.clamp(min=0.0))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    pruned = model.prune()
    with torch.no_grad():
        after = pruned(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert pruned.parameter_counts()["gates"] == 0


def test_an_unknown_kind_lists_the_registered_ones(toy: str) -> None:
    listed = r"\['fixed', 'hard_concrete', 'sensitivity', 'sensitivity_per_param', 'sigmoid', 'topk', 'toy'\]"
    with pytest.raises(ValueError, match=r"SLAConfig.gate='l0'.*" + listed):
        SLAConfig(tasks={"a": 2}, gate="l0")


def test_a_kind_registers_once_and_must_satisfy_the_protocol(toy: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_gate_kind("toy")(ScaledOpenGates)
    with pytest.raises(ValueError, match=r"lacks \['decide'\]"):
        register_gate_kind("incomplete")(type("Incomplete", (nn.Module,), {"probabilities": lambda s, x: x}))
    assert "incomplete" not in GATE_KINDS
