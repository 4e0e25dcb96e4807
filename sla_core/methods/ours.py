"""Ours as a method: gated adapters whose structure is learned (`sla`), and the same adapters with every
gate fixed open (`adapters`: classic sequential bottleneck adapters, the Houlsby baseline).

Options override the experiment's `sla:` section for this method only, e.g. `sla:lambda_sparse=0.5`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from sla_core.config import SLAConfig
from sla_core.methods.base import numel

if TYPE_CHECKING:
    from sla_core.experiment import ExperimentConfig
    from sla_core.model import SLAModel


@dataclass
class StructureLearned:
    """Gated adapter candidates at every site; λ or a budget decides which stay."""

    name: ClassVar[str] = "sla"
    prunable: ClassVar[bool] = True
    options: dict[str, Any] = field(default_factory=dict)  # `sla:` keys for this method only
    lr: float | None = None

    def __post_init__(self) -> None:
        SLAConfig.from_dict({"tasks": {"check": 2}, **self.fixed(), **self.options})  # names the bad key

    def fixed(self) -> dict[str, Any]:
        """Settings this method always uses, whatever the `sla:` section says."""
        return {}

    @property
    def spec(self) -> str:
        opts = {**self.options, **({"lr": self.lr} if self.lr is not None else {})}
        return self.name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in opts.items()) if opts else "")

    def sla_config(self, num_labels: dict[str, int], cfg: ExperimentConfig | None) -> SLAConfig:
        if cfg is None:
            return SLAConfig.from_dict({"tasks": num_labels, **self.options, **self.fixed()})
        return cfg.sla_config(num_labels, **{**self.options, **self.fixed()})  # an option's mode key wins

    def build(
        self, backbone: nn.Module, num_labels: dict[str, int], cfg: ExperimentConfig | None = None
    ) -> nn.Module:
        from sla_core.model import attach

        forwards = cfg.train.steps * cfg.train.grad_accum if cfg is not None else None
        return attach(backbone, self.sla_config(num_labels, cfg), schedule_steps=forwards)

    def parameter_groups(self, model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
        tc = cfg.train
        return model.parameter_groups(self.lr if self.lr is not None else tc.lr, tc.gate_lr, tc.weight_decay)

    def counts(self, model: nn.Module) -> dict[str, int]:
        counts = model.parameter_counts()
        return {"backbone": counts["backbone"], "trainable": counts["trainable"], "kept": kept_count(model)}

    def prune(self, model: nn.Module) -> nn.Module:
        return model.prune(inplace=True)

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from sla_core.io import save_adapters

        return save_adapters(model, path, extra={"method": self.spec, **(extra or {})})


@dataclass
class FixedAdapters(StructureLearned):
    """Sequential bottleneck adapters at every site, all kept, nothing learned about the structure."""

    name: ClassVar[str] = "adapters"
    prunable: ClassVar[bool] = False

    def fixed(self) -> dict[str, Any]:
        return {"gate": "fixed", "paths": ["sequential"], "lambda_sparse": 0.0, "budget": None}


@dataclass
class RandomStructure(StructureLearned):
    """The control for ours: a random structure of the same budget, decided at the first step and trained
    through the same fixed-structure phase (needs `budget`, e.g. `random:budget=0.002`)."""

    name: ClassVar[str] = "random"

    def fixed(self) -> dict[str, Any]:
        return {"decision": "random"}


def kept_count(model: SLAModel) -> int:
    """What an export after pruning would hold now: the open adapters and the heads (gates go)."""
    counts = model.parameter_counts()
    if model.pruned:
        return counts["trainable"]
    kept = (model.decided_gates() > 0).any(dim=0).to(model.member_params.dtype)  # (C, K)
    heads = sum(numel(p) for n, p in model.named_parameters() if "sla_heads" in n)
    return int(round(float((kept * model.member_params).sum()))) + heads


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
