"""The baselines as methods of the one loop: full fine-tuning, PEFT LoRA and PEFT prefix tuning.

Each builds a `HeadModel` (pooling + per-task linear heads) over the backbone; nothing is pruned, so what
trains is what ships. Their trained state saves as `sla_method.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sla_core.files import atomic_folder, sha256_file
from sla_core.methods.base import numel, trainable_keys, trainable_params
from sla_core.methods.head import HeadModel, default_pooling

if TYPE_CHECKING:
    from sla_core.experiment import ExperimentConfig

SET_FORMAT = "sla-method-set"
SET_VERSION = 1
SET_CONFIG = "sla_method.json"
SET_WEIGHTS = "model.safetensors"


def base_of(backbone: nn.Module) -> nn.Module:
    return backbone.base_model if hasattr(backbone, "base_model") else backbone


def attention_targets(base: nn.Module) -> list[str]:
    """LoRA's usual targets, the query and value projections, by the names this architecture uses."""
    names = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"], ["c_attn"]):
        if set(pair) <= names:
            return pair
    raise ValueError(
        f"cannot tell this backbone's query/value projections (linear layers: {sorted(names)[:12]}); "
        "name them, e.g. --methods lora:targets=q_lin+v_lin"
    )


class _Baseline:
    """What the baselines share: head model, one optimizer group, counts, export."""

    prunable: ClassVar[bool] = False
    name: ClassVar[str]
    lr: float | None

    def wrap(self, base: nn.Module) -> nn.Module:
        raise NotImplementedError

    def build(
        self, backbone: nn.Module, num_labels: dict[str, int], cfg: ExperimentConfig | None = None
    ) -> nn.Module:
        base = base_of(backbone)
        for p in base.parameters():
            p.requires_grad_(False)
        backbone_params = sum(numel(p) for p in base.parameters())
        pooling = default_pooling(base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed if cfg is not None else 0)  # heads and LoRA/prefix init
            return HeadModel(self.wrap(base), num_labels, pooling, backbone_params)

    def parameter_groups(self, model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
        lr = self.lr if self.lr is not None else cfg.train.lr
        return [{"params": trainable_params(model), "lr": lr, "weight_decay": cfg.train.weight_decay}]

    def counts(self, model: nn.Module) -> dict[str, int]:
        trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        return {"backbone": int(model.backbone_params), "trainable": trainable, "kept": trainable}

    def prune(self, model: nn.Module) -> nn.Module:
        return model

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from sla_core.io import backbone_signature

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        state = {k: state[k] for k in trainable_keys(model)}
        empty = [k for k, v in state.items() if v.numel() == 0]
        if empty:
            raise RuntimeError(f"refusing to save empty tensors {empty[:3]} (gather ZeRO-3 parameters first)")
        with atomic_folder(path) as tmp:
            save_file(state, str(tmp / SET_WEIGHTS), metadata={"format": SET_FORMAT})
            meta = {
                "format": SET_FORMAT,
                "format_version": SET_VERSION,
                "method": self.spec,
                "pruned": True,
                "backbone": backbone_signature(base_of(model.backbone), _backbone_name(model)),
                "tasks": model.tasks,
                "sha256": sha256_file(tmp / SET_WEIGHTS),
                "parameter_counts": self.counts(model),
                "extra": extra or {},
            }
            (tmp / SET_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return Path(path)


def _backbone_name(model: nn.Module) -> str:
    config = getattr(base_of(model.backbone), "config", None)
    return str(getattr(config, "name_or_path", "") or "")


def load_method_set(backbone: nn.Module, path: str | Path, meta: dict[str, Any]) -> nn.Module:
    """Rebuild a baseline's model from its saved set over a fresh `backbone` (digest checked)."""
    from sla_core.io import AdapterFileError
    from sla_core.methods import parse_method

    folder = Path(path)
    weights = folder / SET_WEIGHTS
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: not found")
    if sha256_file(weights) != meta.get("sha256"):
        raise AdapterFileError(f"{weights}: contents do not match the sha256 in {SET_CONFIG} (file changed)")
    method = parse_method(meta["method"])
    model = method.build(backbone, {t: int(n) for t, n in meta["tasks"].items()})
    state = load_file(str(weights))
    missing = sorted(set(trainable_keys(model)) - set(state))
    if missing:
        raise AdapterFileError(f"{weights}: missing tensors {missing[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


@dataclass
class FullFineTuning(_Baseline):
    """Every backbone weight trains (plus the heads)."""

    name: ClassVar[str] = "full_ft"
    lr: float | None = None

    @property
    def spec(self) -> str:
        return _spec(self.name, lr=self.lr)

    def wrap(self, base: nn.Module) -> nn.Module:
        for p in base.parameters():
            p.requires_grad_(True)
        return base


@dataclass
class LoRA(_Baseline):
    """PEFT LoRA of rank `r` (alpha = 2r unless given) on `targets` (default: query and value)."""

    name: ClassVar[str] = "lora"
    r: int = 8
    alpha: float | None = None
    targets: list[str] | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = self.targets.split("+")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora:r={self.r!r}: the rank must be an integer >= 1")

    @property
    def spec(self) -> str:
        targets = "+".join(self.targets) if self.targets else None
        return _spec(self.name, r=self.r, alpha=self.alpha, targets=targets, lr=self.lr)

    def wrap(self, base: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = self.targets or attention_targets(base)
        alpha = self.alpha if self.alpha is not None else 2 * self.r
        return get_peft_model(base, LoraConfig(r=self.r, lora_alpha=alpha, target_modules=targets))


@dataclass
class PrefixTuning(_Baseline):
    """PEFT prefix tuning with `tokens` virtual tokens per layer."""

    name: ClassVar[str] = "prefix"
    tokens: int = 20
    lr: float | None = None

    @property
    def spec(self) -> str:
        return _spec(self.name, tokens=self.tokens, lr=self.lr)

    def wrap(self, base: nn.Module) -> nn.Module:
        from peft import PrefixTuningConfig, get_peft_model

        config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.tokens)
        return get_peft_model(base, config)


def _spec(name: str, **options: Any) -> str:
    given = [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items() if v is not None
    ]
    return name + (":" + ",".join(given) if given else "")
